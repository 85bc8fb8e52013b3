#!/usr/bin/env python
"""The GPU check: everything a CUDA device changes, run in a few minutes, one table.

    python benchmarks/gpu_check.py                 # on one CUDA GPU: about 5 minutes
    python benchmarks/gpu_check.py --device cpu --quick    # the same checks on the CPU (the test suite's slow tier)

Checks, each a fresh process launched the way a user launches it (``tune run``, ``python``):

  tiny distillation       configs/tiny.yaml (smoke teacher and corpus built on the fly), bf16 on CUDA
  embedding distillation  configs/embedding_teacher.yaml on a random all-MiniLM-L6-v2-shaped
                          teacher and random sentences (no download), packed rows, bf16 on CUDA
  distributed, FSDP2      recipes/distill_recursive_distributed.py on 1 process (NCCL on CUDA)
  speed benchmark         benchmarks/run.py: our step vs the plain transformers loop, achieved
                          FLOP/s against the device's measured bf16 matmul peak and (CUDA) its
                          data sheet's (MFU), peak memory of a step
  int8 export (CPU)       recipes/export_student.py on the tiny run's student: ONNX Runtime and
                          torch.export files, still on the CPU

A distillation check passes when its process exits 0 and its logged total loss falls. The
table gives the exit code, the first and last logged losses, the median logged tokens/s, the
peak CUDA memory the recipe logged, and the seconds the check took. Results: gpu_check.md and
gpu_check.json in --out (default benchmarks/results/gpu_check_<time>/). Exit status 1 when a
check fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
TUNE = Path(sys.executable).with_name("tune")

import torch  # noqa: E402
import workloads  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tune(*args) -> List[str]:
    return [str(TUNE) if TUNE.exists() else "tune", "run", *map(str, args)]


def launch(name: str, command: List[str], out: Path, timeout: float) -> Dict:
    """Run ``command`` from the repository root, its output in ``out/<name>.log``."""
    log(f"{name}: {' '.join(command)}")
    started = time.perf_counter()
    with (out / f"{name.replace(' ', '_')}.log").open("w") as f:
        try:
            code = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = time.perf_counter() - started
    log(f"{name}: exit {code} after {seconds:.0f} s")
    return {"check": name, "exit": code, "seconds": seconds}


def read_metrics(run_dir: Path) -> Dict:
    """First and last logged total loss, median tokens/s (the first log, with warm-up, left out)
    and the largest peak CUDA memory, from a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    losses = [r["loss/total"] for r in records if "loss/total" in r]
    speeds = [r["tokens_per_second"] for r in records if "tokens_per_second" in r]
    memory = [r["memory/peak_allocated_gib"] for r in records if "memory/peak_allocated_gib" in r]
    return {
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "tokens_per_s": statistics.median(speeds[1:] or speeds) if speeds else None,
        "peak_gib": max(memory) if memory else None,
    }


