"""recipes/evaluate.py: models x tasks -> the table; cells that survive a kill; the metrics by hand."""

import json
import math
import signal

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from components.errors import ConfigError, RunInterrupted
from components.evaluation.cells import cosine, similarity_scores
from components.evaluation.report import Column, column_score, summarize
from components.smoke.tasks import smoke_task, SMOKE_TASK_CONFIGS
from components.training.run import execute
from tests.recipe_helpers import run_export


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_tasks")
    return {kind: smoke_task(str(root), kind) for kind in ("sst2", "stsb")}


def _task(tasks, kind, **extra):
    task, data = SMOKE_TASK_CONFIGS[kind]
    return {"task": dict(task), "data": {"source": dict(tasks[kind]), **data}, **extra}


def suite(output_dir, models, files, **overrides):
    cfg = {
        "output_dir": str(output_dir),
        "models": {k: str(v) for k, v in models.items()},
        "reference": "teacher",
        "device": "cpu",
        "finetune_defaults": {
            "max_steps": 3,
            "eval_every_n_steps": 3,
            "log_every_n_steps": 1,
            "data": {"max_length": 32, "batch_size": 16, "eval_batch_size": 100},
            "optimizer": {"_component_": "torch.optim.AdamW", "lr": 2e-3},
        },
        "tasks": {
            "sst2": {
                "kind": "finetune",
                "overrides": _task(files, "sst2"),
                "tuning": ["full", "head"],
                "seeds": [0, 1],
            },
            "sst2_probe": {"kind": "probe", "overrides": _task(files, "sst2"), "max_train_rows": 200},
            "stsb": {"kind": "similarity", "overrides": _task(files, "stsb")},
        },
        "latency": {"shapes": [[1, 16], [2, 16]], "warmup": 0, "repeats": 1},
    }
    cfg.update(overrides)
    return OmegaConf.create(cfg)


def evaluate(cfg):
    from recipes.evaluate import EvaluateRecipe

    return execute(EvaluateRecipe(cfg))


class Calls:
    """Counts the cells a run computes, and raises ``fail`` at call number ``at``."""

    def __init__(self, monkeypatch, at=None, fail=KeyboardInterrupt):
        from recipes.evaluate import EvaluateRecipe

        self.cells, self.at, self.fail = [], at, fail
        for method in ("_score", "_finetune"):
            original = getattr(EvaluateRecipe, method)

            def wrapped(recipe, cell, *args, _original=original):
                self.cells.append(cell.label() + f" [{cell.kind}]")
                if self.at is not None and len(self.cells) == self.at:
                    raise self.fail("killed")
                return _original(recipe, cell, *args)

            monkeypatch.setattr(EvaluateRecipe, method, wrapped)


