"""The distributed recipe on 2 CPU processes (gloo) against the single-device one."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from components.checkpointing import load_student
from components.checkpointing.resume import list_checkpoints, load_checkpoint
from components.config import ConfigError
from tests.helpers import REPO, torchrun_command, tune_run
from tests.recipe_helpers import logged, run_recipe, tiny_config

pytestmark = pytest.mark.slow  # every test launches several processes (tune run --nproc_per_node, torchrun)
STEPS = 6


def launch_distributed(*args, nproc=2, tune=False):
    """A distributed run expected to succeed: with ``tune`` through ``tune run --nproc_per_node``
    (the one launch of this recipe that proves the command line), else the same torchrun."""
    if tune:
        result = tune_run("distill_recursive_distributed", *args, nproc=nproc)
    else:
        command = torchrun_command("distill_recursive_distributed", *args, nproc=nproc)
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher_dir, corpus_file):
    """The same global batch of 16 windows: one device x 16, and two ranks x 8."""
    root = tmp_path_factory.mktemp("dist")
    overrides = {
        "max_steps": STEPS,
        "save_every_n_steps": 3,
        "eval_every_n_steps": 3,
        "student.dropout": 0.0,  # dropout draws differ across ranks
        "student.attention_dropout": 0.0,
        "data.max_eval_windows": 32,
        # a quantisation-aware finish; weight-only, because per-tensor dynamic activation scales
        # depend on which windows share a tensor, and each rank holds half of them
        "stages": [{"name": "distill", "steps": 4}, {"name": "qat", "fake_quantize": True}],
        "quantization": {"scheme": "int8_weight"},
    }
    single = root / "single"
    run_recipe(tiny_config(single, teacher_dir, corpus_file, **overrides, **{"data.batch_size": 16}))
    config = root / "dist.yaml"
    OmegaConf.save(
        OmegaConf.create(tiny_config(root / "unused", teacher_dir, corpus_file, **overrides, **{"data.batch_size": 8})),
        config,
    )
    distributed = root / "distributed"
    launch_distributed("--config", str(config), f"output_dir={distributed}", tune=True)
    return single, distributed, config


def test_two_ranks_follow_the_single_device_trajectory(runs):
    """Two ranks on half batches compute the single device's step up to float summation order
    (each rank sums its own tokens; gradients are averaged): 1e-5 relative in the fp32 stage.
    In the QAT stage (steps 5-6) weights are rounded to int8 in the forward pass, and a weight
    that summation order puts within ~1e-7 of a rounding boundary rounds the other way on one
    side: a step s = absmax/127 of its channel, where everything else agrees to 1e-7. A few such
    flips among the student's weights move the loss by ~s * |dL/dw| each, far below 1e-3 of it
    (1.8e-5 measured under ATEN_CPU_CAPABILITY=avx2, 0 with AVX-512 kernels); a wrong
    distributed QAT step (another scale, unsynchronised weights) moves it by far more."""
    single, distributed, _ = runs
    a, b = logged(single), logged(distributed)
    assert set(range(1, STEPS + 1)) <= set(a) and set(range(1, STEPS + 1)) <= set(b)
    assert [b[step]["stage"] for step in range(1, STEPS + 1)] == [0, 0, 0, 0, 1, 1]
    for step in range(1, STEPS + 1):
        rel = 1e-5 if b[step]["stage"] == 0 else 1e-3
        for key in ("loss/total", "loss/mlm", "loss/output", "loss/hidden", "loss/attention", "grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], rel=rel), (step, key)
    # the students of step 3 (fp32): the same parameters. (The key bias has a true gradient of
    # exactly zero: AdamW turns rounding noise into updates of ~1e-6 there, so parameters are
    # compared to an absolute 1e-5.)
    x, y = (load_checkpoint(run / "checkpoints" / "step_00000003")["model"] for run in (single, distributed))
    assert x.keys() == y.keys()
    for name in x:
        assert torch.allclose(x[name], y[name], rtol=1e-4, atol=1e-5), name
    assert "eval/student_mlm_loss" in b[3]
    # the exported students: the same model, up to those flips' share of the last two steps
    x, y = load_student(str(single / "student")).eval(), load_student(str(distributed / "student")).eval()
    ids = torch.randint(5, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(x(ids).logits, y(ids).logits, rtol=1e-2, atol=1e-3)


def test_two_ranks_resume_with_the_same_losses(runs, tmp_path):
    _, distributed, config = runs
    resumed = tmp_path / "resumed"
    shutil.copytree(distributed / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    launch_distributed("--config", str(config), f"output_dir={resumed}", "resume_from_checkpoint=True")
    a, b = logged(distributed), logged(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step]["loss/total"] == pytest.approx(a[step]["loss/total"], rel=1e-6)
    assert [p.name for p in list_checkpoints(resumed)] == ["step_00000003", "step_00000006"]


def test_a_checkpoint_resumes_with_its_world_size_only(runs, tmp_path, teacher_dir, corpus_file):
    _, distributed, _ = runs
    out = tmp_path / "one"
    shutil.copytree(distributed / "checkpoints" / "step_00000003", out / "checkpoints" / "step_00000003")
    cfg = tiny_config(out, teacher_dir, corpus_file, max_steps=STEPS, resume_from_checkpoint=True)
    with pytest.raises(ConfigError, match="written by 2 process"):
        run_recipe(cfg)


def test_sharded_teacher_and_student_hold_half_the_parameters(teacher_dir):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            str(REPO / "tests" / "sharded_teacher_check.py"),
            str(teacher_dir),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(ranks) == 2
    total = ranks[0]["total"]
    for r in ranks:
        assert r["local"] <= total / 2 + 64 and r["local"] >= total / 2 - 64  # shards of rows, rounding
        assert r["diff"] <= 1e-5
    assert sum(r["local"] for r in ranks) == total
    assert sum(r["student_local"] for r in ranks) == ranks[0]["student_total"]
    for r in ranks:
        assert abs(r["student_local"] - r["student_total"] / 2) <= 64


def launch_distributed_failing(config, *args, timeout=300):
    """A distributed run expected to fail: (return code, stdout + stderr). ``tests`` is put
    on the path so that configs can name test helpers."""
    result = subprocess.run(
        torchrun_command("distill_recursive_distributed", "--config", config, *args, nproc=2),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,  # a hang (ranks waiting on a collective) fails here
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return result.returncode, result.stdout + result.stderr


def test_ranks_that_see_different_corpora_fail_before_step_1(tmp_path, teacher_dir, corpus_file):
    text = corpus_file.read_text()
    (tmp_path / "corpus_0.jsonl").write_text(text)
    (tmp_path / "corpus_1.jsonl").write_text(text + json.dumps({"text": "one more document on rank 1"}) + "\n")
    config = tmp_path / "dist.yaml"
    cfg = tiny_config(tmp_path / "out", teacher_dir, tmp_path / "corpus_${oc.env:RANK}.jsonl", **{"data.batch_size": 8})
    OmegaConf.save(OmegaConf.create(cfg), config)
    code, output = launch_distributed_failing(config)
    assert code != 0
    assert "The ranks disagree before step 1: rank 1 differs from rank 0 in" in output and "data" in output
    assert "distill:" not in output  # no step was taken
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_ctrl_c_in_a_write_on_rank_0_ends_every_rank(tmp_path, teacher_dir, corpus_file):
    """(An OSError takes the same path; Ctrl-C is the case an ``except Exception`` misses.)"""
    config = tmp_path / "dist.yaml"
    cfg = tiny_config(tmp_path / "out", teacher_dir, corpus_file, **{"data.batch_size": 8})
    cfg["metric_logger"] = {"_component_": "tests.helpers.FailingLogger", "fail_at": 2, "error": "KeyboardInterrupt"}
    OmegaConf.save(OmegaConf.create(cfg), config)
    code, output = launch_distributed_failing(config)
    assert code != 0
    # rank 1 stops with rank 0's error instead of waiting in the next collective
    assert "Stopping: rank 0 failed to write (KeyboardInterrupt" in output, output[-3000:]
    # what was written before stays: the checkpoint of step 3 was never reached, metrics of step 1 are kept
    assert '"step": 1' in (tmp_path / "out" / "metrics.jsonl").read_text()
