"""The composite distillation loss: weights, the layer map, and every term for logging.

    total = w_mlm * mlm + w_output * output
          + sum over layer-wise terms x of  w_x * sum_{(s, t) in active map} v_s * x(s, t)
          + w_embedding * hidden(embeddings)
          + w_sentence * hidden(mean-pooled last layers)

Layer-wise terms: ``hidden`` (cosine or MSE, MiniALBERT/TinyBERT), ``attention`` (per-head KL),
``feature_map`` (MobileBERT's LayerNorm-then-MSE), ``feature_mean`` and ``feature_variance``
(MobileBERT's released mean/variance transfer). Each mapped student layer ``s`` has weight
``v_s`` (``layer_weights``, 1 unless given). ``sentence`` compares what sentence-embedding users
consume: the mean over each sequence's tokens of the student's last layer and of the teacher's
(Reimers & Gurevych 2020, "Making Monolingual Sentence Embeddings Multilingual using Knowledge
Distillation", distil such embeddings with MSE; the term uses ``hidden_metric``). The *active*
map is the whole layer map unless a stage selects some student layers (``set_layers``):
MobileBERT's progressive transfer trains layer k with layer k's losses only. Pre-training
distillation, ``a * MLM + (1 - a) * KD``, is the weights ``{mlm: a, output: 1 - a}``.

Token-level terms are divided by the number of masked tokens (mlm, output) or non-padding
tokens (the others) of the whole optimizer step when the caller passes those counts.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Literal, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from components.losses.terms import (
    AttentionKLLoss,
    FeatureMapLoss,
    HiddenAlignmentLoss,
    MaskedLMLoss,
    MeanVarianceLoss,
    OutputKLLoss,
)
from components.models.output import EncoderOutput, EncoderSpec

TERMS = (
    "mlm",
    "output",
    "hidden",
    "attention",
    "embedding",
    "sentence",
    "feature_map",
    "feature_mean",
    "feature_variance",
)
LossTerm = Literal[
    "mlm", "output", "hidden", "attention", "embedding", "sentence", "feature_map", "feature_mean", "feature_variance"
]
# terms summed over the (active) layer map
LAYER_TERMS = ("hidden", "attention", "feature_map", "feature_mean", "feature_variance")

# MiniALBERT: 1 * mlm + 3 * (attention + hidden) + 5 * output, T = 1.
MINIALBERT_WEIGHTS = {"mlm": 1.0, "output": 5.0, "hidden": 3.0, "attention": 3.0, "embedding": 0.0}
# MobileBERT's layer-wise transfer (paper: feature maps 100, attention 1; released code: mean
# 5000, variance 5); its pre-training distillation stage is {mlm: 0.5, output: 0.5}.
MOBILEBERT_WEIGHTS = {"feature_map": 100.0, "attention": 1.0, "feature_mean": 5000.0, "feature_variance": 5.0}

LayerMap = Union[Literal["uniform"], List[Optional[int]], Dict[int, int]]


def resolve_layer_map(layer_map: LayerMap, num_student: int, num_teacher: int) -> List[Tuple[int, int]]:
    """(student layer, teacher layer) pairs, 1-based.

    ``"uniform"``: student layer ``i`` -> teacher layer ``i * L / N`` rounded half up, so 6
    iterations over 12 layers give 2, 4, ..., 12, over 24 layers 4, 8, ..., 24, and 8 over 12
    give 2, 3, 5, 6, 8, 9, 11, 12. A list gives the teacher
    layer of each student layer in order (``null`` skips one); a mapping gives pairs directly.
    """
    if isinstance(layer_map, str):
        if layer_map != "uniform":
            raise ValueError(f"layer_map must be 'uniform', a list or a mapping, got {layer_map!r}")
        pairs = [(i, max(1, math.floor(i * num_teacher / num_student + 0.5))) for i in range(1, num_student + 1)]
    elif isinstance(layer_map, Mapping):
        pairs = sorted((int(s), int(t)) for s, t in layer_map.items())
    else:
        layer_map = list(layer_map)
        if len(layer_map) != num_student:
            raise ValueError(f"layer_map lists {len(layer_map)} teacher layers for a student with {num_student} layers")
        pairs = [(i, int(t)) for i, t in enumerate(layer_map, start=1) if t is not None]
    for s, t in pairs:
        if not 1 <= s <= num_student:
            raise ValueError(f"layer_map: student layer {s} is outside 1..{num_student}")
        if not 1 <= t <= num_teacher:
            raise ValueError(f"layer_map: teacher layer {t} is outside 1..{num_teacher}")
    return pairs


def segment_means(
    hidden: torch.Tensor, attention_mask: torch.Tensor, segment_ids: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The mean over each sequence's tokens: ``[batch, K, hidden]`` and which of the K slots
    hold a sequence (``[batch, K]``, bool). ``segment_ids`` numbers the sequences of packed rows
    1..K (0: padding); without it each row is one sequence."""
    if segment_ids is None:
        segment_ids = attention_mask.long()
    segment_ids = segment_ids * (attention_mask > 0)
    k = max(int(segment_ids.max()), 1)
    members = F.one_hot(segment_ids, k + 1)[..., 1:].to(torch.float32)  # [batch, seq, K]
    counts = members.sum(1)  # [batch, K]
    sums = torch.einsum("bsk,bsh->bkh", members, hidden.float())
    return sums / counts.clamp_min(1).unsqueeze(-1), counts > 0


