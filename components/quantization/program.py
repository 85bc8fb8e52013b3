"""The quantised student as a plain-torch module, and the serving signature both exports share.

``quantize_modules`` swaps every ``nn.Linear`` for a ``QuantizedLinear`` and the word
embeddings for a ``QuantizedEmbedding``. They store the integers of the scheme (int8; int4
packed two to a byte) with their fp32 scales, and compute with them: weights are dequantised on
the fly and, for ``int8_dynamic``, every Linear input is rounded to uint8 with one dynamic scale,
exactly as ONNX Runtime does. Traced by ``torch.export``, this is a program that needs nothing
but torch to run, computes the numbers the ONNX file computes, and holds the weights at 1/4
(int8) or 1/8 (int4) of their fp32 size. It runs fp32 matmuls: it is the portable reference,
the ONNX file is the fast path.
"""

import copy
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from components.quantization.schemes import dequantize_weight, EMBEDDING_BITS, quantize_weight, round_activation, Scheme


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], even count per row -> uint8, two per byte (low nibble first)."""
    low, high = q[:, 0::2], q[:, 1::2]
    return ((low & 0xF) | ((high & 0xF) << 4)).to(torch.uint8)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    signed = packed.to(torch.int8)
    low = torch.bitwise_right_shift(torch.bitwise_left_shift(signed, 4), 4)  # sign-extends
    high = torch.bitwise_right_shift(signed, 4)
    return torch.stack((low, high), dim=-1).flatten(-2)


class QuantizedLinear(nn.Module):
    """A Linear holding scheme integers; ``forward`` computes what the runtime computes."""

    def __init__(self, linear: nn.Linear, scheme: Scheme):
        super().__init__()
        q, scale = quantize_weight(linear.weight, scheme.weight_bits, scheme.group_size, scheme.weight_qmax)
        self.packed = scheme.weight_bits == 4
        self.register_buffer("qweight", _pack_int4(q) if self.packed else q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.round_inputs = scheme.dynamic_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.round_inputs:
            x = round_activation(x)
        q = _unpack_int4(self.qweight) if self.packed else self.qweight
        # the fake quantiser's own operations, so that the program computes exactly what QAT saw
        return F.linear(x, dequantize_weight(q, self.scale), self.bias)


class QuantizedEmbedding(nn.Module):
    """An embedding table stored as int8 rows, one symmetric scale per row."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        q, scale = quantize_weight(embedding.weight, EMBEDDING_BITS)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].float() * self.scale[ids]


def quantize_modules(model: nn.Module, scheme: Scheme) -> nn.Module:
    """A copy of a float ``model`` with quantised Linears and word embeddings."""
    model = copy.deepcopy(model).float().eval()
    word_embeddings = getattr(getattr(model, "embeddings", None), "word_embeddings", None)

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, QuantizedLinear(child, scheme))
            elif child is word_embeddings:
                setattr(module, name, QuantizedEmbedding(child))
            else:
                swap(child)

    swap(model)
    return model


class ServingEncoder(nn.Module):
    """``(input_ids, attention_mask[, token_type_ids]) -> (last_hidden_state[, logits])``: the
    signature of both exported files. Logits are at every position (``[batch, seq, vocab]``)."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student
        self.uses_token_types = student.config.get("type_vocab_size", 0) > 0
        self.has_logits = student.spec.has_mlm_head

    @property
    def input_names(self) -> List[str]:
        return ["input_ids", "attention_mask"] + (["token_type_ids"] if self.uses_token_types else [])

    @property
    def output_names(self) -> List[str]:
        return ["last_hidden_state"] + (["logits"] if self.has_logits else [])

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, ...]:
        out = self.student(input_ids, attention_mask, token_type_ids, return_logits=self.has_logits)
        return (out.last_hidden_state, out.logits) if self.has_logits else (out.last_hidden_state,)

    def dynamic_shapes(self, max_length: int):
        batch = torch.export.Dim("batch", min=1, max=4096)
        sequence = torch.export.Dim("sequence", min=2, max=max_length)
        return {name: {0: batch, 1: sequence} for name in self.input_names}
