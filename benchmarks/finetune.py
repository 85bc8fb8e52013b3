#!/usr/bin/env python
"""Fine-tuning speed: the fine-tuning recipe's own step, eager fp32 against torch.compile and
bf16 autocast, each measured interleaved against a fresh eager fp32 recipe in the same run.

    python benchmarks/finetune.py            # minialbert_128 shapes, ~6 min on 2 cores
    python benchmarks/finetune.py --quick    # small shapes, ~2 min

Side: ``FinetuneRecipe`` (recipes/finetune.py, what ``tune run`` executes) set up on a random
student (E 128, H 768, 12 heads, FFN 3072, 6 iterations: minialbert_128 without adapters;
``--quick``: H 256, 2 iterations) and a two-class task of random-word sentences of 5-60 words
(SST-2's range), ``tuning: full``, batch 32, ``pad_to_multiple_of: 8``. It times
``_train_step`` over a fixed cycle of 8 training batches of different lengths: the shapes of a
real epoch, so a compiled model meets the dynamic shapes it would meet in a run.

Per variant: the first cycle's extra seconds over the steady state (compilation, recompiles),
the steady speed-up (paired median of cycles), and the break-even step count: extra seconds /
seconds saved per step. A variant that is slower never pays off.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import measure  # noqa: E402
import torch  # noqa: E402
import workloads  # noqa: E402

SCRATCH = Path(os.environ.get("BENCH_SCRATCH", "/tmp/bench_scratch")) / "finetune"
CYCLE = 8  # batches of different lengths, timed as one unit
BATCH = 32
VARIANTS = {"torch.compile": {"compile": True}, "dtype=bf16": {"dtype": "bf16"}}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_task(folder: Path, vocab: int, seed: int) -> dict:
    """train.jsonl (CYCLE batches) and validation.jsonl of random-word sentences, 5-60 words."""
    rng = random.Random(seed)
    files = {}
    for split, rows in (("train", CYCLE * BATCH), ("validation", BATCH)):
        path = folder / f"{split}.jsonl"
        with path.open("w") as f:
            for _ in range(rows):
                words = " ".join(f"w{rng.randrange(999, vocab)}" for _ in range(rng.randint(5, 60)))
                f.write(json.dumps({"sentence": words, "label": rng.randrange(2)}) + "\n")
        files[split] = str(path)
    return files


def make_recipe(student_dir: Path, files: dict, output_dir: Path, **overrides):
    from omegaconf import OmegaConf

    from components.config import override
    from recipes.finetune import FinetuneRecipe

    cfg = {
        "output_dir": str(output_dir),
        "checkpoint_dir": str(student_dir),
        "tuning": "full",
        "seed": 0,
        "device": "cpu",
        "dtype": "fp32",
        "task": {"type": "classification", "input": "single", "metric": "accuracy"},
        "data": {"source": files, "max_length": 128, "batch_size": BATCH, "pad_to_multiple_of": 8},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 2e-5, "weight_decay": 0.01},
        "max_steps": 10**6,
        "log_every_n_steps": 10**9,
    }
    recipe = FinetuneRecipe(OmegaConf.create(override(cfg, overrides)))
    recipe.setup()
    return recipe


def cycle_batches(recipe):
    from components.data.task_data import task_batches

    batches = task_batches(
        recipe.task.splits["train"], BATCH, recipe.tokenizer.pad_token_id, 8, shuffle=True, seed=0, epoch=0
    )
    return [next(batches) for _ in range(CYCLE)]


def run_cycle(recipe, batches) -> float:
    def steps():
        for batch in batches:
            recipe._train_step(batch)

    return measure.timed(steps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="H 256, 2 iterations, fewer cycles")
    p.add_argument("--cycles", type=int, help=f"timed cycles of {CYCLE} steps per side (default 6, --quick 4)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=measure.available_cores())
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    workloads.quiet_transformers()
    logging.getLogger().setLevel(logging.WARNING)
    cycles = args.cycles or (4 if args.quick else 6)
    shapes = workloads.QUICK if args.quick else workloads.FULL
    SCRATCH.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=SCRATCH))
    results = {"environment": measure.environment(), "shapes": shapes.name, "cycle_steps": CYCLE, "variants": {}}
    try:
        assets = workloads.make_assets(shapes, work / "assets")
        from transformers import AutoTokenizer

        student_dir = Path(assets["student"])
        AutoTokenizer.from_pretrained(assets["teacher"]).save_pretrained(str(student_dir))
        files = write_task(work, shapes.vocab, seed=0)
        for name in args.variants:
            log(f"{name}: setting up")
            base = make_recipe(student_dir, files, work / f"base-{name}")
            variant = make_recipe(student_dir, files, work / f"variant-{name}", **VARIANTS[name])
            batches = cycle_batches(base)
            first = {"base": run_cycle(base, batches), "variant": run_cycle(variant, batches)}
            times = {"base": [], "variant": []}
            for i in range(cycles):
                for key in ("base", "variant") if i % 2 == 0 else ("variant", "base"):
                    times[key].append(run_cycle(base if key == "base" else variant, batches))
            steady = {k: statistics.median(v) / CYCLE for k, v in times.items()}
            extra = first["variant"] - CYCLE * steady["variant"] - (first["base"] - CYCLE * steady["base"])
            saved = steady["base"] - steady["variant"]
            speedup = statistics.median(b / v for b, v in zip(times["base"], times["variant"]))
            results["variants"][name] = {
                "first_cycle_s": first,
                "steady_step_s": steady,
                "speedup": speedup,
                "extra_first_cycle_s": extra,
                "break_even_steps": (extra / saved) if saved > 0 else None,
                "cycle_times_s": times,
            }
            log(f"{name}: {speedup:.2f}x steady, {extra:.1f} s extra in the first cycle")
            for recipe in (base, variant):
                recipe.cleanup()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"fine-tuning step, {shapes.name} shapes, batch {BATCH}, {results['environment']['cpu_model']}")
    print(f"{'variant':<16}{'speed-up':>10}{'eager step s':>14}{'extra s (1st)':>15}{'pays off after':>16}")
    for name, r in results["variants"].items():
        pays = "never" if r["break_even_steps"] is None else f"{max(r['break_even_steps'], 0):.0f} steps"
        print(
            f"{name:<16}{r['speedup']:>9.2f}x{r['steady_step_s']['base']:>14.3f}"
            f"{r['extra_first_cycle_s']:>15.1f}{pays:>16}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
