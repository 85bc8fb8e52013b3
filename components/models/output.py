"""The one record every encoder returns, and the facts about an encoder that losses need.

Teachers and students alike return an ``EncoderOutput``; losses read only this record
and the batch, so any encoder that fills it plugs into every loss and recipe.
"""

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch


@dataclass
class EncoderOutput:
    """What an encoder forward returns.

    Attributes:
        hidden_states: ``hidden_states[0]`` is the embedding output at the model width
            (after the factorised-embedding projector, if any) and ``hidden_states[i]`` the
            output of layer/iteration ``i`` (1-based), each ``[batch, seq, hidden]``.
        attentions: attention probabilities ``[batch, heads, seq, seq]`` (before dropout),
            keyed by the 1-based layer index, for the layers the caller asked for only.
        logits: MLM logits, ``[n, vocab]`` for the ``n`` positions selected by
            ``logits_mask`` or ``[batch, seq, vocab]`` for all positions; ``None`` when the
            encoder has no MLM head or logits were not requested.
    """

    hidden_states: Tuple[torch.Tensor, ...]
    attentions: Dict[int, torch.Tensor] = field(default_factory=dict)
    logits: Optional[torch.Tensor] = None

    @property
    def last_hidden_state(self) -> torch.Tensor:
        return self.hidden_states[-1]


@dataclass(frozen=True)
class EncoderSpec:
    """Shapes of an encoder that decide how it is aligned with another one."""

    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    has_mlm_head: bool