def test_the_table_and_a_rerun_after_a_kill_repeats_no_finished_cell(
    distilled_student, teacher_dir, tasks, tmp_path, monkeypatch
):
    out = tmp_path / "eval"
    cfg = suite(out, {"teacher": teacher_dir, "student": distilled_student}, tasks)
    # per model: efficiency, probe, similarity, then 2 tunings x 2 seeds of fine-tuning
    per_model = 3 + 4
    first = Calls(monkeypatch, at=5)  # killed in the teacher's second fine-tuning cell
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg)
    assert len(first.cells) == 5
    finished = sorted(p.name for p in (out / "cells").rglob("*.json"))
    assert len(finished) == 4
    assert not (out / "results.json").exists()

    monkeypatch.undo()
    second = Calls(monkeypatch)
    evaluate(cfg)
    assert len(second.cells) == 2 * per_model - 4  # nothing finished is computed again
    assert not set(second.cells) & set(first.cells[:4])
    assert second.cells[0] == first.cells[4]  # the killed cell is redone

    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = results["models"]
    assert list(rows) == ["teacher", "student"]
    for name, row in rows.items():
        scores = row["scores"]
        assert set(scores) == {"sst2/full", "sst2/head", "sst2_probe", "stsb"}
        assert all(s is not None for s in scores.values())
        assert scores["sst2/full"]["n"] == 2 and scores["sst2/full"]["seeds"] == [0, 1]
        assert row["average"] == pytest.approx(np.mean([s["value"] for s in scores.values()]))
        assert row["parameters"] > 0 and row["bytes"] > 0 and set(row["latency_ms"]) == {"1x16", "2x16"}
        assert name in report
    student, teacher = rows["student"], rows["teacher"]
    assert student["of_reference"]["average"] == pytest.approx(
        np.mean([student["scores"][k]["value"] / teacher["scores"][k]["value"] for k in student["scores"]])
    )
    assert teacher["of_reference"]["average"] == pytest.approx(1.0)
    assert student["of_reference"]["parameters"] == pytest.approx(student["parameters"] / teacher["parameters"])
    # the fine-tuning cells are the fine-tuning recipe's runs, with their own results
    runs = sorted((out / "runs" / "student" / "sst2").iterdir())
    assert len(runs) == 4 and all((r / "results.json").is_file() for r in runs)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("student/sst2_probe/accuracy" in line for line in logged)

    monkeypatch.undo()
    third = Calls(monkeypatch)
    evaluate(cfg)
    assert third.cells == []
    assert json.loads((out / "results.json").read_text())["models"] == rows


def test_a_changed_model_gets_new_cells(distilled_student, tasks, tmp_path, monkeypatch):
    import shutil

    student = tmp_path / "student"
    shutil.copytree(distilled_student, student)
    out = tmp_path / "eval"
    tasks_only_probe = {"probe": {"kind": "probe", "overrides": _task(tasks, "sst2"), "max_train_rows": 100}}
    cfg = suite(out, {"student": student}, tasks, reference=None, tasks=tasks_only_probe)
    evaluate(cfg)
    calls = Calls(monkeypatch)
    evaluate(cfg)
    assert calls.cells == []
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps(config, indent=1))  # same model, other bytes: a new digest
    evaluate(cfg)
    assert len(calls.cells) == 2  # efficiency and the probe, again


def test_a_stop_signal_in_a_fine_tuning_cell_resumes_it(distilled_student, tasks, tmp_path, monkeypatch, caplog):
    from recipes.finetune import FinetuneRecipe

    out = tmp_path / "eval"
    only = {"sst2": {"kind": "finetune", "overrides": _task(tasks, "sst2"), "tuning": ["adapters"]}}
    cfg = suite(out, {"student": distilled_student}, tasks, reference=None, tasks=only)
    cfg.finetune_defaults.max_steps = 6
    cfg.finetune_defaults.eval_every_n_steps = 2
    original = FinetuneRecipe._train_step

    def step(recipe, batch):
        if recipe.step == 2:
            signal.raise_signal(signal.SIGTERM)
        return original(recipe, batch)

    monkeypatch.setattr(FinetuneRecipe, "_train_step", step)
    with pytest.raises(
        RunInterrupted, match="Evaluation stopped in cell student / sst2 adapters.*Run the same command"
    ):
        evaluate(cfg)
    monkeypatch.undo()
    with caplog.at_level("INFO"):
        evaluate(cfg)
    assert "(resuming)" in caplog.text
    (run,) = (out / "runs" / "student" / "sst2").iterdir()
    assert json.loads((run / "results.json").read_text())["best"]["step"] in (2, 4, 6)


