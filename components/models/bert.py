"""A fully parameterised BERT-family encoder (one layer per depth), used for teachers.

Hugging Face BERT, RoBERTa, XLM-R, CamemBERT and BioBERT-style checkpoints convert onto it
(``components.checkpointing.hf_bert``); tests check it against transformers' own models.
"""

from typing import Collection, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from components.models.adapters import adapter_layers, start_as_identity
from components.models.layers import (
    apply_mlm_head,
    attention_bias,
    Embeddings,
    init_weights,
    MLMHead,
    segment_positions,
    TransformerLayer,
)
from components.models.output import EncoderOutput, EncoderSpec


class BertEncoder(nn.Module):
    """Embeddings, ``num_layers`` post-LN transformer layers, and an optional MLM head.

    ``adapter_placement`` (``"houlsby"``, ``"pfeiffer"``, ``"minialbert"``; ``None``: none, as
    every checkpoint) gives each layer its own adapters, ``adapters[i]`` for layer ``i``: what
    adapter tuning adds to a BERT checkpoint (``components.models.adapters.add_adapters``),
    saved in ``config`` so a fine-tuned model rebuilds them.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        mlm_head: bool = True,
        activation: str = "gelu",
        mlm_head_activation: Optional[str] = None,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        pad_token_id: int = 0,
        position_offset: int = 0,
        adapter_placement: Optional[str] = None,
        adapter_reduction_factor: int = 16,
    ):
        super().__init__()
        self.config = dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            intermediate_size=intermediate_size,
            mlm_head=mlm_head,
            activation=activation,
            mlm_head_activation=mlm_head_activation,
            dropout=dropout,
            attention_dropout=attention_dropout,
            layer_norm_eps=layer_norm_eps,
            max_position_embeddings=max_position_embeddings,
            type_vocab_size=type_vocab_size,
            pad_token_id=pad_token_id,
            position_offset=position_offset,
            adapter_placement=adapter_placement,
            adapter_reduction_factor=adapter_reduction_factor,
        )
        self.embeddings = Embeddings(
            vocab_size,
            hidden_size,
            max_position_embeddings,
            type_vocab_size,
            pad_token_id,
            position_offset,
            layer_norm_eps,
            dropout,
        )
        self.layers = nn.ModuleList(
            TransformerLayer(
                hidden_size,
                num_heads,
                intermediate_size,
                activation,
                dropout,
                attention_dropout,
                layer_norm_eps,
            )
            for _ in range(num_layers)
        )
        self.mlm_head = (
            MLMHead(
                hidden_size,
                hidden_size,
                vocab_size,
                mlm_head_activation or activation,
                layer_norm_eps,
            )
            if mlm_head
            else None
        )
        self.adapters = (
            adapter_layers(adapter_placement, hidden_size, adapter_reduction_factor, num_layers)
            if adapter_placement
            else None
        )
        self.activation_checkpointing = False
        init_weights(self)
        start_as_identity(self.adapters)

    @property
    def spec(self) -> EncoderSpec:
        return EncoderSpec(
            num_layers=len(self.layers),
            hidden_size=self.config["hidden_size"],
            num_heads=self.config["num_heads"],
            vocab_size=self.config["vocab_size"],
            has_mlm_head=self.mlm_head is not None,
        )

    @property
    def max_sequence_length(self) -> int:
        return self.config["max_position_embeddings"] - self.config["position_offset"]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        *,
        attention_layers: Collection[int] = (),
        logits_mask: Optional[torch.Tensor] = None,
        return_logits: bool = True,
        segment_ids: Optional[torch.Tensor] = None,
    ) -> EncoderOutput:
        """Same arguments and record as ``RecursiveEncoder.forward`` (packed rows included)."""
        positions = None if segment_ids is None else segment_positions(segment_ids)
        x = self.embeddings(input_ids, token_type_ids, positions)
        bias = attention_bias(attention_mask, x.dtype, segment_ids)
        hidden_states, attentions = [x], {}
        for i, layer in enumerate(self.layers, start=1):
            adapters = self.adapters[i - 1] if self.adapters is not None else None
            if self.activation_checkpointing and self.training:
                x, probs = checkpoint(layer, x, bias, adapters, i in attention_layers, use_reentrant=False)
            else:
                x, probs = layer(x, bias, adapters, need_probs=i in attention_layers)
            hidden_states.append(x)
            if probs is not None:
                attentions[i] = probs
        logits = apply_mlm_head(self.mlm_head, x, logits_mask, return_logits)
        return EncoderOutput(tuple(hidden_states), attentions, logits)

    def adapter_parameters(self):
        """The per-layer adapters (none unless added): what adapter tuning trains besides a head."""
        return [] if self.adapters is None else list(self.adapters.parameters())
