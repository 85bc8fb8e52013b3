"""The fine-tuning recipe: tuning modes, every task type through the recipe's main (and one
through `tune run`), adapter sets on one base, resume, bad input."""

import csv
import itertools
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from components.checkpointing import load_student
from components.checkpointing.resume import load_checkpoint
from components.errors import CheckpointError, RunInterrupted, TaskDataError
from components.inference import MultiTaskModel
from components.smoke.tasks import smoke_task, SMOKE_TASK_CONFIGS
from components.training.run import execute
from tests.helpers import tune_run
from tests.recipe_helpers import logged, override, run_recipe, tiny_config


@pytest.fixture(scope="module")
def base(distilled_student):
    """A tiny distilled student with adapters (the base every task starts from): the session's
    shared one (conftest's distilled_run: 4 steps, dropout 0.1). Read only."""
    return distilled_student


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
        "data": {
            "source": {k: str(v) for k, v in files.items()},
            **data,
            "max_length": 48,
            "batch_size": 16,
            "eval_batch_size": 64,
        },
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


def test_adapter_tuning_changes_only_adapters_and_head(base, tasks, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="finetune"):
        recipe = run_finetune(finetune_config(out, base, tasks["sst2"]))
    assert "has minialbert adapters of its own (reduction factor 4): tuning those" in caplog.text
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
    assert "adds_adapters" not in manifest["base"]  # the base's own adapters, not fresh ones
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


def _task_config_file(kind, base, tasks, tmp_path):
    """(output_dir, config file) of a fine-tuning run on the smoke task ``kind``."""
    out = tmp_path / kind
    config = tmp_path / "config.yaml"
    tuning = "full" if kind == "stsb" else "adapters"
    OmegaConf.save(OmegaConf.create(finetune_config(out, base, tasks[kind], kind, tuning=tuning)), config)
    return out, config


@pytest.mark.parametrize("kind", ["sst2", "mrpc", "stsb", "ner"])
def test_every_task_type_through_the_recipes_main(kind, base, tasks, tmp_path, run_main):
    """Single sentences, pairs, regression and NER, end to end with the README's command line
    (``recipe_main`` in this process: test_a_task_through_tune_run launches it)."""
    out, config = _task_config_file(kind, base, tasks, tmp_path)
    result = run_main("finetune", "--config", config)
    assert result.code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_task_run(kind, out, tasks, result.log)


