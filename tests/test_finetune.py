"""The fine-tuning recipe: tuning modes, every task type through `tune run`, adapter sets on one
base, resume, bad input."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from components.adapter_sets import MultiTaskModel
from components.checkpointing import load_student
from components.checkpointing.resume import load_checkpoint
from components.errors import CheckpointError, ConfigError, RunInterrupted, TaskDataError
from components.smoke_tasks import smoke_task, SMOKE_TASK_CONFIGS
from components.training.run import execute
from tests.recipe_helpers import logged, override, run_recipe, tiny_config

REPO = Path(__file__).resolve().parents[1]
TUNE = Path(sys.executable).with_name("tune")


@pytest.fixture(scope="module")
def base(tmp_path_factory, teacher_dir, corpus_file):
    """A tiny distilled student with adapters (the base every task starts from)."""
    out = tmp_path_factory.mktemp("distilled")
    run_recipe(tiny_config(out, teacher_dir, corpus_file, max_steps=4, save_every_n_steps=None))
    return out / "student"


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """The smoke tasks' files: {kind: {split: path}}."""
    root = tmp_path_factory.mktemp("tasks")
    return {kind: smoke_task(str(root), kind) for kind in ("sst2", "mrpc", "stsb", "ner")}


def finetune_config(output_dir, checkpoint_dir, files, kind="sst2", **overrides):
    task, data = SMOKE_TASK_CONFIGS[kind]
    cfg = {
        "output_dir": str(output_dir),
        "checkpoint_dir": str(checkpoint_dir),
        "seed": 0,
        "task": dict(task),
        "data": {"source": {k: str(v) for k, v in files.items()}, **data, "max_length": 48, "batch_size": 16,
                 "eval_batch_size": 64},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 2e-3, "weight_decay": 0.01},
        "max_steps": 8,
        "eval_every_n_steps": 4,
        "log_every_n_steps": 1,
        "tuning": "adapters",
    }
    return override(cfg, overrides)


def run_finetune(cfg):
    from recipes.finetune import FinetuneRecipe

    return execute(FinetuneRecipe(OmegaConf.create(cfg)))


