"""Transformer building blocks shared by every encoder: embeddings, attention, the post-LN
layer (with adapter sites), and the masked-LM head.

Module and parameter names follow the computation, not any checkpoint format; converters in
``components/checkpointing`` map Hugging Face names onto them.
"""

import math
from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# Names as Hugging Face configs spell them, so checkpoints round-trip without a table.
ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def get_activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def attention_bias(
    attention_mask: Optional[torch.Tensor],
    dtype: torch.dtype,
    segment_ids: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """``[batch, seq]`` mask (1 = token, 0 = padding) -> additive ``[batch, 1, 1, seq]`` bias.

    Returns ``None`` when nothing is padded, which lets SDPA take its fastest kernel (eager
    mode only: under ``torch.compile`` that data-dependent check would break the graph).

    With ``segment_ids`` (packed rows, see ``segment_positions``) the bias is
    block-diagonal, ``[batch, 1, seq, seq]``: a token attends only to the tokens of its own
    segment, exactly as it would alone in a padded row.
    """
    if segment_ids is not None:
        allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
        bias.masked_fill_(~allowed, torch.finfo(dtype).min)
        return bias[:, None]
    if attention_mask is None:
        return None
    if not torch.compiler.is_compiling() and bool(attention_mask.all()):
        return None
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    bias.masked_fill_(attention_mask == 0, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position ids of packed rows: ``segment_ids`` ``[batch, seq]`` numbers the sequences packed
    into each row (1, 2, ... left to right; 0 = padding) and positions restart at 0 with each."""
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return index - torch.cummax(torch.where(starts, index, 0), dim=1).values


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout (width ``embedding_size``)."""

    def __init__(
        self,
        vocab_size: int,
        embedding_size: int,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        pad_token_id: int = 0,
        position_offset: int = 0,
        layer_norm_eps: float = 1e-12,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, embedding_size, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_position_embeddings, embedding_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, embedding_size) if type_vocab_size > 0 else None
        self.norm = nn.LayerNorm(embedding_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        # RoBERTa-style checkpoints number positions from pad_token_id + 1.
        self.position_offset = position_offset

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        if seq_len + self.position_offset > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"Sequence length {seq_len} exceeds the {self.position_embeddings.num_embeddings}"
                f" position embeddings of this model (offset {self.position_offset})"
            )
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=input_ids.device)[None]
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids + self.position_offset)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                x = x + self.token_type_embeddings.weight[0]
            else:
                x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(x))


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],
    num_heads: int,
    dropout: float = 0.0,
    training: bool = False,
    need_probs: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scaled dot-product attention over already projected ``[batch, seq, width]`` queries,
    keys and values split into ``num_heads`` heads; returns the ``[batch, seq, width]`` context
    (heads merged, before any output projection) and, when ``need_probs``, the probabilities
    ``[batch, heads, seq, seq]`` (softmax in fp32, before dropout). SDPA otherwise.
    """
    batch, seq, width = q.shape
    head_dim = width // num_heads

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, seq, num_heads, head_dim).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    dropout = dropout if training else 0.0
    probs = None
    if need_probs:
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        if bias is not None:
            scores = scores + bias
        # Softmax in fp32 keeps the distillation targets exact under bf16 autocast.
        probs = scores.float().softmax(dim=-1)
        context = F.dropout(probs, dropout, training).to(v.dtype) @ v
    else:
        mask = None if bias is None else bias.to(q.dtype)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return context.transpose(1, 2).reshape(batch, seq, width), probs


class MultiHeadAttention(nn.Module):
    """Bidirectional self-attention. SDPA unless the caller needs the probabilities."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float = 0.1):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.output = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout

    def forward(
        self, x: torch.Tensor, bias: Optional[torch.Tensor], need_probs: bool = False
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        context, probs = attend(
            self.query(x),
            self.key(x),
            self.value(x),
            bias,
            self.num_heads,
            self.dropout,
            self.training,
            need_probs,
        )
        return self.output(context), probs


class TransformerLayer(nn.Module):
    """A post-LayerNorm BERT layer with four optional adapter sites.

    ``adapters`` maps a site name to a module applied there:
    ``attention_in`` (layer input), ``attention_out`` (attention output, inside the residual),
    ``ffn_in`` (input of the feed-forward block), ``ffn_out`` (FFN output, inside the residual).
    A recursive encoder passes a different adapter set on each application of the shared layer.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        activation: str = "gelu",
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
    ):
        super().__init__()
        self.attention = MultiHeadAttention(hidden_size, num_heads, attention_dropout)
        self.attention_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.ffn_in = nn.Linear(hidden_size, intermediate_size)
        self.ffn_out = nn.Linear(intermediate_size, hidden_size)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.activation = get_activation(activation)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        bias: Optional[torch.Tensor],
        adapters: Optional[Mapping[str, nn.Module]] = None,
        need_probs: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        adapters = adapters if adapters is not None else {}

        def site(name: str, h: torch.Tensor) -> torch.Tensor:
            return adapters[name](h) if name in adapters else h

        x = site("attention_in", x)
        attended, probs = self.attention(x, bias, need_probs)
        x = self.attention_norm(x + site("attention_out", self.dropout(attended)))
        x = site("ffn_in", x)
        fed = self.ffn_out(self.activation(self.ffn_in(x)))
        x = self.ffn_norm(x + site("ffn_out", self.dropout(fed)))
        return x, probs


class MLMHead(nn.Module):
    """dense (hidden -> head_size) + activation + LayerNorm + decoder to the vocabulary."""

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        vocab_size: int,
        activation: str = "gelu",
        layer_norm_eps: float = 1e-12,
    ):
        super().__init__()
        self.dense = nn.Linear(hidden_size, head_size)
        self.activation = get_activation(activation)
        self.norm = nn.LayerNorm(head_size, eps=layer_norm_eps)
        self.decoder = nn.Linear(head_size, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.activation(self.dense(x))))


def apply_mlm_head(
    head: Optional[nn.Module], x: torch.Tensor, logits_mask: Optional[torch.Tensor], want: bool
) -> Optional[torch.Tensor]:
    """Logits at the positions of ``logits_mask`` (``[n, vocab]``), or at all positions."""
    if head is None or not want:
        return None
    return head(x[logits_mask] if logits_mask is not None else x)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: N(0, std) for weights, zeros for biases, ones for norms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
