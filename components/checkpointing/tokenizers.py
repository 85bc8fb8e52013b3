"""A model folder's tokenizer, checked against the model it belongs to."""

from pathlib import Path

from transformers import AutoTokenizer

from components.errors import CheckpointError
from components.fingerprint import VOCABULARY_FILES


def load_tokenizer(folder: Path, vocab_size: int, needs_mask: bool = False):
    """The tokenizer of a model folder, checked against the model's ``vocab_size``."""
    # transformers quietly builds a 5-token tokenizer when a folder has no vocabulary files
    if not any((folder / name).is_file() for name in VOCABULARY_FILES):
        raise CheckpointError(f"Could not load the tokenizer from {folder}: none of {list(VOCABULARY_FILES)} is there")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise CheckpointError(f"Could not load the tokenizer from {folder}: {e}") from e
    if tokenizer.pad_token_id is None or (needs_mask and tokenizer.mask_token_id is None):
        raise CheckpointError(
            f"{folder}: the tokenizer has no {'pad' if tokenizer.pad_token_id is None else 'mask'} token; "
            "batches need a pad token and masked-LM distillation a mask token (every BERT-family tokenizer defines both)"
        )
    if not 0.9 * vocab_size <= len(tokenizer) <= vocab_size:
        raise CheckpointError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model {vocab_size} embeddings; "
            "the tokenizer files do not belong to these weights"
        )
    return tokenizer
