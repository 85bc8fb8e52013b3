"""MiniALBERT-style recursive student: factorised embeddings, ONE shared transformer layer
applied ``num_iterations`` times, and per-iteration bottleneck adapters.

    x = projector(embeddings(tokens))                  # E -> H
    for i in 1..N:  x = shared_layer(x, adapters[i])  # adapters are the only unshared part
    logits = mlm_head(x)

Without adapters this is exactly a transformers ``AlbertForMaskedLM`` with one hidden group
(``components.checkpointing.albert`` converts between the two).
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
from components.models.presets import preset


class RecursiveEncoder(nn.Module):
    """A shared-layer encoder with optional per-iteration adapters and an MLM head.

    Args:
        vocab_size: vocabulary size (must equal the teacher tokenizer's).
        embedding_size: width ``E`` of the factorised embeddings.
        hidden_size: width ``H`` of the shared layer; ``E == H`` means no projector.
        num_heads: attention heads of the shared layer.
        intermediate_size: FFN width of the shared layer.
        num_iterations: how many times the shared layer is applied (``N``).
        adapter_placement: ``"minialbert"`` (pre-adapters), ``"houlsby"``, ``"pfeiffer"``, or
            ``None`` for no adapters (an ALBERT model).
        adapter_reduction_factor: adapter bottleneck is ``H // adapter_reduction_factor``.
        iteration_embeddings: a learned vector per iteration added to the shared layer's input
            (the Universal Transformer's timestep embedding, Dehghani et al. 2019), so the one
            layer can act differently at each depth: ``N * H`` parameters, starting at zero
            (the same function as without). Such a student is saved in the native format only.
        mlm_head: whether to build the masked-LM head.
        mlm_head_size: width of the MLM head's transform; defaults to ``E`` (ALBERT's head).
            MiniALBERT's released models use ``H``.
        tie_word_embeddings: share the MLM decoder with the word embeddings (needs
            ``mlm_head_size == E``). MiniALBERT's released models are untied.
        activation, dropout, attention_dropout, layer_norm_eps, max_position_embeddings,
        type_vocab_size, pad_token_id: as in BERT.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_size: int = 128,
        hidden_size: int = 768,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        num_iterations: int = 6,
        adapter_placement: Optional[str] = "minialbert",
        adapter_reduction_factor: int = 16,
        iteration_embeddings: bool = False,
        mlm_head: bool = True,
        mlm_head_size: Optional[int] = None,
        tie_word_embeddings: bool = False,
        activation: str = "gelu",
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        pad_token_id: int = 0,
    ):
        super().__init__()
        mlm_head_size = mlm_head_size or embedding_size
        if tie_word_embeddings and mlm_head_size != embedding_size:
            raise ValueError(
                f"tie_word_embeddings needs mlm_head_size == embedding_size, got {mlm_head_size} and {embedding_size}"
            )
        # Everything needed to rebuild this model; saved next to exported weights.
        self.config = dict(
            vocab_size=vocab_size,
            embedding_size=embedding_size,
            hidden_size=hidden_size,
            num_heads=num_heads,
            intermediate_size=intermediate_size,
            num_iterations=num_iterations,
            adapter_placement=adapter_placement,
            adapter_reduction_factor=adapter_reduction_factor,
            iteration_embeddings=iteration_embeddings,
            mlm_head=mlm_head,
            mlm_head_size=mlm_head_size,
            tie_word_embeddings=tie_word_embeddings,
            activation=activation,
            dropout=dropout,
            attention_dropout=attention_dropout,
            layer_norm_eps=layer_norm_eps,
            max_position_embeddings=max_position_embeddings,
            type_vocab_size=type_vocab_size,
            pad_token_id=pad_token_id,
        )
        self.embeddings = Embeddings(
            vocab_size,
            embedding_size,
            max_position_embeddings,
            type_vocab_size,
            pad_token_id,
            layer_norm_eps=layer_norm_eps,
            dropout=dropout,
        )
        self.projector = nn.Linear(embedding_size, hidden_size) if embedding_size != hidden_size else nn.Identity()
        self.layer = TransformerLayer(
            hidden_size,
            num_heads,
            intermediate_size,
            activation,
            dropout,
            attention_dropout,
            layer_norm_eps,
        )
        # (components.models.adapters.add_adapters puts fresh ones into an adapter-free encoder)
        self.adapters = (
            adapter_layers(adapter_placement, hidden_size, adapter_reduction_factor, num_iterations)
            if adapter_placement
            else None
        )
        self.iteration_embeddings = (
            nn.Parameter(torch.zeros(num_iterations, hidden_size)) if iteration_embeddings else None
        )
        self.mlm_head = (
            MLMHead(hidden_size, mlm_head_size, vocab_size, activation, layer_norm_eps) if mlm_head else None
        )
        self.num_iterations = num_iterations
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self)
        # W_up = 0: Houlsby and Pfeiffer adapters start as identities; MiniALBERT's start as
        # LayerNorm(x), which only re-normalises a post-LN input.
        start_as_identity(self.adapters)
        if self.iteration_embeddings is not None:
            nn.init.zeros_(self.iteration_embeddings)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config["tie_word_embeddings"] and self.mlm_head is not None:
            self.mlm_head.decoder.weight = self.embeddings.word_embeddings.weight

    @property
    def spec(self) -> EncoderSpec:
        return EncoderSpec(
            num_layers=self.num_iterations,
            hidden_size=self.config["hidden_size"],
            num_heads=self.config["num_heads"],
            vocab_size=self.config["vocab_size"],
            has_mlm_head=self.mlm_head is not None,
        )

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
        """Encode a batch.

        Args:
            attention_layers: 1-based iterations whose attention probabilities to return;
                all others run SDPA.
            logits_mask: ``[batch, seq]`` bool; MLM logits only at these positions.
            return_logits: skip the MLM head entirely when ``False``.
            segment_ids: ``[batch, seq]`` for packed rows: the 1-based number of the
                sequence each token belongs to (0 = padding). Tokens attend only within
                their sequence and positions restart with each, so every sequence is
                encoded as it would be alone in a padded row.
        """
        positions = None if segment_ids is None else segment_positions(segment_ids)
        x = self.projector(self.embeddings(input_ids, token_type_ids, positions))
        bias = attention_bias(attention_mask, x.dtype, segment_ids)
        hidden_states, attentions = [x], {}
        for i in range(1, self.num_iterations + 1):
            adapters = self.adapters[i - 1] if self.adapters is not None else None
            need_probs = i in attention_layers
            if self.iteration_embeddings is not None:
                x = x + self.iteration_embeddings[i - 1].to(x.dtype)
            if self.activation_checkpointing and self.training:
                x, probs = checkpoint(self.layer, x, bias, adapters, need_probs, use_reentrant=False)
            else:
                x, probs = self.layer(x, bias, adapters, need_probs)
            hidden_states.append(x)
            if probs is not None:
                attentions[i] = probs
        logits = apply_mlm_head(self.mlm_head, x, logits_mask, return_logits)
        return EncoderOutput(tuple(hidden_states), attentions, logits)

    def adapter_parameters(self):
        """The per-iteration adapters: what adapter-only tuning trains (besides a task head)."""
        return [] if self.adapters is None else list(self.adapters.parameters())


