"""The teacher: a frozen encoder in eval mode, run under inference mode, plus its tokenizer."""

from typing import Callable, Collection, Optional

import torch
from torch import nn

from components.models.output import EncoderOutput, EncoderSpec


class FrozenTeacher(nn.Module):
    """Wraps any encoder that returns an :class:`EncoderOutput` and never lets it train.

    The encoder stays in eval mode (no dropout: the original MiniALBERT code left it on) and
    runs under ``torch.inference_mode``. Tensors from inference mode cannot be saved for the
    student's backward pass, so the ones the caller asks for are returned as ordinary copies;
    hidden states it did not ask for come back as ``None``. A teacher sharded with FSDP2 runs
    under ``torch.no_grad`` instead (FSDP2's unsharding tracks tensor versions, which inference
    tensors do not have).

    Args:
        encoder: the teacher network.
        tokenizer: its Hugging Face tokenizer; the student and the data use the same one.
        name: where the teacher came from, for messages.
        inference_mode: ``False`` for a sharded encoder.
    """

    def __init__(self, encoder: nn.Module, tokenizer=None, name: str = "teacher", inference_mode: bool = True):
        super().__init__()
        self.encoder = encoder.eval()
        self.encoder.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.inference_mode = inference_mode

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    @property
    def spec(self) -> EncoderSpec:
        return self.encoder.spec

    @property
    def max_sequence_length(self) -> int:
        return self.encoder.max_sequence_length

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        *,
        hidden_layers: Optional[Collection[int]] = None,
        attention_layers: Collection[int] = (),
        logits_mask: Optional[torch.Tensor] = None,
        return_logits: bool = True,
    ) -> EncoderOutput:
        """Like the student's forward; ``hidden_layers`` (0 = embeddings) selects which hidden
        states to return, ``None`` meaning all of them."""
        with torch.inference_mode() if self.inference_mode else torch.no_grad():
            out = self.encoder(
                input_ids,
                attention_mask,
                token_type_ids,
                attention_layers=attention_layers,
                logits_mask=logits_mask,
                return_logits=return_logits,
            )
        keep = range(len(out.hidden_states)) if hidden_layers is None else set(hidden_layers)

        def usable(t):  # inference tensors cannot take part in the student's backward
            return t.clone() if self.inference_mode else t

        return EncoderOutput(
            hidden_states=tuple(usable(h) if i in keep else None for i, h in enumerate(out.hidden_states)),
            attentions={i: usable(a) for i, a in out.attentions.items()},
            logits=None if out.logits is None else usable(out.logits),
        )


def hf_teacher(
    path: str, revision: Optional[str] = None, shard: Optional[Callable[[nn.Module], None]] = None
) -> FrozenTeacher:
    """A teacher from a Hugging Face BERT-family checkpoint: a Hub id or a local folder.

    The folder needs ``config.json``, weights (``model.safetensors`` or ``pytorch_model.bin``,
    sharded or not) and tokenizer files. A checkpoint without an MLM head (a plain ``BertModel``)
    loads too; then only hidden-state and attention losses can use it. ``shard`` is set by the
    distributed recipe: it shards the encoder with FSDP2 before the weights are read.
    """
    from transformers import AutoTokenizer

    from components.checkpointing.hf_bert import (
        CheckpointError,
        load_hf_encoder,
        resolve_checkpoint_dir,
    )

    folder = resolve_checkpoint_dir(path, revision)
    encoder, _ = load_hf_encoder(folder, shard=shard)
    vocab = encoder.spec.vocab_size
    # transformers quietly builds a 5-token tokenizer when a folder has no vocabulary files
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"Could not load the tokenizer from {folder}: none of {list(TOKENIZER_FILES)} is there"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise CheckpointError(f"Could not load the tokenizer from {folder}: {e}") from e
    if tokenizer.pad_token_id is None or tokenizer.mask_token_id is None:
        raise CheckpointError(
            f"{folder}: the tokenizer has no {'pad' if tokenizer.pad_token_id is None else 'mask'} token; "
            "masked-LM distillation needs both (every BERT-family tokenizer defines them)"
        )
    if not 0.9 * vocab <= len(tokenizer) <= vocab:
        raise CheckpointError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model {vocab} embeddings; "
            "the tokenizer files do not belong to these weights"
        )
    return FrozenTeacher(encoder, tokenizer, name=str(path), inference_mode=shard is None)


# Any one of these gives a tokenizer its vocabulary.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tokenizer.model",
)
