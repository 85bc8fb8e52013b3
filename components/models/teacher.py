"""The teacher: a frozen encoder in eval mode, run under inference mode, plus its tokenizer."""

from typing import Callable, Collection, Literal, Optional

import torch
from torch import nn

from components.models.output import EncoderOutput, EncoderSpec


class FrozenTeacher(nn.Module):
    """Wraps any encoder that returns an :class:`EncoderOutput` and never lets it train.

    The encoder stays in eval mode (no dropout: the original MiniALBERT code left it on), its
    parameters need no gradient, and it runs under ``torch.no_grad``. (``torch.inference_mode``
    was measured: its outputs must be copied before the student's backward can use them, and
    with those copies it was 1.7% slower at BERT-base shapes; it also breaks FSDP2's unshard.)

    Args:
        encoder: the teacher network.
        tokenizer: its Hugging Face tokenizer; the student and the data use the same one.
        name: where the teacher came from, for messages.

    ``fingerprint`` (set by :func:`hf_teacher`; ``None`` otherwise) identifies its weights, so
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


def hf_teacher(
    path: str,
    revision: Optional[str] = None,
    dtype: Literal["fp32", "bf16"] = "fp32",
    shard: Optional[Callable[[nn.Module], None]] = None,
) -> FrozenTeacher:
    """A teacher from a Hugging Face BERT-family checkpoint: a Hub id or a local folder.

    The folder needs ``config.json``, weights (``model.safetensors`` or ``pytorch_model.bin``,
    sharded or not) and tokenizer files. A checkpoint without an MLM head (a plain ``BertModel``)
    loads too; then only hidden-state and attention losses can use it. A Hub id is downloaded to
    the Hugging Face cache, or read from it offline (``HF_HUB_OFFLINE=1``, or no connection).
    The folder is untrusted input: its config's sizes are checked against the weights before
    anything is allocated, and nothing in it is executed or written
    (``components.checkpointing.hf_bert``).

    Args:
        dtype: ``"bf16"`` stores and runs the teacher in bfloat16: half the memory, and 2-4x
            faster matmuls on GPUs and on CPUs with bf16 instructions (slower on CPUs without).
            Its attention probabilities stay fp32; the losses compute in fp32.
        shard: set by the distributed recipe: shards the encoder with FSDP2 before the weights
            are read.
    """
    from components.checkpointing.hf_bert import load_hf_encoder, load_tokenizer, resolve_checkpoint_dir, weight_files
    from components.fingerprint import model_folder_fingerprint

    if dtype not in DTYPES:  # before any download
        raise ValueError(f"teacher dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    folder = resolve_checkpoint_dir(path, revision)
    encoder, _ = load_hf_encoder(folder, dtype=DTYPES[dtype], shard=shard)
    tokenizer = load_tokenizer(folder, encoder.spec.vocab_size, needs_mask=True)
    teacher = FrozenTeacher(encoder, tokenizer, name=str(path))
    teacher.fingerprint = model_folder_fingerprint(folder, weight_files(folder)[1])
    return teacher
