"""Bottleneck adapters and where they sit in a transformer layer.

Adapter(x) = x + W_up act(W_down x), followed by a LayerNorm in MiniALBERT's variant
(LayerNorm(x + W_up GELU(W_down x))). Houlsby and Pfeiffer adapters sit inside the layer's
residual branch, right before the layer's own LayerNorm, so they carry none of their own.
"""

from typing import Dict, Tuple

import torch
from torch import nn

from components.models.layers import get_activation

# placement name -> (adapter sites in TransformerLayer, whether each adapter has a LayerNorm)
PLACEMENTS: Dict[str, Tuple[Tuple[str, ...], bool]] = {
    # MiniALBERT: before the shared attention block and before the shared FFN block.
    "minialbert": (("attention_in", "ffn_in"), True),
    # Houlsby et al. 2019: after the attention output projection and after the FFN output.
    "houlsby": (("attention_out", "ffn_out"), False),
    # Pfeiffer et al. 2021: one adapter, after the FFN output.
    "pfeiffer": (("ffn_out",), False),
}


class BottleneckAdapter(nn.Module):
    """``x -> LayerNorm(x + up(act(down(x))))`` (the LayerNorm only in MiniALBERT's variant), with
    ``hidden_size // reduction_factor`` inside."""

    def __init__(
        self,
        hidden_size: int,
        reduction_factor: int = 16,
        activation: str = "gelu",
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-12,
    ):
        super().__init__()
        if hidden_size % reduction_factor:
            raise ValueError(f"adapter reduction_factor {reduction_factor} does not divide hidden_size {hidden_size}")
        bottleneck = hidden_size // reduction_factor
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        self.activation = get_activation(activation)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps) if layer_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.up(self.activation(self.down(x)))
        return self.norm(x) if self.norm is not None else x


def adapter_set(placement: str, hidden_size: int, reduction_factor: int, activation: str = "gelu") -> nn.ModuleDict:
    """The adapters of one layer application, keyed by their ``TransformerLayer`` site."""
    try:
        sites, layer_norm = PLACEMENTS[placement]
    except KeyError:
        raise ValueError(f"Unknown adapter placement {placement!r}; choose one of {sorted(PLACEMENTS)}") from None
    return nn.ModuleDict(
        {site: BottleneckAdapter(hidden_size, reduction_factor, activation, layer_norm) for site in sites}
    )
