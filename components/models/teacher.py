"""The teacher: a frozen encoder in eval mode, run without gradients, plus its tokenizer.
(``components.checkpointing.hf_teacher`` builds one from a Hugging Face checkpoint.)"""

from typing import Collection, Optional

import torch
from torch import nn

from components.models.output import EncoderOutput, EncoderSpec


class FrozenTeacher(nn.Module):
    """Wraps any encoder that returns an ``EncoderOutput`` and never lets it train.

    The encoder stays in eval mode (no dropout: the original MiniALBERT code left it on), its
    parameters need no gradient, and it runs under ``torch.no_grad``. (``torch.inference_mode``
    was measured: its outputs must be copied before the student's backward can use them, and
    with those copies it was 1.7% slower at BERT-base shapes; it also breaks FSDP2's unshard.)

    Args:
        encoder: the teacher network.
        tokenizer: its Hugging Face tokenizer; the student and the data use the same one.
        name: where the teacher came from, for messages.

    ``fingerprint`` (set by ``components.checkpointing.hf_teacher``; ``None`` otherwise) identifies its weights, so
    that a resume can tell whether it still distils the same teacher.
    """

    def __init__(self, encoder: nn.Module, tokenizer=None, name: str = "teacher"):
        super().__init__()
        self.encoder = encoder.eval()
        self.encoder.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.fingerprint = None

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    @property
    def spec(self) -> EncoderSpec:
        return self.encoder.spec

    @property
    def max_sequence_length(self) -> int:
        return self.encoder.max_sequence_length

    @torch.no_grad()
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
        """Same arguments and record as the student's forward."""
        return self.encoder(
            input_ids,
            attention_mask,
            token_type_ids,
            attention_layers=attention_layers,
            logits_mask=logits_mask,
            return_logits=return_logits,
            **({} if segment_ids is None else {"segment_ids": segment_ids}),
        )


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