def test_fine_tuned_models_and_adapter_sets_are_scored_as_they_are(distilled_student, tasks, tmp_path, monkeypatch):
    """A fine-tuned model and an adapter set are rows too: their own task's column is their own
    predictions, equal to what their fine-tuning run measured; nothing is trained again."""
    from recipes.finetune import FinetuneRecipe

    runs = {}
    for tuning in ("full", "adapters"):
        cfg = {
            "output_dir": str(tmp_path / tuning),
            "checkpoint_dir": str(distilled_student),
            "tuning": tuning,
            "device": "cpu",
            "max_steps": 4,
            "eval_every_n_steps": 2,
            **_task(tasks, "sst2"),
        }
        cfg["data"].update(max_length=32, batch_size=16, eval_batch_size=100)
        execute(FinetuneRecipe(OmegaConf.create(cfg)))
        runs[tuning] = json.loads((tmp_path / tuning / "results.json").read_text())["best"]["metrics"]
    models = {"sst2_full": tmp_path / "full" / "model", "sst2_adapters": tmp_path / "adapters" / "adapter_set"}
    only = {
        "sst2": {"kind": "finetune", "overrides": _task(tasks, "sst2"), "tuning": ["full", "adapters", "head"]},
        "probe": {"kind": "probe", "overrides": _task(tasks, "sst2"), "max_train_rows": 100},
    }
    cfg = suite(tmp_path / "eval", models, tasks, reference=None, tasks=only)
    cfg.finetune_defaults.data.max_length = 32
    calls = Calls(monkeypatch)
    evaluate(cfg)
    assert not [c for c in calls.cells if c.endswith("[finetune]")]  # nothing fine-tuned again
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["models"]
    assert rows["sst2_full"]["kind"] == "finetuned"
    assert rows["sst2_full"]["scores"]["sst2/full"]["metrics"]["accuracy"] == pytest.approx(runs["full"]["accuracy"])
    assert rows["sst2_full"]["scores"]["sst2/adapters"] is None
    adapters = rows["sst2_adapters"]["scores"]
    assert adapters["sst2/adapters"]["metrics"]["accuracy"] == pytest.approx(runs["adapters"]["accuracy"])
    assert adapters["sst2/full"] is None and adapters["probe"] is not None
    # an adapter set needs its base on disk: it counts the base's bytes and the set's
    assert (
        rows["sst2_adapters"]["bytes"] > (tmp_path / "adapters" / "adapter_set" / "adapters.safetensors").stat().st_size
    )


def test_a_stop_asked_for_in_a_cells_last_step_stops_after_that_cell(distilled_student, tasks, tmp_path, monkeypatch):
    from recipes.finetune import FinetuneRecipe

    out = tmp_path / "eval"
    only = {"sst2": {"kind": "finetune", "overrides": _task(tasks, "sst2"), "tuning": ["head"], "seeds": [0, 1]}}
    cfg = suite(out, {"student": distilled_student}, tasks, reference=None, tasks=only)
    original = FinetuneRecipe._train_step

    def step(recipe, batch):
        if recipe.step == recipe.max_steps - 1 and recipe.cfg.seed == 0:  # the first cell's last step
            signal.raise_signal(signal.SIGTERM)
        return original(recipe, batch)

    monkeypatch.setattr(FinetuneRecipe, "_train_step", step)
    with pytest.raises(RunInterrupted, match="stopped by SIGTERM after cell student / sst2 head lr=0.002 seed=0"):
        evaluate(cfg)
    monkeypatch.undo()
    calls = Calls(monkeypatch)
    evaluate(cfg)
    assert calls.cells == ["student / sst2 head lr=0.002 seed=1 [finetune]"]  # the first cell was kept


