"""The corpus store (one flat memory-mapped token array per split), the one-giant-document
guard, and the fingerprints that keep a resume on the data and teacher it started with."""

import json
import os
import shutil

import datasets
import pytest

from components.data import load_documents, tokenize_windows
from components.data.corpus import special_tokens_template, window_starts
from components.errors import CheckpointError
from tests.recipe_helpers import logged, run_recipe, tiny_config


def reference_windows(tokenizer, texts, max_length, stride):
    """The windows as they were built before the store: one token list per window."""
    prefix, suffix = special_tokens_template(tokenizer)
    body = max_length - len(prefix) - len(suffix)
    out = []
    for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        out += [prefix + ids[s : s + body] + suffix for s in window_starts(len(ids), body, stride)]
    return out


def test_store_holds_each_token_once_and_reads_back_every_window(tokenizer, documents, tmp_path):
    docs = datasets.Dataset.from_dict({"text": documents})
    windows = tokenize_windows(docs, tokenizer, max_length=32, stride=8, cache_dir=tmp_path)
    expected = reference_windows(tokenizer, documents, 32, 8)
    assert windows["input_ids"] == expected
    assert windows[[3, 0, len(expected) - 1]]["input_ids"] == [expected[3], expected[0], expected[-1]]
    assert windows.select(range(5, 9))[[1, 2]]["input_ids"] == expected[6:8]
    # uint16 tokens (the vocabulary fits) + 16 bytes per window: 2 + 16/8 = 4 bytes per token
    meta = windows.meta
    assert meta["dtype"] == "uint16"
    on_disk = sum(p.stat().st_size for p in windows.folder.iterdir())
    tokens = meta["num_tokens"]
    assert tokens == sum(len(ids) for ids in tokenizer(documents, add_special_tokens=False)["input_ids"])
    assert on_disk - len(json.dumps(meta)) - 1 == 2 * tokens + 16 * len(expected)
    assert on_disk / tokens <= 4.01


def test_store_is_built_once_and_reused(tokenizer, documents, tmp_path, monkeypatch):
    docs = datasets.Dataset.from_dict({"text": documents[:5]})
    first = tokenize_windows(docs, tokenizer, max_length=32, stride=16, cache_dir=tmp_path)
    stamp = os.stat(first.folder / "tokens.bin").st_mtime_ns
    import components.data.store as store

    monkeypatch.setattr(store, "DOCS_PER_BATCH", None)  # a rebuild would fail
    again = tokenize_windows(docs, tokenizer, max_length=32, stride=16, cache_dir=tmp_path)
    assert again.folder == first.folder and os.stat(again.folder / "tokens.bin").st_mtime_ns == stamp
    monkeypatch.undo()
    # other window settings are another store, not a stale reuse
    assert tokenize_windows(docs, tokenizer, max_length=32, stride=8, cache_dir=tmp_path).folder != first.folder


def test_large_vocabularies_are_stored_as_int32(tokenizer, documents, tmp_path):
    class Wide:  # the same tokenizer claiming 70k entries
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return 70_000

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    docs = datasets.Dataset.from_dict({"text": documents[:4]})
    windows = tokenize_windows(docs, Wide(tokenizer), max_length=32, stride=16, cache_dir=tmp_path)
    assert windows.meta["dtype"] == "int32"
    assert windows["input_ids"] == reference_windows(tokenizer, documents[:4], 32, 16)


