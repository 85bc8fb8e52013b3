#!/usr/bin/env python
"""Fine-tuning speed against transformers' Trainer: the recipe's own step and loop against
``transformers.Trainer`` on the same model, the same tokenized rows in the same order and the
same hyperparameters, taking turns step by step in one process.

    python benchmarks/finetune_vs_trainer.py --quick   # BERT 4 x 256, max_length 64, ~2 min on 2 idle cores
    python benchmarks/finetune_vs_trainer.py           # BERT 6 x 384 and an ALBERT student, max_length 128

Model: a ``BertForSequenceClassification`` of random weights (vocab 30,522, dropout 0.1, as
BERT's) saved to a temporary folder with a WordPiece tokenizer trained on the smoke task's
docstring sentences; ours loads it with ``load_encoder``, the Trainer with ``from_pretrained``.
The full run adds a student of the same width written as an ALBERT folder (E 128, one shared
layer applied 6 times, dropout 0 as in ``configs/embedding_teacher.yaml``;
``AlbertForSequenceClassification`` on the Trainer side). Our head's
initial weights are copied into the transformers models, so every side starts from the same
weights; the first batch's loss (eval mode, fp32) is compared before anything trains.

Data: the smoke SST-2-like task (``components.smoke.smoke_task``, 2,000 training sentences),
tokenized once by our ``load_task_data``. The Trainer gets those rows (without ``index``) in the
order of our epoch 0 with ``train_sampling_strategy="sequential"`` and
``DataCollatorWithPadding(pad_to_multiple_of=8)``, so every side sees identical batches.

Sides (``--sides``), each at batch 32, AdamW lr 5e-5, weight decay 0.01 (not on biases and
LayerNorms), gradient clipping at 1.0, linear decay, no evaluation, no saving, logging every 10
steps, in fp32 and under bf16 autocast where the recipe's ``dtype: auto`` picks it:

* ``ours``: ``FinetuneRecipe`` set up from a config (``setup()``), driven by the loop of its
  ``_train()`` without evaluation and checkpoints: ``task_batches``, ``_train_step``, the
  metrics bookkeeping, ``run.log`` every 10 steps, ``run.poll_stop``. The optimizer as the
  shipped configs write it (``torch.optim.AdamW``: on a CPU, its for-loop implementation).
* ``trainer``: ``Trainer.train()`` with the Trainer's default ``optim`` (``adamw_torch_fused``).
* ``trainer-adamw_torch``: the same with ``optim="adamw_torch"``: the optimizer ours uses.
* ``ours-fused``: ours with ``optimizer.fused: true`` in the config, nothing else changed.

How it is timed: a pass runs every side for ``warmup + steps`` optimizer steps from the start
of epoch 0 and an empty optimizer state, as a fresh run would (the Trainer builds its optimizer
in ``train()``). Each side runs in its own thread and waits for its turn at every step boundary
(after ``on_step_end`` for the Trainer), so the sides take turns one optimizer step each, in an
order that rotates every step: steps of the same index, on the same batch, are measured within
seconds of each other, under the same load from the rest of the machine. A turn is one
iteration of the side's loop (its next batch, the step, logging); the first turn includes
setting up the data loader (and for the Trainer, ``train()``'s own setup), the last one
``train()``'s end. Per side: s/step (median of the turns after the warm-up); the ratio side /
ours (> 1: ours is faster) as the median of per-step ratios, over quiet steps only (every side's
turn ran while the rest of the machine used < 0.25 cores), and of the best-case times (per step
index, the fastest pass); "compute" (the step without data and logging: ours ``_train_step``,
Trainer ``on_step_begin`` to ``on_step_end``), "optimizer" (``optimizer.step()``, by hooks) and
the end-to-end wall of a pass (data loader, first steps, all steps; median ratio over passes).
Every figure is a ratio of things measured in the same run; absolute times are in the JSON
(``benchmarks/results/``, git-ignored) for the record only.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import measure  # noqa: E402
import torch  # noqa: E402
import workloads  # noqa: E402

SCRATCH = Path(os.environ.get("BENCH_SCRATCH", "/tmp/bench_scratch")) / "finetune_vs_trainer"
BATCH = 32
LR = 5e-5
WEIGHT_DECAY = 0.01
CLIP = 1.0
LOG_EVERY = 10
SEED = 42
VOCAB = 30522  # BERT's; the tokenizer's pieces trained on docstrings, padded with [unusedN]
NUM_LABELS = 2
# name: (family, hidden, layers or iterations, heads, FFN, embedding size of an ALBERT student)
MODELS = {
    "bert-quick": ("bert", 256, 4, 4, 1024, None),
    "bert": ("bert", 384, 6, 12, 1536, None),  # all-MiniLM-L6-v2's shape
    "albert": ("albert", 384, 6, 12, 1536, 128),  # the embedding workload's student
}
SIDES = {
    "ours": "ours (recipe, torch.optim.AdamW)",
    "trainer": "Trainer (default optim: {optim})",
    "trainer-adamw_torch": "Trainer (optim adamw_torch)",
    "ours-fused": "ours + optimizer.fused: true",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ assets
def write_tokenizer(folder: Path) -> None:
    """A lower-casing WordPiece tokenizer trained on the smoke tasks' docstring sentences, padded
    to BERT's 30,522 ids with ``[unusedN]`` pieces (as BERT's own vocabulary has)."""
    from transformers import BertTokenizerFast

    from components.smoke import train_tokenizer
    from components.smoke.tasks import docstring_sentences

    trained = train_tokenizer(list(docstring_sentences()), VOCAB)
    pieces = [p for p, _ in sorted(trained.get_vocab().items(), key=lambda kv: kv[1])]
    pieces += [f"[unused{i}]" for i in range(VOCAB - len(pieces))]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=512).save_pretrained(str(folder))


def write_model(name: str, folder: Path, tokenizer_dir: Path) -> None:
    """The model's folder: weights, config and the tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    family, hidden, layers, heads, ffn, embed = MODELS[name]
    torch.manual_seed(0)
    if family == "bert":
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=ffn,
            num_labels=NUM_LABELS,
            pad_token_id=0,
        )
        BertForSequenceClassification(config).save_pretrained(str(folder))
    else:
        from components.checkpointing.student import save_student
        from components.models.recursive import RecursiveEncoder

        model = RecursiveEncoder(
            vocab_size=VOCAB,
            embedding_size=embed,
            hidden_size=hidden,
            num_heads=heads,
            intermediate_size=ffn,
            num_iterations=layers,
            adapter_placement=None,
            mlm_head=False,
            # as the embedding workload's student (configs/embedding_teacher.yaml); transformers'
            # AlbertLayer also leaves out the dropout after the FFN that ours (and BERT's) applies
            dropout=0.0,
            attention_dropout=0.0,
            pad_token_id=0,
        )
        assert save_student(model, folder, format="albert") == "albert"
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(folder))


