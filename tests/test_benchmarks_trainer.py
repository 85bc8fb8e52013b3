"""benchmarks/finetune_vs_trainer.py: how turns become ratios (fast), and one tiny run end to end
against transformers' Trainer (slow; it needs accelerate, which the Trainer imports)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import finetune_vs_trainer  # noqa: E402


def _side(step, other_cores=0.0):
    """Two steps (the first a warm-up) and the final turn, as ``Turns.run`` records them."""
    return {
        "turn_s": [9.0, step, 0.5],
        "other_cores": [0.0, other_cores, 0.0],
        "compute_s": [8.0, step / 2],
        "optimizer_s": [1.0, step / 10],
    }


def test_turns_become_ratios_against_ours():
    passes = [
        {"ours": _side(1.0), "trainer": _side(2.0)},
        {"ours": _side(1.0, other_cores=1.0), "trainer": _side(4.0)},  # contended
        {"ours": _side(2.0), "trainer": _side(3.0)},
    ]
    summary = finetune_vs_trainer.summarise(passes, ["ours", "trainer"], warmup=1)
    assert (summary["quiet_steps"], summary["steps"]) == (2, 3)
    ours, trainer = summary["sides"]["ours"], summary["sides"]["trainer"]
    assert ours["step_ratio"] == 1.0
    assert trainer["step_ratio"] == 2.0  # median of 2, 4, 1.5
    assert trainer["step_ratio_quiet"] == 1.75  # passes 1 and 3 only
    # best case: per step index the fastest pass, warm-up left out: 2.0 against 1.0
    assert trainer["best_step_s"] == 2.0 and trainer["best_step_ratio"] == 2.0
    assert trainer["step_s"] == 3.0 and trainer["examples_per_s"] == finetune_vs_trainer.BATCH / 3.0
    assert trainer["optimizer_s"] == 0.3
    # a pass end to end, every turn (warm-up and final) included; the median over passes is pass 1's
    assert trainer["wall_ratio"] == (9.0 + 2.0 + 0.5) / (9.0 + 1.0 + 0.5)


@pytest.mark.slow  # a tokenizer, a task, two models and one pass: about 20 s on 2 cores
def test_a_tiny_run_compares_the_same_model_and_batches(tmp_path):
    pytest.importorskip("accelerate")
    out = tmp_path / "result.json"
    command = [sys.executable, str(REPO / "benchmarks" / "finetune_vs_trainer.py"), "--quick", "--passes", "1"]
    command += ["--warmup", "1", "--steps", "1", "--dtypes", "fp32", "--sides", "ours", "trainer", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    section = json.loads(out.read_text())["models"]["bert-quick"]["dtypes"]["fp32"]
    loss = section["first_batch_loss"]
    assert loss["same_batch"] and loss["rel_diff"] < 1e-5
    assert set(section["summary"]["sides"]) == {"ours", "trainer"}
    trainer = section["passes"][0]["trainer"]
    assert len(trainer["turn_s"]) == 3 and len(trainer["compute_s"]) == len(trainer["optimizer_s"]) == 2
    assert "Trainer (default optim:" in done.stdout
