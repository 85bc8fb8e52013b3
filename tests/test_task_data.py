"""Downstream-task data: every file type, labels, NER alignment, batches, and every error."""

import json

import datasets
import pytest
import torch

from components.data.task_data import (
    collate_task_batch,
    num_batches,
    per_word,
    task_batches,
    TaskDataError,
)
from tests.helpers import load_task

SENTENCES = [
    "Return the value of the named attribute.",
    'He said "stop here, please" twice.',
    "The buffer is flushed when the file closes.",
    "A new thread is started for every request.",
]


def write_tsv(path, header, rows):
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header] + rows) + "\n", encoding="utf-8")
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_conll(path, sentences, tagged=True):
    lines = ["-DOCSTART- -X- O O", ""]
    for words, tags in sentences:
        lines += [f"{w} NN {t}" if tagged else w for w, t in zip(words, tags)] + [""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def single(**overrides):
    """A classification task config reading one sentence per row."""
    return {"type": "classification", "input": "single", **overrides}


def expected_ids(tokenizer, *texts):
    return tokenizer(*texts, truncation=True, max_length=128)["input_ids"]


# ------------------------------------------------------------------------------------ file types


def test_tsv_keeps_quotes_and_labels_are_sorted_numerically(tmp_path, tokenizer):
    train = write_tsv(
        tmp_path / "train.tsv", ["sentence", "label"], [[s, label] for s, label in zip(SENTENCES, [10, 2, 10, 2])]
    )
    dev = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], [[SENTENCES[1], 2]])
    test = write_tsv(tmp_path / "test.tsv", ["index", "sentence"], [[0, SENTENCES[1]], [1, "null"]])
    task = load_task({"source": {"train": train, "validation": dev, "test": test}}, single(), tokenizer)
    assert task.label_names == ["2", "10"] and task.label_values == [2, 10]  # 2 < 10, not "10" < "2"
    rows = task.splits["train"]
    assert rows["labels"] == [1, 0, 1, 0]
    assert rows["index"] == [0, 1, 2, 3]
    # the unbalanced quote is text, not a CSV quote
    assert rows["input_ids"][1] == expected_ids(tokenizer, SENTENCES[1])
    assert task.labelled == {"train": True, "validation": True, "test": False}
    assert "labels" not in task.splits["test"].column_names
    assert task.splits["test"]["input_ids"][1] == expected_ids(tokenizer, "null")  # not a missing value
    assert task.sources["validation"] == dev


def test_csv_jsonl_and_parquet_read_alike(tmp_path, tokenizer):
    import pandas as pd

    labels = ["pos", "neg", "neg", "pos"]
    frame = pd.DataFrame({"text": SENTENCES, "y": labels})
    frame.to_csv(tmp_path / "a.csv", index=False)
    frame.to_parquet(tmp_path / "a.parquet")
    write_jsonl(tmp_path / "a.jsonl", frame.to_dict("records"))
    data = {"text_column": "text", "label_column": "y"}
    for ext in ("csv", "jsonl", "parquet"):
        path = str(tmp_path / f"a.{ext}")
        task = load_task({**data, "source": {"train": path, "validation": path}}, single(), tokenizer)
        assert task.label_names == ["neg", "pos"] and task.label_values == ["neg", "pos"]
        assert task.splits["train"]["labels"] == [1, 0, 0, 1], ext
        assert task.splits["validation"]["input_ids"] == expected_ids(tokenizer, SENTENCES), ext
        assert "test" not in task.splits


def test_task_labels_fix_order_and_keep_the_datas_values(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "a.jsonl", [{"sentence": s, "label": label} for s, label in zip(SENTENCES, [0, 1, 1, 0])]
    )
    task = load_task({"source": {"train": path, "validation": path}}, single(labels=["1", "0", "2"]), tokenizer)
    assert task.label_names == ["1", "0", "2"]
    assert task.label_values == [1, 0, "2"]  # "2" is never seen in the data
    assert task.splits["train"]["labels"] == [1, 0, 0, 1]


@pytest.fixture(scope="module")
def glue_like(tmp_path_factory):
    """A save_to_disk folder shaped like GLUE SST-2 on the Hub: ClassLabel labels, test labels -1."""
    features = datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "positive"]),
            "idx": datasets.Value("int32"),
        }
    )

    def split(labels):
        return datasets.Dataset.from_dict(
            {"sentence": SENTENCES[: len(labels)], "label": labels, "idx": list(range(len(labels)))}, features=features
        )

    folder = tmp_path_factory.mktemp("glue") / "sst2"
    glue = datasets.DatasetDict({"train": split([0, 1, 1, 0]), "dev": split([1, 0]), "test": split([-1, -1, -1])})
    glue.save_to_disk(str(folder))
    return str(folder)


