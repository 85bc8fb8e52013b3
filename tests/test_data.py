"""Corpus reading, windowing, MLM masking statistics and the order of batches."""

import json

import pytest
import torch

from components.data import (
    CorpusError,
    GlobalBatchSampler,
    load_documents,
    MLMMasker,
    pad_batch,
    special_tokens_template,
    split_documents,
    step_generator,
    tokenize_windows,
)
from components.data.corpus import window_starts


def test_window_starts_cover_every_token():
    assert window_starts(0, 8, 4) == []
    assert window_starts(5, 8, 4) == [0]
    assert window_starts(8, 8, 4) == [0]
    assert window_starts(9, 8, 4) == [0, 4]
    assert window_starts(20, 8, 4) == [0, 4, 8, 12]
    for n in range(1, 40):
        covered = set()
        for s in window_starts(n, 8, 3):
            covered.update(range(s, min(s + 8, n)))
        assert covered == set(range(n))


def test_windows_carry_special_tokens_and_overlap_by_stride(tokenizer, documents):
    import datasets

    docs = datasets.Dataset.from_dict({"text": documents[:3]})
    windows = tokenize_windows(docs, tokenizer, max_length=32, stride=10)
    prefix, suffix = special_tokens_template(tokenizer)
    assert prefix == [tokenizer.cls_token_id] and suffix == [tokenizer.sep_token_id]
    first = tokenizer(documents[0], add_special_tokens=False)["input_ids"]
    expected = [prefix + first[s : s + 30] + suffix for s in window_starts(len(first), 30, 10)]
    got = windows["input_ids"][: len(expected)]
    assert got == expected
    assert all(len(w) <= 32 for w in windows["input_ids"])
    with pytest.raises(ValueError, match="stride=31 must be between 1 and 30"):
        tokenize_windows(docs, tokenizer, max_length=32, stride=31)


def test_reads_txt_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first document line one\nline two\n\nsecond document\n\n\n")
    assert load_documents(str(tmp_path / "a.txt"))["text"] == ["first document line one\nline two", "second document"]
    assert len(load_documents(str(tmp_path / "a.txt"), sample_by="line")) == 3
    with open(tmp_path / "b.jsonl", "w") as f:
        for t in ["one", "", "three"]:
            f.write(json.dumps({"body": t, "id": 1}) + "\n")
    assert load_documents(str(tmp_path / "b.jsonl"), text_column="body")["text"] == ["one", "three"]
    pq.write_table(pa.table({"text": ["x y z", "u v"]}), tmp_path / "c.parquet")
    assert load_documents(str(tmp_path / "*.parquet"))["text"] == ["x y z", "u v"]