# ------------------------------------------------------------------------------------- sides
class StepClock:
    """Per-step timestamps: begin (batch in hand), optimizer pre/post hooks, end (step done)."""

    def __init__(self):
        self.begin: List[float] = []
        self.end: List[float] = []
        self.opt_pre: List[float] = []
        self.opt_post: List[float] = []

    def hooks(self, optimizer):
        return [
            optimizer.register_step_pre_hook(lambda *_: self.opt_pre.append(time.perf_counter())),
            optimizer.register_step_post_hook(lambda *_: self.opt_post.append(time.perf_counter())),
        ]

    def summary(self) -> Dict:
        return {
            "compute_s": [e - b for b, e in zip(self.begin, self.end)],
            "optimizer_s": [b - a for a, b in zip(self.opt_pre, self.opt_post)],
        }


def no_turns() -> None:
    pass


class Ours:
    """``FinetuneRecipe`` from a config, driven by its own loop minus evaluation and checkpoints."""

    def __init__(self, folder: Path, files: Dict, output_dir: Path, dtype: str, max_length: int, fused: bool):
        from omegaconf import OmegaConf

        from recipes.finetune import FinetuneRecipe

        optimizer = {"_component_": "torch.optim.AdamW", "lr": LR, "weight_decay": WEIGHT_DECAY}
        if fused:
            optimizer["fused"] = True
        cfg = {
            "output_dir": str(output_dir),
            "checkpoint_dir": str(folder),
            "tuning": "full",
            "seed": SEED,
            "device": "cpu",
            "dtype": dtype,
            "task": {"type": "classification", "input": "single", "metric": "accuracy"},
            "data": {
                "source": files,
                "text_column": "sentence",
                "label_column": "label",
                "max_length": max_length,
                "batch_size": BATCH,
                "pad_to_multiple_of": 8,
            },
            "classifier_dropout": 0.1,
            "optimizer": optimizer,
            "lr_schedule": {"_component_": "components.training.linear_warmup_decay", "warmup_steps": 0},
            "clip_grad_norm": CLIP,
            "max_steps": 10**6,
            "log_every_n_steps": LOG_EVERY,
        }
        self.recipe = FinetuneRecipe(OmegaConf.create(cfg))
        self.recipe.setup()

    def batches(self):
        from components.data.task_data import task_batches

        r = self.recipe
        train = r.task.splits["train"]
        return task_batches(train, BATCH, r.tokenizer.pad_token_id, 8, shuffle=True, seed=r.cfg.seed, epoch=0)

    def run(self, steps: int, turn: Callable[[], None] = no_turns) -> Dict:
        """``steps`` iterations of the recipe's loop; ``turn()`` between two of them."""
        r = self.recipe
        r.optimizer.state.clear()  # as a fresh run: AdamW allocates its state at the first step
        clock = StepClock()
        handles = clock.hooks(r.optimizer)
        batches = self.batches()
        for i in range(steps):  # recipes/finetune.py FinetuneRecipe._train, without eval and checkpoints
            if i:
                turn()
            started = time.perf_counter()
            batch = next(batches)
            clock.begin.append(time.perf_counter())
            metrics = r._train_step(batch)
            clock.end.append(time.perf_counter())
            metrics["examples_per_second"] = r.cfg.data.batch_size / (time.perf_counter() - started)
            r.step += 1
            if r.step % r.cfg.log_every_n_steps == 0:
                r.run.log({**metrics, **r.run.memory_stats()}, r.step)
            r.run.poll_stop()
        turn()  # the Trainer's last turn is the end of train(); ours has nothing left to do
        for h in handles:
            h.remove()
        return clock.summary()

    def close(self) -> None:
        self.recipe.cleanup()


