#!/usr/bin/env python
"""Benchmark harness: our distillation recipe's step vs a plain transformers loop.

    python benchmarks/run.py --quick                      # small MLM shapes + the embedding workload, ~7 min on 2 cores
    python benchmarks/run.py                              # bert-base shapes + the embedding workload
    python benchmarks/run.py --workload embedding --profile
    python benchmarks/run.py --out benchmarks/results/x.json

Workloads (workloads.WORKLOADS): "bert-base" / "quick" (MiniALBERT: a teacher with an MLM head,
long windows, every loss term) and "embedding" (a sentence-embedding teacher without an MLM
head: 32 short sentences, hidden + attention terms, data.pack). "Ours" is the recipe's own
train_step(); the reference is components/testing/reference_loop.py, the loop the tests check our losses
and gradients against.

Everything is measured as a RATIO of two things timed in the same run, interleaved
(ours, ref, ref, ours, ...: the order alternates so drift cancels), median over repetitions:
the machine is shared and absolute figures are noisy. Sections, per workload:

  1. distillation throughput, ours vs reference (same weights, windows, loss; checked first)
  2. achieved FLOP/s of each step vs this machine's peak fp32 matmul FLOP/s
  3. peak memory of one step (fresh subprocess per measurement), ours vs reference
then once: inference latency, student (minialbert_128) vs teacher (BERT-base), vs their FLOP ratio.

See benchmarks/README.md and benchmarks/flops.py (the FLOP formulas), workloads.py (the two sides), measure.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import measure  # noqa: E402
import torch  # noqa: E402
import workloads  # noqa: E402
from flops import distill_flops, encoder_forward_flops  # noqa: E402

SCRATCH = Path(os.environ.get("BENCH_SCRATCH", "/tmp/bench_scratch"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def section_distill(
    ours,
    ref,
    shapes: workloads.Shapes,
    warmup: int,
    reps: int,
    probe_n: int = 2048,
    probe_dtype=torch.float32,
    device: str = "cpu",
) -> Dict:
    runners = {"ours": ours, "reference": ref}
    batch, padded = ours.batches[0], ours.padded[0]
    tokens = int(padded.attention_mask.sum())
    masked = int(padded.masked_positions.sum())
    log(f"distill: {warmup} warm-up step(s) each")
    for _ in range(warmup):
        for k in ("ours", "reference"):
            runners[k].step()
    times: Dict[str, List[float]] = {"ours": [], "reference": []}
    others: Dict[str, List[float]] = {"ours": [], "reference": []}
    own: Dict[str, List[float]] = {"ours": [], "reference": []}
    losses: Dict[str, List[float]] = {"ours": [], "reference": []}
    load = [os.getloadavg()[0]]
    peak_probe: List[float] = []
    for i in range(reps):
        order = ("ours", "reference") if i % 2 == 0 else ("reference", "ours")
        peak_probe.append(measure.matmul_probe(probe_n, dtype=probe_dtype, device=device))
        for k in order:
            m = measure.Measured(runners[k].step)
            times[k].append(m.seconds)
            others[k].append(m.other_cores)
            own[k].append(m.own_cores)
            losses[k].append(float(m.result))
        log(
            f"distill rep {i + 1}/{reps}: ours {times['ours'][-1]:.3f}s  ref {times['reference'][-1]:.3f}s  "
            f"(other load {others['ours'][-1]:.2f} / {others['reference'][-1]:.2f} cores)"
        )
        load.append(os.getloadavg()[0])
    per_rep_ratio = [r / o for o, r in zip(times["ours"], times["reference"])]
    flops = {
        "ours": distill_flops(shapes, *batch.input_ids.shape, masked, "ours"),
        "reference": distill_flops(shapes, *padded.input_ids.shape, masked, "reference"),
    }
    out = {
        "batch": shapes.batch,
        "seq": int(padded.input_ids.shape[1]),
        "non_padding_tokens": tokens,
        "padded_positions": int(padded.input_ids.numel()),
        "positions_ours": int(batch.input_ids.numel()),
        "packed_rows": int(batch.input_ids.shape[0]) if batch.segment_ids is not None else None,
        "masked_tokens": masked,
        "batch_preparation_s": ours.prepare_seconds,
        "warmup_steps": warmup,
        "order": "interleaved, alternating (ours, ref), (ref, ours), ...",
        "loadavg_1min_during": load,
        "losses_after_each_rep": losses,
        "loss_trajectory_max_rel_diff": max(
            workloads.rel_diff(a, b) for a, b in zip(losses["ours"], losses["reference"])
        ),
        "flops_per_step": flops,
        "peak_probe_flops_per_s_per_rep": peak_probe,
        "peak_probe": f"best of 2 {probe_n}^3 {str(probe_dtype)[6:]} matmuls just before each pair",
        "speedup_per_rep": per_rep_ratio,
        "speedup_median": statistics.median(per_rep_ratio),
        "speedup_of_min_times": min(times["reference"]) / min(times["ours"]),
        **quiet_pairs(per_rep_ratio, others["ours"], others["reference"]),
    }
    for k in runners:
        med = statistics.median(times[k])
        out[k] = {
            "step_times_s": times[k],
            "other_cores_busy_per_rep": others[k],
            "own_cores_per_rep": own[k],
            "step_time": measure.summary(times[k]),
            "tokens_per_s_median": tokens / med,
            "tokens_per_s_per_rep": [tokens / t for t in times[k]],
            "achieved_flops_per_s_median": flops[k]["total"] / med,
            "fraction_of_probe_peak_per_rep": [flops[k]["total"] / t / p for t, p in zip(times[k], peak_probe)],
        }
        out[k]["fraction_of_probe_peak_median"] = statistics.median(out[k]["fraction_of_probe_peak_per_rep"])
    return out


QUIET = 0.25  # other processes using less than this many cores during both halves of a pair


def quiet_pairs(ratios: List[float], others_a: List[float], others_b: List[float]) -> Dict:
    """Median ratio over the pairs that ran while the rest of the machine was (nearly) idle."""
    quiet = [r for r, a, b in zip(ratios, others_a, others_b) if a < QUIET and b < QUIET]
    return {
        "quiet_threshold_other_cores": QUIET,
        "quiet_pairs": len(quiet),
        "speedup_median_quiet": statistics.median(quiet) if quiet else None,
    }


def section_saved_tensors(ours, ref) -> Dict:
    out = {}
    for k, r in (("ours", ours), ("reference", ref)):
        params = list(r.student.parameters()) + list(r.teacher.parameters())
        out[k + "_mib"] = measure.saved_tensor_bytes(r.forward, params) / 2**20
    out["method"] = (
        "sum of distinct storages autograd saves for backward during the loss forward "
        "(torch.autograd.graph.saved_tensors_hooks), parameters excluded"
    )
    return out


def section_cuda_memory(ours, ref, device: str) -> Dict:
    """Peak CUDA memory allocated during one steady step of each side (models and optimizer
    state included: what the device must hold)."""
    out = {}
    for name, side in (("ours", ours), ("reference", ref)):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        side.step()
        out[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    out["ratio_ours_over_ref"] = out["ours_peak_gib"] / out["reference_peak_gib"]
    return out


def section_memory(assets, shapes: workloads.Shapes, seed: int, threads: int, reps: int, bf16: bool = False) -> Dict:
    results: Dict[str, List[Dict]] = {"ours": [], "reference": []}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    for i in range(reps):
        for kind in ("ours", "reference") if i % 2 == 0 else ("reference", "ours"):
            log(f"memory: fresh process for {kind} ({i + 1}/{reps})")
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--_memory-probe",
                kind,
                "--_assets",
                json.dumps(assets),
                "--_shapes",
                json.dumps(asdict(shapes)),
                "--seed",
                str(seed),
                "--threads",
                str(threads),
                *(["--bf16"] if bf16 else []),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
            if proc.returncode != 0:
                raise RuntimeError(f"memory probe failed:\n{proc.stderr[-3000:]}")
            results[kind].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out: Dict = {
        "runs": results,
        "method": results["ours"][0]["method"]
        + (
            "; each measurement in a fresh python process with MALLOC_MMAP_THRESHOLD_=65536 "
            "(freed tensors return to the OS)"
        ),
    }
    for key in ("first_step_delta_mib", "steady_step_delta_mib", "steady_step_peak_mib"):
        o = statistics.median(r[key] for r in results["ours"])
        f = statistics.median(r[key] for r in results["reference"])
        out[key] = {"ours": o, "reference": f, "ratio_ours_over_ref": o / f if f else float("nan")}
    return out


def section_inference(batches: List[int], seq: int, warmup: int, reps: int, seed: int) -> Dict:
    """BERT-base teacher encoder vs minialbert_128 student encoder, no MLM head (what a
    downstream task runs), no padding, eval + no_grad, interleaved."""
    from components.models.bert import BertEncoder
    from components.models.recursive import minialbert_128

    torch.manual_seed(seed)
    models = {
        "teacher": BertEncoder(
            vocab_size=30522,
            hidden_size=768,
            num_layers=12,
            num_heads=12,
            intermediate_size=3072,
            dropout=0.0,
            attention_dropout=0.0,
        ).eval(),
        "student": minialbert_128(dropout=0.0, attention_dropout=0.0).eval(),
    }
    out: Dict = {
        "seq": seq,
        "models": {
            "teacher": "BertEncoder 12 layers H=768 12 heads FFN 3072 (BERT-base), no MLM head",
            "student": "minialbert_128: E=128 H=768 6 iterations, MiniALBERT adapters r=16, no MLM head",
        },
        "batches": {},
    }
    g = torch.Generator().manual_seed(seed)
    for b in batches:
        ids = torch.randint(999, 30522, (b, seq), generator=g)
        ids[:, 0], ids[:, -1] = workloads.CLS, workloads.SEP
        mask = torch.ones_like(ids)
        fns = {k: (lambda m=m, ids=ids, mask=mask: m(ids, mask, return_logits=False)) for k, m in models.items()}
        times: Dict[str, List[float]] = {"teacher": [], "student": []}
        others: Dict[str, List[float]] = {"teacher": [], "student": []}
        with torch.no_grad():
            for _ in range(warmup):
                for f in fns.values():
                    f()
            for i in range(reps):
                for k in ("student", "teacher") if i % 2 == 0 else ("teacher", "student"):
                    m = measure.Measured(fns[k])
                    times[k].append(m.seconds)
                    others[k].append(m.other_cores)
        flops = {
            "teacher": encoder_forward_flops(b, seq, 12, 768, 3072),
            "student": encoder_forward_flops(b, seq, 6, 768, 3072, embed=128, adapter_reduction=16),
        }
        ratios = [t / s for s, t in zip(times["student"], times["teacher"])]
        out["batches"][str(b)] = {
            "times_s": times,
            "teacher_ms_median": 1000 * statistics.median(times["teacher"]),
            "student_ms_median": 1000 * statistics.median(times["student"]),
            "other_cores_busy": others,
            "speedup_per_rep": ratios,
            "speedup_median": statistics.median(ratios),
            "speedup_of_min_times": min(times["teacher"]) / min(times["student"]),
            **quiet_pairs(ratios, others["student"], others["teacher"]),
            "flops": flops,
            "flop_ratio_teacher_over_student": flops["teacher"]["total"] / flops["student"]["total"],
        }
        log(
            f"inference b={b}: teacher {out['batches'][str(b)]['teacher_ms_median']:.1f} ms, "
            f"student {out['batches'][str(b)]['student_ms_median']:.1f} ms"
        )
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def section_variants(
    assets, shapes: workloads.Shapes, warmup: int, reps: int, compile_too: bool, device: str = "cpu"
) -> Dict:
    """Variants of our step (config overrides), each timed interleaved against our plain fp32 step."""

    def side(**overrides):
        return workloads.RecipeSide(assets, shapes, SCRATCH, **{"device": device, "dtype": "fp32", **overrides})

    makers = {
        "teacher bf16": lambda: side(**{"teacher.dtype": "bf16"}),
        "dtype=bf16 (autocast, fp32 weights)": lambda: side(dtype="bf16"),
        "dtype=bf16 + teacher bf16": lambda: side(dtype="bf16", **{"teacher.dtype": "bf16"}),
        "cached teacher outputs (bound)": lambda: workloads.cached_teacher(side()),
    }
    if shapes.name == "embedding":
        makers["padded rows (data.pack=false)"] = lambda: side(**{"data.pack": False})
    if compile_too:
        makers["torch.compile"] = lambda: side(compile=True)
        makers["torch.compile + dtype=bf16"] = lambda: side(compile=True, dtype="bf16")
    out: Dict = {}
    for name, make in makers.items():
        base, variant = side(), make()
        a, b = (float(side.forward()["total"].detach()) for side in (base, variant))
        log(f"variant {name!r}: warm-up")
        started = time.perf_counter()
        variant.step()
        first_step = time.perf_counter() - started
        for _ in range(warmup):
            base.step()
            variant.step()
        times = {"base": [], "variant": []}
        for i in range(reps):
            for key in ("base", "variant") if i % 2 == 0 else ("variant", "base"):
                times[key].append(measure.timed((base if key == "base" else variant).step))
        ratios = [x / y for x, y in zip(times["base"], times["variant"])]
        out[name] = {
            "loss_rel_diff_before_training": abs(a - b) / abs(a),
            "first_step_s": first_step,
            "step_times_s": times,
            "speedup_over_ours_fp32_median": statistics.median(ratios),
            "speedup_per_rep": ratios,
        }
        base.close()
        variant.close()
        del base, variant
    masked = 0.15 * shapes.seq if shapes.mlm_head else 0
    per_window = workloads.cache_bytes_per_window(shapes, masked)
    out["cache_disk"] = {
        "bytes_per_window": per_window,
        "windows_assumed": 40_000_000,
        "note": "English Wikipedia, about 5B tokens, in 256-token windows every 128 tokens: ~40M windows",
    }
    return out


def args_bf16(res: Dict) -> bool:
    return bool(res.get("settings", {}).get("bf16_autocast"))


def workload_table(res: Dict) -> str:
    lines = []

    def row(name, a, b, ratio, note=""):
        lines.append(f"{name:<44}{a:>14}{b:>14}{ratio:>10}  {note}")

    def f(x, spec=".1f"):
        return format(x, spec) if isinstance(x, (int, float)) else str(x)

    sh = res["shapes"]
    lines.append(
        f"shapes={sh['name']}  teacher {sh['t_layers']}x{sh['t_hidden']}  student E={sh['s_embed']} "
        f"H={sh['s_hidden']} x{sh['s_iters']}  vocab {sh['vocab']}  threads {res['environment']['torch_threads']}  "
        f"cpu {res['environment']['cpu_model']}{'  bf16 autocast' if args_bf16(res) else ''}"
        + (f"  device {res['environment']['cuda']['device_name']}" if res["environment"].get("cuda") else "")
    )
    eq = res.get("equivalence")
    if eq:
        t = eq["terms"]
        lines.append(
            "losses (same windows, before any update): total rel diff "
            f"{t['total']['rel_diff']:.2e} (ours {t['total']['ours']:.6f}, ref {t['total']['reference']:.6f}); "
            + ", ".join(f"{k} {v['rel_diff']:.1e}" for k, v in t.items() if k != "total")
        )
    d = res.get("distill")
    if d:
        packed = f"; ours packs them in {d['packed_rows']} rows" if d.get("packed_rows") else ""
        lines.append(
            f"batch: {d['batch']} sequences, {d['non_padding_tokens']} tokens in {d['padded_positions']} padded positions{packed}"
        )
    lines.append("")
    row("metric", "ours", "reference", "ratio", "(ratio = ours/reference unless noted)")
    lines.append("-" * 96)
    d = res.get("distill")
    if d:
        o, r = d["ours"], d["reference"]
        row(
            "distill step time, median s",
            f(o["step_time"]["median"], ".3f"),
            f(r["step_time"]["median"], ".3f"),
            f(o["step_time"]["median"] / r["step_time"]["median"], ".2f"),
        )
        row(
            "distill throughput, non-pad tokens/s",
            f(o["tokens_per_s_median"]),
            f(r["tokens_per_s_median"]),
            f(d["speedup_median"], ".2f"),
            f"median of {len(d['speedup_per_rep'])} paired reps "
            f"[{min(d['speedup_per_rep']):.2f}..{max(d['speedup_per_rep']):.2f}]",
        )
        q = d["speedup_median_quiet"]
        row(
            "  same, quiet pairs only / from min times",
            "",
            "",
            f(q, ".2f") if q is not None else "n/a",
            f"{d['quiet_pairs']} pairs with other load < {QUIET} cores; min-time ratio {d['speedup_of_min_times']:.2f}",
        )
        fo, fr = d["flops_per_step"]["ours"]["total"], d["flops_per_step"]["reference"]["total"]
        row("matmul GFLOP per step (analytic)", f(fo / 1e9), f(fr / 1e9), f(fo / fr, ".2f"))
        fl = res.get("flops")
        if fl:
            row(
                "achieved GFLOP/s (own FLOP count)",
                f(o["achieved_flops_per_s_median"] / 1e9),
                f(r["achieved_flops_per_s_median"] / 1e9),
                f(o["achieved_flops_per_s_median"] / r["achieved_flops_per_s_median"], ".2f"),
            )
            row(
                f"  fraction of peak {'bf16' if args_bf16(res) else 'fp32'} matmul",
                f(fl["ours_fraction_of_peak"], ".1%"),
                f(fl["reference_fraction_of_peak"], ".1%"),
                "",
                f"peak {fl['peak_flops_per_s'] / 1e9:.1f} GFLOP/s ({fl['peak_matmul_n']}^3 matmul, best of run)",
            )
            if "ours_mfu_datasheet_bf16" in fl:
                row(
                    "  MFU (data sheet's dense bf16 peak)",
                    f(fl["ours_mfu_datasheet_bf16"], ".1%"),
                    f(fl["reference_mfu_datasheet_bf16"], ".1%"),
                    "",
                    res["environment"]["cuda"]["device_name"],
                )
        row(
            "  fraction of a peak probe run beside it",
            f(o["fraction_of_probe_peak_median"], ".1%"),
            f(r["fraction_of_probe_peak_median"], ".1%"),
            "",
            "median over reps of achieved / matmul probe timed just before the pair",
        )
        row(
            "loss after each timed step, max rel diff",
            "",
            "",
            f(d["loss_trajectory_max_rel_diff"], ".1e"),
            "both sides train identically",
        )
        prep = d.get("batch_preparation_s")
        if prep is not None:
            row(
                "  batch preparation (pad, mask, pack), ms",
                f(1000 * prep),
                "",
                f(prep / o["step_time"]["median"], ".1%"),
                "of our step, on the training thread (median of 5 steps' batches)",
            )
    st = res.get("saved_tensors")
    if st:
        row(
            "autograd-saved activations, MiB",
            f(st["ours_mib"]),
            f(st["reference_mib"]),
            f(st["ours_mib"] / st["reference_mib"], ".2f"),
        )
    cm = res.get("cuda_memory")
    if cm:
        row(
            "peak CUDA memory of a step, GiB",
            f(cm["ours_peak_gib"], ".2f"),
            f(cm["reference_peak_gib"], ".2f"),
            f(cm["ratio_ours_over_ref"], ".2f"),
            "models, optimizer state and activations",
        )
    m = res.get("memory")
    if m:
        for key, name in (
            ("steady_step_delta_mib", "peak RSS of a step - RSS before, MiB"),
            ("first_step_delta_mib", "  same, first step (allocs AdamW state)"),
        ):
            row(name, f(m[key]["ours"]), f(m[key]["reference"]), f(m[key]["ratio_ours_over_ref"], ".2f"))
    var = res.get("variants")
    if var:
        lines.append("")
        lines.append(
            f"{'variants of our step':<44}{'speed-up':>14}{'loss diff':>14}{'1st step':>10}  speed-up over our fp32 step (paired median); 1st step in s"
        )
        lines.append("-" * 96)
        for name, v in var.items():
            if name == "cache_disk":
                continue
            lines.append(
                f"{'  ' + name:<44}{v['speedup_over_ours_fp32_median']:>14.2f}"
                f"{v['loss_rel_diff_before_training']:>14.1e}{v['first_step_s']:>10.1f}"
            )
        disk = var["cache_disk"]
        per = disk["bytes_per_window"]
        lines.append(f"{'  cache size per window':<44}" + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in per.items()))
        lines.append(
            f"{'  cache size for ' + format(disk['windows_assumed'] / 1e6, '.0f') + 'M windows':<44}"
            + ", ".join(f"{k} {v * disk['windows_assumed'] / 2**40:.1f} TiB" for k, v in per.items())
        )
    prof = res.get("profile")
    if prof:
        for k, p in prof.items():
            lines.append("")
            lines.append(f"top ops by self CPU time, {k} step ({p['total_self_cpu_ms_per_step']:.0f} ms/step profiled)")
            for e in p["top"]:
                lines.append(
                    f"  {e['op']:<42}{e['self_cpu_ms_per_step']:>10.1f} ms {e['share']:>7.1%}"
                    f"  x{e['calls_per_step']:.0f}"
                )
    return "\n".join(lines)


def table(res: Dict) -> str:
    blocks = []
    for w in res["workloads"].values():
        flops = dict(res.get("flops") or {}, **w.get("flops", {})) if res.get("flops") else None
        blocks.append(
            workload_table({**w, "environment": res["environment"], "settings": res["settings"], "flops": flops})
        )
    lines = []
    inf = res.get("inference")
    if inf:
        lines.append("")
        lines.append(
            f"{'inference, seq ' + str(inf['seq']) + ', no_grad':<44}{'student ms':>14}{'teacher ms':>14}"
            f"{'speedup':>10}  FLOP ratio; quiet-pair median (n); min-time ratio"
        )
        lines.append("-" * 96)
        for b, v in inf["batches"].items():
            q = v["speedup_median_quiet"]
            lines.append(
                f"{'  batch ' + b:<44}{v['student_ms_median']:>14.1f}{v['teacher_ms_median']:>14.1f}"
                f"{v['speedup_median']:>10.2f}  {v['flop_ratio_teacher_over_student']:.2f}; "
                f"{'n/a' if q is None else format(q, '.2f')} ({v['quiet_pairs']}); {v['speedup_of_min_times']:.2f}"
            )
    if lines:
        blocks.append("\n".join(lines).lstrip("\n"))
    return "\n\n".join(blocks)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="the small MLM shapes instead of bert-base, fewer sections' reps"
    )
    p.add_argument(
        "--workload",
        nargs="*",
        choices=sorted(workloads.WORKLOADS),
        help="workloads to run (default: quick or bert-base, then embedding)",
    )
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/<time>_<workloads>.json)")
    p.add_argument("--batch", type=int, help="override the distillation batch size")
    p.add_argument("--seq", type=int, help="override the distillation sequence length")
    p.add_argument("--reps", type=int, help="timed repetitions per side (default 20 quick, 6 full)")
    p.add_argument("--warmup", type=int, help="warm-up steps per side (default 2 quick, 1 full)")
    p.add_argument("--mem-reps", type=int, default=2, help="fresh-process memory probes per side")
    p.add_argument("--threads", type=int, default=measure.available_cores(), help="torch threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["distill", "variants", "memory", "inference", "peak"],
        help="sections to leave out",
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="both sides' forward under CPU bf16 autocast (the recipe's dtype=bf16); peak is bf16 too",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda[:N]: both sides on it; on CUDA, MFU against its bf16 peak and peak CUDA memory",
    )
    p.add_argument("--profile", action="store_true", help="torch.profiler table of the top ops of each step")
    p.add_argument("--compile", action="store_true", help="also time our step under torch.compile (slow to compile)")
    p.add_argument("--keep-assets", action="store_true", help="keep the random checkpoints under the scratch dir")
    # internal: one memory measurement in a fresh process
    p.add_argument("--_memory-probe", dest="memory_probe", help=argparse.SUPPRESS)
    p.add_argument("--_assets", dest="assets", help=argparse.SUPPRESS)
    p.add_argument("--_shapes", dest="shapes", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_workload(shapes: workloads.Shapes, args, reps: int, warmup: int, peak_dtype) -> Dict:
    res: Dict = {"shapes": asdict(shapes), "loss": shapes.loss}
    SCRATCH.mkdir(parents=True, exist_ok=True)
    asset_dir = Path(tempfile.mkdtemp(prefix=f"assets-{shapes.name}-", dir=SCRATCH))
    try:
        log(f"{shapes.name}: building a random teacher, student and corpus under {asset_dir}")
        assets = workloads.make_assets(shapes, asset_dir, args.seed)
        if "distill" not in args.skip:
            torch.manual_seed(args.seed)
            ours, ref = workloads.make_sides(assets, shapes, SCRATCH, args.bf16, args.device)
            res["equivalence"] = workloads.loss_agreement(ours, ref)
            log(f"losses: total rel diff {res['equivalence']['terms']['total']['rel_diff']:.2e}")
            res["saved_tensors"] = section_saved_tensors(ours, ref)
            res["distill"] = section_distill(
                ours, ref, shapes, warmup, reps, probe_dtype=peak_dtype, device=args.device
            )
            if args.device != "cpu":
                res["cuda_memory"] = section_cuda_memory(ours, ref, args.device)
            if args.profile:
                log("profiling")
                res["profile"] = {k: workloads.profile_step(r) for k, r in (("ours", ours), ("reference", ref))}
            ours.close()
            del ours, ref
            if "variants" not in args.skip:
                res["variants"] = section_variants(assets, shapes, warmup, max(3, reps // 2), args.compile, args.device)
        if "memory" not in args.skip and args.device == "cpu":  # (CUDA: cuda_memory above)
            res["memory"] = section_memory(assets, shapes, args.seed, args.threads, args.mem_reps, args.bf16)
    finally:
        if not args.keep_assets:
            shutil.rmtree(asset_dir, ignore_errors=True)
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        shapes = workloads.Shapes(**json.loads(args.shapes))
        workloads.quiet_transformers()
        result = workloads.memory_probe(
            args.memory_probe, json.loads(args.assets), shapes, args.seed, args.threads, args.bf16, SCRATCH
        )
        print(json.dumps(result))
        return 0

    workloads.quiet_transformers()
    started = time.time()
    names = args.workload or ["quick" if args.quick else "bert-base", "embedding"]
    chosen = [workloads.WORKLOADS[n] for n in names]
    if args.batch or args.seq:
        chosen = [w.replace(batch=args.batch or w.batch, seq=args.seq or w.seq) for w in chosen]
    reps = args.reps or (20 if args.quick else 6)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 1)
    out_path = args.out or HERE / "results" / f"{dt.datetime.now():%Y%m%d-%H%M%S}_{'+'.join(names)}.json"

    res: Dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "environment": measure.environment(),
        "settings": {
            "bf16_autocast": args.bf16,
            "reps": reps,
            "warmup": warmup,
            "mem_reps": args.mem_reps,
            "seed": args.seed,
            "optimizer": f"AdamW lr {workloads.LR} wd {workloads.WEIGHT_DECAY} (not on biases and norms)",
            "clip_grad_norm": workloads.CLIP,
        },
        "workloads": {},
    }
    log(f"workloads {names}; {args.threads} threads; reps {reps}, warm-up {warmup}")

    peaks = []
    peak_dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak_n = 2048 if args.device == "cpu" else 8192  # a GPU needs a larger matmul to reach its peak
    if args.device != "cpu":
        res["environment"]["cuda"] = measure.cuda_bf16_peak(args.device)
        if "inference" not in args.skip:
            args.skip.append("inference")  # a CPU latency section
    if "peak" not in args.skip:
        log("peak matmul (start)")
        peaks.append(measure.peak_matmul(n=peak_n, dtype=peak_dtype, device=args.device))
    for shapes in chosen:
        res["workloads"][shapes.name] = run_workload(shapes, args, reps, warmup, peak_dtype)

    if "inference" not in args.skip:
        res["inference"] = section_inference(
            [1, 8], 128, warmup=1 if args.quick else 2, reps=5 if args.quick else 9, seed=args.seed
        )

    if "peak" not in args.skip:
        log("peak matmul (end)")
        peaks.append(measure.peak_matmul(n=peak_n, dtype=peak_dtype, device=args.device))
        best = max(p["best_flops_per_s"] for p in peaks)
        res["flops"] = {
            "peak_dtype": str(peak_dtype),
            "peak_matmul_runs": peaks,
            "peak_flops_per_s": best,
            "peak_matmul_n": peaks[0]["n"],
        }
        for w in res["workloads"].values():
            if "distill" in w:
                w["flops"] = {
                    f"{k}_fraction_of_peak": w["distill"][k]["achieved_flops_per_s_median"] / best
                    for k in ("ours", "reference")
                }
                sheet = res["environment"].get("cuda", {}).get("datasheet_bf16_flops_per_s")
                if sheet:  # MFU as GPU papers give it: against the data sheet's dense bf16 peak
                    for k in ("ours", "reference"):
                        w["flops"][f"{k}_mfu_datasheet_bf16"] = w["distill"][k]["achieved_flops_per_s_median"] / sheet

    res["environment"]["loadavg_at_end"] = list(os.getloadavg())
    res["duration_s"] = time.time() - started
    text = table(res)
    res["table"] = text
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=2) + "\n")
    print(text)
    print(f"\nraw figures: {out_path}  ({res['duration_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