def test_corpus_errors_name_the_problem(tmp_path):
    with pytest.raises(CorpusError, match="Corpus file not found: .*missing.txt"):
        load_documents(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    with pytest.raises(CorpusError, match="empty"):
        load_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "d.jsonl").write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(CorpusError, match=r"no column 'text' \(columns: \['content'\]\); set data.text_column"):
        load_documents(str(tmp_path / "d.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(CorpusError, match=r"Corpus .*bad.jsonl, line 2 is not valid JSON"):
        load_documents(str(tmp_path / "bad.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match="Unsupported corpus file type"):
        load_documents(str(tmp_path / "x.csv"))
    with pytest.raises(CorpusError, match="not a local file, and loading it as a Hugging Face dataset failed"):
        load_documents("no_such_dataset_anywhere")


def test_held_out_documents_are_disjoint():
    import datasets

    docs = datasets.Dataset.from_dict({"text": [f"doc {i}" for i in range(50)]})
    train, held = split_documents(docs, 0.1, seed=0)
    assert len(held) == 5 and len(train) == 45
    assert not set(train["text"]) & set(held["text"])
    assert split_documents(docs, 0.1, seed=0)[1]["text"] == held["text"]
    with pytest.raises(CorpusError, match="eval_fraction=0"):
        split_documents(docs.select([0]), 0.1, seed=0)


def masked(tokenizer, input_ids, attention_mask, seed):
    masker = MLMMasker(tokenizer)
    noise = masker.noise(*input_ids.shape, step_generator(seed, 0))
    return masker(input_ids, attention_mask, noise)


def test_masking_statistics(tokenizer):
    g = torch.Generator().manual_seed(0)
    rows, length = 400, 128
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    normal = torch.tensor([i for i in range(len(tokenizer)) if i not in set(special.tolist())])
    input_ids = normal[torch.randint(len(normal), (rows, length), generator=g)]
    input_ids[:, 0], input_ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:, 100:] = 0
    input_ids[:, 100:] = tokenizer.pad_token_id
    inputs, labels = masked(tokenizer, input_ids, attention_mask, seed=1)
    selected = labels != -100
    maskable = attention_mask.bool() & ~torch.isin(input_ids, special)
    assert not (selected & ~maskable).any(), "special tokens and padding are never masked"
    assert torch.equal(labels[selected], input_ids[selected])
    n = selected.sum().item()
    assert abs(n / maskable.sum().item() - 0.15) < 0.005
    became_mask = (inputs == tokenizer.mask_token_id) & selected
    unchanged = (inputs == input_ids) & selected
    random = selected & ~became_mask & ~unchanged
    assert abs(became_mask.sum().item() / n - 0.8) < 0.015
    assert abs(random.sum().item() / n - 0.1) < 0.015
    assert abs(unchanged.sum().item() / n - 0.1) < 0.015  # (a random draw may hit the same token)
    assert not torch.isin(inputs[random], special).any()
    assert torch.equal(inputs[~selected], input_ids[~selected])
    # deterministic for a seed, different across seeds
    assert torch.equal(masked(tokenizer, input_ids, attention_mask, seed=1)[1], labels)
    assert not torch.equal(masked(tokenizer, input_ids, attention_mask, seed=2)[1], labels)


def test_global_batches_do_not_depend_on_how_they_are_split():
    one = GlobalBatchSampler(40, micro_batch_size=8, seed=3)
    two_ranks = [GlobalBatchSampler(40, micro_batch_size=4, world_size=2, rank=r, seed=3) for r in (0, 1)]
    accumulated = GlobalBatchSampler(40, micro_batch_size=2, accumulation_steps=4, seed=3)
    for _ in range(12):  # crosses epochs (5 steps per epoch)
        whole = one.next_step()[0]
        assert [i for s in two_ranks for i in s.next_step()[0]] == whole
        assert [i for mb in accumulated.next_step() for i in mb] == whole
    assert one.epoch == 2 and sorted(GlobalBatchSampler(40, 8, seed=3).next_step()[0]) != list(range(8))


def test_sampler_resumes_where_it_stopped():
    for taken in (0, 6, 7, 9, 14):  # 7 steps per epoch: before, at and after epoch ends
        a = GlobalBatchSampler(30, 4, seed=0)
        for _ in range(taken):
            a.next_step()
        b = GlobalBatchSampler(30, 4, seed=0)
        b.seek(taken)
        assert [a.next_step() for _ in range(9)] == [b.next_step() for _ in range(9)], taken
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(3, 4)


def test_a_window_is_masked_the_same_in_any_split(tokenizer):
    from components.training.distill import step_batches

    windows = [
        {"input_ids": [tokenizer.cls_token_id] + list(range(10, 10 + n)) + [tokenizer.sep_token_id]}
        for n in range(5, 37)
    ]

    class Rows:
        def __getitem__(self, idx):
            return {"input_ids": [windows[i]["input_ids"] for i in idx]}

    masker = MLMMasker(tokenizer)

    def masks(batch_size, world, accumulation):
        out = {}
        for rank in range(world):

            def sampler(rank=rank):
                s = GlobalBatchSampler(32, batch_size, accumulation, world, rank, seed=5)
                s.next_step()  # look at the second step
                return s

            indices = sampler().next_step()
            batches = step_batches(Rows(), sampler(), masker, 1, 5, tokenizer.pad_token_id, 40)
            for mb, b in zip(indices, batches, strict=True):
                for i, window in enumerate(mb):
                    n = int(b.attention_mask[i].sum())
                    out[window] = (b.input_ids[i, :n].tolist(), b.labels[i, :n].tolist())
        return out

    reference = masks(8, 1, 1)
    assert masks(4, 2, 1) == reference
    assert masks(2, 1, 4) == reference
    assert masks(2, 2, 2) == reference


def test_pad_batch():
    out = pad_batch([[1, 2, 3], [4]], pad_token_id=0, pad_to_multiple_of=4)
    assert out["input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_smoke_tokenizer_is_reproducible(documents):
    from components.smoke import train_tokenizer

    first, second = train_tokenizer(documents, 300), train_tokenizer(documents, 300)
    assert first.get_vocab() == second.get_vocab()
    assert first.convert_ids_to_tokens(list(range(5))) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