class TrainerSide:
    """``transformers.Trainer`` on the same folder, rows and order; a fresh Trainer per pass."""

    def __init__(self, folder: Path, family: str, rows, tokenizer, output_dir: Path, bf16: bool, optim: Optional[str]):
        from transformers import AlbertForSequenceClassification, BertForSequenceClassification, DataCollatorWithPadding

        cls = BertForSequenceClassification if family == "bert" else AlbertForSequenceClassification
        self.model = cls.from_pretrained(str(folder), num_labels=NUM_LABELS)
        self.rows = rows
        self.collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
        self.output_dir = output_dir
        self.bf16 = bf16
        self.optim = optim
        self.resolved_optim = optim

    def arguments(self, steps: int):
        from transformers import TrainingArguments

        kwargs = {} if self.optim is None else {"optim": self.optim}
        return TrainingArguments(
            output_dir=str(self.output_dir),
            per_device_train_batch_size=BATCH,
            learning_rate=LR,
            weight_decay=WEIGHT_DECAY,
            max_grad_norm=CLIP,
            lr_scheduler_type="linear",
            warmup_steps=0,
            max_steps=steps,
            bf16=self.bf16,
            use_cpu=True,
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            logging_steps=LOG_EVERY,
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            train_sampling_strategy="sequential",
            seed=SEED,
            **kwargs,
        )

    def run(self, steps: int, turn: Callable[[], None] = no_turns) -> Dict:
        """``trainer.train()`` for ``steps`` optimizer steps; ``turn()`` after each one's ``on_step_end``."""
        from transformers import PrinterCallback, Trainer, TrainerCallback

        clock = StepClock()
        autocast = []

        class Clock(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                autocast.append("_original_forward" in vars(model))  # accelerate wrapped forward in autocast

            def on_step_begin(self, args, state, control, **kwargs):
                clock.begin.append(time.perf_counter())

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                clock.opt_pre.append(time.perf_counter())

            def on_optimizer_step(self, args, state, control, **kwargs):
                clock.opt_post.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                clock.end.append(time.perf_counter())
                turn()

        trainer = Trainer(
            model=self.model,
            args=self.arguments(steps),
            train_dataset=self.rows,
            data_collator=self.collator,
            callbacks=[Clock()],
        )
        trainer.remove_callback(PrinterCallback)  # it prints the final metrics (disable_tqdm=True)
        self.resolved_optim = str(getattr(trainer.args.optim, "value", trainer.args.optim))
        trainer.train()
        del trainer
        if autocast != [self.bf16]:
            raise RuntimeError(f"the Trainer's forward {'is not' if self.bf16 else 'is'} under bf16 autocast")
        return clock.summary()

    def close(self) -> None:
        pass


class Turns:
    """Sides that take turns: each runs in its own thread and blocks in ``turn()`` until the
    scheduler lets it run its next step, so only one side computes at a time."""

    def __init__(self, keys: List[str], threads: int):
        self.keys = keys
        self.threads = threads
        self.go = {k: threading.Event() for k in keys}
        self.done = {k: threading.Event() for k in keys}
        self.results: Dict[str, Dict] = {}
        self.errors: Dict[str, BaseException] = {}

    def _turn(self, key: str) -> None:
        self.done[key].set()
        self.go[key].wait()
        self.go[key].clear()

    def _body(self, key: str, side, steps: int) -> None:
        torch.set_num_threads(self.threads)  # per thread: each has its own OpenMP team
        self.go[key].wait()
        self.go[key].clear()
        try:
            self.results[key] = side.run(steps, lambda: self._turn(key))
        except BaseException as e:  # reported by the scheduler
            self.errors[key] = e
        finally:
            self.done[key].set()

    def run(self, sides: Dict, steps: int) -> Dict[str, Dict]:
        """One pass: ``steps`` steps per side plus the final turn, in rotating order; per side the
        seconds of each turn and the cores the rest of the machine used meanwhile."""
        workers = {
            k: threading.Thread(target=self._body, args=(k, sides[k], steps), daemon=True, name=f"side-{k}")
            for k in self.keys
        }
        for w in workers.values():
            w.start()
        turns = {k: [] for k in self.keys}
        others = {k: [] for k in self.keys}
        for i in range(steps + 1):
            shift = i % len(self.keys)
            for key in self.keys[shift:] + self.keys[:shift]:
                m = measure.Measured(lambda key=key: self._hand_over(key))
                turns[key].append(m.seconds)
                others[key].append(m.other_cores)
                if key in self.errors:
                    raise RuntimeError(f"side {key} failed") from self.errors[key]
        for w in workers.values():
            w.join()
        return {k: {"turn_s": turns[k], "other_cores": others[k], **self.results[k]} for k in self.keys}

    def _hand_over(self, key: str) -> None:
        self.go[key].set()
        self.done[key].wait()
        self.done[key].clear()


def copy_head(ours: Ours, hf_model) -> None:
    """Our head's initial weights into the transformers model's pooler and classifier."""
    head = ours.recipe.model.head
    base = getattr(hf_model, hf_model.base_model_prefix)
    pooler = getattr(base.pooler, "dense", base.pooler)
    with torch.no_grad():
        for mine, theirs in ((head.pooler, pooler), (head.classifier, hf_model.classifier)):
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)


