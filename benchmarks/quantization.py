#!/usr/bin/env python
"""Quantised students: fp32 vs post-training int8 (PTQ) vs quantisation-aware int8 (QAT).

    python benchmarks/quantization.py --quick     # a few minutes on 2 cores
    python benchmarks/quantization.py             # longer distillation, every scheme, more repetitions

1. Quality, on held-out windows of the smoke corpus. The smoke teacher is distilled into a student
   for S steps (fp32, the recipe itself); from that checkpoint two branches train K more steps
   each: fp32 (-> the fp32 student, and PTQ int8 from it) and fake-quantised (-> QAT int8). All
   three have the same training. Reported: masked-LM accuracy (the held-out masks of the run's
   evaluator) and the cosine of the last hidden state against the fp32 student, with the int8
   models run in ONNX Runtime from the files recipes/export_student.py writes.
2. Size and CPU latency at miniALBERT-128 shapes (random weights: neither depends on their
   values): file sizes against the fp32 ONNX export, and the latency of the fp32 student in
   PyTorch (what users run today), the fp32 ONNX file, the int8 ONNX file and the int8 .pt2
   program at 1x128 and 8x128 tokens. Every ratio is of two things timed in the same run,
   interleaved (the order rotates), median of the repetitions: the machine is shared.

Results: a table on stdout and JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import logging
import os
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import measure  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import workloads  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from components.checkpointing import load_student  # noqa: E402
from components.models import minialbert_128  # noqa: E402
from components.quantization import get_scheme  # noqa: E402
from components.quantization.export import export_quantized, fp32_weight_bytes  # noqa: E402
from components.quantization.onnx_export import export_onnx  # noqa: E402

SCRATCH = Path(os.environ.get("BENCH_SCRATCH", "/tmp/bench_scratch")) / "quantization"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# 1. Quality
# ---------------------------------------------------------------------------------------------


def distill_config(output_dir: Path, assets: Path, steps: int, extra: int, qat: bool, resume: bool) -> Dict:
    """configs/tiny.yaml reading the smoke assets from ``assets`` (the same for both branches)."""
    tiny = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "tiny.yaml"))
    tiny["teacher"] = {"_component_": "components.checkpointing.hf_teacher", "path": str(assets / "teacher")}
    tiny["data"]["source"] = str(assets / "corpus.jsonl")
    tiny.update(
        output_dir=str(output_dir),
        max_steps=steps + extra,
        save_every_n_steps=steps,
        eval_every_n_steps=None,
        keep_last_n_checkpoints=0,
        resume_from_checkpoint=resume,
        stages=[{"name": "distill", "steps": steps}, {"name": "qat" if qat else "fp32", "fake_quantize": qat}],
    )
    return tiny


def run_distillation(cfg: Dict):
    from components.training.run import execute
    from recipes.distill_recursive import DistillRecursiveRecipe

    return execute(DistillRecursiveRecipe(OmegaConf.create(cfg)))


def onnx_outputs(path: Path, batches) -> List[List[np.ndarray]]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [
        session.run(
            None,
            {
                "input_ids": b.input_ids.numpy(),
                "attention_mask": b.attention_mask.numpy(),
                "token_type_ids": np.zeros_like(b.input_ids.numpy()),
            },
        )
        for b in batches
    ]


@torch.no_grad()
def torch_outputs(student, batches) -> List[List[np.ndarray]]:
    student.eval()
    outs = []
    for b in batches:
        out = student(b.input_ids, b.attention_mask)
        outs.append([out.last_hidden_state.numpy(), out.logits.numpy()])
    return outs


def quality_of(outputs, reference, batches) -> Dict[str, float]:
    correct = masked = 0
    cosines = []
    for (hidden, logits), (ref_hidden, _), b in zip(outputs, reference, batches):
        where = b.masked_positions.numpy()
        correct += int((logits.argmax(-1)[where] == b.labels.numpy()[where]).sum())
        masked += int(where.sum())
        real = b.attention_mask.bool().numpy()
        x, y = hidden[real], ref_hidden[real]
        cosines.append((x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1) + 1e-12))
    return {"mlm_accuracy": correct / masked, "hidden_cosine_vs_fp32": float(np.concatenate(cosines).mean())}


def section_quality(steps: int, extra: int, schemes: List[str]) -> Dict:
    from components.smoke import ensure_smoke_assets
    from recipes.export_student import export

    root = SCRATCH / "quality"
    if root.exists():
        shutil.rmtree(root)
    assets = ensure_smoke_assets(str(SCRATCH / "smoke_assets"))  # built once, reused by later runs
    fp32_dir = root / "fp32"
    log(f"quality: distilling the smoke teacher, {steps} fp32 steps then {extra} more (fp32 branch)")
    recipe = run_distillation(distill_config(fp32_dir, assets, steps, extra, qat=False, resume=False))
    batches = recipe.evaluator.batches
    fp32 = torch_outputs(load_student(str(fp32_dir / "student")), batches)
    rows = {"fp32 student (PyTorch)": quality_of(fp32, fp32, batches)}
    checkpoint = f"step_{steps:08d}"
    for scheme in schemes:
        qat_dir = root / f"qat_{scheme}"
        log(f"quality: the {scheme} QAT branch: {extra} fake-quantised steps from the same step-{steps} checkpoint")
        shutil.copytree(fp32_dir / "checkpoints" / checkpoint, qat_dir / "checkpoints" / checkpoint)
        cfg = distill_config(qat_dir, assets, steps, extra, qat=True, resume=True)
        cfg["quantization"] = {"scheme": scheme}
        run_distillation(cfg)
        log(f"quality: exporting PTQ (fp32 branch) and QAT {scheme} files")
        common = {"eval_batch_size": 8, "eval_max_length": 64, "scheme": scheme}
        ptq_file, qat_file = root / f"ptq_{scheme}", root / f"qat_{scheme}_export"
        export(OmegaConf.create({"checkpoint_dir": str(fp32_dir / "student"), "output_dir": str(ptq_file), **common}))
        export(OmegaConf.create({"checkpoint_dir": str(qat_dir / "student"), "output_dir": str(qat_file), **common}))
        qat_float = torch_outputs(load_student(str(qat_dir / "student")), batches)
        qat_int = onnx_outputs(qat_file / "model.onnx", batches)
        rows[f"PTQ {scheme} (ONNX Runtime)"] = quality_of(onnx_outputs(ptq_file / "model.onnx", batches), fp32, batches)
        rows[f"QAT {scheme} (ONNX Runtime)"] = quality_of(qat_int, fp32, batches)
        rows[f"QAT {scheme} (ONNX Runtime)"]["hidden_cosine_vs_own_float"] = quality_of(qat_int, qat_float, batches)[
            "hidden_cosine_vs_fp32"
        ]
        rows[f"QAT {scheme}: its float weights (PyTorch)"] = quality_of(qat_float, fp32, batches)
    return {
        "steps": steps,
        "extra_steps": extra,
        "heldout_windows": sum(len(b.input_ids) for b in batches),
        "masked_tokens": int(sum(b.masked_positions.sum() for b in batches)),
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# 2. Size and latency
# ---------------------------------------------------------------------------------------------


def section_speed(schemes: List[str], seq: int, batches: List[int], warmup: int, reps: int) -> Dict:
    import onnxruntime as ort

    root = SCRATCH / "speed"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    torch.manual_seed(0)
    student = minialbert_128(dropout=0.0, attention_dropout=0.0).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (max(batches), seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    fp32_weights = fp32_weight_bytes(student)

    log("speed: exporting the fp32 ONNX baseline")
    trace = {k: v[:4, :64].clone() for k, v in batch.items()}
    example = tuple(trace[k][:2].clone() for k in ("input_ids", "attention_mask", "token_type_ids"))
    export_onnx(student, None, root / "fp32.onnx", example, student.config["max_position_embeddings"])
    sizes = {"fp32 weights (safetensors)": fp32_weights, "fp32 model.onnx": (root / "fp32.onnx").stat().st_size}
    files = {}
    for name in schemes:
        log(f"speed: exporting {name}")
        folder = root / name
        folder.mkdir()
        export_quantized(student, folder, get_scheme(name), trace)
        files[name] = folder
        sizes[f"{name} model.onnx"] = (folder / "model.onnx").stat().st_size
        sizes[f"{name} model.pt2"] = (folder / "model.pt2").stat().st_size

    sessions = {"fp32": ort.InferenceSession(str(root / "fp32.onnx"), providers=["CPUExecutionProvider"])}
    for name, folder in files.items():
        sessions[name] = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    programs = {name: torch.export.load(str(folder / "model.pt2")).module() for name, folder in files.items()}

    latency = {}
    for b in batches:
        inputs = {k: v[:b] for k, v in batch.items()}
        feeds = {k: v.numpy() for k, v in inputs.items()}
        args = tuple(inputs.values())

        def torch_fp32(args=args):
            with torch.no_grad():
                student(*args)

        runners: Dict[str, Callable] = {"PyTorch fp32": torch_fp32}
        for name, session in sessions.items():
            runners[f"ONNX Runtime {name}"] = functools.partial(session.run, None, feeds)
        for name, program in programs.items():
            runners[f"torch.export {name} (.pt2)"] = functools.partial(torch.no_grad()(program), *args)
        log(f"speed: {b}x{seq} tokens, {warmup} warm-up + {reps} interleaved repetitions of {len(runners)} runners")
        for fn in runners.values():
            for _ in range(warmup):
                fn()
        times: Dict[str, List[float]] = {k: [] for k in runners}
        names = list(runners)
        for r in range(reps):
            for k in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
                times[k].append(measure.timed(runners[k]))
        median = {k: statistics.median(v) for k, v in times.items()}
        latency[f"{b}x{seq}"] = {
            "median_ms": {k: round(v * 1000, 2) for k, v in median.items()},
            "speedup_vs_pytorch_fp32": {k: round(median["PyTorch fp32"] / v, 3) for k, v in median.items()},
            "speedup_vs_onnx_fp32": {k: round(median["ONNX Runtime fp32"] / v, 3) for k, v in median.items()},
        }
    return {
        "shape": "minialbert_128 (E=128, H=768, 6 iterations, adapters, MLM head)",
        "bytes": sizes,
        "size_vs_fp32_weights": {k: round(v / fp32_weights, 4) for k, v in sizes.items()},
        "latency": latency,
        "onnxruntime": ort.__version__,
        "ort_threads": "default (one per physical core)",
    }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def table(res: Dict) -> str:
    lines = [
        f"CPU: {res['environment']['cpu_model']} ({res['environment']['available_cores']} cores), "
        f"torch {res['environment']['torch']}, onnxruntime {res['speed']['onnxruntime']}"
    ]
    q = res["quality"]
    lines += [
        "",
        f"Quality: smoke teacher -> tiny student, {q['steps']} + {q['extra_steps']} steps; "
        f"{q['heldout_windows']} held-out windows, {q['masked_tokens']} masked tokens",
        f"{'model':46s} {'MLM accuracy':>12s} {'cos vs fp32':>12s}",
    ]
    for name, row in q["rows"].items():
        lines.append(f"{name:46s} {row['mlm_accuracy']:12.4f} {row['hidden_cosine_vs_fp32']:12.5f}")
    s = res["speed"]
    lines += ["", f"Size at {s['shape']} (ratio to fp32 weights)"]
    for name, ratio in s["size_vs_fp32_weights"].items():
        lines.append(f"  {name:36s} {s['bytes'][name] / 1e6:8.1f} MB  {ratio:6.3f}")
    for shape, row in s["latency"].items():
        lines += ["", f"Latency {shape} tokens: median ms, speed-up vs PyTorch fp32, vs ONNX Runtime fp32"]
        for name, ms in row["median_ms"].items():
            lines.append(
                f"  {name:36s} {ms:9.1f} ms  {row['speedup_vs_pytorch_fp32'][name]:6.2f}x  "
                f"{row['speedup_vs_onnx_fp32'][name]:6.2f}x"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short distillation, int8_dynamic only, fewer repetitions")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    workloads.quiet_transformers()
    torch.manual_seed(0)
    if args.quick:
        steps, extra, quality_schemes, schemes, reps = 150, 50, ["int8_dynamic"], ["int8_dynamic"], 7
    else:
        schemes = ["int8_dynamic", "int8_weight", "int4_weight"]
        steps, extra, quality_schemes, reps = 600, 200, ["int8_dynamic", "int4_weight"], 15
    res = {"environment": measure.environment(), "args": vars(args) | {"out": str(args.out)}}
    res["quality"] = section_quality(steps, extra, quality_schemes)
    res["speed"] = section_speed(schemes, seq=128, batches=[1, 8], warmup=2, reps=reps)
    print(table(res))
    out = args.out or HERE / "results" / f"quantization-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    log(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