def test_an_interrupted_build_leaves_nothing_behind(tokenizer, documents, tmp_path):
    docs = datasets.Dataset.from_dict({"text": documents[:5]})

    def broken_iter(batch_size):
        yield {"text": documents[:1]}
        raise KeyboardInterrupt

    docs.iter = broken_iter
    with pytest.raises(KeyboardInterrupt):
        tokenize_windows(docs, tokenizer, max_length=32, stride=16, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_file_without_blank_lines_is_read_by_line(tmp_path, caplog):
    lines = [f"sentence number {i} says something about the weather today." for i in range(20_000)]
    text = "\n".join(lines) + "\n"
    assert len(text.encode()) > (1 << 20)
    (tmp_path / "lines.txt").write_text(text)
    with caplog.at_level("WARNING"):
        docs = load_documents(str(tmp_path / "lines.txt"))  # sample_by defaults to paragraph
    assert len(docs) == 20_000 and docs[7]["text"] == lines[7]
    assert "lines.txt has no blank line in its first 1 MiB" in caplog.text and "sample_by=line" in caplog.text
    # paragraphs stay paragraphs when there are blank lines
    (tmp_path / "paragraphs.txt").write_text("\n\n".join(lines[:30_000]) + "\n")
    caplog.clear()
    assert len(load_documents(str(tmp_path / "paragraphs.txt"))) == 20_000
    assert "blank line" not in caplog.text


# ---------------------------------------------------------------- fingerprints on resume


def _copy_corpus(corpus_file, folder):
    folder.mkdir()
    shutil.copy(corpus_file, folder / "corpus.jsonl")
    return folder / "corpus.jsonl"


def test_a_resume_on_a_changed_corpus_is_refused(tmp_path, teacher_dir, corpus_file):
    corpus = _copy_corpus(corpus_file, tmp_path / "data")
    out = tmp_path / "run"
    run_recipe(tiny_config(out, teacher_dir, corpus, max_steps=6, save_every_n_steps=3))
    shutil.rmtree(out / "student")  # as if stopped after the step-6 checkpoint
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with open(corpus, "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "a document added after the run began"}) + "\n")
    cfg = tiny_config(out, teacher_dir, corpus, max_steps=9, save_every_n_steps=3, resume_from_checkpoint=True)
    with pytest.raises(
        CheckpointError, match=r"another data: corpus.jsonl changed size .*allow_changes_on_resume=\[data\]"
    ):
        run_recipe(cfg)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == {
        p: t for p, t in before.items() if p.name != ".lock"
    }
    # accepted on purpose: the run continues
    cfg["allow_changes_on_resume"] = ["data"]
    run_recipe(cfg)
    assert max(logged(out)) == 9


def test_moving_the_corpus_is_not_changing_it(tmp_path, teacher_dir, corpus_file):
    corpus = _copy_corpus(corpus_file, tmp_path / "data")
    out = tmp_path / "run"
    run_recipe(tiny_config(out, teacher_dir, corpus, max_steps=3, save_every_n_steps=3))
    moved = tmp_path / "elsewhere"
    shutil.move(corpus.parent, moved)
    run_recipe(tiny_config(out, teacher_dir, moved / "corpus.jsonl", max_steps=6, resume_from_checkpoint=True))
    assert max(logged(out)) == 6


def test_epochs_keep_their_schedule_when_an_accepted_change_moves_the_window_count(tmp_path, teacher_dir, documents):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[:3]))
    out = tmp_path / "run"
    overrides = {"data.stride": 30, "data.eval_fraction": 0.0, "keep_last_n_checkpoints": 0}
    cfg = tiny_config(out, teacher_dir, corpus, max_steps=None, epochs=1, save_every_n_steps=2, **overrides)
    total = run_recipe(cfg).max_steps
    assert total >= 4
    lrs = {step: r["lr"] for step, r in logged(out).items() if "lr" in r}
    # drop the end of the run, as if killed after the checkpoint of step 2
    for path in (out / "checkpoints").iterdir():
        if path.name != "step_00000002":
            shutil.rmtree(path)
    shutil.rmtree(out / "student")
    with open(corpus, "a", encoding="utf-8") as f:  # twice the windows per epoch
        f.write("".join(json.dumps({"text": d}) + "\n" for d in documents[:3]))
    resumed = run_recipe({**cfg, "resume_from_checkpoint": True, "allow_changes_on_resume": ["data"]})
    assert resumed.max_steps == total and resumed.sampler.steps_per_epoch > total
    assert {step: r["lr"] for step, r in logged(out).items() if "lr" in r} == pytest.approx(lrs)