def first_batch_losses(ours: Ours, trainer: TrainerSide) -> Dict:
    """Both sides' loss on the first batch of epoch 0, eval mode (no dropout), fp32."""
    from components.training.finetune import finetune_loss

    batch = next(ours.batches())
    collated = trainer.collator([trainer.rows[i] for i in range(BATCH)])
    model = ours.recipe.model
    model.eval()
    trainer.model.eval()
    with torch.no_grad():
        a = float(finetune_loss(model, batch, torch.device("cpu")))
        b = float(trainer.model(**collated).loss)
    model.train()
    trainer.model.train()
    same = torch.equal(collated["input_ids"], batch["input_ids"]) and torch.equal(
        collated["attention_mask"], batch["attention_mask"]
    )
    return {"ours": a, "trainer": b, "rel_diff": abs(a - b) / abs(b), "same_batch": same}


def profile(side, steps: int, rows: int = 12) -> str:
    from torch.profiler import profile as torch_profile
    from torch.profiler import ProfilerActivity

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        side.run(steps)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# -------------------------------------------------------------------------------------- main
def measure_model(name: str, args, work: Path, files: Dict, dtypes: List[str]) -> Dict:
    family = MODELS[name][0]
    folder = work / name
    write_model(name, folder, work / "tokenizer")
    out = {"shape": MODELS[name], "dtypes": {}}
    total = args.warmup + args.steps
    for dtype in dtypes:
        log(f"{name} {dtype}: setting up {', '.join(args.sides)}")
        sides = {}
        for key in args.sides:
            if key.startswith("ours"):
                fused = key == "ours-fused"
                sides[key] = Ours(folder, files, work / f"out-{name}-{dtype}-{key}", dtype, args.max_length, fused)
        reference = sides.get("ours") or next(iter(sides.values()), None)
        if reference is None:
            reference = Ours(folder, files, work / f"out-{name}-{dtype}-ref", dtype, args.max_length, False)
        out["parameters"] = sum(p.numel() for p in reference.recipe.model.parameters())
        order = [int(i) for b in reference.batches() for i in b["index"]]
        rows = reference.recipe.task.splits["train"].select(order).remove_columns(["index"])
        first = [b for _, b in zip(range(total), reference.batches())]
        for key in args.sides:
            if key.startswith("trainer"):
                optim = "adamw_torch" if key == "trainer-adamw_torch" else None
                tokenizer = reference.recipe.tokenizer
                side = TrainerSide(folder, family, rows, tokenizer, work / f"hf-{key}", dtype == "bf16", optim)
                copy_head(reference, side.model)
                sides[key] = side
        section = {
            "tokens_per_step": [int(b["attention_mask"].sum()) for b in first],
            "padded_positions_per_step": [b["input_ids"].numel() for b in first],
            "passes": [],
        }
        if dtype == "fp32":
            trainer = next((s for k, s in sides.items() if k.startswith("trainer")), None)
            if trainer is not None:
                section["first_batch_loss"] = first_batch_losses(reference, trainer)
                log(f"first-batch loss ours vs Trainer: rel diff {section['first_batch_loss']['rel_diff']:.1e}")
        keys = list(sides)
        for p in range(args.passes):
            result = Turns(keys, args.threads).run(sides, total)
            section["passes"].append(result)
            log(
                f"{name} {dtype} pass {p + 1}/{args.passes}: "
                + ", ".join(
                    f"{k} {statistics.median(v['turn_s'][args.warmup : total]):.3f} s/step" for k, v in result.items()
                )
            )
        section["trainer_optim"] = {k: s.resolved_optim for k, s in sides.items() if isinstance(s, TrainerSide)}
        if args.profile:
            section["profile"] = {k: profile(sides[k], total) for k in ("ours", "trainer") if k in sides}
        section["summary"] = summarise(section["passes"], keys, args.warmup)
        out["dtypes"][dtype] = section
        for side in sides.values():
            side.close()
        if reference not in sides.values():
            reference.close()
        gc.collect()
    return out