# ------------------------------------------------------------------ the figures, by hand
def test_fine_tuning_columns_take_the_best_rate_by_its_mean_over_seeds():
    cells = [
        {"task": "t", "tuning": "full", "lr": 1e-3, "seed": s, "metrics": {"accuracy": v, "mse": m}}
        for s, v, m in ((0, 0.80, 0.3), (1, 0.90, 0.1))
    ] + [
        {"task": "t", "tuning": "full", "lr": 2e-3, "seed": s, "metrics": {"accuracy": v, "mse": m}}
        for s, v, m in ((0, 0.85, 0.5), (1, 0.95, 0.5))
    ]
    best = column_score(Column("t", "finetune", ("accuracy",), "full"), cells)
    assert best["lr"] == 2e-3 and best["value"] == pytest.approx(0.90) and best["n"] == 2
    # sample standard deviation of (0.85, 0.95) is 0.1 / sqrt(2); over sqrt(2) seeds: 0.05
    assert best["stderr"] == pytest.approx(0.05)
    lowest = column_score(Column("t", "finetune", ("mse",), "full"), cells)  # lower is better
    assert lowest["lr"] == 1e-3 and lowest["value"] == pytest.approx(0.2)
    one = column_score(Column("t", "finetune", ("accuracy",), "full"), cells[:1])
    assert one["stderr"] is None and one["value"] == 0.80
    assert column_score(Column("t", "finetune", ("accuracy",), "head"), cells) is None
    # several metrics (GLUE's F1/accuracy): each is shown, the score is their mean, and the best rate by it
    both = column_score(Column("t", "finetune", ("accuracy", "mse"), "full"), cells)
    assert both["lr"] == 2e-3 and both["value"] == pytest.approx((0.90 + 0.5) / 2)
    assert both["metrics"] == pytest.approx({"accuracy": 0.90, "mse": 0.5})


def test_the_average_and_the_percentages_of_the_reference():
    columns = [Column("a", "probe", ("accuracy",)), Column("b", "similarity", ("spearman",))]
    cells = [
        {"model": "t", "task": "a", "metrics": {"accuracy": 0.8}},
        {"model": "t", "task": "b", "metrics": {"spearman": 0.5}},
        {"model": "s", "task": "a", "metrics": {"accuracy": 0.6}},
        {"model": "s", "task": "b", "metrics": {"spearman": 0.5}},
    ]
    info = {
        "t": {"parameters": 100, "bytes": 400, "latency_ms": {"1x8": 2.0}},
        "s": {"parameters": 25, "bytes": 100, "latency_ms": {"1x8": 0.5}},
    }
    rows = summarize(info, columns, cells, "t")["models"]
    assert rows["s"]["average"] == pytest.approx(0.55)
    assert rows["s"]["of_reference"]["scores"] == pytest.approx({"a": 0.75, "b": 1.0})
    assert rows["s"]["of_reference"]["average"] == pytest.approx(0.875)
    assert rows["s"]["of_reference"]["parameters"] == 0.25 and rows["s"]["of_reference"]["latency_ms"] == {"1x8": 0.25}


class _Stub:
    """A model whose sentence embedding is a fixed vector per first word piece."""

    max_length = 512

    def __init__(self, tokenizer, vectors):
        self.tokenizer, self.vectors = tokenizer, vectors

    def features(self, batch):
        return torch.tensor([self.vectors[int(ids[1])] for ids in batch["input_ids"]], dtype=torch.float64)


def test_similarity_is_spearman_of_the_cosines(tokenizer, tmp_path):
    rows = [("alpha", "beta", 1.0), ("gamma", "delta", 4.0), ("alpha", "delta", 2.5), ("gamma", "beta", 0.5)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "label": y}) + "\n" for a, b, y in rows))
    words = ["alpha", "beta", "gamma", "delta"]
    first_piece = {w: tokenizer(w)["input_ids"][1] for w in words}
    assert len(set(first_piece.values())) == 4
    vectors = dict(zip(first_piece.values(), ([1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 2.0])))
    sections = {
        "data": {**_defaults_data(), "source": {"train": str(path), "validation": str(path)}},
        "task": {"type": "regression", "input": "pair", "labels": None, "metric": None},
    }
    metrics = similarity_scores(_Stub(tokenizer, vectors), sections, "validation", batch_size=3)
    # cosines: (a,b) 1/sqrt2 = .707, (g,d) 2/sqrt5 = .894, (a,d) 1/sqrt5 = .447, (g,b) .707
    cos = [1 / math.sqrt(2), 2 / math.sqrt(5), 1 / math.sqrt(5), 1 / math.sqrt(2)]
    gold = [1.0, 4.0, 2.5, 0.5]
    # ranks: cos (2.5, 4, 1, 2.5), gold (2, 4, 3, 1); Spearman = Pearson of the ranks
    rc, rg = np.array([2.5, 4, 1, 2.5]), np.array([2, 4, 3, 1.0])
    rc, rg = rc - rc.mean(), rg - rg.mean()
    assert metrics["spearman"] == pytest.approx((rc @ rg) / math.sqrt((rc @ rc) * (rg @ rg)))
    c, g = np.array(cos) - np.mean(cos), np.array(gold) - np.mean(gold)
    assert metrics["pearson"] == pytest.approx((c @ g) / math.sqrt((c @ c) * (g @ g)))
    assert cosine(np.zeros((1, 2)), np.ones((1, 2))).tolist() == [0.0]


