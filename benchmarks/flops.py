"""Matmul FLOPs of the benchmarked steps, for achieved FLOP/s against the machine's peak.

FLOP counting (``distill_flops``, ``encoder_forward_flops``): matmuls only, ``2*m*n*k`` per
``[m, k] @ [k, n]`` product, on the shapes each side computes (padding is computed, so it is
counted; ours counts packed rows when it packs).
Per layer over ``T = rows*seq`` token positions, width ``H``, FFN ``F``:

    Q, K, V, output projections   4 * 2*T*H*H
    FFN in + out                  2 * 2*T*H*F
    attention scores  Q K^T       2 * rows * seq * seq * H     (all heads together)
    attention context P V         2 * rows * seq * seq * H

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

from typing import Dict, Optional

from workloads import Shapes


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


def distill_flops(shapes: Shapes, rows: int, seq: int, num_masked: int, kind: str) -> Dict:
    """Matmul FLOPs of one distillation step over ``rows x seq`` positions; ``kind`` decides
    where MLM heads run."""
    t = rows * seq
    n = (num_masked if kind == "ours" else t) if shapes.mlm_head else 0
    teacher = encoder_forward_flops(
        rows,
        seq,
        shapes.t_layers,
        shapes.t_hidden,
        shapes.t_ffn,
        head_positions=n,
        head_width=shapes.t_hidden,
        vocab=shapes.vocab,
    )
    student = encoder_forward_flops(
        rows,
        seq,
        shapes.s_iters,
        shapes.s_hidden,
        shapes.s_ffn,
        embed=shapes.s_embed,
        head_positions=n,
        head_width=shapes.s_embed,
        vocab=shapes.vocab,
    )
    total = teacher["total"] + 3 * student["total"]
    return {
        "positions": t,
        "mlm_head_positions": n,
        "teacher_forward": teacher,
        "student_forward": student,
        "student_forward_backward": 3 * student["total"],
        "total": total,
    }