@pytest.mark.slow  # a tune run launch: the command line and the import hook
def test_a_task_through_tune_run(base, tasks, tmp_path):
    out, config = _task_config_file("sst2", base, tasks, tmp_path)
    result = tune_run("finetune", "--config", config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_task_run("sst2", out, tasks, result.stdout)


def check_task_run(kind, out, tasks, log):
    """What a finished run of ``_task_config_file`` wrote and logged."""
    tuning = "full" if kind == "stsb" else "adapters"
    results = json.loads((out / "results.json").read_text())
    metric = {"sst2": "accuracy", "mrpc": "accuracy", "stsb": "pearson", "ner": "f1"}[kind]
    assert results["metric"] == metric and results["best"]["step"] in (4, 8)
    assert f"Best validation {metric}" in log
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


def test_adapter_sets_on_one_base_reproduce_their_runs_in_any_order(base, tasks, tmp_path, teacher_dir, corpus_file):
    """One base, a head-only set and two adapter sets, added and used in every order: each task
    predicts exactly what its own fine-tuning run wrote (same batches, same arithmetic), so a
    head-only task runs on the base's own adapters, whatever task ran before it."""
    # regression predictions are written with 6 digits: any change of adapters shows
    runs = {
        "stsb_head": ("stsb", "head"),  # the base's adapters, a new head
        "stsb": ("stsb", "adapters"),
        "ner": ("ner", "adapters"),
    }
    for name, (kind, tuning) in runs.items():
        run_finetune(finetune_config(tmp_path / name, base, tasks[kind], kind, tuning=tuning))
    pairs = [(row["sentence1"], row["sentence2"]) for row in map(json.loads, open(tasks["stsb"]["test"]))]
    blocks = Path(tasks["ner"]["test"]).read_text().strip().split("\n\n")
    words = [[line.split()[0] for line in block.splitlines()] for block in blocks if not block.startswith("-DOCSTART-")]
    inputs = {"stsb": pairs[:64], "ner": words[:64]}  # the runs' first batch
    expected = {}
    for name, (kind, _) in runs.items():
        written = read_predictions(tmp_path / name / "predictions" / "test.tsv")
        expected[name] = [written[i] for i in range(len(inputs[kind]))]
    assert expected["stsb_head"] != expected["stsb"]  # the check can tell the two stsb tasks apart

    for added in itertools.permutations(runs):
        model = MultiTaskModel(str(base))
        for name in added:
            model.add(name, str(tmp_path / name / "adapter_set"))
        a, b, c = added
        for name in (a, b, c, a, c, b, a):  # every task after every other
            kind = runs[name][0]
            got = model.predict(name, inputs[kind], batch_size=64)  # the runs' eval_batch_size: the same batches
            got = [" ".join(g) if kind == "ner" else f"{g:.6g}" for g in got]
            assert got == expected[name], (added, name)

    # a set only goes on its own base
    other = tmp_path / "other"
    run_recipe(tiny_config(other, teacher_dir, corpus_file, max_steps=2, save_every_n_steps=None, seed=1))
    with pytest.raises(CheckpointError, match="was trained on the base .* not on"):
        MultiTaskModel(str(other / "student")).add("stsb", str(tmp_path / "stsb" / "adapter_set"))


def test_an_adapter_set_holds_only_adapters_and_a_head_of_its_own_base(base, tasks, tmp_path):
    """A set that would overwrite shared base weights is refused, naming the key and the file;
    a head-only set is refused on a base whose adapters differ (its fingerprint covers them)."""
    out = tmp_path / "head"
    run_finetune(finetune_config(out, base, tasks["sst2"], tuning="head", max_steps=2))
    folder = out / "adapter_set"
    weights = folder / "adapters.safetensors"
    original = weights.read_bytes()
    tensors = load_file(str(weights))

    # a shared-layer tensor smuggled into a set
    student = load_student(str(base), mlm_head=False)
    shared = next(k for k in student.state_dict() if not k.startswith("adapters."))
    forged = tmp_path / "forged"
    shutil.copytree(folder, forged)
    save_file({**tensors, f"encoder.{shared}": student.state_dict()[shared] * 0}, str(forged / "adapters.safetensors"))
    model = MultiTaskModel(str(base))
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(forged / 'adapters.safetensors'))} holds encoder\.{re.escape(shared)}"
    ):
        model.add("forged", str(forged))
    assert not model.tasks

    # the same base with other adapters: the head-only set was trained on the base's own
    changed = tmp_path / "changed_base"
    shutil.copytree(base, changed)
    state = load_file(str(changed / "model.safetensors"))
    key = next(k for k in state if "adapters." in k)
    state[key] = state[key] + 0.5
    save_file(state, str(changed / "model.safetensors"), {"format": "pt"})
    with pytest.raises(CheckpointError, match="was trained on the base .* not on"):
        MultiTaskModel(str(changed)).add("sst2", str(folder))
    assert weights.read_bytes() == original  # nothing of the set was touched


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
    assert (
        json.loads((interrupted / "results.json").read_text())["best"]
        == json.loads((straight / "results.json").read_text())["best"]
    )
    assert (interrupted / "predictions" / "test.tsv").read_text() == (straight / "predictions" / "test.tsv").read_text()


