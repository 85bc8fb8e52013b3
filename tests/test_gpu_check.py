"""benchmarks/gpu_check.py, the check a person with one CUDA GPU runs: its CPU fallback runs
every check end to end here (the same commands, device=cpu), so that the day a GPU is there
only the device differs."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def test_a_run_is_read_from_its_metrics_file(tmp_path):
    records = [
        {"step": 10, "loss/total": 9.0, "tokens_per_second": 10.0},  # the first: warm-up, left out of the speed
        {"step": 20, "loss/total": 7.0, "tokens_per_second": 100.0, "memory/peak_allocated_gib": 1.5},
        {"step": 20, "eval/loss": 3.0},
        {"step": 30, "loss/total": 5.0, "tokens_per_second": 120.0, "memory/peak_allocated_gib": 2.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    read = gpu_check.read_metrics(tmp_path)
    assert read == {"loss_first": 9.0, "loss_last": 5.0, "tokens_per_s": 110.0, "peak_gib": 2.5}
    assert gpu_check.read_metrics(tmp_path / "missing") == {}
    text = gpu_check.table(
        [{"check": "tiny", "ok": False, "exit": 0, "seconds": 3.0, **read, "note": "loss did not fall"}],
        {"device": "cpu", "torch": "x", "cuda": None, "seconds": 60.0},
    )
    assert "| tiny | NO | 0 | 9.000 -> 5.000 | 110 | 2.50 | 3 | loss did not fall |" in text


@pytest.mark.slow  # five launches: three distillation runs, the speed benchmark, an export
def test_the_gpu_check_runs_every_check_on_the_cpu(tmp_path, smoke_assets):
    out = tmp_path / "check"
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick"]
    done = subprocess.run(
        [*command, "--out", str(out), "--smoke-assets", str(smoke_assets)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    checks = {row["check"]: row for row in result["checks"]}
    assert len(checks) == 5 and all(row["ok"] and row["exit"] == 0 for row in checks.values()), checks
    for name in ("tiny distillation, auto", "embedding distillation, auto", "distributed (FSDP2), 1 process, auto"):
        assert checks[name]["loss_last"] < checks[name]["loss_first"] and checks[name]["tokens_per_s"] > 0
    assert "the reference" in checks["speed benchmark"]["note"]
    assert (out / "int8" / "model.onnx").is_file()
    assert (out / "gpu_check.md").read_text() == done.stdout
