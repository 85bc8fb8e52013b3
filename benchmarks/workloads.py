"""The workloads of the speed benchmark (``benchmarks/run.py``) and its two sides.

Two implementations of ONE distillation step, on the same random weights and the same batch:

* **ours**: the recipe itself. ``RecipeSide`` builds ``DistillRecursiveRecipe`` from a config
  (the random teacher's folder, the random student's folder through ``load_student``, a corpus
  file of the workload's token sequences) and times ``recipe.train_step()`` on the first
  step's micro-batches, pinned: what ``tune run`` executes, packing and all.
* **reference**: the plain transformers loop of ``components/testing/reference_loop.py`` (the same code
  the tests check our losses and gradients against) on the padded batch of the same windows.

Workloads (``Shapes``): MiniALBERT's (a BERT teacher with an MLM head, windows of 50-100% of
``seq`` tokens, every loss term) and a sentence-embedding teacher's (no MLM head, 32 short
sentences, hidden + attention terms only, ``data.pack``).
"""

from __future__ import annotations

import gc
import math
import os
import resource
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List

import torch
from measure import reset_peak_rss, rss_kib, timed
from torch import nn

from components.losses import MINIALBERT_WEIGHTS

PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103  # BERT's special-token layout


@dataclass(frozen=True)
class Shapes:
    name: str
    vocab: int
    t_layers: int
    t_hidden: int
    t_heads: int
    t_ffn: int
    s_embed: int
    s_hidden: int
    s_heads: int
    s_ffn: int
    s_iters: int
    batch: int
    seq: int
    max_positions: int = 512
    # False: a sentence-embedding teacher (no MLM head), short sentences, hidden + attention
    # terms only, no masking, packed rows
    mlm_head: bool = True

    def replace(self, **kw) -> "Shapes":
        return Shapes(**{**asdict(self), **kw})

    @property
    def loss(self) -> Dict:
        """The loss config of the workload (ours; components/testing/reference_loop.py writes the same)."""
        if self.mlm_head:  # MiniALBERT's
            return {"weights": dict(MINIALBERT_WEIGHTS), "attention_reduction": "element"}
        return {"weights": {"hidden": 3.0, "attention": 3.0}, "attention_reduction": "distribution"}


# teacher: BERT-base (12 x 768, 12 heads, FFN 3072, vocab 30522); student: minialbert_128
# without adapters (E=128, H=768, 6 iterations). MiniALBERT distilled at 256 tokens.
FULL = Shapes("bert-base", 30522, 12, 768, 12, 3072, 128, 768, 12, 3072, 6, batch=4, seq=256)
QUICK = Shapes("quick", 8000, 4, 256, 4, 1024, 128, 256, 4, 1024, 2, batch=8, seq=128)
# teacher: all-MiniLM-L6-v2's shape (6 x 384, 12 heads, FFN 1536); student: 6 iterations of
# H=384, E=128, no adapters; 32 sentences of 10-60 tokens (median about 25) at max_length 64.
EMBEDDING = Shapes("embedding", 30522, 6, 384, 12, 1536, 128, 384, 12, 1536, 6, batch=32, seq=64, mlm_head=False)
WORKLOADS = {w.name: w for w in (FULL, QUICK, EMBEDDING)}


def quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


TEACHER_QK_SCALE = 6.0


