"""The README's command, exactly: ``tune run recipes/distill_recursive.py --config ...`` (one real
launch, slow tier), and its one-line errors through the recipe's main in this process."""

import os

import pytest

from tests.helpers import REPO, tune_run


@pytest.mark.slow  # a tune run launch (the command line and the import hook) of the smoke config
def test_tiny_config_end_to_end(tmp_path, smoke_assets):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from components.checkpointing import load_student
    from tests.recipe_helpers import logged

    out = tmp_path / "tiny"
    result = tune_run(
        "distill_recursive",
        "--config",
        "configs/tiny.yaml",
        f"output_dir={out}",
        "max_steps=120",
        "eval_every_n_steps=60",
        f"teacher.assets_dir={smoke_assets}",
        f"data.source.assets_dir={smoke_assets}",
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    records = logged(out)
    first, last = records[10]["loss/total"], records[120]["loss/total"]
    assert last < 0.6 * first, (first, last)
    assert records[120]["eval/student_mlm_loss"] < records[60]["eval/student_mlm_loss"]

    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(out / "tensorboard"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {
        "loss/total",
        "loss/mlm",
        "loss/output",
        "loss/hidden",
        "loss/attention",
        "lr",
        "grad_norm",
        "tokens_per_second",
    } <= tags
    assert {"eval/student_mlm_loss", "eval/teacher_mlm_loss"} <= tags

    student = load_student(str(out / "student"))
    assert student.num_iterations == 2 and student.adapters is not None
    assert (out / "student" / "tokenizer.json").is_file()

    # the README's three lines: the student with adapters through a transformers pipeline
    import transformers

    import components  # noqa: F401

    fill = transformers.pipeline("fill-mask", model=str(out / "student"))
    predictions = fill("the " + fill.tokenizer.mask_token + " is here")
    assert len(predictions) == 5 and all(p["sequence"].endswith("is here") for p in predictions)
    assert sorted((p["score"] for p in predictions), reverse=True) == [p["score"] for p in predictions]


@pytest.mark.parametrize(
    "args, message",
    [
        (["output_dir=x", "max_stepz=3"], "Unknown config key 'max_stepz' (did you mean 'max_steps'?)"),
        (["output_dir=x", "student.hiden_size=3"], "has no argument 'hiden_size' (did you mean 'hidden_size'?)"),
        (["output_dir=x", "max_steps=ten"], "'max_steps' must be int or null, got str 'ten'"),
    ],
)
def test_bad_overrides_fail_fast_with_one_line(run_main, args, message):
    result = run_main("distill_recursive", "--config", "configs/tiny.yaml", *args)
    assert result.code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr  # (in this process an exception would fail the test anyway)
    assert not (REPO / "x").exists()


def test_missing_config_file(run_main):
    result = run_main("distill_recursive", "--config", "configs/nope.yaml")
    assert result.code == 2 and "Config file not found: configs/nope.yaml" in result.stderr
