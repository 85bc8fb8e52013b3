import logging
from typing import Any, Dict, Mapping, NamedTuple, Optional

from components.data.corpus import (
    CorpusError,
    data_fingerprint,
    load_documents,
    special_tokens_template,
    split_documents,
    tokenize_windows,
)
from components.data.mlm import GlobalBatchSampler, MaskNoise, MLMMasker, pad_batch, step_generator
from components.data.store import TokenWindows

log = logging.getLogger(__name__)

__all__ = [
    "build_windows",
    "Corpus",
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
    "TokenWindows",
]


class Corpus(NamedTuple):
    train: TokenWindows
    held_out: Optional[TokenWindows]  # None: nothing to evaluate on
    fingerprint: Dict[str, Any]  # what identifies the text (see data_fingerprint)


def build_windows(data: Mapping[str, Any], source: Any, tokenizer, seed: int) -> Corpus:
    """The training and held-out windows for a ``data`` config section whose ``source`` has
    been resolved to paths or a Hub name, and the corpus's fingerprint."""
    documents = load_documents(
        source,
        text_column=data["text_column"],
        hub_config=data["hub_config"],
        split=data["split"],
        sample_by=data["sample_by"],
        encoding_errors=data["encoding_errors"],
        num_proc=data["num_proc"],
    )
    fingerprint = data_fingerprint(source, documents, data["hub_config"], data["split"])
    train_docs, eval_docs = split_documents(documents, data["eval_fraction"], seed)

    def windows(docs, part):
        return tokenize_windows(
            docs, tokenizer, data["max_length"], data["stride"], desc=f"Tokenising the {part} documents"
        )

    train = windows(train_docs, "training")
    if len(train) == 0:
        raise CorpusError(f"The corpus {source} gave no token windows to train on")
    held_out = windows(eval_docs, "held-out") if eval_docs is not None else None
    if held_out is not None and len(held_out) > data["max_eval_windows"]:
        held_out = held_out.select(range(data["max_eval_windows"]))
    if held_out is not None and len(held_out) == 0:
        held_out = None  # nothing to evaluate on: the run skips evaluation
    log.info(
        "Corpus: %d documents -> %d training windows, %d held-out windows (store: %s)",
        len(documents),
        len(train),
        0 if held_out is None else len(held_out),
        train.folder,
    )
    return Corpus(train, held_out, fingerprint)
