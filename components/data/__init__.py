import logging
from typing import Any, Mapping, Optional, Tuple

import datasets

from components.data.corpus import (
    CorpusError,
    load_documents,
    special_tokens_template,
    split_documents,
    tokenize_windows,
)
from components.data.mlm import GlobalBatchSampler, MaskNoise, MLMMasker, pad_batch, step_generator

log = logging.getLogger(__name__)

__all__ = [
    "build_windows",
    "CorpusError",
    "GlobalBatchSampler",
    "load_documents",
    "MaskNoise",
    "MLMMasker",
    "pad_batch",
    "special_tokens_template",
    "split_documents",
    "step_generator",
    "tokenize_windows",
]


def build_windows(
    data: Mapping[str, Any], source: Any, tokenizer, seed: int
) -> Tuple[datasets.Dataset, Optional[datasets.Dataset]]:
    """(train windows, held-out windows or None) for a ``data`` config section whose
    ``source`` has been resolved to paths or a Hub name."""
    documents = load_documents(
        source,
        text_column=data["text_column"],
        hub_config=data["hub_config"],
        split=data["split"],
        sample_by=data["sample_by"],
        encoding_errors=data["encoding_errors"],
    )
    train_docs, eval_docs = split_documents(documents, data["eval_fraction"], seed)

    def windows(docs):
        return tokenize_windows(docs, tokenizer, data["max_length"], data["stride"], data["num_proc"])

    train = windows(train_docs)
    if len(train) == 0:
        raise CorpusError(f"The corpus {source} gave no token windows to train on")
    held_out = windows(eval_docs) if eval_docs is not None else None
    if held_out is not None and len(held_out) > data["max_eval_windows"]:
        held_out = held_out.select(range(data["max_eval_windows"]))
    if held_out is not None and len(held_out) == 0:
        held_out = None  # nothing to evaluate on: the run skips evaluation
    log.info(
        "Corpus: %d documents -> %d training windows, %d held-out windows",
        len(documents),
        len(train),
        0 if held_out is None else len(held_out),
    )
    return train, held_out
