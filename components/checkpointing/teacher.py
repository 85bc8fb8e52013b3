"""A teacher from a Hugging Face BERT-family checkpoint (a Hub id or a local folder)."""

from typing import Callable, Literal, Optional

from torch import nn

from components.checkpointing.hf_bert import load_hf_encoder
from components.checkpointing.hub import resolve_checkpoint_dir
from components.checkpointing.tokenizers import load_tokenizer
from components.checkpointing.weights import weight_files
from components.fingerprint import model_folder_fingerprint
from components.models.teacher import DTYPES, FrozenTeacher


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
    if dtype not in DTYPES:  # before any download
        raise ValueError(f"teacher dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    folder = resolve_checkpoint_dir(path, revision)
    encoder, _ = load_hf_encoder(folder, dtype=DTYPES[dtype], shard=shard)
    tokenizer = load_tokenizer(folder, encoder.spec.vocab_size, needs_mask=True)
    teacher = FrozenTeacher(encoder, tokenizer, name=str(path))
    teacher.fingerprint = model_folder_fingerprint(folder, weight_files(folder)[1])
    return teacher
