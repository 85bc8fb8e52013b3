"""Bottleneck adapters and where they sit in a transformer layer.

Adapter(x) = x + W_up act(W_down x), followed by a LayerNorm in MiniALBERT's variant
(LayerNorm(x + W_up GELU(W_down x))). Houlsby and Pfeiffer adapters sit inside the layer's
residual branch, right before the layer's own LayerNorm, so they carry none of their own.

Adapters start with ``W_up = 0``: a Houlsby or Pfeiffer adapter is then exactly the identity
(``x + 0``), which is what lets ``add_adapters`` put fresh ones into a trained encoder without
changing a single output; MiniALBERT's starts as ``LayerNorm(x)``, which is not.
"""

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from components.models.layers import get_activation, init_weights

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


def adapter_layers(placement: str, hidden_size: int, reduction_factor: int, count: int) -> nn.ModuleList:
    """One ``adapter_set`` per layer application (iteration of a recursive encoder, layer of a
    BERT encoder), as encoders hold them in ``adapters``."""
    return nn.ModuleList(adapter_set(placement, hidden_size, reduction_factor) for _ in range(count))


def start_as_identity(adapters: Optional[nn.Module]) -> None:
    """``W_up = 0`` in every adapter of ``adapters``: Houlsby and Pfeiffer adapters become exact
    identities (with ``up``'s bias at 0, as ``init_weights`` leaves it); MiniALBERT's become
    ``LayerNorm(x)``."""
    for module in adapters.modules() if adapters is not None else ():
        if isinstance(module, BottleneckAdapter):
            nn.init.zeros_(module.up.weight)


def takes_adapters(encoder: nn.Module) -> bool:
    """Whether ``encoder`` has per-layer adapter sites (its builder takes ``adapter_placement``):
    recursive students and BERT encoders do, bottleneck students do not."""
    return "adapter_placement" in (getattr(encoder, "config", None) or {})


FRESH_PLACEMENTS = tuple(sorted(p for p, (_, layer_norm) in PLACEMENTS.items() if not layer_norm))


def fresh_adapter_layers(encoder: nn.Module, placement: str, reduction_factor: int) -> nn.ModuleList:
    """The (uninitialised) adapters ``add_adapters`` would put into ``encoder``, built on the
    current device (the meta device gives their layout); a ``ValueError`` says why there are none."""
    if not takes_adapters(encoder):
        raise ValueError(f"a {type(encoder).__name__} has no adapter sites")
    if getattr(encoder, "adapters", None) is not None:
        raise ValueError(f"this {type(encoder).__name__} already has {encoder.config['adapter_placement']} adapters")
    if placement not in FRESH_PLACEMENTS:
        raise ValueError(
            f"fresh adapters must start as the identity: placement {placement!r} is not one of {list(FRESH_PLACEMENTS)}"
            + (" (its LayerNorm would change every output)" if placement in PLACEMENTS else "")
        )
    if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, int) or reduction_factor < 1:
        raise ValueError(f"adapter reduction_factor must be a whole number >= 1, got {reduction_factor!r}")
    spec = encoder.spec
    return adapter_layers(placement, spec.hidden_size, reduction_factor, spec.num_layers)


def add_adapters(encoder: nn.Module, placement: str = "houlsby", reduction_factor: int = 16) -> nn.ModuleList:
    """Put fresh adapters into an adapter-free ``encoder`` (one set per layer application) and
    record them in its ``config``, so that a saved model rebuilds them; returns them.

    Fresh adapters are identities (Houlsby and Pfeiffer initialisation, ``W_up = 0``): the
    encoder computes exactly what it did until they train. MiniALBERT's LayerNorm'd placement
    is refused, as it would change every output."""
    adapters = fresh_adapter_layers(encoder, placement, reduction_factor)
    init_weights(adapters)
    start_as_identity(adapters)
    weight = next(encoder.parameters(), None)
    if weight is not None:
        adapters.to(device=weight.device, dtype=weight.dtype)
    encoder.adapters = adapters
    encoder.config.update(adapter_placement=placement, adapter_reduction_factor=reduction_factor)
    return adapters
