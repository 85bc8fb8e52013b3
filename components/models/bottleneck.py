"""MobileBERT-style bottleneck student: a deep, thin stack of blocks whose boundaries are wide
(``hidden_size``) and whose insides are narrow (``intra_bottleneck_size``).

    x = embeddings(tokens)                               # trigram of E-wide embeddings -> H
    for each block:                                      # x is H wide between blocks
        n = norm(narrow(x))                              # H -> I
        a = norm(attention(q, k, v) + n)                 # q, k, v: see BottleneckBlock
        a = norm(ffn(a) + a), num_feedforward_networks times   (I -> intermediate -> I)
        x = norm(dropout(widen(a)) + x)                  # I -> H, residual to the block input
    logits = mlm_head(x)

Computation for computation the same as transformers' ``MobileBertForMaskedLM``
(``components.checkpointing.mobilebert`` converts between the two), with one generalisation:
with neither ``use_bottleneck_attention`` nor ``key_query_shared_bottleneck`` the queries,
keys and values are projected from the H-wide block input (IB-BERT's shape); transformers can
build that case only when H == I.
"""

from typing import Collection, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from components.models.layers import (
    apply_mlm_head,
    attend,
    attention_bias,
    get_activation,
    init_weights,
    segment_positions,
)
from components.models.output import EncoderOutput, EncoderSpec
from components.models.presets import preset

NORMALIZATIONS = ("no_norm", "layer_norm")


class NoNorm(nn.Module):
    """MobileBERT's replacement for LayerNorm: an elementwise affine map, no statistics."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def make_norm(normalization: str, size: int, eps: Optional[float]) -> nn.Module:
    """``NoNorm`` or ``LayerNorm``; ``eps=None`` keeps LayerNorm's own default (1e-5), as
    transformers does for the embedding norm and the last FFN's norm."""
    if normalization == "no_norm":
        return NoNorm(size)
    return nn.LayerNorm(size) if eps is None else nn.LayerNorm(size, eps=eps)


class LinearNorm(nn.Module):
    """``norm(linear(x))``: the projections into the block's bottleneck."""

    def __init__(self, in_size: int, out_size: int, normalization: str, eps: float):
        super().__init__()
        self.linear = nn.Linear(in_size, out_size)
        self.norm = make_norm(normalization, out_size, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x))