@dataclass
class LossOutput:
    total: torch.Tensor
    terms: Dict[str, torch.Tensor]  # unweighted value of every active term


class DistillationLoss(nn.Module):
    """Holds the weights, layer map and hidden-state projection; returns every term.

    Args:
        student, teacher: the two encoders' ``EncoderSpec``.
        weights: weight of each term in ``TERMS``; missing terms weigh 0.
        temperature: temperature of the output KL (scaled by ``T**2``).
        layer_map: see ``resolve_layer_map``.
        hidden_metric: ``"cosine"`` or ``"mse"``.
        attention_reduction: ``"distribution"`` averages the KL of each attention
            distribution; ``"element"`` also divides by the sequence length, as MiniALBERT's
            ``KLDivLoss(reduction="mean")`` did (use it to keep the paper's loss weights
            balanced as published: at 256 tokens the term is 256x smaller).
        layer_weights: ``{student layer: weight}`` for the layer-wise terms; unnamed mapped
            layers weigh 1 (e.g. ``{6: 3.0}`` puts three times the weight on the last of six).

    When the student is narrower than the teacher, learned linear projections map student
    hidden states to the teacher's width (``projection``: one shared by all mapped layers and the
    embeddings, or one per mapped layer: ``per_layer``, for students whose layers differ, such as
    MobileBERT's under a stock BERT teacher). They train with the student and are not part of
    the exported student.
    """

    def __init__(
        self,
        student: EncoderSpec,
        teacher: EncoderSpec,
        weights: Optional[Dict[LossTerm, float]] = None,
        temperature: float = 1.0,
        layer_map: LayerMap = "uniform",
        hidden_metric: Literal["cosine", "mse"] = "cosine",
        attention_reduction: Literal["distribution", "element"] = "distribution",
        projection: Literal["shared", "per_layer"] = "shared",
        layer_weights: Optional[Mapping[int, float]] = None,
    ):
        super().__init__()
        if student.vocab_size != teacher.vocab_size:
            raise ValueError(
                f"Student vocabulary ({student.vocab_size}) differs from the teacher's ({teacher.vocab_size})"
            )
        self.student_spec, self.teacher_spec = student, teacher
        self.layer_map = resolve_layer_map(layer_map, student.num_layers, teacher.num_layers)
        self.layer_weights = {s: 1.0 for s, _ in self.layer_map}
        for s, v in (layer_weights or {}).items():
            if int(s) not in self.layer_weights:
                raise ValueError(
                    f"layer_weights names student layer {s}, which the layer map does not map "
                    f"(mapped: {sorted(self.layer_weights)})"
                )
            if v < 0:
                raise ValueError(f"layer_weights: student layer {s} has a negative weight {v}")
            self.layer_weights[int(s)] = float(v)
        if projection not in ("shared", "per_layer"):
            raise ValueError(f"projection must be 'shared' or 'per_layer', got {projection!r}")
        self.projection = self.projections = None
        if student.hidden_size != teacher.hidden_size:
            if projection == "shared":
                self.projection = nn.Linear(student.hidden_size, teacher.hidden_size)
            else:  # one per mapped student layer, and one for the embeddings ("0")
                layers = [0] + [s for s, _ in self.layer_map]
                self.projections = nn.ModuleDict(
                    {str(i): nn.Linear(student.hidden_size, teacher.hidden_size) for i in layers}
                )
        self.mlm = MaskedLMLoss()
        self.output = OutputKLLoss(temperature)
        self.hidden = HiddenAlignmentLoss(hidden_metric)
        self.attention = AttentionKLLoss(attention_reduction)
        self.feature_map = FeatureMapLoss()
        self.feature_mean = MeanVarianceLoss("mean")
        self.feature_variance = MeanVarianceLoss("variance")
        self.weights: Dict[str, float] = {}
        self.set_weights(MINIALBERT_WEIGHTS if weights is None else weights)
        self.active_layer_map = list(self.layer_map)

    def check_weights(self, weights: Mapping[str, float]) -> Dict[str, float]:
        """Validated weights for every term (missing ones 0); raises on what cannot work."""
        unknown = set(weights) - set(TERMS)
        if unknown:
            raise ValueError(f"Unknown loss terms {sorted(unknown)}; the terms are {list(TERMS)}")
        full = {term: float(weights.get(term, 0.0)) for term in TERMS}
        for term, w in full.items():
            if w < 0:
                raise ValueError(f"Loss weight {term}={w} is negative")
        if full["output"] and not self.teacher_spec.has_mlm_head:
            raise ValueError(
                "The output loss needs the teacher's MLM logits, but the teacher has no MLM head "
                "(a plain encoder checkpoint). Set its weight to 0: loss.weights.output=0"
            )
        if (full["output"] or full["mlm"]) and not self.student_spec.has_mlm_head:
            raise ValueError("The mlm and output losses need a student with an MLM head")
        if (
            full["sentence"]
            and self.projections is not None
            and str(self.student_spec.num_layers) not in self.projections
        ):
            raise ValueError(
                "The sentence term compares the student's last layer, which the layer map leaves out, so "
                "projection=per_layer has no projection for it: map the last layer or use projection=shared"
            )
        if not any(full.values()):
            raise ValueError("Every loss weight is 0: nothing to train")
        return full

    def set_weights(self, weights: Mapping[str, float]) -> None:
        self.weights = self.check_weights(weights)

    def check_layers(self, layers: Optional[Sequence[int]]) -> List[Tuple[int, int]]:
        """The pairs of the layer map whose student layer is in ``layers`` (all for ``None``)."""
        if layers is None:
            return list(self.layer_map)
        mapped = {s for s, _ in self.layer_map}
        unmapped = sorted(set(layers) - mapped)
        if unmapped:
            raise ValueError(f"layers {unmapped} are not student layers of the layer map (mapped: {sorted(mapped)})")
        return [(s, t) for s, t in self.layer_map if s in set(layers)]

    def set_layers(self, layers: Optional[Sequence[int]]) -> None:
        """Which mapped student layers the layer-wise terms cover (a stage's ``layers``)."""
        self.active_layer_map = self.check_layers(layers)

    # What the encoders must return for the active terms.
    def student_attention_layers(self) -> Set[int]:
        return {s for s, _ in self.active_layer_map} if self.weights["attention"] else set()

    def teacher_attention_layers(self) -> Set[int]:
        return {t for _, t in self.active_layer_map} if self.weights["attention"] else set()

    @property
    def needs_student_logits(self) -> bool:
        return bool(self.weights["mlm"] or self.weights["output"])

    @property
    def needs_teacher_logits(self) -> bool:
        return bool(self.weights["output"])

    def project(self, hidden: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """Student hidden states of ``layer`` (0: the embeddings) at the teacher's width."""
        if self.projections is not None:
            return self.projections[str(layer)](hidden)
        return self.projection(hidden) if self.projection is not None else hidden

    def forward(
        self,
        student: EncoderOutput,
        teacher: EncoderOutput,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
        num_masked: Optional[float] = None,
        num_tokens: Optional[float] = None,
        segment_ids: Optional[torch.Tensor] = None,
        num_sequences: Optional[float] = None,
    ) -> LossOutput:
        """Compute every active term.

        Args:
            student, teacher: the encoders' records; logits are at the masked positions.
            labels: ``[batch, seq]``, the original token at masked positions and -100 elsewhere.
            attention_mask: ``[batch, seq]``, 1 for tokens and 0 for padding.
            num_masked, num_tokens: masked / non-padding token counts to divide by (those of
                the whole optimizer step); default to this batch's.
            segment_ids: ``[batch, seq]`` of packed rows (``pack_batch``): which sequence of its
                row each token belongs to, 0 for padding; ``None``: one sequence per row.
            num_sequences: the sequence count the ``sentence`` term divides by (the step's);
                defaults to this batch's.
        """
        w = self.weights
        masked_labels = labels[labels != -100]
        num_masked = masked_labels.numel() if num_masked is None else num_masked
        num_tokens = attention_mask.sum().item() if num_tokens is None else num_tokens
        sums: Dict[str, torch.Tensor] = {}
        if w["mlm"]:
            sums["mlm"] = self.mlm(student.logits, masked_labels, "sum") / max(num_masked, 1)
        if w["output"]:
            sums["output"] = self.output(student.logits, teacher.logits, "sum") / max(num_masked, 1)
        for term in LAYER_TERMS:
            if not w[term]:
                continue
            loss = getattr(self, term)
            if term == "attention":
                pairs = ((student.attentions[s], teacher.attentions[t]) for s, t in self.active_layer_map)
            else:
                pairs = (
                    (self.project(student.hidden_states[s], s), teacher.hidden_states[t])
                    for s, t in self.active_layer_map
                )
            weights = [self.layer_weights[s] for s, _ in self.active_layer_map]
            sums[term] = sum(v * loss(s, t, attention_mask, "sum") for v, (s, t) in zip(weights, pairs)) / max(
                num_tokens, 1
            )
        if w["embedding"]:
            sums["embedding"] = self.hidden(
                self.project(student.hidden_states[0], 0), teacher.hidden_states[0], attention_mask, "sum"
            ) / max(num_tokens, 1)
        if w["sentence"]:
            pooled_student, valid = segment_means(
                self.project(student.hidden_states[-1], len(student.hidden_states) - 1), attention_mask, segment_ids
            )
            pooled_teacher, _ = segment_means(teacher.hidden_states[-1], attention_mask, segment_ids)
            num_sequences = valid.sum().item() if num_sequences is None else num_sequences
            sums["sentence"] = self.hidden(pooled_student, pooled_teacher, valid, "sum") / max(num_sequences, 1)
        total = sum(w[name] * value for name, value in sums.items())
        return LossOutput(total=total, terms=sums)