def test_a_resume_with_a_changed_teacher_is_refused(tmp_path, teacher_dir, corpus_file):
    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    out = tmp_path / "run"
    run_recipe(tiny_config(out, teacher, corpus_file, max_steps=3, save_every_n_steps=3))
    weights = load_file(teacher / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01  # same size, other values: a retrained teacher
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    cfg = tiny_config(out, teacher, corpus_file, max_steps=6, resume_from_checkpoint=True)
    with pytest.raises(CheckpointError, match=r"another teacher: model.safetensors changed content"):
        run_recipe(cfg)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000003"]


def test_a_resume_with_a_changed_tokenizer_is_refused(tmp_path, teacher_dir, corpus_file):
    """The tokenizer decides the windows: its files are part of the teacher's fingerprint."""
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    out = tmp_path / "run"
    run_recipe(tiny_config(out, teacher, corpus_file, max_steps=3, save_every_n_steps=3))
    settings = json.loads((teacher / "tokenizer_config.json").read_text())
    settings["do_lower_case"] = not settings.get("do_lower_case", True)
    (teacher / "tokenizer_config.json").write_text(json.dumps(settings))
    before = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    cfg = tiny_config(out, teacher, corpus_file, max_steps=6, resume_from_checkpoint=True)
    with pytest.raises(CheckpointError, match=r"another teacher: tokenizer_config.json changed"):
        run_recipe(cfg)
    assert {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------- content, not paths or times


def _rewrite_keeping_mtime(path, text):
    """Other content of the same size, the modification time put back (``cp -p``, ``rsync -t``)."""
    stat = path.stat()
    assert len(text.encode()) == stat.st_size
    path.write_text(text)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_mtime_ns == stat.st_mtime_ns


def test_a_corpus_rewritten_with_its_mtime_kept_is_another_corpus(tmp_path, tokenizer):
    from components.data import data_fingerprint

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the first text says one thing\n\nand then a second paragraph\n")
    docs = load_documents(str(corpus))
    store = tokenize_windows(docs, tokenizer, max_length=16, stride=8)
    fingerprint = data_fingerprint(str(corpus), docs)
    _rewrite_keeping_mtime(corpus, "the other text says one thing\n\nand then a second paragraph\n")
    again = load_documents(str(corpus))
    assert again["text"][0] == "the other text says one thing"  # not the cached documents
    assert tokenize_windows(again, tokenizer, max_length=16, stride=8).folder != store.folder
    assert data_fingerprint(str(corpus), again) != fingerprint


def test_digests_cover_every_byte_and_are_cached_per_file_version(tmp_path, monkeypatch):
    import time

    import components.fingerprint as fp

    monkeypatch.setenv("RECURSIVE_DISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fp, "RACY_NS", 0)  # cache even a file written a moment ago
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:  # bigger than the 64 MiB the old sampled hash read whole
        f.truncate(65 << 20)
    digest = fp.file_digest(big)
    (record,) = (tmp_path / "cache" / "digests").iterdir()
    record.write_text(record.read_text().replace(digest, "0" * 64))
    assert fp.file_digest(big) == "0" * 64  # the cached digest is used: the file is not read again

    time.sleep(0.05)  # past a tick of the kernel's coarse clock, which stamps ctime
    stat = big.stat()
    with open(big, "r+b") as f:  # one byte, between where the old hash took its samples
        f.seek((65 << 20) // 30)
        f.write(b"x")
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = fp.file_digest(big)
    assert changed not in (digest, "0" * 64)
    import hashlib

    assert changed == hashlib.sha256(big.read_bytes()).hexdigest()


def test_blank_lines_holding_spaces_or_carriage_returns_end_paragraphs(tmp_path, caplog):
    """The reader and the one-giant-document guard agree on what a blank line is."""
    lines = [f"sentence number {i} says something about the weather today." for i in range(20_000)]
    (tmp_path / "spaces.txt").write_text("\n \t\n".join(lines) + "\n")
    (tmp_path / "crlf.txt").write_bytes(("\r\n\r\n".join(lines[:50]) + "\r\n").encode())
    with caplog.at_level("WARNING"):
        spaced = load_documents(str(tmp_path / "spaces.txt"))
        crlf = load_documents(str(tmp_path / "crlf.txt"))
    assert len(spaced) == 20_000 and spaced[7]["text"] == lines[7]
    assert crlf["text"] == lines[:50]
    assert "blank line" not in caplog.text  # neither file is mistaken for one giant document