QUIET = 0.25  # a step is quiet when the rest of the machine used fewer cores than this during every side's turn


def quartiles(xs: List[float]) -> List[float]:
    if len(xs) < 2:
        return [xs[0], xs[0]]
    q = statistics.quantiles(xs, n=4)
    return [q[0], q[2]]


def summarise(passes: List[Dict], keys: List[str], warmup: int) -> Dict:
    """Per side, over the steps after the warm-up of every pass: the median step, the median of the
    per-step ratios side / ours (with quartiles), the same over quiet steps, the ratio of best-case
    times (per step index, the fastest pass: every pass feeds the same batches in the same order),
    compute and optimizer medians, and the median over passes of the end-to-end wall ratio."""
    base = "ours" if "ours" in keys else keys[0]
    steps = len(passes[0][base]["compute_s"])
    steady = range(warmup, steps)
    cells = [(p, i) for p in passes for i in steady]
    quiet = [(p, i) for p, i in cells if all(p[k]["other_cores"][i] < QUIET for k in keys)]

    def ratios(key, among):
        return [p[key]["turn_s"][i] / p[base]["turn_s"][i] for p, i in among]

    def best(key, field):
        return statistics.fmean(min(p[key][field][i] for p in passes) for i in steady)

    def wall(p, key):
        return sum(p[key]["turn_s"])

    out = {"quiet_steps": len(quiet), "steps": len(cells), "sides": {}}
    for key in keys:
        step = statistics.median(p[key]["turn_s"][i] for p, i in cells)
        out["sides"][key] = {
            "step_s": step,
            "examples_per_s": BATCH / step,
            "step_ratio": statistics.median(ratios(key, cells)),
            "step_ratio_quartiles": quartiles(ratios(key, cells)),
            "step_ratio_quiet": statistics.median(ratios(key, quiet)) if quiet else None,
            "best_step_s": best(key, "turn_s"),
            "best_step_ratio": best(key, "turn_s") / best(base, "turn_s"),
            "compute_s": statistics.median(p[key]["compute_s"][i] for p, i in cells),
            "optimizer_s": statistics.median(p[key]["optimizer_s"][i] for p, i in cells),
            "best_compute_s": best(key, "compute_s"),
            "best_optimizer_s": best(key, "optimizer_s"),
            "wall_s": statistics.median(wall(p, key) for p in passes),
            "wall_ratio": statistics.median(wall(p, key) / wall(p, base) for p in passes),
            "other_cores_median": statistics.median(p[key]["other_cores"][i] for p, i in cells),
        }
    return out