def test_save_to_disk_folder_with_classlabels(glue_like, tokenizer):
    data = {"source": glue_like, "splits": {"train": "train", "validation": "dev", "test": "test"}}
    task = load_task(data, single(), tokenizer)
    assert task.label_names == ["negative", "positive"] and task.label_values == [0, 1]
    assert task.splits["validation"]["labels"] == [1, 0]
    assert task.labelled == {"train": True, "validation": True, "test": False}
    assert len(task.splits["test"]) == 3 and "labels" not in task.splits["test"].column_names
    assert "dev" in task.sources["validation"] and glue_like in task.sources["validation"]
    # task.labels matches ClassLabel names and keeps printing the data's ids
    task = load_task(data, single(labels=["positive", "negative"]), tokenizer)
    assert task.label_values == [1, 0] and task.splits["train"]["labels"] == [1, 0, 0, 1]


def test_a_source_without_a_test_split_has_no_test(glue_like, tokenizer):
    data = {"source": glue_like, "splits": {"train": "train", "validation": "dev"}}
    assert set(load_task(data, single(), tokenizer).splits) == {"train", "validation"}


def test_pairs_carry_both_segments(tmp_path, tokenizer):
    rows = [
        {"s1": a, "s2": b, "label": i % 2} for i, (a, b) in enumerate(zip(SENTENCES, SENTENCES[1:] + SENTENCES[:1]))
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    data = {"source": {"train": path, "validation": path}, "text_column": "s1", "text_pair_column": "s2"}
    task = load_task(data, single(input="pair"), tokenizer)
    row = task.splits["train"][0]
    assert row["input_ids"] == tokenizer(SENTENCES[0], SENTENCES[1])["input_ids"]
    second = len(tokenizer(SENTENCES[1], add_special_tokens=False)["input_ids"]) + 1  # + [SEP]
    assert row["token_type_ids"] == [0] * (len(row["input_ids"]) - second) + [1] * second


def test_regression_reads_floats_and_minus_one_test_labels_mean_unlabelled(tmp_path, tokenizer):
    rows = [{"sentence": s, "label": label} for s, label in zip(SENTENCES, [0, 2.5, 5, 1])]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", [dict(r, label=-1.0) for r in rows])
    task = load_task({"source": {"train": train, "validation": train, "test": test}}, {"type": "regression"}, tokenizer)
    assert task.label_names is None and task.label_values is None and task.num_labels == 1
    assert task.splits["train"]["labels"] == [0.0, 2.5, 5.0, 1.0]
    assert task.labelled["test"] is False
    batch = next(task_batches(task.splits["train"], 4, 0, 8, False, 0, 0))
    assert batch["labels"].dtype == torch.float32


# ------------------------------------------------------------------------------------------- NER


def multi_piece_words(tokenizer, words):
    return [w for w in words if len(tokenizer.tokenize(w)) > 1]


def test_ner_labels_sit_on_the_first_piece_of_each_word(tmp_path, tokenizer):
    words = "The socket module wraps sockets of the operating system".split()
    assert len(multi_piece_words(tokenizer, words)) >= 2, "the example needs words of several pieces"
    tags = ["O", "B-MOD", "O", "O", "O", "O", "O", "B-SYS", "I-SYS"]
    other = (["Use", "json", "here"], ["O", "B-MOD", "O"])
    train = write_conll(tmp_path / "train.conll", [(words, tags), other])
    test = write_conll(tmp_path / "test.txt", [(words, tags)], tagged=False)
    task = load_task(
        {"source": {"train": train, "validation": train, "test": test}}, {"type": "token_classification"}, tokenizer
    )
    assert task.label_names == ["O", "B-MOD", "B-SYS", "I-SYS"]  # "O" first, then sorted
    assert len(task.splits["train"]) == 2  # -DOCSTART- is not a sentence
    row = task.splits["train"][0]
    encoded = tokenizer(words, is_split_into_words=True)
    assert row["input_ids"] == encoded["input_ids"]
    word_ids = encoded.word_ids()
    for position, word in enumerate(word_ids):
        first = word is not None and (position == 0 or word_ids[position - 1] != word)
        assert row["word_starts"][position] == int(first)
        assert row["labels"][position] == (task.label_names.index(tags[word]) if first else -100)
    assert row["num_words"] == len(words) == sum(row["word_starts"])
    assert task.labelled["test"] is False
    unlabelled = task.splits["test"][0]
    assert "labels" not in unlabelled and unlabelled["word_starts"] == row["word_starts"]
    batch = collate_task_batch([row, task.splits["train"][1]], tokenizer.pad_token_id)
    words_per_row = per_word(batch["labels"], batch["word_starts"])
    assert [[task.label_names[i] for i in r] for r in words_per_row] == [tags, other[1]]


def test_ner_truncation_keeps_num_words(tmp_path, tokenizer):
    words = ["the"] * 40
    assert len(tokenizer.tokenize("the")) == 1
    path = write_conll(tmp_path / "long.conll", [(words, ["O"] * 40)])
    task = load_task(
        {"source": {"train": path, "validation": path}, "max_length": 12}, {"type": "token_classification"}, tokenizer
    )
    row = task.splits["train"][0]
    assert len(row["input_ids"]) == 12 and row["num_words"] == 40 and sum(row["word_starts"]) == 10


def test_ner_from_a_save_to_disk_folder_with_classlabel_tags(tmp_path, tokenizer):
    tags = datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER"]))
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")), "ner_tags": tags})
    ds = datasets.Dataset.from_dict(
        {"tokens": [["Ada", "Lovelace", "wrote"]], "ner_tags": [[1, 2, 0]]}, features=features
    )
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "conll"))
    task = load_task({"source": str(tmp_path / "conll")}, {"type": "token_classification"}, tokenizer)
    assert task.label_names == ["O", "B-PER", "I-PER"] and task.label_values == [0, 1, 2]
    row = task.splits["train"][0]
    assert [t for t in row["labels"] if t != -100] == [1, 2, 0]


