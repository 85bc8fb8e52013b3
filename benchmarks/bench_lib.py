"""Building blocks of the benchmark harness (``benchmarks/run.py``).

Two implementations of ONE MiniALBERT distillation step, on the same random weights and the
same masked batch:

* **ours**: ``components.training.distill.distill_forward`` with a ``FrozenTeacher`` around a
  ``BertEncoder`` (``load_hf_encoder`` of the reference teacher's folder) and an adapter-free
  ``RecursiveEncoder`` (``load_student`` of the reference student's ALBERT folder), loss
  ``DistillationLoss(attention_reduction="element")`` with MiniALBERT's weights.
* **reference**: a straightforward transformers loop, as MiniALBERT's ``general_distillation.py``
  did it: ``BertForMaskedLM`` teacher (eval, no_grad, eager attention, every hidden state and
  attention map, logits at every position) and ``AlbertForMaskedLM`` student (one hidden group,
  train mode, eager attention, logits at every position), and the loss written with
  ``KLDivLoss(reduction="mean")`` for attention, ``CosineEmbeddingLoss`` for hidden states,
  ``KLDivLoss(reduction="batchmean")`` for the output and the model's own MLM loss.

Both take backward, gradient clipping at 1.0 (the recipe's default; HF Trainer's too) and an
AdamW step. Dropout is 0 everywhere, so the two are numerically the same computation.

FLOP counting (``distill_flops``, ``encoder_forward_flops``): matmuls only, ``2*m*n*k`` per
``[m, k] @ [k, n]`` product, on the padded shapes (padding is computed, so it is counted).
Per layer over ``T = batch*seq`` token positions, width ``H``, FFN ``F``:

    Q, K, V, output projections   4 * 2*T*H*H
    FFN in + out                  2 * 2*T*H*F
    attention scores  Q K^T       2 * batch * seq * seq * H     (all heads together)
    attention context P V         2 * batch * seq * seq * H

Embedding look-ups, LayerNorm, softmax, GELU, the loss terms and the optimizer are
element-wise (memory-bound) and not counted. The student's E->H projector adds ``2*T*E*H``;
an MLM head over ``n`` positions adds ``2*n*H*Hh + 2*n*Hh*V`` (``Hh`` = its transform width:
H for BERT's head, E for ALBERT's). MLM heads are counted only where computed: ours at the
masked positions (teacher and student), the reference at all ``T`` positions. The teacher runs
forward only; the student forward + backward = 3x its forward FLOPs (backward computes the
gradient of both matmul operands, 2x forward; every student matmul input needs a gradient,
because the embeddings train). MiniALBERT adapters (inference section only) add
``2 * 2*2*T*H*(H/r)`` per iteration.
"""

from __future__ import annotations

import gc
import math
import os
import re
import resource
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------

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

    def replace(self, **kw) -> "Shapes":
        return Shapes(**{**asdict(self), **kw})


# teacher: BERT-base (12 x 768, 12 heads, FFN 3072, vocab 30522); student: minialbert_128
# without adapters (E=128, H=768, 6 iterations). MiniALBERT distilled at 256 tokens.
FULL = Shapes("bert-base", 30522, 12, 768, 12, 3072, 128, 768, 12, 3072, 6, batch=4, seq=256)
QUICK = Shapes("quick", 8000, 4, 256, 4, 1024, 128, 256, 4, 1024, 2, batch=8, seq=128)


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def environment() -> Dict:
    import platform

    import transformers

    flags = ""
    try:
        flags = next(
            (l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), ""
        )
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in flags]
    return dict(
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        cpu_model=cpu_model(),
        cpu_isa=isa,
        os_cpu_count=os.cpu_count(),
        available_cores=available_cores(),
        torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
        mkldnn=torch.backends.mkldnn.is_available(),
        mkl=torch.backends.mkl.is_available(),
        cpu_capability=getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")(),
        loadavg_at_start=list(os.getloadavg()),
    )


# ---------------------------------------------------------------------------------------------
# Weights and data
# ---------------------------------------------------------------------------------------------


def quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


TEACHER_QK_SCALE = 6.0


