from components.losses.distillation import (
    DistillationLoss,
    LossOutput,
    MINIALBERT_WEIGHTS,
    resolve_layer_map,
    TERMS,
)
from components.losses.terms import AttentionKLLoss, HiddenAlignmentLoss, MaskedLMLoss, OutputKLLoss

__all__ = [
    "AttentionKLLoss",
    "DistillationLoss",
    "HiddenAlignmentLoss",
    "LossOutput",
    "MaskedLMLoss",
    "MINIALBERT_WEIGHTS",
    "OutputKLLoss",
    "resolve_layer_map",
    "TERMS",
]