def read_predictions(path: Path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["index", "prediction"]
    return {int(i): p for i, p in rows[1:]}


def test_adapter_tuning_changes_only_adapters_and_head(base, tasks, tmp_path):
    out = tmp_path / "run"
    recipe = run_finetune(finetune_config(out, base, tasks["sst2"]))
    before = load_student(str(base), mlm_head=False).state_dict()
    after = load_checkpoint(out / "checkpoints" / "step_00000008")["model"]
    changed = []
    for name, tensor in before.items():
        tuned = after[f"encoder.{name}"]
        if name.startswith("adapters."):
            changed.append(not torch.equal(tuned, tensor))
        else:
            assert torch.equal(tuned, tensor), f"{name} changed in adapters mode"
    assert changed and all(changed)  # every adapter tensor trained
    assert {n.split(".")[0] for n in after} == {"encoder", "head"}

    # the run saved only what trained, and names its base
    manifest = json.loads((out / "adapter_set" / "adapter_set.json").read_text())
    saved = load_file(str(out / "adapter_set" / "adapters.safetensors"))
    assert sorted(saved) == manifest["tensors"]
    assert all(n.startswith(("encoder.adapters.", "head.")) for n in saved)
    assert manifest["bytes"] < 0.25 * manifest["base_bytes"]
    assert manifest["base"]["path"] == str(base)
    trained = sum(p.numel() for p in recipe.params)
    assert trained == sum(t.numel() for t in saved.values())
    assert not (out / "model").exists()


def test_head_tuning_trains_the_head_only(base, tasks, tmp_path):
    out = tmp_path / "run"
    run_finetune(finetune_config(out, base, tasks["sst2"], tuning="head", max_steps=4))
    before = load_student(str(base), mlm_head=False).state_dict()
    after = load_checkpoint(out / "checkpoints" / "step_00000004")["model"]
    assert all(torch.equal(after[f"encoder.{n}"], t) for n, t in before.items())
    assert all(n.startswith("head.") for n in load_file(str(out / "adapter_set" / "adapters.safetensors")))


@pytest.mark.parametrize("kind", ["sst2", "mrpc", "stsb", "ner"])
def test_every_task_type_through_tune_run(kind, base, tasks, tmp_path):
    """Single sentences, pairs, regression and NER, end to end with the README's command."""
    out = tmp_path / kind
    config = tmp_path / "config.yaml"
    tuning = "full" if kind == "stsb" else "adapters"
    OmegaConf.save(OmegaConf.create(finetune_config(out, base, tasks[kind], kind, tuning=tuning)), config)
    result = subprocess.run(
        [str(TUNE), "run", "recipes/finetune.py", "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    metric = {"sst2": "accuracy", "mrpc": "accuracy", "stsb": "pearson", "ner": "f1"}[kind]
    assert results["metric"] == metric and results["best"]["step"] in (4, 8)
    assert f"Best validation {metric}" in result.stdout
    records = logged(out)
    assert f"eval/{metric}" in records[4] and f"eval/{metric}" in records[8]
    assert (out / ("model" if tuning == "full" else "adapter_set")).is_dir()
    test = read_predictions(out / "predictions" / "test.tsv")
    assert sorted(test) == list(range(200))
    values = set(test.values())
    if kind in ("sst2", "mrpc"):
        assert values <= {"0", "1"}
    elif kind == "stsb":
        assert all(isinstance(float(v), float) for v in values)
    else:
        lines = Path(tasks["ner"]["test"]).read_text().splitlines()
        words = [line.split()[0] for line in lines if line.strip() and not line.startswith("-DOCSTART-")]
        predicted = [tag for tags in test.values() for tag in tags.split(" ")]
        assert len(predicted) == len(words)  # one tag per word of the test file
        assert {t for t in predicted} <= {"O", "B-MOD", "I-MOD", "B-FUNC", "I-FUNC"}


def test_two_adapter_sets_on_one_base_reproduce_their_runs(base, tasks, tmp_path, teacher_dir, corpus_file):
    runs = {}
    for kind in ("sst2", "ner"):
        runs[kind] = tmp_path / kind
        run_finetune(finetune_config(runs[kind], base, tasks[kind], kind))
    model = MultiTaskModel(str(base))
    for kind, out in runs.items():
        model.add(kind, str(out / "adapter_set"))
    # alternate tasks: each must see its own adapters, whatever ran before
    sentences = [row["sentence"] for row in csv.DictReader(open(tasks["sst2"]["test"]), delimiter="\t")]
    sentences = sentences[:40]
    blocks = Path(tasks["ner"]["test"]).read_text().strip().split("\n\n")
    blocks = [b for b in blocks if not b.startswith("-DOCSTART-")][:40]
    words = [[line.split()[0] for line in block.splitlines()] for block in blocks]
    for _ in range(2):
        for kind, inputs in (("sst2", sentences), ("ner", words)):
            expected = read_predictions(runs[kind] / "predictions" / "test.tsv")
            got = model.predict(kind, inputs)
            if kind == "sst2":
                assert [str(g) for g in got] == [expected[i] for i in range(len(inputs))]
            else:
                assert [" ".join(g) for g in got] == [expected[i] for i in range(len(inputs))]

    # a set only goes on its own base
    other = tmp_path / "other"
    run_recipe(tiny_config(other, teacher_dir, corpus_file, max_steps=2, save_every_n_steps=None, seed=1))
    with pytest.raises(CheckpointError, match="was trained on the base .* not on"):
        MultiTaskModel(str(other / "student")).add("sst2", str(runs["sst2"] / "adapter_set"))


def test_sigterm_then_resume_reproduces_the_uninterrupted_run(base, tasks, tmp_path, monkeypatch):
    from recipes.finetune import FinetuneRecipe

    cfg = dict(max_steps=12, eval_every_n_steps=4, tuning="full")
    straight = tmp_path / "straight"
    run_finetune(finetune_config(straight, base, tasks["mrpc"], "mrpc", **cfg))

    # a scheduler's SIGTERM during step 6: the step finishes, a checkpoint is written, the run stops
    interrupted = tmp_path / "interrupted"
    step = FinetuneRecipe._train_step

    def train_step(self, batch):
        if self.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch)

    monkeypatch.setattr(FinetuneRecipe, "_train_step", train_step)
    with pytest.raises(RunInterrupted, match="Stopped by SIGTERM after step 6 of 12") as stopped:
        run_finetune(finetune_config(interrupted, base, tasks["mrpc"], "mrpc", **cfg))
    assert stopped.value.exit_code == 143
    monkeypatch.setattr(FinetuneRecipe, "_train_step", step)
    run_finetune(finetune_config(interrupted, base, tasks["mrpc"], "mrpc", **cfg, resume_from_checkpoint=True))

    a, b = logged(straight), logged(interrupted)
    assert sorted(b) == list(range(1, 13))
    for n in range(1, 13):
        assert b[n]["loss"] == pytest.approx(a[n]["loss"], rel=1e-6), n
    assert json.loads((interrupted / "results.json").read_text())["best"] == json.loads((straight / "results.json").read_text())["best"]
    assert (interrupted / "predictions" / "test.tsv").read_text() == (straight / "predictions" / "test.tsv").read_text()


# ------------------------------------------------------------------ bad input
def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_bad_task_data_names_the_file_and_the_column(base, tasks, tmp_path):
    files = dict(tasks["sst2"])
    bad_label = dict(files, validation=_write(tmp_path / "dev.tsv", "sentence\tlabel\na fine line\t7\n"))
    with pytest.raises(TaskDataError, match=r"dev\.tsv.*'label'|'label'.*dev\.tsv"):
        run_finetune(finetune_config(tmp_path / "a", base, bad_label))
    with pytest.raises(TaskDataError, match=r"train\.tsv.*'sentense'|'sentense'.*train\.tsv"):
        run_finetune(finetune_config(tmp_path / "b", base, files, **{"data.text_column": "sentense"}))
    empty = dict(files, validation=_write(tmp_path / "empty.tsv", "sentence\tlabel\n"))
    with pytest.raises(TaskDataError, match=r"empty\.tsv"):
        run_finetune(finetune_config(tmp_path / "c", base, empty))
    with pytest.raises(TaskDataError, match=r"text_pair_column.*train\.tsv.*sentence2|train\.tsv.*text_pair_column"):
        run_finetune(finetune_config(tmp_path / "d", base, tasks["mrpc"], "mrpc", **{"data.text_pair_column": None}))


def test_every_kind_of_model_and_the_ones_that_cannot_work(base, tasks, tmp_path, teacher_dir, corpus_file):
    with pytest.raises(CheckpointError, match="No model at"):
        run_finetune(finetune_config(tmp_path / "a", tmp_path, tasks["sst2"]))
    # a BERT checkpoint fine-tunes (full or head), but has no adapters to tune
    with pytest.raises(ConfigError, match="tuning=adapters but .* has no adapters"):
        run_finetune(finetune_config(tmp_path / "b", teacher_dir, tasks["sst2"]))
    run_finetune(finetune_config(tmp_path / "c", teacher_dir, tasks["sst2"], tuning="full", max_steps=4))
    assert (tmp_path / "c" / "model" / "model.safetensors").is_file()
    # an adapter-free student is written as ALBERT: it fine-tunes too, and its full model reloads
    albert = tmp_path / "albert"
    run_recipe(tiny_config(albert, teacher_dir, corpus_file, max_steps=2, save_every_n_steps=None,
                           **{"student.adapter_placement": None}))
    assert json.loads((albert / "student" / "config.json").read_text())["model_type"] == "albert"
    recipe = run_finetune(finetune_config(tmp_path / "d", albert / "student", tasks["sst2"], tuning="full", max_steps=4))
    from components.checkpointing.tasks import load_task_model

    model, task = load_task_model(str(tmp_path / "d" / "model"))
    assert task["label_values"] == [0, 1] and task["metric"] == "accuracy"
    batch = recipe.tokenizer(["a sentence to classify"], return_tensors="pt")
    recipe.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(batch["input_ids"], batch["attention_mask"]), recipe.model(batch["input_ids"], batch["attention_mask"]))


def test_bad_input_through_tune_run_is_one_line(base, tasks, tmp_path):
    config = tmp_path / "config.yaml"
    OmegaConf.save(OmegaConf.create(finetune_config(tmp_path / "out", base, tasks["sst2"], **{"data.label_column": "lable"})), config)
    result = subprocess.run([str(TUNE), "run", "recipes/finetune.py", "--config", str(config)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "'lable'" in last and "train.tsv" in last