def make_assets(shapes: Shapes, folder: Path, seed: int = 0) -> Dict[str, str]:
    """Random teacher (HF BERT folder) and student (ours, exported as an ALBERT folder)."""
    from transformers import BertConfig, BertForMaskedLM

    from components.checkpointing.student import save_student
    from components.models.recursive import RecursiveEncoder

    quiet_transformers()
    folder.mkdir(parents=True, exist_ok=True)
    teacher_dir, student_dir = folder / "teacher_bert", folder / "student_albert"
    torch.manual_seed(seed)
    teacher = BertForMaskedLM(
        BertConfig(
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
    )
    # A 0.02-initialised BERT attends almost uniformly (attention KL ~1e-4), which would make
    # the attention term, and its equivalence check, meaningless. Sharpen the teacher's
    # attention like a trained model's: scale its query and key weights.
    with torch.no_grad():
        for layer in teacher.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(TEACHER_QK_SCALE)
            layer.attention.self.key.weight.mul_(TEACHER_QK_SCALE)
    teacher.save_pretrained(str(teacher_dir))
    del teacher
    torch.manual_seed(seed + 1)
    student = RecursiveEncoder(
        vocab_size=shapes.vocab,
        embedding_size=shapes.s_embed,
        hidden_size=shapes.s_hidden,
        num_heads=shapes.s_heads,
        intermediate_size=shapes.s_ffn,
        num_iterations=shapes.s_iters,
        adapter_placement=None,
        dropout=0.0,
        attention_dropout=0.0,
        max_position_embeddings=shapes.max_positions,
        pad_token_id=PAD,
    )
    assert save_student(student, student_dir, format="albert") == "albert"
    return {"teacher": str(teacher_dir), "student": str(student_dir)}


class _StubTokenizer:
    """What ``MLMMasker`` reads from a tokenizer, with BERT's special ids."""

    mask_token_id = MASK
    pad_token_id = PAD
    all_special_ids = [PAD, UNK, CLS, SEP, MASK]

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __len__(self) -> int:
        return self.vocab


def make_batch(shapes: Shapes, seed: int = 0):
    """A padded, MLM-masked batch: row 0 is full length, the others 50-100% of it."""
    from components.data.mlm import MLMMasker, pad_batch, step_generator
    from components.training.distill import MaskedBatch

    g = torch.Generator().manual_seed(seed)
    first_word = 999 if shapes.vocab > 2000 else 200
    windows = []
    for row in range(shapes.batch):
        length = shapes.seq if row == 0 else int(torch.randint(shapes.seq // 2, shapes.seq + 1, (1,), generator=g))
        body = torch.randint(first_word, shapes.vocab, (length - 2,), generator=g).tolist()
        windows.append([CLS] + body + [SEP])
    padded = pad_batch(windows, PAD, 8, shapes.seq)
    masker = MLMMasker(_StubTokenizer(shapes.vocab))
    noise = masker.noise(shapes.batch, padded["input_ids"].shape[1], step_generator(seed, 0))
    inputs, labels = masker(padded["input_ids"], padded["attention_mask"], noise)
    return MaskedBatch(inputs, padded["attention_mask"], labels)


# ---------------------------------------------------------------------------------------------
# The two steps
# ---------------------------------------------------------------------------------------------

MINIALBERT_WEIGHTS = {"mlm": 1.0, "output": 5.0, "hidden": 3.0, "attention": 3.0, "embedding": 0.0}
LR, WEIGHT_DECAY, CLIP = 5e-4, 1e-4, 1.0


class Runner:
    """One side (ours or reference): models, optimizer, batch, and ``step()``."""

    kind: str
    student: nn.Module

    def loss(self) -> Dict[str, torch.Tensor]:  # {"total": ..., term: ...}
        raise NotImplementedError

    bf16 = False  # run the forward (models and loss) under CPU bf16 autocast, as dtype=bf16 does

    def forward(self) -> Dict[str, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.loss()

    def step(self) -> torch.Tensor:
        terms = self.forward()
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return terms["total"].detach()

    def step_phases(self) -> Dict[str, float]:
        """One step, timed by phase (forward hooks on the two models): teacher forward,
        student forward, loss terms (the rest of the forward), backward, clip + AdamW."""
        stamps: Dict[str, float] = {}

        def mark(key):
            return lambda *_: stamps.__setitem__(key, time.perf_counter())

        hooks = [
            self.teacher.register_forward_pre_hook(mark("t0")),
            self.teacher.register_forward_hook(mark("t1")),
            self.student.register_forward_pre_hook(mark("s0")),
            self.student.register_forward_hook(mark("s1")),
        ]
        try:
            start = time.perf_counter()
            terms = self.forward()
            forward_end = time.perf_counter()
            terms["total"].backward()
            backward_end = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(self.params, CLIP)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            end = time.perf_counter()
        finally:
            for h in hooks:
                h.remove()
        teacher, student = stamps["t1"] - stamps["t0"], stamps["s1"] - stamps["s0"]
        return {
            "teacher_forward": teacher,
            "student_forward": student,
            "loss_terms": forward_end - start - teacher - student,
            "backward": backward_end - forward_end,
            "clip_and_optimizer": end - backward_end,
            "total": end - start,
        }

    def _init_optimizer(self) -> None:
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=WEIGHT_DECAY)


class OursRunner(Runner):
    kind = "ours"

    def __init__(self, assets: Dict[str, str], batch, shapes: Shapes, teacher_dtype=torch.float32):
        from components.checkpointing.hf_bert import load_hf_encoder
        from components.checkpointing.student import load_student
        from components.losses.distillation import DistillationLoss
        from components.models.teacher import FrozenTeacher

        quiet_transformers()
        encoder, _ = load_hf_encoder(Path(assets["teacher"]), dtype=teacher_dtype)
        self.teacher = FrozenTeacher(encoder, name="bench-teacher")
        self.student = load_student(assets["student"]).train()
        self.loss_fn = DistillationLoss(
            self.student.spec,
            self.teacher.spec,
            weights=MINIALBERT_WEIGHTS,
            temperature=1.0,
            layer_map="uniform",
            hidden_metric="cosine",
            attention_reduction="element",
        )
        assert self.loss_fn.projection is None  # same widths: nothing extra to train
        self.batch = batch
        self._init_optimizer()

    def loss(self) -> Dict[str, torch.Tensor]:
        from components.training.distill import distill_forward

        out = distill_forward(self.student, self.teacher, self.loss_fn, self.batch)
        return {"total": out.total, **out.terms}


class CachedTeacherRunner(OursRunner):
    """Our step with the teacher's outputs read from a cache instead of computed: the most a
    precomputed-teacher cache could save (disk reads not counted). A cache needs the masks to
    be fixed per window (the teacher sees the masked input), i.e. static masking."""

    kind = "ours, cached teacher outputs"

    def __init__(self, assets, batch, shapes):
        super().__init__(assets, batch, shapes)
        live = self.teacher
        recorded = {}

        class Replay(torch.nn.Module):
            spec = live.spec

            def forward(self, *args, **kwargs):
                return recorded["out"]

        masked = batch.masked_positions
        recorded["out"] = live(
            batch.input_ids,
            batch.attention_mask,
            attention_layers=self.loss_fn.teacher_attention_layers(),
            logits_mask=masked,
        )
        self.teacher = Replay()


def cache_bytes_per_window(shapes: Shapes, masked_per_window: float, top_k: int = 32) -> Dict[str, float]:
    """What a teacher cache must store per window for each loss term (bf16 tensors, top-k
    logits as bf16 values + int32 ids)."""
    mapped = shapes.s_iters
    return {
        "hidden_states_bf16": mapped * shapes.seq * shapes.t_hidden * 2,
        "attention_maps_bf16": mapped * shapes.t_heads * shapes.seq * shapes.seq * 2,
        f"top{top_k}_logits": masked_per_window * top_k * (2 + 4),
    }


class ReferenceRunner(Runner):
    """MiniALBERT's ``DistillationWrapper`` (general_distillation.py), restated."""

    kind = "reference"

    def __init__(self, assets: Dict[str, str], batch, shapes: Shapes):
        from transformers import AlbertForMaskedLM, BertForMaskedLM

        quiet_transformers()
        self.teacher = BertForMaskedLM.from_pretrained(assets["teacher"], attn_implementation="eager").eval()
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.student = AlbertForMaskedLM.from_pretrained(assets["student"], attn_implementation="eager").train()
        assert self.student.config.num_hidden_groups == 1
        self.batch = batch
        n_t, n_s = self.teacher.config.num_hidden_layers, self.student.config.num_hidden_layers
        assert n_t % n_s == 0, "the reference maps student i to teacher (L/N)*i"
        self.stride = n_t // n_s  # 2 for 12 -> 6: teacher index 2*i + 1 as in the original
        self.attention_loss = nn.KLDivLoss(reduction="mean")
        self.hidden_loss = nn.CosineEmbeddingLoss(reduction="mean")
        self.output_loss = nn.KLDivLoss(reduction="batchmean")
        self.temperature = 1.0
        self._init_optimizer()

    def loss(self) -> Dict[str, torch.Tensor]:
        with warnings.catch_warnings():
            # KLDivLoss(reduction="mean") warns that it divides by every element: that is
            # exactly what MiniALBERT computed, and what attention_reduction="element" matches.
            warnings.filterwarnings("ignore", message="reduction: 'mean' divides")
            return self._loss()

    def _loss(self) -> Dict[str, torch.Tensor]:
        b = self.batch
        s_out = self.student(
            input_ids=b.input_ids,
            attention_mask=b.attention_mask,
            labels=b.labels,
            output_hidden_states=True,
            output_attentions=True,
        )
        with torch.no_grad():
            t_out = self.teacher(
                input_ids=b.input_ids,
                attention_mask=b.attention_mask,
                output_hidden_states=True,
                output_attentions=True,
            )
        s_att, t_att = s_out.attentions, [a.detach() for a in t_out.attentions]
        s_hid, t_hid = s_out.hidden_states[1:], [h.detach() for h in t_out.hidden_states[1:]]
        heads = s_att[0].shape[1]
        mask = b.attention_mask

        att = hid = None
        for i in range(len(s_att)):
            t = self.stride * i + self.stride - 1
            # attention: rows of non-padding queries, every head; KLDivLoss(mean) over elements
            m = mask.unsqueeze(1).repeat(1, heads, 1).unsqueeze(-1).expand_as(s_att[i]).bool()
            s_sel = torch.masked_select(s_att[i], m).view(-1, s_att[i].size(-1)) + 1e-12
            t_sel = torch.masked_select(t_att[t], m).view(-1, t_att[t].size(-1)) + 1e-12
            a = self.attention_loss(torch.log(s_sel), t_sel)
            att = a if att is None else att + a
            # hidden: mean over non-padding tokens of 1 - cos
            m = mask.unsqueeze(-1).expand_as(s_hid[i]).bool()
            dim = s_hid[i].size(-1)
            s_sel = torch.masked_select(s_hid[i], m).view(-1, dim)
            t_sel = torch.masked_select(t_hid[t], m).view(-1, dim)
            target = s_sel.new(s_sel.size(0)).fill_(1)
            h = self.hidden_loss(s_sel, t_sel, target)
            hid = h if hid is None else hid + h
        # output: KL at masked positions, batchmean = per masked position
        s_logits, t_logits = s_out.logits, t_out.logits.detach()
        m = (b.labels > -1).unsqueeze(-1).expand_as(s_logits).bool()
        s_sel = torch.masked_select(s_logits, m).view(-1, s_logits.size(-1))
        t_sel = torch.masked_select(t_logits, m).view(-1, s_logits.size(-1))
        T = self.temperature
        out = self.output_loss(F.log_softmax(s_sel / T, dim=-1), F.softmax(t_sel / T, dim=-1)) * T**2
        total = 1.0 * s_out.loss + 3.0 * (att + hid) + 5.0 * out
        return {"total": total, "mlm": s_out.loss, "output": out, "hidden": hid, "attention": att}


RUNNERS = {"ours": OursRunner, "reference": ReferenceRunner}


# ---------------------------------------------------------------------------------------------
# Equivalence
# ---------------------------------------------------------------------------------------------


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def equivalence(ours: OursRunner, ref: ReferenceRunner) -> Dict:
    """Loss terms and student gradients of both sides on the same batch, before any update."""
    from components.checkpointing.albert import NATIVE_TO_ALBERT

    result: Dict = {"terms": {}}
    o, r = ours.forward(), ref.forward()
    for name in ("total", "mlm", "output", "hidden", "attention"):
        a, b = float(o[name].detach()), float(r[name].detach())
        result["terms"][name] = {"ours": a, "reference": b, "rel_diff": _rel(a, b)}
    o["total"].backward()
    r["total"].backward()
    ref_params = dict(ref.student.named_parameters(remove_duplicate=False))
    # transformers 5 leaves ALBERT's predictions.bias and predictions.decoder.bias as two
    # parameters when the decoder is untied; only decoder.bias is used by the forward.
    aliases = {"predictions.bias": "predictions.decoder.bias"}
    per_param, missing = {}, []
    for name, p in ours.student.named_parameters():
        ref_name = NATIVE_TO_ALBERT[name]
        q = ref_params[ref_name]
        if q.grad is None and ref_name in aliases:
            q = ref_params[aliases[ref_name]]
        if p.grad is None or q.grad is None:
            missing.append(name)
            continue
        per_param[name] = ((p.grad - q.grad).double().norm().item(), q.grad.double().norm().item())
    diff = math.sqrt(sum(d * d for d, _ in per_param.values()))
    norm = math.sqrt(sum(n * n for _, n in per_param.values()))
    result["grad_rel_diff"] = diff / max(norm, 1e-30)
    result["grad_compared_tensors"] = len(per_param)
    result["grad_not_compared"] = missing
    # Parameters whose gradient is (nearly) 0 (the attention key bias: softmax ignores a
    # constant added to a row of scores) carry rounding noise; judge those against the total norm.
    zero = {k for k, (_, n) in per_param.items() if n < 1e-4 * norm}  # e.g. key/query bias
    worst = max(((k, d / n) for k, (d, n) in per_param.items() if k not in zero), key=lambda x: x[1])
    result["grad_worst_param"] = {"name": worst[0], "rel_diff": worst[1]}
    result["grad_tiny_params"] = {
        k: {"ours_minus_ref_norm_over_total_norm": per_param[k][0] / max(norm, 1e-30)} for k in sorted(zero)
    }
    ours.optimizer.zero_grad(set_to_none=True)
    ref.optimizer.zero_grad(set_to_none=True)
    return result


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


def layer_flops(batch: int, seq: int, hidden: int, ffn: int) -> int:
    t = batch * seq
    return 4 * 2 * t * hidden * hidden + 2 * 2 * t * hidden * ffn + 2 * (2 * batch * seq * seq * hidden)


def mlm_head_flops(n: int, hidden: int, head: int, vocab: int) -> int:
    return 2 * n * hidden * head + 2 * n * head * vocab


def encoder_forward_flops(
    batch: int,
    seq: int,
    layers: int,
    hidden: int,
    ffn: int,
    embed: Optional[int] = None,
    head_positions: int = 0,
    head_width: Optional[int] = None,
    vocab: int = 0,
    adapter_reduction: Optional[int] = None,
) -> Dict[str, int]:
    parts = {"layers": layers * layer_flops(batch, seq, hidden, ffn)}
    if embed is not None and embed != hidden:
        parts["projector"] = 2 * batch * seq * embed * hidden
    if adapter_reduction:
        parts["adapters"] = layers * 2 * (2 * 2 * batch * seq * hidden * (hidden // adapter_reduction))
    if head_positions:
        parts["mlm_head"] = mlm_head_flops(head_positions, hidden, head_width or hidden, vocab)
    parts["total"] = sum(parts.values())
    return parts


def distill_flops(shapes: Shapes, num_masked: int, kind: str) -> Dict:
    """Matmul FLOPs of one distillation step; ``kind`` decides where MLM heads run."""
    t = shapes.batch * shapes.seq
    n = num_masked if kind == "ours" else t
    teacher = encoder_forward_flops(
        shapes.batch, shapes.seq, shapes.t_layers, shapes.t_hidden, shapes.t_ffn,
        head_positions=n, head_width=shapes.t_hidden, vocab=shapes.vocab,
    )
    student = encoder_forward_flops(
        shapes.batch, shapes.seq, shapes.s_iters, shapes.s_hidden, shapes.s_ffn,
        embed=shapes.s_embed, head_positions=n, head_width=shapes.s_embed, vocab=shapes.vocab,
    )
    total = teacher["total"] + 3 * student["total"]
    return {
        "mlm_head_positions": n,
        "teacher_forward": teacher,
        "student_forward": student,
        "student_forward_backward": 3 * student["total"],
        "total": total,
    }


# ---------------------------------------------------------------------------------------------
# Timing and memory utilities
# ---------------------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_counters():
    """(seconds of busy CPU on the whole machine incl. steal, seconds of this process)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / _CLK  # user nice system irq softirq steal
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    t = os.times()
    return busy, t.user + t.system


class Measured:
    """Wall time of a call plus how busy the machine was meanwhile: ``own_cores`` (CPU seconds
    of this process per wall second) and ``other_cores`` (everything else, steal included, per
    wall second; /proc/stat has 10 ms resolution). On a 2-core machine ``other_cores`` near 0
    means the measurement ran alone."""

    def __init__(self, fn: Callable[[], object]):
        busy0, own0 = _cpu_counters()
        start = time.perf_counter()
        self.result = fn()
        self.seconds = time.perf_counter() - start
        busy1, own1 = _cpu_counters()
        self.own_cores = (own1 - own0) / self.seconds
        self.other_cores = max(0.0, (busy1 - busy0) - (own1 - own0)) / self.seconds


def summary(xs: List[float]) -> Dict[str, float]:
    return {
        "median": statistics.median(xs),
        "min": min(xs),
        "max": max(xs),
        "mean": statistics.fmean(xs),
        "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "n": len(xs),
    }


def peak_matmul(n: int = 2048, repeats: int = 10, warmup: int = 2, dtype=torch.float32) -> Dict:
    """Best-of-``repeats`` FLOP/s of an ``n x n @ n x n`` matmul (fp32 unless told; 2 n^3 FLOPs)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    times = [timed(lambda: torch.matmul(a, b, out=out)) for _ in range(repeats)]
    flops = 2 * n**3
    return {"n": n, "flops": flops, "times_s": times, "best_flops_per_s": flops / min(times),
            "median_flops_per_s": flops / statistics.median(times)}


def matmul_probe(n: int = 2048, repeats: int = 2, dtype=torch.float32) -> float:
    """A short peak probe (best of ``repeats`` n^3 matmuls) to interleave with other timings."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / min(timed(lambda: a @ b) for _ in range(repeats))


def gemm_rate(m: int, k: int, n: int, repeats: int = 10, warmup: int = 2) -> Dict:
    """Best FLOP/s of ``[m, k] @ [k, n]`` (a typical shape of the step)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(warmup):
        a @ b
    times = [timed(lambda: a @ b) for _ in range(repeats)]
    return {"shape": [m, k, n], "times_s": times, "best_flops_per_s": 2 * m * k * n / min(times)}


def saved_tensor_bytes(fn: Callable[[], Dict[str, torch.Tensor]], exclude: List[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``fn`` (the loss
    forward), parameters excluded: the activation memory a step holds at its peak."""
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            s = t.untyped_storage()
            if s.data_ptr() not in skip:
                seen[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def _rss_kib(field: str) -> int:
    m = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) if m else -1


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM); Linux >= 4.0. False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_probe(kind: str, assets: Dict[str, str], shapes: Shapes, seed: int, threads: int, bf16: bool = False) -> Dict:
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
    batch = make_batch(shapes, seed)
    runner = RUNNERS[kind](assets, batch, shapes)
    runner.bf16 = bf16
    gc.collect()
    result = {"kind": kind, "rss_after_build_mib": _rss_kib("VmRSS") / 1024}
    can_reset = _reset_peak()
    result["method"] = (
        "VmHWM reset via /proc/self/clear_refs, peak during step minus VmRSS before it"
        if can_reset
        else "ru_maxrss (process peak, not resettable) minus VmRSS before the step"
    )
    for label in ("first_step", "steady_step"):
        gc.collect()
        _reset_peak()
        before = _rss_kib("VmRSS")
        runner.step()
        peak = _rss_kib("VmHWM") if can_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result[f"{label}_rss_before_mib"] = before / 1024
        result[f"{label}_peak_mib"] = peak / 1024
        result[f"{label}_delta_mib"] = (peak - before) / 1024
    result["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def profile_step(runner: Runner, steps: int = 2, rows: int = 15) -> Dict:
    """torch.profiler over ``steps`` steps: top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

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
