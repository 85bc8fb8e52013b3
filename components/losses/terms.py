"""The distillation loss terms, each a small module usable on its own.

Every term returns a *sum over tokens* when ``reduction="sum"`` and the mean over tokens when
``reduction="mean"`` (the default). The composite uses sums and divides by token counts taken
over the whole optimizer step, so gradient accumulation and data parallelism give exactly the
loss of one large batch. All terms compute in fp32 whatever the autocast dtype.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _reduce(per_item: torch.Tensor, count, reduction: str) -> torch.Tensor:
    total = per_item.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(float(count), 1.0)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


class MaskedLMLoss(nn.Module):
    """Cross-entropy of the student's MLM logits at the masked positions.

    Args (forward): ``logits`` ``[n, vocab]`` and ``labels`` ``[n]`` for the ``n`` masked positions.
    """

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        per_position = F.cross_entropy(logits.float(), labels, reduction="none")
        return _reduce(per_position, labels.numel(), reduction)


class OutputKLLoss(nn.Module):
    """KL(teacher || student) of the MLM distributions at temperature ``T``, times ``T**2``.

    The ``T**2`` factor (Hinton et al.) keeps gradient magnitudes independent of ``T``; at the
    default ``T = 1`` it is the plain KL divergence per masked position.
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        t = self.temperature
        teacher_logp = F.log_softmax(teacher_logits.float() / t, dim=-1)
        student_logp = F.log_softmax(student_logits.float() / t, dim=-1)
        per_position = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1) * t * t
        return _reduce(per_position, per_position.numel(), reduction)


class HiddenAlignmentLoss(nn.Module):
    """Distance between student and teacher hidden states at non-padding tokens.

    ``metric="cosine"``: 1 - cos(student, teacher) per token (MiniALBERT).
    ``metric="mse"``: mean squared error over the hidden dimension per token (TinyBERT).
    Both inputs must already have the same width (the composite projects the student).
    """

    def __init__(self, metric: str = "cosine"):
        super().__init__()
        if metric not in ("cosine", "mse"):
            raise ValueError(f"hidden metric must be 'cosine' or 'mse', got {metric!r}")
        self.metric = metric

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        attention_mask: torch.Tensor,
        reduction: str = "mean",
    ) -> torch.Tensor:
        student, teacher = student.float(), teacher.float()
        if self.metric == "cosine":
            per_token = 1.0 - F.cosine_similarity(student, teacher, dim=-1)
        else:
            per_token = (student - teacher).pow(2).mean(-1)
        mask = attention_mask.to(per_token.dtype)
        return _reduce(per_token * mask, mask.sum(), reduction)


class FeatureMapLoss(nn.Module):
    """MobileBERT's feature-map transfer: both hidden states through a LayerNorm without
    parameters (zero mean, unit variance over the hidden dimension), then the mean squared
    error over that dimension, per non-padding token."""

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        student, teacher = student.float(), teacher.float()
        normed_s = F.layer_norm(student, student.shape[-1:])
        normed_t = F.layer_norm(teacher, teacher.shape[-1:])
        per_token = (normed_s - normed_t).pow(2).mean(-1)
        mask = attention_mask.to(per_token.dtype)
        return _reduce(per_token * mask, mask.sum(), reduction)


class MeanVarianceLoss(nn.Module):
    """MobileBERT's released mean/variance transfer, per non-padding token: the squared
    difference of the hidden states' means over the hidden dimension (``statistic="mean"``) or
    the absolute difference of their variances (``statistic="variance"``)."""

    def __init__(self, statistic: str = "mean"):
        super().__init__()
        if statistic not in ("mean", "variance"):
            raise ValueError(f"statistic must be 'mean' or 'variance', got {statistic!r}")
        self.statistic = statistic

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        student, teacher = student.float(), teacher.float()
        if self.statistic == "mean":
            per_token = (student.mean(-1) - teacher.mean(-1)).pow(2)
        else:
            per_token = (student.var(-1, unbiased=False) - teacher.var(-1, unbiased=False)).abs()
        mask = attention_mask.to(per_token.dtype)
        return _reduce(per_token * mask, mask.sum(), reduction)


def match_heads(student: torch.Tensor, teacher: torch.Tensor):
    """Attention maps ``[batch, heads, q, k]`` with the same number of heads on both sides.

    The rule for teachers with other head counts: when the teacher's heads are a multiple of
    the student's (BERT-large's 16 over MobileBERT's 4), each student head is matched with the
    mean of a contiguous group of teacher heads (teacher heads 1-4 -> student head 1, ...);
    otherwise both sides are averaged over all their heads. A mean of attention distributions
    is a distribution, so the KL stays well defined."""
    hs, ht = student.shape[1], teacher.shape[1]
    if hs == ht:
        return student, teacher
    if ht % hs == 0:
        grouped = teacher.unflatten(1, (hs, ht // hs)).mean(2)
        return student, grouped
    return student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)


class AttentionKLLoss(nn.Module):
    """KL(teacher || student) of each attention distribution (one per query row and head),
    averaged over heads, at non-padding query positions: MobileBERT's per-head attention
    transfer, and MiniALBERT's attention loss.

    When the head counts differ, ``match_heads`` pairs them (groups of teacher heads when
    the counts divide, else the head means). Padded keys carry zero probability on both sides
    and contribute nothing.

    ``reduction_over="distribution"`` is that per-distribution KL (MobileBERT's definition);
    ``"element"`` also divides by the number of keys (the padded sequence length), which is what
    MiniALBERT's ``KLDivLoss(reduction="mean")`` computed.
    """

    def __init__(self, reduction_over: str = "distribution"):
        super().__init__()
        if reduction_over not in ("distribution", "element"):
            raise ValueError(f"attention reduction must be 'distribution' or 'element', got {reduction_over!r}")
        self.reduction_over = reduction_over

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        attention_mask: torch.Tensor,
        reduction: str = "mean",
    ) -> torch.Tensor:
        student, teacher = match_heads(student.float(), teacher.float())
        tiny = torch.finfo(student.dtype).tiny
        per_row = (torch.xlogy(teacher, teacher) - teacher * student.clamp_min(tiny).log()).sum(-1)
        if self.reduction_over == "element":
            per_row = per_row / per_row.shape[-1]
        per_query = per_row.mean(1)  # over heads -> [batch, seq]
        mask = attention_mask.to(per_query.dtype)
        return _reduce(per_query * mask, mask.sum(), reduction)
