from components.losses.distillation import (
    DistillationLoss,
    LossOutput,
    MINIALBERT_WEIGHTS,
    MOBILEBERT_WEIGHTS,
    resolve_layer_map,
    TERMS,
)
from components.losses.terms import (
    AttentionKLLoss,
    FeatureMapLoss,
    HiddenAlignmentLoss,
    MaskedLMLoss,
    match_heads,
    MeanVarianceLoss,
    OutputKLLoss,
)

__all__ = [
    "AttentionKLLoss",
    "DistillationLoss",
    "FeatureMapLoss",
    "HiddenAlignmentLoss",
    "LossOutput",
    "MaskedLMLoss",
    "match_heads",
    "MeanVarianceLoss",
    "MINIALBERT_WEIGHTS",
    "MOBILEBERT_WEIGHTS",
    "OutputKLLoss",
    "resolve_layer_map",
    "TERMS",
]