_MINIALBERT = dict(
    vocab_size=30522,
    embedding_size=128,
    hidden_size=768,
    num_heads=12,
    intermediate_size=3072,
    num_iterations=6,
    adapter_placement="minialbert",
    adapter_reduction_factor=16,
)


@preset(RecursiveEncoder, **_MINIALBERT)
def minialbert_128():
    """miniALBERT-128: E=128, H=768, 12 heads, FFN 3072, 6 iterations, adapters r=16.

    About 12.07M parameters without the MLM head (11.16M without adapters), as in the paper.
    """


@preset(RecursiveEncoder, **{**_MINIALBERT, "vocab_size": 28996, "embedding_size": 312})
def minialbert_312():
    """The E=312 variant: about 17.45M parameters without the MLM head with BioBERT's
    28,996-token vocabulary (the paper's "17.5M"), 17.93M with bert-base-uncased's 30,522."""


@preset(
    RecursiveEncoder,
    vocab_size=1000,
    embedding_size=32,
    hidden_size=64,
    num_heads=4,
    intermediate_size=128,
    num_iterations=2,
    adapter_placement="minialbert",
    adapter_reduction_factor=4,
    max_position_embeddings=128,
)
def recursive_tiny():
    """A tiny recursive student for smoke runs and tests: E=32, H=64, 4 heads, 2 iterations."""
