"""torchtune's observability blocks in our configs: metric_logger, profiler, log_peak_memory_stats."""

import importlib.util
import os
import re
import subprocess

import pytest
import yaml

from components.errors import MissingDependencyError
from tests.helpers import tune_run
from tests.recipe_helpers import DISTILLED, logged, run_recipe, tiny_config

DISK_LOGGER = "torchtune.training.metric_logging.DiskLogger"


def _disk_log(log_dir):
    files = list(log_dir.glob("*.txt"))
    assert len(files) == 1, files
    steps = {}
    for line in files[0].read_text().splitlines():
        match = re.match(r"Step (\d+) \| (.*)", line)
        assert match, line
        values = dict(item.split(":", 1) for item in match.group(2).split())
        steps.setdefault(int(match.group(1)), {}).update({k: float(v) for k, v in values.items()})
    return steps


def test_a_torchtune_disk_logger_replaces_tensorboard(tmp_path, teacher_dir, corpus_file):
    out, logs = tmp_path / "run", tmp_path / "logs"
    cfg = tiny_config(out, teacher_dir, corpus_file, max_steps=4, eval_every_n_steps=2)
    cfg["metric_logger"] = {"_component_": DISK_LOGGER, "log_dir": str(logs)}
    run_recipe(cfg)
    on_disk, jsonl = _disk_log(logs), logged(out)
    assert sorted(on_disk) == sorted(jsonl) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):  # the same scalars in both, losses and evaluation alike
        assert on_disk[step]["loss/total"] == pytest.approx(jsonl[step]["loss/total"])
    assert "eval/student_mlm_loss" in on_disk[2] and "eval/student_mlm_loss" in on_disk[4]
    assert not (out / "tensorboard").exists()


def test_profiler_traces_the_steps_it_is_asked_for(tmp_path, teacher_dir, corpus_file):
    out = tmp_path / "run"
    cfg = tiny_config(out, teacher_dir, corpus_file, max_steps=5, save_every_n_steps=None)
    cfg["profiler"] = {
        "_component_": "torchtune.training.setup_torch_profiler",
        "enabled": True,
        "wait_steps": 1,
        "warmup_steps": 1,
        "active_steps": 2,
        "num_cycles": 1,
    }
    run_recipe(cfg)
    traces = sorted((out / "profiling").iterdir())
    assert [t.name for t in traces] == ["iteration_4"]  # steps 3-4 traced, once
    assert list(traces[0].glob("*.pt.trace.json.gz"))
    table = (traces[0] / "rank0_key_averages.txt").read_text()
    assert "aten::scaled_dot_product_attention" in table or "aten::addmm" in table
    assert len(logged(out)) == 5  # the run itself is unchanged


def test_disabled_profiler_writes_nothing(tmp_path, teacher_dir, corpus_file):
    out = tmp_path / "run"
    cfg = tiny_config(out, teacher_dir, corpus_file, max_steps=2, save_every_n_steps=None)
    cfg["profiler"] = {"_component_": "torchtune.training.setup_torch_profiler", "enabled": False}
    run_recipe(cfg)
    assert not (out / "profiling").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_logger_whose_package_is_missing_is_one_line(tmp_path, teacher_dir, corpus_file):
    cfg = tiny_config(tmp_path / "run", teacher_dir, corpus_file, max_steps=2)
    cfg["metric_logger"] = {"_component_": "torchtune.training.metric_logging.WandBLogger", "project": "x"}
    with pytest.raises(
        MissingDependencyError, match="metric_logger: torchtune.training.metric_logging.WandBLogger.*wandb"
    ):
        run_recipe(cfg)


def test_peak_memory_stats_are_empty_off_cuda():
    import torch

    from components.training.metrics import peak_memory_stats

    assert peak_memory_stats(torch.device("cpu")) == {}


def test_metrics_jsonl_and_tensorboard_stay_the_default(distilled_run):
    out = distilled_run  # a run of tiny_config with no logger settings: the defaults
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(logged(out)) == list(range(1, DISTILLED["max_steps"] + 1))
    saved = (out / "config.yaml").read_text()
    assert "metric_logger: null" in saved and "log_peak_memory_stats: true" in saved


@pytest.mark.slow  # a tune run launch: a terminal's view of one process's stdout and stderr
def test_through_tune_run_a_pasted_block_logs_and_lines_do_not_tear_the_bar(tmp_path, teacher_dir, corpus_file):
    """The metric_logger block as torchtune configs write it (``log_dir: ${output_dir}/logs``),
    given as key=value overrides. And on a terminal, where the bar (stderr) and log lines
    (stdout) share the screen, every log line starts after the bar is cleared, not at the end of
    a half-drawn bar."""
    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(out, teacher_dir, corpus_file, eval_every_n_steps=2)))
    result = tune_run(
        "distill_recursive",
        "--config",
        str(config),
        f"metric_logger._component_={DISK_LOGGER}",
        "metric_logger.log_dir=${output_dir}/logs",
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert sorted(_disk_log(out / "logs")) == [1, 2, 3, 4, 5, 6]
    # what a terminal shows of each line: the text after its last carriage return
    shown = [line.rsplit("\r", 1)[-1] for line in result.stdout.split("\n")]
    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ")
    logs = [line for line in shown if stamp.search(line)]
    assert any("Step 2: " in line for line in logs)  # evaluation lines were logged mid-run
    torn = [line for line in logs if not stamp.match(line)]
    assert not torn, torn