def print_report(results: Dict, args) -> None:
    env = results["environment"]
    print(
        f"\nfine-tuning: ours vs transformers.Trainer, batch {BATCH}, max_length {args.max_length}, "
        f"{args.passes} passes of {args.warmup}+{args.steps} steps per side taking turns, {args.threads} threads, "
        f"{env['cpu_model']} ({', '.join(env['cpu_isa'])}), torch {env['torch']}, transformers {env['transformers']}"
    )
    print(
        "ratio = side / ours (> 1: ours is faster): median of per-step ratios [quartiles], over quiet steps, of "
        "best-case times;\ns/step, compute, optimizer: medians (best case); wall: a pass end to end, median ratio\n"
    )
    for name, model in results["models"].items():
        for dtype, section in model["dtypes"].items():
            tokens = statistics.fmean(section["tokens_per_step"])
            padded = statistics.fmean(section["padded_positions_per_step"])
            loss = section.get("first_batch_loss")
            check = f"; first-batch loss rel diff {loss['rel_diff']:.1e}" if loss else ""
            summary = section["summary"]
            print(
                f"{name} ({model['parameters'] / 1e6:.1f}M parameters), {dtype}: {tokens:.0f} tokens in "
                f"{padded:.0f} padded positions per step{check}; quiet steps {summary['quiet_steps']}/{summary['steps']}"
            )
            print(
                f"  {'side':<44}{'s/step':>15}{'ex/s':>7}{'ratio':>19}{'quiet':>7}{'best':>6}"
                f"{'compute s':>15}{'optimizer s':>15}{'wall':>6}"
            )
            for key, s in summary["sides"].items():
                label = SIDES[key].format(optim=section["trainer_optim"].get(key, "?"))
                lo, hi = s["step_ratio_quartiles"]
                quiet = "-" if s["step_ratio_quiet"] is None else f"{s['step_ratio_quiet']:.2f}"
                print(
                    f"  {label:<44}{s['step_s']:>7.3f} ({s['best_step_s']:.3f}){s['examples_per_s']:>7.1f}"
                    f"{s['step_ratio']:>7.2f} [{lo:.2f}..{hi:.2f}]{quiet:>7}{s['best_step_ratio']:>6.2f}"
                    f"{s['compute_s']:>7.3f} ({s['best_compute_s']:.3f})"
                    f"{s['optimizer_s']:>7.3f} ({s['best_optimizer_s']:.3f}){s['wall_ratio']:>6.2f}"
                )
            for key, table in section.get("profile", {}).items():
                print(f"\n  top ops, {key}, {args.warmup + args.steps} steps:\n{table}")
            print()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="BERT 4 x 256 only, max_length 64, 2 short passes")
    p.add_argument("--models", nargs="+", choices=list(MODELS), help="default: bert albert (--quick: bert-quick)")
    p.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES))
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], help="default: fp32, and bf16 where auto picks it")
    p.add_argument("--max-length", type=int, help="default 128 (--quick: 64)")
    p.add_argument("--passes", type=int, help="passes over the first steps of epoch 0 (default 3, --quick 2)")
    p.add_argument("--steps", type=int, help="timed steps per side and pass after the warm-up (default 10, --quick 6)")
    p.add_argument("--warmup", type=int, default=2, help="steps per side and pass before timing")
    p.add_argument("--threads", type=int, default=measure.available_cores())
    p.add_argument("--profile", action="store_true", help="torch.profiler's top ops of ours and the Trainer")
    p.add_argument("--out", type=Path, help="default benchmarks/results/<date>-<time>_finetune_vs_trainer.json")
    args = p.parse_args(argv)
    args.models = args.models or (["bert-quick"] if args.quick else ["bert", "albert"])
    args.max_length = args.max_length or (64 if args.quick else 128)
    args.passes = args.passes or (2 if args.quick else 3)
    args.steps = args.steps or (6 if args.quick else 10)
    torch.set_num_threads(args.threads)
    workloads.quiet_transformers()
    import datasets

    datasets.disable_progress_bars()
    logging.getLogger().setLevel(logging.WARNING)
    for noisy in ("finetune", "components", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from components.training.parallel import resolve_dtype

    auto_bf16, why = resolve_dtype("auto", torch.device("cpu"))
    dtypes = args.dtypes or (["fp32", "bf16"] if auto_bf16 else ["fp32"])
    SCRATCH.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=SCRATCH))
    results = {
        "environment": measure.environment(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dtype_auto": why,
        "models": {},
    }
    try:
        from components.smoke import smoke_task

        log("writing the tokenizer and the smoke SST-2 task")
        files = smoke_task(str(work / "smoke"), "sst2")
        files = {k: v for k, v in files.items() if k != "test"}
        write_tokenizer(work / "tokenizer")
        for name in args.models:
            results["models"][name] = measure_model(name, args, work, files, dtypes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_report(results, args)
    out = args.out or HERE / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}_finetune_vs_trainer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