class BottleneckEmbeddings(nn.Module):
    """E-wide word embeddings, optionally as a trigram (next, this, previous token: 3E), projected
    to H, plus H-wide position and token-type embeddings, norm, dropout.

    The trigram is taken by absolute position and ignores the attention mask (as transformers
    does): the last real token of a right-padded row sees the padding token as its "next".
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_size: int,
        hidden_size: int,
        trigram_input: bool,
        normalization: str,
        max_position_embeddings: int,
        type_vocab_size: int,
        pad_token_id: int,
        dropout: float,
    ):
        super().__init__()
        self.trigram_input = trigram_input
        self.word_embeddings = nn.Embedding(vocab_size, embedding_size, padding_idx=pad_token_id)
        in_size = 3 * embedding_size if trigram_input else embedding_size
        self.projection = (
            nn.Linear(in_size, hidden_size) if trigram_input or embedding_size != hidden_size else nn.Identity()
        )
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.norm = make_norm(normalization, hidden_size, None)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        if position_ids is not None and self.trigram_input:
            # a packed sequence's first and last tokens would see their neighbours' tokens
            raise ValueError("A trigram-input student cannot read packed rows; set data.pack=false")
        if seq_len > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"Sequence length {seq_len} exceeds the {self.position_embeddings.num_embeddings}"
                " position embeddings of this model"
            )
        e = self.word_embeddings(input_ids)
        if self.trigram_input:
            # zero before the first and after the last position; slicing the padded sequence
            # (rather than padding a seq-1 slice) keeps torch.export's sequence dim free
            padded = F.pad(e, (0, 0, 1, 1))
            e = torch.cat([padded[:, 2:], e, padded[:, :-2]], dim=-1)  # next, this, previous
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=input_ids.device)[None]
        x = self.projection(e) + self.position_embeddings(position_ids)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(x))


class BottleneckAttention(nn.Module):
    """Multi-head attention whose queries/keys and values may come from different inputs and
    widths; everything inside is ``size`` (the intra-block width) wide."""

    def __init__(self, query_key_in: int, value_in: int, size: int, num_heads: int, dropout: float):
        super().__init__()
        self.query = nn.Linear(query_key_in, size)
        self.key = nn.Linear(query_key_in, size)
        self.value = nn.Linear(value_in, size)
        self.output = nn.Linear(size, size)
        self.num_heads = num_heads
        self.dropout = dropout

    def forward(
        self,
        query_key: torch.Tensor,
        value: torch.Tensor,
        bias: Optional[torch.Tensor],
        need_probs: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        context, probs = attend(
            self.query(query_key),
            self.key(query_key),
            self.value(value),
            bias,
            self.num_heads,
            self.dropout,
            self.training,
            need_probs,
        )
        return self.output(context), probs


class FeedForward(nn.Module):
    """``norm(outer(act(inner(x))) + x)`` at the intra-block width."""

    def __init__(
        self,
        size: int,
        intermediate_size: int,
        activation: str,
        normalization: str,
        eps: Optional[float],
    ):
        super().__init__()
        self.inner = nn.Linear(size, intermediate_size)
        self.activation = get_activation(activation)
        self.outer = nn.Linear(intermediate_size, size)
        self.norm = make_norm(normalization, size, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.outer(self.activation(self.inner(x))) + x)


class BottleneckBlock(nn.Module):
    """One MobileBERT block, H wide at its input and output, I wide inside.

    Attention inputs (``n = narrow(x)`` is always the attention's residual):

    * ``use_bottleneck_attention``: queries, keys and values from ``n`` (MobileBERT-tiny);
    * else ``key_query_shared_bottleneck``: queries and keys from a second bottleneck
      ``narrow_query_key(x)``, values from ``x`` (MobileBERT);
    * else: queries, keys and values from ``x`` (IB-BERT).
    """

    def __init__(
        self,
        hidden_size: int,
        intra_bottleneck_size: int,
        num_heads: int,
        intermediate_size: int,
        num_feedforward_networks: int,
        use_bottleneck_attention: bool,
        key_query_shared_bottleneck: bool,
        normalization: str,
        activation: str,
        dropout: float,
        attention_dropout: float,
        layer_norm_eps: float,
    ):
        super().__init__()
        h, i = hidden_size, intra_bottleneck_size
        self.use_bottleneck_attention = use_bottleneck_attention
        self.narrow = LinearNorm(h, i, normalization, layer_norm_eps)
        self.narrow_query_key = (
            LinearNorm(h, i, normalization, layer_norm_eps)
            if key_query_shared_bottleneck and not use_bottleneck_attention
            else None
        )
        query_key_in = i if use_bottleneck_attention or key_query_shared_bottleneck else h
        value_in = i if use_bottleneck_attention else h
        self.attention = BottleneckAttention(query_key_in, value_in, i, num_heads, attention_dropout)
        self.attention_norm = make_norm(normalization, i, layer_norm_eps)
        # transformers builds the last FFN's norm without eps (LayerNorm's default 1e-5).
        self.ffns = nn.ModuleList(
            FeedForward(
                i,
                intermediate_size,
                activation,
                normalization,
                layer_norm_eps if j < num_feedforward_networks - 1 else None,
            )
            for j in range(num_feedforward_networks)
        )
        self.widen = nn.Linear(i, h)
        self.dropout = nn.Dropout(dropout)
        self.output_norm = make_norm(normalization, h, layer_norm_eps)

    def forward(
        self, x: torch.Tensor, bias: Optional[torch.Tensor], need_probs: bool = False
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        n = self.narrow(x)
        if self.use_bottleneck_attention:
            query_key, value = n, n
        elif self.narrow_query_key is not None:
            query_key, value = self.narrow_query_key(x), x
        else:
            query_key, value = x, x
        attended, probs = self.attention(query_key, value, bias, need_probs)
        a = self.attention_norm(attended + n)
        for ffn in self.ffns:
            a = ffn(a)
        return self.output_norm(self.dropout(self.widen(a)) + x), probs


class BottleneckMLMHead(nn.Module):
    """MobileBERT's MLM head: ``t = LayerNorm(act(dense(x)))`` (H wide, always a real LayerNorm),
    then ``logits = t[..., :E] @ W^T + t[..., E:] @ D + b`` with ``W`` the (tied) ``[vocab, E]``
    decoder and ``D`` the ``[H - E, vocab]`` decoder of the remaining widths (``decoder_rest``,
    a Linear whose weight is ``D^T``)."""

    def __init__(
        self,
        hidden_size: int,
        embedding_size: int,
        vocab_size: int,
        activation: str,
        layer_norm_eps: float,
    ):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = get_activation(activation)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.decoder = nn.Linear(embedding_size, vocab_size)
        # transformers stores D as cls.predictions.dense.weight [H - E, vocab]; a Linear (its
        # weight D^T) lets quantisation and export treat both halves of the decoder alike
        self.decoder_rest = nn.Linear(hidden_size - embedding_size, vocab_size, bias=False)
        self.split = embedding_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.activation(self.dense(x)))
        # transformers multiplies by the concatenated decoder once; calling the decoder as a
        # module keeps it a Linear that quantisation and export can replace
        return self.decoder(t[..., : self.split]) + self.decoder_rest(t[..., self.split :])


class BottleneckEncoder(nn.Module):
    """A MobileBERT-style encoder with an optional MLM head (``MobileBertConfig`` semantics).

    Args:
        vocab_size: vocabulary size (must equal the teacher tokenizer's).
        embedding_size: width ``E`` of the word embeddings.
        hidden_size: width ``H`` at block boundaries: embedding output, block outputs, every
            returned hidden state, the MLM transform.
        intra_bottleneck_size: width ``I`` inside a block (attention and FFNs).
        num_layers: number of blocks.
        num_heads: attention heads (head size ``I // num_heads``).
        intermediate_size: inner width of each FFN.
        num_feedforward_networks: stacked FFNs per block.
        use_bottleneck_attention: queries, keys and values from the block's input bottleneck.
        key_query_shared_bottleneck: (without ``use_bottleneck_attention``) queries and keys
            from a second bottleneck of the block input, values from the block input itself.
            Ignored under ``use_bottleneck_attention``; transformers still builds that unused
            bottleneck, the converter fills it in.
        trigram_input: embed each position as its (next, own, previous) tokens' embeddings.
        normalization: ``"no_norm"`` (``NoNorm``) or ``"layer_norm"``, for every norm but
            the MLM head's (always a LayerNorm).
        activation: of the FFNs and the MLM transform.
        dropout: hidden dropout: after the embedding norm and on each block's widening
            projection (transformers' bottleneck model has no other).
        attention_dropout: on the attention probabilities.
        layer_norm_eps: eps of every LayerNorm except the embedding norm and the last FFN's
            norm of each block, which use LayerNorm's default 1e-5 (as transformers builds them).
        max_position_embeddings, type_vocab_size, pad_token_id: as in BERT.
        mlm_head: whether to build the masked-LM head (needs ``embedding_size <= hidden_size``).
        tie_word_embeddings: share the head's E-wide decoder with the word embeddings.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_size: int = 128,
        hidden_size: int = 512,
        intra_bottleneck_size: int = 128,
        num_layers: int = 24,
        num_heads: int = 4,
        intermediate_size: int = 512,
        num_feedforward_networks: int = 4,
        use_bottleneck_attention: bool = False,
        key_query_shared_bottleneck: bool = True,
        trigram_input: bool = True,
        normalization: str = "no_norm",
        activation: str = "relu",
        dropout: float = 0.0,
        attention_dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        pad_token_id: int = 0,
        mlm_head: bool = True,
        tie_word_embeddings: bool = True,
    ):
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"Unknown normalization {normalization!r}; choose one of {list(NORMALIZATIONS)}")
        get_activation(activation)  # raises for an unknown name
        if intra_bottleneck_size % num_heads:
            raise ValueError(f"intra_bottleneck_size {intra_bottleneck_size} is not divisible by num_heads {num_heads}")
        for name, value in dict(
            num_layers=num_layers,
            num_feedforward_networks=num_feedforward_networks,
            type_vocab_size=type_vocab_size,
        ).items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if mlm_head and embedding_size > hidden_size:
            raise ValueError(f"The MLM head needs embedding_size <= hidden_size, got {embedding_size} > {hidden_size}")
        # Everything needed to rebuild this model; saved next to exported weights.
        self.config = dict(
            vocab_size=vocab_size,
            embedding_size=embedding_size,
            hidden_size=hidden_size,
            intra_bottleneck_size=intra_bottleneck_size,
            num_layers=num_layers,
            num_heads=num_heads,
            intermediate_size=intermediate_size,
            num_feedforward_networks=num_feedforward_networks,
            use_bottleneck_attention=use_bottleneck_attention,
            key_query_shared_bottleneck=key_query_shared_bottleneck,
            trigram_input=trigram_input,
            normalization=normalization,
            activation=activation,
            dropout=dropout,
            attention_dropout=attention_dropout,
            layer_norm_eps=layer_norm_eps,
            max_position_embeddings=max_position_embeddings,
            type_vocab_size=type_vocab_size,
            pad_token_id=pad_token_id,
            mlm_head=mlm_head,
            tie_word_embeddings=tie_word_embeddings,
        )
        self.embeddings = BottleneckEmbeddings(
            vocab_size,
            embedding_size,
            hidden_size,
            trigram_input,
            normalization,
            max_position_embeddings,
            type_vocab_size,
            pad_token_id,
            dropout,
        )
        self.blocks = nn.ModuleList(
            BottleneckBlock(
                hidden_size,
                intra_bottleneck_size,
                num_heads,
                intermediate_size,
                num_feedforward_networks,
                use_bottleneck_attention,
                key_query_shared_bottleneck,
                normalization,
                activation,
                dropout,
                attention_dropout,
                layer_norm_eps,
            )
            for _ in range(num_layers)
        )
        self.mlm_head = (
            BottleneckMLMHead(hidden_size, embedding_size, vocab_size, activation, layer_norm_eps) if mlm_head else None
        )
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's initialisation (N(0, 0.02) weights, zero biases), identity norms."""
        init_weights(self)
        for m in self.modules():
            if isinstance(m, NoNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config["tie_word_embeddings"] and self.mlm_head is not None:
            self.mlm_head.decoder.weight = self.embeddings.word_embeddings.weight

    @property
    def spec(self) -> EncoderSpec:
        return EncoderSpec(
            num_layers=self.config["num_layers"],
            hidden_size=self.config["hidden_size"],
            num_heads=self.config["num_heads"],
            vocab_size=self.config["vocab_size"],
            has_mlm_head=self.mlm_head is not None,
        )

    @property
    def max_sequence_length(self) -> int:
        return self.config["max_position_embeddings"]

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
            attention_layers: 1-based blocks whose attention probabilities to return; all
                others run SDPA.
            logits_mask: ``[batch, seq]`` bool; MLM logits only at these positions.
            return_logits: skip the MLM head entirely when ``False``.
            segment_ids: ``[batch, seq]`` for packed rows: the 1-based number of the
                sequence each token belongs to (0 = padding). Tokens attend only within
                their sequence and positions restart with each, so every sequence is
                encoded as it would be alone in a padded row.
        """
        positions = None if segment_ids is None else segment_positions(segment_ids)
        x = self.embeddings(input_ids, token_type_ids, positions)
        bias = attention_bias(attention_mask, x.dtype, segment_ids)
        hidden_states, attentions = [x], {}
        for i, block in enumerate(self.blocks, start=1):
            need_probs = i in attention_layers
            if self.activation_checkpointing and self.training:
                x, probs = checkpoint(block, x, bias, need_probs, use_reentrant=False)
            else:
                x, probs = block(x, bias, need_probs)
            hidden_states.append(x)
            if probs is not None:
                attentions[i] = probs
        logits = apply_mlm_head(self.mlm_head, x, logits_mask, return_logits)
        return EncoderOutput(tuple(hidden_states), attentions, logits)

    def adapter_parameters(self):
        """No adapters: adapter-only tuning has nothing to train here."""
        return []


@preset(BottleneckEncoder, vocab_size=30522)
def mobilebert():
    """MobileBERT (``google/mobilebert-uncased``'s shape): E=128, H=512, I=128, 24 blocks,
    4 heads, 4 FFNs of 512, shared query/key bottleneck, trigram input, NoNorm, ReLU.

    24,581,888 parameters without the MLM head (embeddings 4,368,128 + 24 x 842,240), exactly
    transformers' ``MobileBertModel`` without its pooler; 36,596,538 with the head (the tied
    decoder counted once; the head's ``[384, 30522]`` decoder is 11.7M of it). The paper's
    25.3M is 0.72M (about 3%) above the body and far below body + head; it is a rounded figure
    counted some other way, so transformers' own count is the check (tests/test_mobilebert.py).
    """


@preset(
    BottleneckEncoder,
    vocab_size=30522,
    num_feedforward_networks=2,
    use_bottleneck_attention=True,
    key_query_shared_bottleneck=False,
)
def mobilebert_tiny():
    """MobileBERT-tiny (Google's ``mobilebert-tiny`` json): as ``mobilebert`` but 2 FFNs per
    block and queries, keys and values all from the 128-wide input bottleneck.

    15,485,696 parameters without the MLM head (embeddings 4,368,128 + 24 x 463,232), exactly
    transformers' ``MobileBertModel`` with these flags; 27,500,346 with the head. The paper's
    15.1M is 0.39M (about 2.5%) below the body (while its 25.3M for MobileBERT is above it):
    the paper counts differently; transformers' own count is the check (tests/test_mobilebert.py).
    """


@preset(
    BottleneckEncoder,
    vocab_size=1000,
    embedding_size=32,
    hidden_size=64,
    intra_bottleneck_size=32,
    num_layers=4,
    num_heads=4,
    intermediate_size=64,
    num_feedforward_networks=2,
    max_position_embeddings=128,
)
def bottleneck_tiny():
    """A tiny bottleneck student for smoke runs and tests: E=32, H=64, I=32, 4 blocks, 4 heads,
    2 FFNs of 64, MobileBERT's attention flags; 128,064 parameters without the MLM head,
    165,352 with it."""