def distill_check(
    name: str, recipe: str, config: str, run_dir: Path, steps: int, out: Path, timeout: float, *overrides, nproc=None
):
    """``steps`` optimizer steps of a distillation recipe, logged ten times."""
    launcher = ["--nproc_per_node", str(nproc)] if nproc else []
    logging = [f"max_steps={steps}", f"log_every_n_steps={max(1, steps // 10)}"]
    command = tune(*launcher, f"recipes/{recipe}.py", "--config", config, f"output_dir={run_dir}", *logging, *overrides)
    row = {**launch(name, command, out, timeout), **read_metrics(run_dir)}
    falling = row.get("loss_last") is not None and row["loss_last"] < row["loss_first"]
    row["ok"] = row["exit"] == 0 and falling
    row["note"] = "" if falling else "loss did not fall"
    return row


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    p.add_argument("--quick", action="store_true", help="a few steps per check, small benchmark shapes")
    p.add_argument("--out", type=Path, help="folder for the logs, runs and results")
    p.add_argument("--smoke-assets", type=Path, help="an existing smoke assets folder (else built on the fly)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per check")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    dtype = "bf16" if cuda else "auto"  # the GPU check is a bf16 check; the CPU takes what suits it
    out = (args.out or HERE / "results" / f"gpu_check_{dt.datetime.now():%Y%m%d-%H%M%S}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = (
        {"tiny": 20, "embedding": 10, "distributed": 20}
        if args.quick
        else {"tiny": 300, "embedding": 200, "distributed": 100}
    )
    common = [f"device={device}", f"dtype={dtype}", "save_every_n_steps=null", "eval_every_n_steps=null"]
    assets = []
    if args.smoke_assets:
        assets = [f"teacher.assets_dir={args.smoke_assets}", f"data.source.assets_dir={args.smoke_assets}"]
    began = time.perf_counter()
    rows = []

    tiny = out / "tiny"
    rows.append(distill_check(f"tiny distillation, {dtype}", "distill_recursive", "configs/tiny.yaml", tiny,
                              steps["tiny"], out, args.timeout, *common, *assets))  # fmt: skip

    random_assets = workloads.make_assets(workloads.EMBEDDING, out / "embedding_assets")
    rows.append(distill_check(
        f"embedding distillation, {dtype}", "distill_recursive", "configs/embedding_teacher.yaml", out / "embedding",
        steps["embedding"], out, args.timeout, *common, f"teacher.path={random_assets['teacher']}",
        f"data.source={random_assets['corpus']}", "data.hub_config=null", "data.eval_fraction=0",
    ))  # fmt: skip

    if not assets:  # the tiny run's, built once
        built = tiny / "smoke_assets"
        assets = [f"teacher.assets_dir={built}", f"data.source.assets_dir={built}"]
    rows.append(distill_check(
        f"distributed (FSDP2), 1 process, {dtype}", "distill_recursive_distributed", "configs/tiny.yaml",
        out / "distributed", steps["distributed"], out, args.timeout, *common, *assets, nproc=1,
    ))  # fmt: skip

    bench_json = out / "run.json"
    bench = [sys.executable, str(HERE / "run.py"), "--device", device, "--out", str(bench_json)]
    bench += ["--skip", "memory", "inference", "variants"]
    if args.quick:
        bench += ["--workload", "quick", "--batch", "2", "--seq", "32", "--reps", "2", "--warmup", "1"]
    else:
        bench += ["--workload", "bert-base", "embedding", "--reps", "10", "--warmup", "3"]
    if cuda:
        bench += ["--bf16"]
    row = launch("speed benchmark", bench, out, args.timeout)
    row.update(ok=row["exit"] == 0, note="")
    if bench_json.is_file():
        res = json.loads(bench_json.read_text())
        notes = []
        for name, w in res["workloads"].items():
            flops = dict(res.get("flops", {}), **w.get("flops", {}))
            note = f"{name}: {w['distill']['speedup_median']:.2f}x the reference, ours at {flops.get('ours_fraction_of_peak', float('nan')):.0%} of the measured peak"
            if "ours_mfu_datasheet_bf16" in flops:
                note += f", MFU {flops['ours_mfu_datasheet_bf16']:.1%}"
            if "cuda_memory" in w:
                note += f", {w['cuda_memory']['ours_peak_gib']:.2f} GiB"
            notes.append(note)
        row["note"] = "; ".join(notes)
        row["benchmark"] = res.get("table")
    rows.append(row)

    student = tiny / "student"
    row = launch("int8 export (CPU)", tune("recipes/export_student.py", "--config", "configs/export_int8.yaml",
                 f"checkpoint_dir={student}", f"output_dir={out / 'int8'}"), out, args.timeout)  # fmt: skip
    onnx = out / "int8" / "model.onnx"
    row["ok"] = row["exit"] == 0 and onnx.is_file()
    row["note"] = f"model.onnx {onnx.stat().st_size / 2**20:.1f} MiB" if onnx.is_file() else "no model.onnx"
    rows.append(row)

    environment = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "seconds": time.perf_counter() - began,
    }
    text = table(rows, environment)
    print(text)
    (out / "gpu_check.md").write_text(text + "\n")
    (out / "gpu_check.json").write_text(json.dumps({"environment": environment, "checks": rows}, indent=2) + "\n")
    log(f"wrote {out / 'gpu_check.md'} and gpu_check.json")
    return 0 if all(r["ok"] for r in rows) else 1


def table(rows: List[Dict], environment: Dict) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    lines = [
        f"GPU check on {environment['device']} (torch {environment['torch']}, CUDA {environment['cuda']}), "
        f"{environment['seconds'] / 60:.1f} min",
        "",
        "| check | ok | exit | loss first -> last | tokens/s | peak GiB | s | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        loss = f"{f(r.get('loss_first'), '.3f')} -> {f(r.get('loss_last'), '.3f')}" if "loss_first" in r else "-"
        lines.append(
            f"| {r['check']} | {'yes' if r['ok'] else 'NO'} | {r['exit']} | {loss} | {f(r.get('tokens_per_s'), ',.0f')} "
            f"| {f(r.get('peak_gib'), '.2f')} | {r['seconds']:.0f} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