# --------------------------------------------------------------------------------------- batches


def test_collate_pads_to_a_multiple():
    rows = [
        {"input_ids": [2, 5, 6, 3], "token_type_ids": [0, 0, 0, 0], "labels": 1, "index": 7},
        {"input_ids": [2, 9, 9, 9, 9, 9, 9, 9, 9, 3], "token_type_ids": [0] * 5 + [1] * 5, "labels": 0, "index": 2},
    ]
    batch = collate_task_batch(rows, pad_token_id=0, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0].tolist() == [2, 5, 6, 3] + [0] * 12
    assert batch["attention_mask"].sum(1).tolist() == [4, 10]
    assert batch["token_type_ids"][1].tolist() == [0] * 5 + [1] * 5 + [0] * 6
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    assert batch["index"].tolist() == [7, 2]
    ner = collate_task_batch(
        [{"input_ids": [2, 5, 3], "labels": [-100, 1, -100], "word_starts": [0, 1, 0], "num_words": 1, "index": 0}],
        0,
        4,
    )
    assert ner["labels"].tolist() == [[-100, 1, -100, -100]]
    assert ner["word_starts"].tolist() == [[0, 1, 0, 0]] and ner["num_words"].tolist() == [1]


def test_shuffled_order_depends_on_seed_and_epoch_only_and_resumes_at_start():
    ds = datasets.Dataset.from_dict(
        {"input_ids": [[2, i, 3] for i in range(10)], "labels": list(range(10)), "index": list(range(10))}
    )
    assert num_batches(ds, 3) == 4

    def order(**kw):
        args = dict(batch_size=3, pad_token_id=0, pad_to_multiple_of=1, shuffle=True, seed=1, epoch=0)
        return [b["index"].tolist() for b in task_batches(ds, **{**args, **kw})]

    first = order()
    assert first == order() and sorted(sum(first, [])) == list(range(10))
    assert [len(b) for b in first] == [3, 3, 3, 1]
    assert order(epoch=1) != first and order(seed=2) != first
    assert order(start=2) == first[2:]
    assert order(shuffle=False) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


# ---------------------------------------------------------------------------------------- errors


@pytest.fixture()
def files(tmp_path):
    train = write_tsv(
        tmp_path / "train.tsv", ["sentence", "label"], [[s, label] for s, label in zip(SENTENCES, "ab" * 2)]
    )
    dev = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], [[SENTENCES[0], "a"], [SENTENCES[1], "c"]])
    return {"train": train, "validation": dev}


