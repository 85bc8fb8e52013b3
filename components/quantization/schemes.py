"""Quantisation schemes and their numerics: the one place that says which integers a student
becomes. Fake quantisation (training), the ONNX export and the torch.export program all call
these functions, so what QAT trains for is exactly what the deployed runtime computes.

=================  ==========================================  =======================================
scheme             weights                                     activations (inputs of every Linear)
=================  ==========================================  =======================================
``int8_dynamic``   int8, symmetric, per output channel,        uint8, asymmetric, ONE scale per tensor,
                   scale = absmax / 64, values in [-64, 64]    computed at run time from its min/max
``int8_weight``    int8, symmetric, per output channel,        float
                   scale = absmax / 127, values in [-127, 127]
``int4_weight``    int4, symmetric, per group of ``group_size``  float
                   inputs, scale = absmax / 7, in [-7, 7]
=================  ==========================================  =======================================

``int8_dynamic`` is ONNX Runtime's dynamic quantisation (``quantize_dynamic`` with
``per_channel=True, reduce_range=True, weight_type=QInt8``): ``DynamicQuantizeLinear`` turns each
activation into uint8 with ``scale = (max(x, 0) - min(x, 0)) / 255`` and
``zero_point = round(-min(x, 0) / scale)``, rounding half to even, and the weights are rounded the
same way; integer products accumulate in int32. Given the same float input, each quantised MatMul
of the file returns the exact integer result times the scales to within a few float32 roundings,
on every CPU kernel (``tests/test_quantization.py`` checks each node); a whole network differs
from its float simulation only where float summation order moves a value across a rounding
boundary (rare: see that test).

Why the weights use 7 bits (``reduce_range``): on x86 CPUs without VNNI (AVX2, AVX-512F) ONNX
Runtime multiplies uint8 activations by int8 weights with ``vpmaddubsw``, which adds pairs of
products into int16 and saturates past 32767; with weights up to 127 a pair reaches
2 * 255 * 127, and outputs come out wrong by up to 0.23 on a 96 -> 160 Linear (measured on an
AVX2 EPYC). Weights within [-64, 64] keep every pair below 2 * 255 * 64 = 32640, so the
file computes the same on every CPU; QAT trains for exactly those integers. torchao's
``IntxFakeQuantizeConfig`` cannot express this (per-token activations only, weights scaled by
absmax / 127.5 into [-128, 127]), so the rounding rules are written here and plugged into
torchao's fake-quantised modules (``components.quantization.qat``).

Why the ONNX file stores those weights negated, with negative scales: on ARM CPUs with SME
(Apple's M4, for one) ONNX Runtime 1.23+ runs ``DynamicQuantizeMatMul`` nodes whose weight
scales are all positive with a KleidiAI kernel that quantises activations to int8 per row, not
per tensor: a different rounding from the one QAT trains for. ``(-q) * (-scale)`` is the same
weight bit for bit and keeps those nodes on the integer GEMM every other CPU runs
(``components.quantization.onnx_export.negate_integer_weights``).

Every scheme also stores the word-embedding table as int8, one symmetric scale per row (per
token): the table is a quarter of miniALBERT-128's parameters and would otherwise keep the file
at 40% of fp32. Position and token-type embeddings, LayerNorms and biases stay fp32.

All fake quantisers use the straight-through estimator: forward computes the rounded value,
backward passes the gradient through unchanged.
"""

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch


@dataclass(frozen=True)
class Scheme:
    name: str
    weight_bits: int  # 8 or 4: the integer type weights are stored in
    weight_qmax: int  # weights take values in [-weight_qmax, weight_qmax]
    group_size: Optional[int]  # None: one scale per output channel
    dynamic_activations: bool  # uint8 per-tensor dynamic activations (ORT DynamicQuantizeLinear)
    runtime: str  # what the scheme targets, in words (docs, export.json)


SCHEMES: Dict[str, Scheme] = {
    "int8_dynamic": Scheme(
        "int8_dynamic",
        8,
        64,  # ONNX Runtime's reduce_range: no int16 saturation on CPUs without VNNI
        None,
        True,
        "ONNX Runtime dynamic int8 (MatMulInteger / DynamicQuantizeMatMul): int8 per-channel weights, "
        "uint8 per-tensor activations quantised at run time",
    ),
    "int8_weight": Scheme(
        "int8_weight",
        8,
        127,
        None,
        False,
        "int8 per-channel weights dequantised to fp32 at run time (ONNX DequantizeLinear + MatMul); "
        "4x smaller, fp32 arithmetic",
    ),
    "int4_weight": Scheme(
        "int4_weight",
        4,
        7,
        32,
        False,
        "int4 weights in groups of group_size inputs (ONNX blocked DequantizeLinear, fused by ONNX Runtime "
        "into MatMulNBits); fp32 activations",
    ),
}
SCHEME_NAMES = tuple(SCHEMES)
EMBEDDING_BITS = 8