def test_a_resume_on_other_task_data_or_another_model_is_refused(base, tasks, tmp_path):
    """Fine-tuning keeps to its data and its starting model as distillation does: moved files
    resume; an edited train file (same size, mtime put back) or a changed model is refused,
    naming what changed, with nothing written; allow_changes_on_resume accepts a change."""
    model = tmp_path / "base"
    shutil.copytree(base, model)
    data = tmp_path / "data"
    data.mkdir()
    files = {split: shutil.copy(path, data) for split, path in tasks["sst2"].items()}
    out = tmp_path / "run"
    common = dict(tuning="full", eval_every_n_steps=1)
    run_finetune(finetune_config(out, model, files, max_steps=2, **common))

    moved = tmp_path / "moved"
    shutil.move(data, moved)
    files = {split: str(moved / Path(path).name) for split, path in files.items()}
    run_finetune(finetune_config(out, model, files, max_steps=3, resume_from_checkpoint=True, **common))
    assert max(logged(out)) == 3

    train = Path(files["train"])
    stat, lines = train.stat(), train.read_text().splitlines(keepends=True)
    sentence, label = lines[1].rstrip("\n").split("\t")
    lines[1] = f"{sentence}\t{1 - int(label)}\n"  # one label flipped: same size
    train.write_text("".join(lines))
    os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    resume = dict(max_steps=4, resume_from_checkpoint=True, **common)
    with pytest.raises(
        CheckpointError, match=r"another data: data.source.train changed content.*allow_changes_on_resume=\[data\]"
    ):
        run_finetune(finetune_config(out, model, files, **resume))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == written
    run_finetune(finetune_config(out, model, files, **resume, allow_changes_on_resume=["data"]))
    assert max(logged(out)) == 4

    state = load_file(str(model / "model.safetensors"))
    key = sorted(state)[0]
    state[key] = state[key] + 0.01
    save_file(state, str(model / "model.safetensors"), {"format": "pt"})
    with pytest.raises(CheckpointError, match=r"another model: model.safetensors changed content"):
        run_finetune(finetune_config(out, model, files, **{**resume, "max_steps": 5}, allow_changes_on_resume=["data"]))


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
    # a BERT checkpoint fine-tunes (tuning=adapters adds fresh adapters: tests/test_fresh_adapters.py)
    run_finetune(finetune_config(tmp_path / "c", teacher_dir, tasks["sst2"], tuning="full", max_steps=4))
    assert (tmp_path / "c" / "model" / "model.safetensors").is_file()
    # an adapter-free student is written as ALBERT: it fine-tunes too, and its full model reloads
    albert = tmp_path / "albert"
    run_recipe(
        tiny_config(
            albert,
            teacher_dir,
            corpus_file,
            max_steps=2,
            save_every_n_steps=None,
            **{"student.adapter_placement": None},
        )
    )
    assert json.loads((albert / "student" / "config.json").read_text())["model_type"] == "albert"
    recipe = run_finetune(
        finetune_config(tmp_path / "d", albert / "student", tasks["sst2"], tuning="full", max_steps=4)
    )
    from components.checkpointing.finetuned import load_task_model

    model, task = load_task_model(str(tmp_path / "d" / "model"))
    assert task["label_values"] == [0, 1] and task["metric"] == "accuracy"
    batch = recipe.tokenizer(["a sentence to classify"], return_tensors="pt")
    recipe.model.eval()
    with torch.no_grad():
        assert torch.allclose(
            model(batch["input_ids"], batch["attention_mask"]),
            recipe.model(batch["input_ids"], batch["attention_mask"]),
        )


def test_bad_input_through_the_recipes_main_is_one_line(base, tasks, tmp_path, run_main):
    config = tmp_path / "config.yaml"
    OmegaConf.save(
        OmegaConf.create(finetune_config(tmp_path / "out", base, tasks["sst2"], **{"data.label_column": "lable"})),
        config,
    )
    result = run_main("finetune", "--config", config)
    assert result.code == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "'lable'" in last and "train.tsv" in last


@pytest.mark.slow  # torch.compile (inductor builds C++ kernels)
def test_compiled_fine_tuning_trains_and_saves_what_eager_does(base, tasks, tmp_path):
    """compile=true: the same losses step by step (within fp32 reassociation: inductor fuses and
    reorders sums, 1e-4 relative over 4 steps) and a best model saved under the same names.
    Without dropout: compiled code draws its dropout masks from another generator."""
    quiet = tmp_path / "base"
    shutil.copytree(base, quiet)
    config = json.loads((quiet / "config.json").read_text())
    config["recursive_encoder"].update(dropout=0.0, attention_dropout=0.0)
    (quiet / "config.json").write_text(json.dumps(config))
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile_{compiled}"
        cfg = finetune_config(
            out, quiet, tasks["sst2"], tuning="full", compile=compiled, max_steps=4, classifier_dropout=0.0
        )
        run_finetune(cfg)
        runs[compiled] = out
    eager, compiled = logged(runs[False]), logged(runs[True])
    for step in range(1, 5):
        assert compiled[step]["loss"] == pytest.approx(eager[step]["loss"], rel=1e-4), step
    a, b = ({p.name for p in (runs[c] / "model").iterdir()} for c in (False, True))
    assert a == b and "config.json" in a
    a, b = (load_file(str(next((runs[c] / "model").glob("*.safetensors")))) for c in (False, True))
    assert a.keys() == b.keys()
