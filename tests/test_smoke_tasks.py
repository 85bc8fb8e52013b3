"""The synthetic smoke tasks: deterministic, shaped like their benchmarks, readable as task data."""

import csv
import json
import os

import pytest

from components.smoke.tasks import SIZES, smoke_task, SMOKE_TASK_CONFIGS
from tests.helpers import load_task


def read_tsv(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def conll_sentences(path):
    blocks = open(path, encoding="utf-8").read().split("\n\n")
    return [[line.split() for line in b.splitlines()] for b in blocks if b.strip() and not b.startswith("-DOCSTART-")]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tmp_path_factory.mktemp("assets")


def test_built_once_and_the_same_every_time(assets, tmp_path):
    first = smoke_task(str(assets), "mrpc")
    again = smoke_task(str(tmp_path), "mrpc")
    for split in SIZES:
        assert open(first[split], "rb").read() == open(again[split], "rb").read()
    written = {p: os.stat(p).st_mtime_ns for p in first.values()}
    assert smoke_task(str(assets), "mrpc") == first  # found, not rebuilt
    assert {p: os.stat(p).st_mtime_ns for p in first.values()} == written
    other_seed = smoke_task(str(tmp_path / "other"), "mrpc", seed=1)
    assert open(other_seed["train"], "rb").read() != open(first["train"], "rb").read()


def test_layouts(assets):
    sst2 = smoke_task(str(assets), "sst2")
    train, test = read_tsv(sst2["train"]), read_tsv(sst2["test"])
    assert list(train[0]) == ["sentence", "label"] and list(test[0]) == ["index", "sentence"]
    assert len(train) == SIZES["train"] and len(test) == SIZES["test"]
    assert {r["label"] for r in train} == {"0", "1"}
    mrpc = smoke_task(str(assets), "mrpc")
    assert list(read_tsv(mrpc["validation"])[0]) == ["sentence1", "sentence2", "label"]
    assert list(read_tsv(mrpc["test"])[0]) == ["index", "sentence1", "sentence2"]
    stsb = smoke_task(str(assets), "stsb")
    rows = [json.loads(line) for line in open(stsb["train"], encoding="utf-8")]
    assert len(rows) == SIZES["train"] and all(0 <= r["label"] <= 5 for r in rows)
    assert "label" not in json.loads(open(stsb["test"], encoding="utf-8").readline())
    ner = smoke_task(str(assets), "ner")
    sentences = conll_sentences(ner["test"])
    assert len(sentences) == SIZES["test"]
    tags = {line[-1] for s in sentences for line in s}
    assert {"O", "B-MOD", "I-MOD", "B-FUNC"} <= tags and all(len(line) == 2 for s in sentences for line in s)


@pytest.mark.parametrize("kind", ["sst2", "mrpc", "stsb", "ner"])
def test_loads_as_task_data(assets, tokenizer, kind):
    task, data = SMOKE_TASK_CONFIGS[kind]
    loaded = load_task({**data, "source": smoke_task(str(assets), kind)}, task, tokenizer)
    assert {s: len(d) for s, d in loaded.splits.items()} == SIZES
    assert loaded.labelled == {"train": True, "validation": True, "test": kind == "ner"}
    if kind in ("sst2", "mrpc"):
        assert loaded.label_values == [0, 1]
    if kind == "ner":
        assert loaded.label_names[0] == "O" and "I-MOD" in loaded.label_names