def error(tokenizer, data, task=None):
    with pytest.raises(TaskDataError) as raised:
        load_task(data, task or single(), tokenizer)
    return str(raised.value)


def test_unknown_label_names_value_column_file_and_label_set(files, tokenizer):
    message = error(tokenizer, {"source": files})
    assert "'c'" in message and "'label'" in message and files["validation"] in message and "['a', 'b']" in message
    assert "row 1" in message


def test_missing_column_lists_columns_and_suggests(files, tokenizer):
    message = error(tokenizer, {"source": files, "text_column": "sentense"})
    assert files["train"] in message and "'sentense'" in message and "['sentence', 'label']" in message
    assert "did you mean 'sentence'" in message
    message = error(tokenizer, {"source": files, "label_column": "labels"})
    assert "'labels'" in message and "data.label_column" in message


def test_empty_split(files, tmp_path, tokenizer):
    empty = write_tsv(tmp_path / "empty.tsv", ["sentence", "label"], [])
    message = error(tokenizer, {"source": {**files, "validation": empty}})
    assert empty in message and "empty" in message and "'sentence'" in message


def test_pair_input_needs_a_pair_column_and_single_refuses_one(files, tokenizer):
    message = error(tokenizer, {"source": files}, single(input="pair"))
    assert "text_pair_column" in message and files["train"] in message and "['sentence', 'label']" in message
    message = error(tokenizer, {"source": files, "text_pair_column": "label"})
    assert "'label'" in message and "single" in message and files["train"] in message


def test_missing_split_file_and_type(files, glue_like, tmp_path, tokenizer):
    message = error(tokenizer, {"source": glue_like, "splits": {"train": "train", "validation": "validation"}})
    assert (
        glue_like in message
        and "'validation'" in message
        and "data.splits.validation" in message
        and "'dev'" in message
    )
    splits = {"train": "train", "validation": "dev", "test": "test_matched"}
    message = error(tokenizer, {"source": glue_like, "splits": splits})
    assert "'test_matched'" in message
    assert "'validation'" in error(tokenizer, {"source": {"train": files["train"]}})
    missing = str(tmp_path / "nope.tsv")
    assert missing in error(tokenizer, {"source": {**files, "validation": missing}})
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    message = error(tokenizer, {"source": {**files, "validation": str(odd)}})
    assert str(odd) in message and "Unsupported" in message
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    assert str(broken) in error(tokenizer, {"source": {**files, "validation": str(broken)}})
    assert "./no/such/folder" in error(tokenizer, {"source": "./no/such/folder"})
    assert "mapping of splits to files" in error(tokenizer, {"source": files["train"]})


def test_ner_needs_a_fast_tokenizer(tmp_path):
    class SlowTokenizer:
        is_fast = False

    path = write_conll(tmp_path / "a.conll", [(["Use", "json"], ["O", "B-MOD"])])
    message = error(SlowTokenizer(), {"source": {"train": path, "validation": path}}, {"type": "token_classification"})
    assert "fast tokenizer" in message and "SlowTokenizer" in message


def test_bad_values_name_row_and_column(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "r.jsonl", [{"sentence": "fine", "label": "1.5"}, {"sentence": "x", "label": "high"}])
    message = error(tokenizer, {"source": {"train": path, "validation": path}}, {"type": "regression"})
    assert path in message and "'high'" in message and "'label'" in message and "row 1" in message
    path = write_jsonl(tmp_path / "t.jsonl", [{"sentence": "fine", "label": 1.5}, {"sentence": None, "label": 2.0}])
    message = error(tokenizer, {"source": {"train": path, "validation": path}}, {"type": "regression"})
    assert path in message and "'sentence'" in message and "row 1" in message
    ner = write_jsonl(tmp_path / "ner.jsonl", [{"tokens": ["a", "b"], "ner_tags": ["O"]}])
    message = error(tokenizer, {"source": {"train": ner, "validation": ner}}, {"type": "token_classification"})
    assert ner in message and "'tokens'" in message and "'ner_tags'" in message
    tsv = write_tsv(tmp_path / "x.tsv", ["tokens", "ner_tags"], [["a", "O"]])
    assert tsv in error(tokenizer, {"source": {"train": tsv, "validation": tsv}}, {"type": "token_classification"})