def sequence_lengths(shapes: Shapes, n: int, seed: int = 0) -> List[int]:
    """Token counts (special tokens included) of ``n`` sequences of the workload: for windows,
    50-100% of ``seq``; for sentences, a log-normal of median 25 kept to 10-60 tokens."""
    g = torch.Generator().manual_seed(seed)
    if shapes.mlm_head:
        return [int(torch.randint(shapes.seq // 2, shapes.seq + 1, (1,), generator=g)) for _ in range(n)]
    lengths: List[int] = []
    while len(lengths) < n:
        x = int(torch.exp(math.log(25) + 0.45 * torch.randn((), generator=g)))
        if 10 <= x <= 60:
            lengths.append(x)
    return lengths


def make_assets(shapes: Shapes, folder: Path, seed: int = 0) -> Dict[str, str]:
    """Random teacher (HF BERT folder with a tokenizer), random student (ours, written as an
    ALBERT folder) and a corpus (one sequence of ``w<id>`` words per line, so that each line
    is one window of the workload's length distribution)."""
    from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizerFast

    from components.checkpointing.student import save_student
    from components.models.recursive import RecursiveEncoder

    quiet_transformers()
    folder.mkdir(parents=True, exist_ok=True)
    teacher_dir, student_dir, corpus = folder / "teacher_bert", folder / "student_albert", folder / "corpus.txt"
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=shapes.vocab,
        hidden_size=shapes.t_hidden,
        num_hidden_layers=shapes.t_layers,
        num_attention_heads=shapes.t_heads,
        intermediate_size=shapes.t_ffn,
        max_position_embeddings=shapes.max_positions,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=PAD,
    )
    teacher = BertForMaskedLM(config) if shapes.mlm_head else BertModel(config, add_pooling_layer=False)
    # A 0.02-initialised BERT attends almost uniformly (attention KL ~1e-4), which would make
    # the attention term, and its equivalence check, meaningless. Sharpen the teacher's
    # attention like a trained model's: scale its query and key weights.
    with torch.no_grad():
        for name, param in teacher.named_parameters():
            if name.endswith(("attention.self.query.weight", "attention.self.key.weight")):
                param.mul_(TEACHER_QK_SCALE)
    teacher.save_pretrained(str(teacher_dir))
    del teacher
    # BERT's special ids (0, 100-103) and one made-up word per other id
    special = {PAD: "[PAD]", UNK: "[UNK]", CLS: "[CLS]", SEP: "[SEP]", MASK: "[MASK]"}
    vocab = {special.get(i, f"w{i}"): i for i in range(shapes.vocab)}
    BertTokenizerFast(vocab=vocab, do_lower_case=True).save_pretrained(str(teacher_dir))
    torch.manual_seed(seed + 1)
    student = RecursiveEncoder(
        vocab_size=shapes.vocab,
        embedding_size=shapes.s_embed,
        hidden_size=shapes.s_hidden,
        num_heads=shapes.s_heads,
        intermediate_size=shapes.s_ffn,
        num_iterations=shapes.s_iters,
        adapter_placement=None,
        mlm_head=shapes.mlm_head,
        dropout=0.0,
        attention_dropout=0.0,
        max_position_embeddings=shapes.max_positions,
        pad_token_id=PAD,
    )
    assert save_student(student, student_dir, format="albert") == "albert"
    g = torch.Generator().manual_seed(seed + 2)
    first_word = 999 if shapes.vocab > 2000 else 200
    lines = []
    for n in sequence_lengths(shapes, 4 * shapes.batch, seed):
        ids = torch.randint(first_word, shapes.vocab, (n - 2,), generator=g).tolist()
        lines.append(" ".join(f"w{i}" for i in ids))
    corpus.write_text("\n".join(lines) + "\n")
    return {"teacher": str(teacher_dir), "student": str(student_dir), "corpus": str(corpus)}


def recipe_config(assets: Dict[str, str], shapes: Shapes, output_dir: Path, **overrides) -> Dict:
    """The distillation config of the workload, as a user would write it."""
    cfg = {
        "output_dir": str(output_dir),
        "seed": 0,
        "teacher": {"_component_": "components.checkpointing.hf_teacher", "path": assets["teacher"]},
        "student": {"_component_": "components.checkpointing.load_student", "path": assets["student"]},
        "data": {
            "source": assets["corpus"],
            "sample_by": "line",
            "max_length": shapes.seq,
            "stride": shapes.seq - 2,  # each line fits one window
            "batch_size": shapes.batch,
            "eval_fraction": 0.0,
            "mlm_probability": 0.15 if shapes.mlm_head else 0.0,
            "pack": not shapes.mlm_head,
        },
        "loss": {"_component_": "components.losses.DistillationLoss", **shapes.loss},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": LR, "weight_decay": WEIGHT_DECAY},
        # constant: the reference has no schedule either
        "lr_schedule": {"_component_": "components.training.linear_warmup_decay", "final_ratio": 1.0},
        "clip_grad_norm": CLIP,
        "max_steps": 10**9,
        "log_every_n_steps": 10**9,
    }
    from components.config import override  # dotted keys, as key=value on the command line

    return override(cfg, overrides)


LR, WEIGHT_DECAY, CLIP = 5e-4, 1e-4, 1.0


class Side:
    """One side of the comparison: ``step()`` (one optimizer step, returns the loss),
    ``forward()`` (the loss terms, no update), ``student`` and ``teacher`` modules."""

    kind: str
    student: nn.Module
    teacher: nn.Module

    def step(self) -> float:
        raise NotImplementedError

    def forward(self) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class RecipeSide(Side):
    """Our recipe, set up from ``recipe_config``; ``step()`` is ``recipe.train_step()`` on the
    first step's micro-batches, pinned so that every timed step sees the same batch."""

    kind = "ours"

    def __init__(self, assets: Dict[str, str], shapes: Shapes, scratch: Path, **overrides):
        import logging
        import tempfile

        from omegaconf import OmegaConf

        from recipes.distill_recursive import DistillRecursiveRecipe

        quiet_transformers()
        logging.getLogger().setLevel(logging.WARNING)
        self.output_dir = Path(tempfile.mkdtemp(prefix="recipe-", dir=scratch))
        self.recipe = DistillRecursiveRecipe(
            OmegaConf.create(recipe_config(assets, shapes, self.output_dir, **overrides))
        )
        self.recipe.setup()
        make = self.recipe.step_batches
        # what a background batch builder could hide: padding, masking, packing on this thread
        self.prepare_seconds = statistics.median(timed(lambda i=i: make(step=i)) for i in range(1, 6))
        self.recipe.sampler.seek(0)
        self.batches = make(step=0)
        self.recipe.sampler.seek(0)  # the same windows again, padded: what the reference reads
        self.padded = make(step=0, pack=False)
        self.recipe.step_batches = lambda step: self.batches
        self.student, self.teacher = self.recipe.student, self.recipe.teacher

    def step(self) -> float:
        return self.recipe.train_step()["loss/total"]

    def forward(self) -> Dict[str, torch.Tensor]:
        from components.training.distill import distill_forward

        with self.recipe.autocast():
            batch = self.batches[0].to(self.recipe.device)
            out = distill_forward(self.student, self.teacher, self.recipe.loss_fn, batch)
        return {"total": out.total, **out.terms}

    def close(self) -> None:
        import shutil

        self.recipe.cleanup()
        shutil.rmtree(self.output_dir, ignore_errors=True)


class ReferenceSide(Side):
    """components/testing/reference_loop.py's plain transformers loop on the padded batch."""

    kind = "reference"

    def __init__(self, assets: Dict[str, str], shapes: Shapes, batch, device: str = "cpu"):
        from components.testing.reference_loop import LAYERS, MINIALBERT, ReferenceLoop

        quiet_transformers()
        self.loop = ReferenceLoop(
            assets["teacher"],
            assets["student"],
            batch,
            MINIALBERT if shapes.mlm_head else LAYERS,
            lr=LR,
            weight_decay=WEIGHT_DECAY,
            clip=CLIP,
            device=device,
        )
        self.student, self.teacher = self.loop.student, self.loop.teacher

    def step(self) -> float:
        return self.loop.step()

    def forward(self) -> Dict[str, torch.Tensor]:
        with self.loop.autocast():
            return self.loop.loss()


def make_sides(assets: Dict[str, str], shapes: Shapes, scratch: Path, bf16: bool = False, device: str = "cpu"):
    ours = RecipeSide(assets, shapes, scratch, device=device, dtype="bf16" if bf16 else "fp32")
    ref = ReferenceSide(assets, shapes, ours.padded[0], device)
    ref.loop.bf16 = bf16  # forward under bf16 autocast, as the recipe's dtype=bf16 does
    return ours, ref


def cached_teacher(side: RecipeSide) -> RecipeSide:
    """Our step with the teacher's outputs read from a cache instead of computed: the most a
    precomputed-teacher cache could save (disk reads not counted). A cache needs the masks to
    be fixed per window (the teacher sees the masked input), i.e. static masking."""
    live, loss_fn, batch = side.teacher, side.recipe.loss_fn, side.batches[0]
    recorded = live(
        batch.input_ids,
        batch.attention_mask,
        attention_layers=loss_fn.teacher_attention_layers(),
        logits_mask=batch.masked_positions,
        return_logits=loss_fn.needs_teacher_logits,
        **({} if batch.segment_ids is None else {"segment_ids": batch.segment_ids}),
    )

    class Replay(torch.nn.Module):
        spec = live.spec

        def forward(self, *args, **kwargs):
            return recorded

    side.recipe.teacher = side.teacher = Replay()
    return side


def cache_bytes_per_window(shapes: Shapes, masked_per_window: float, top_k: int = 32) -> Dict[str, float]:
    """What a teacher cache must store per window for each loss term (bf16 tensors, top-k
    logits as bf16 values + int32 ids)."""
    mapped = shapes.s_iters
    out = {
        "hidden_states_bf16": mapped * shapes.seq * shapes.t_hidden * 2,
        "attention_maps_bf16": mapped * shapes.t_heads * shapes.seq * shapes.seq * 2,
    }
    if shapes.mlm_head:
        out[f"top{top_k}_logits"] = masked_per_window * top_k * (2 + 4)
    return out


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def loss_agreement(ours: Side, ref: Side) -> Dict:
    """Every loss term of both sides on the same windows, before any update (the gradients are
    compared by tests/test_reference_loop.py)."""
    o, r = ours.forward(), ref.forward()
    terms = {}
    for name in r:
        a, b = float(o[name].detach()), float(r[name].detach())
        terms[name] = {"ours": a, "reference": b, "rel_diff": rel_diff(a, b)}
    return {"terms": terms}


def memory_probe(
    kind: str,
    assets: Dict[str, str],
    shapes: Shapes,
    seed: int,
    threads: int,
    bf16: bool = False,
    scratch: Path = Path("/tmp"),
) -> Dict:
    """Run in a FRESH process (see run.py): build one side, then measure the RSS high-water mark
    of (1) the first step (which also allocates AdamW's state and the gradients) and (2) a
    second, steady-state step, each as peak RSS during the step minus RSS just before it.

    The peak is read from /proc/self/status VmHWM after resetting it through
    /proc/self/clear_refs (so model building does not count); where that is impossible, from
    ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (then the figure is only an upper bound if
    building peaked higher than the step). run.py starts this process with
    MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB, so freed tensors go back to the OS and "RSS before
    the step" is the live memory, not glibc's cache.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    ours, ref = make_sides(assets, shapes, scratch, bf16)
    runner = ours if kind == "ours" else ref
    (ref if kind == "ours" else ours).close()
    del ours, ref
    gc.collect()
    result = {"kind": kind, "rss_after_build_mib": rss_kib("VmRSS") / 1024}
    can_reset = reset_peak_rss()
    result["method"] = (
        "VmHWM reset via /proc/self/clear_refs, peak during step minus VmRSS before it"
        if can_reset
        else "ru_maxrss (process peak, not resettable) minus VmRSS before the step"
    )
    for label in ("first_step", "steady_step"):
        gc.collect()
        reset_peak_rss()
        before = rss_kib("VmRSS")
        runner.step()
        peak = rss_kib("VmHWM") if can_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result[f"{label}_rss_before_mib"] = before / 1024
        result[f"{label}_peak_mib"] = peak / 1024
        result[f"{label}_delta_mib"] = (peak - before) / 1024
    result["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    runner.close()
    return result


def profile_step(runner: Side, steps: int = 2, rows: int = 15) -> Dict:
    """torch.profiler over ``steps`` steps: top ops by self CPU time."""
    from torch.profiler import profile, ProfilerActivity

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.step()
    averages = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in averages)
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return {
        "steps": steps,
        "total_self_cpu_ms_per_step": total_self / 1000 / steps,
        "top": [
            {
                "op": e.key,
                "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / steps,
                "share": e.self_cpu_time_total / max(total_self, 1),
                "calls_per_step": e.count / steps,
            }
            for e in top
        ],
    }