def _defaults_data():
    from components.config import check_section
    from components.training.schema import TaskDataConfig

    data = check_section({"source": "unused"}, TaskDataConfig, "data")
    data.update(text_column="sentence1", text_pair_column="sentence2")
    return data


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "change, message",
    [
        ({"reference": "bert"}, "reference 'bert' is not one of the models"),
        ({"models": {"a/b": "x"}}, "models: name 'a/b'"),
        ({"tasks": {"t": {"kind": "zero-shot"}}}, "tasks.t.kind"),
        ({"tasks": {"t": {"kind": "probe", "config": "nowhere.yaml"}}}, "nowhere.yaml does not exist"),
        ({"tasks": {"t": {"kind": "probe", "overrides": {"data": {"source": "x", "text_colum": "s"}}}}}, "text_colum"),
    ],
)
def test_bad_suites_are_refused_before_anything_runs(change, message, tasks, tmp_path):
    from recipes.evaluate import EvaluateRecipe

    cfg = suite(tmp_path / "eval", {"teacher": tmp_path / "nowhere"}, tasks)
    cfg = OmegaConf.merge(cfg, change) if "models" not in change else OmegaConf.merge(cfg, {"reference": None}, change)
    with pytest.raises(ConfigError, match=message):
        EvaluateRecipe(cfg)
    assert not (tmp_path / "eval").exists()


# ------------------------------------------------------------------ the shipped suite, with an int8 row
@pytest.mark.slow
def test_the_tiny_suite_evaluates_a_student_its_int8_export_and_its_teacher(
    distilled_student, teacher_dir, tmp_path, run_main
):
    run_export(distilled_student, tmp_path / "int8")
    out = tmp_path / "eval"
    launch = run_main(
        "evaluate",
        "--config",
        "configs/eval_tiny.yaml",
        f"output_dir={out}",
        f"models={{teacher: {teacher_dir}, student: {distilled_student}, int8: {tmp_path / 'int8'}}}",
        "finetune_defaults.max_steps=4",
        "latency.repeats=2",
    )
    assert launch.code == 0, launch.stderr
    rows = json.loads((out / "results.json").read_text())["models"]
    assert list(rows) == ["teacher", "student", "int8"]
    # sizes are the files a row runs from (a tiny model's ONNX graph outweighs its int8 savings)
    assert rows["int8"]["kind"] == "onnx" and rows["int8"]["bytes"] == (tmp_path / "int8" / "model.onnx").stat().st_size
    assert rows["student"]["bytes"] == (distilled_student / "model.safetensors").stat().st_size
    assert rows["int8"]["parameters"] == rows["student"]["parameters"]  # the student it was exported from
    assert rows["int8"]["scores"]["sst2/full"] is None and rows["int8"]["scores"]["sst2_probe"] is not None
    # the served int8 file's features are close to the fp32 student's: the probe agrees to within noise
    for task in ("sst2_probe", "stsb_similarity"):
        assert abs(rows["int8"]["scores"][task]["value"] - rows["student"]["scores"][task]["value"]) < 0.15
    report = (out / "report.md").read_text()
    assert "| int8 (onnx) |" in report and "% of teacher" in report
    assert (out / "report.png").stat().st_size > 1000