def get_scheme(name: str, group_size: Optional[int] = None) -> Scheme:
    """The scheme called ``name``; ``group_size`` overrides the int4 group size."""
    try:
        scheme = SCHEMES[name]
    except KeyError:
        raise ValueError(f"Unknown quantisation scheme {name!r}; choose one of {list(SCHEMES)}") from None
    if group_size is not None and scheme.group_size is not None:
        if group_size < 2 or group_size & (group_size - 1):
            raise ValueError(f"group_size must be a power of two of at least 2, got {group_size}")
        scheme = dataclasses.replace(scheme, group_size=group_size)
    return scheme


def _safe(scale: torch.Tensor) -> torch.Tensor:
    # an all-zero row (a fresh adapter's up-projection) or tensor: ORT then uses scale 1
    return torch.where(scale < torch.finfo(torch.float32).tiny, torch.ones_like(scale), scale)


def group_for(inputs: int, group_size: Optional[int]) -> Optional[int]:
    """The group a layer with ``inputs`` input features uses: the largest power of two that
    divides ``inputs`` and is at most ``group_size`` (``group_size`` itself for the wide layers;
    16 for miniALBERT's 48-wide adapter bottleneck); ``None``: one scale per channel."""
    if group_size is None:
        return None
    group = 1
    while group * 2 <= group_size and inputs % (group * 2) == 0:
        group *= 2
    return group


def quantize_weight(
    weight: torch.Tensor, bits: int, group_size: Optional[int] = None, qmax: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric integers and scales for a ``[out, in]`` weight (or an ``[rows, dim]`` table).

    Returns ``(q, scale)``: ``q`` int8 of the weight's shape with values in ``[-qmax, qmax]``
    (default ``2**(bits-1) - 1``; a scheme's ``weight_qmax``); ``scale`` float32 ``[out, 1]`` per
    row, or ``[out, in // group_size]`` per group. ``q * scale`` (repeated over each group) is the
    dequantised weight.
    """
    w = weight.detach().float()
    qmax = qmax or 2 ** (bits - 1) - 1
    group_size = group_for(w.shape[1], group_size)
    if group_size is None:
        scale = _safe(w.abs().amax(dim=1, keepdim=True) / qmax)
        q = torch.clamp(torch.round(w / scale), -qmax, qmax)
    else:
        rows, cols = w.shape
        if cols % group_size:
            raise ValueError(f"group_size {group_size} does not divide the weight's {cols} inputs")
        grouped = w.view(rows, cols // group_size, group_size)
        scale = _safe(grouped.abs().amax(dim=2) / qmax)
        q = torch.clamp(torch.round(grouped / scale[..., None]), -qmax, qmax).view(rows, cols)
    return q.to(torch.int8), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` with each scale applied to its row or group (float32)."""
    rows, cols = q.shape
    return (q.view(rows, scale.shape[1], -1).float() * scale[..., None]).view(rows, cols)


def fake_quantize_weight(
    weight: torch.Tensor, bits: int, group_size: Optional[int] = None, qmax: Optional[int] = None
) -> torch.Tensor:
    """The weight as the runtime sees it, with straight-through gradients."""
    q, scale = quantize_weight(weight, bits, group_size, qmax)
    rounded = dequantize_weight(q, scale).to(weight.dtype)
    return weight + (rounded - weight).detach()


def activation_qparams(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """ORT ``DynamicQuantizeLinear``'s uint8 scale and zero point for a whole tensor."""
    x = x.detach().float()
    low, high = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = _safe((high - low) / 255.0)
    zero_point = torch.clamp(torch.round(-low / scale), 0, 255)
    return scale, zero_point


def round_activation(x: torch.Tensor) -> torch.Tensor:
    """``x`` quantised to uint8 with one dynamic scale and dequantised again (no gradient)."""
    scale, zero_point = activation_qparams(x)
    q = torch.clamp(torch.round(x.float() / scale) + zero_point, 0, 255)
    return ((q - zero_point) * scale).to(x.dtype)


def fake_quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """``round_activation`` with straight-through gradients."""
    return x + (round_activation(x) - x).detach()
