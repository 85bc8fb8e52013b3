"""Token windows kept as one flat, memory-mapped token array per corpus split.

A store is a folder:

- ``tokens.bin``: every document's tokens, concatenated, as ``uint16`` when the vocabulary fits
  (``int32`` otherwise), without special tokens;
- ``windows.bin``: ``int64`` pairs (start, stop) into ``tokens.bin``, one per window;
- ``meta.json``: the dtype, the counts and the special tokens put around every window.

Window ``i`` is ``prefix + tokens[start:stop] + suffix``: overlapping windows are not stored
twice. A store costs 2 (or 4) bytes per corpus token plus 16 bytes per window, i.e.
``2 + 16 / stride`` bytes per token (2.125 at the shipped stride 128).

It is built once, streaming documents in batches (memory stays bounded whatever the corpus
size), under a name derived from the documents' fingerprint (for local files, a hash of their
content: ``components.data.corpus``), the tokenizer and the window settings, in
``$RECURSIVE_DISTILL_CACHE`` or ``<datasets cache>/recursive_distill/``. Every rank and every
resume reads the same files; a changed corpus or tokenizer gets a new name.
"""

import hashlib
import itertools
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)

FORMAT = 1
DOCS_PER_BATCH = 1000


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides how a tokenizer cuts text into ids."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary and settings
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        digest.update(json.dumps(tokenizer.init_kwargs, sort_keys=True, default=str).encode())
    digest.update(json.dumps(tokenizer.all_special_ids).encode())
    return digest.hexdigest()


def window_bounds(lengths: np.ndarray, body: int, stride: int) -> np.ndarray:
    """(start, stop) of every window over documents of ``lengths`` tokens, relative to each
    document: starts ``stride`` apart until one reaches the document's end (the vectorised
    ``corpus.window_starts``)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    counts = np.where(lengths > 0, 1 + np.maximum(0, -(-(lengths - body) // stride)), 0)
    doc = np.repeat(np.arange(len(lengths)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    starts = (np.arange(counts.sum()) - first) * stride
    stops = np.minimum(starts + body, lengths[doc])
    return np.stack([starts, stops], axis=1), doc


class TokenWindows:
    """The windows of one store, read through memory maps. Indexing mimics a ``datasets``
    column ``input_ids``: ``w[i]`` and ``w[[i, j]]`` give ``{"input_ids": ...}``, and
    ``w["input_ids"]`` every window (small corpora and tests only)."""

    def __init__(self, folder: Union[str, Path], rows: Optional[np.ndarray] = None):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.prefix: List[int] = self.meta["prefix"]
        self.suffix: List[int] = self.meta["suffix"]
        num_tokens, num_windows = self.meta["num_tokens"], self.meta["num_windows"]
        self.tokens = _memmap(self.folder / "tokens.bin", np.dtype(self.meta["dtype"]), (num_tokens,))
        self.bounds = _memmap(self.folder / "windows.bin", np.dtype(np.int64), (num_windows, 2))
        self.rows = rows  # a selection of windows (see select), or all of them

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.bounds)

    def window(self, i: int) -> List[int]:
        if self.rows is not None:
            i = int(self.rows[i])
        start, stop = self.bounds[i]
        return self.prefix + self.tokens[start:stop].tolist() + self.suffix

    def __getitem__(self, key):
        if isinstance(key, str):
            if key != "input_ids":
                raise KeyError(key)
            return [self.window(i) for i in range(len(self))]
        if isinstance(key, (int, np.integer)):
            return {"input_ids": self.window(int(key))}
        return {"input_ids": [self.window(int(i)) for i in key]}

    def select(self, indices: Sequence[int]) -> "TokenWindows":
        rows = np.asarray(indices, dtype=np.int64)
        if self.rows is not None:
            rows = self.rows[rows]
        return TokenWindows(self.folder, rows)

    def __repr__(self) -> str:
        return f"TokenWindows({self.folder}, {len(self)} windows)"


def _memmap(path: Path, dtype: np.dtype, shape) -> np.ndarray:
    if shape[0] == 0:  # numpy cannot map an empty file
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


def store_key(documents_fingerprint: str, tokenizer, max_length: int, stride: int) -> str:
    parts = [FORMAT, documents_fingerprint, tokenizer_fingerprint(tokenizer), max_length, stride]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def build_store(
    documents,
    tokenizer,
    body: int,
    stride: int,
    prefix: List[int],
    suffix: List[int],
    folder: Path,
    desc: str = "Tokenising into windows",
) -> TokenWindows:
    """Tokenise ``documents`` (a ``datasets`` dataset with a ``text`` column) into the store
    ``folder``, unless it is there already. Built in a temporary sibling and renamed into place,
    so a killed build leaves no half store under the final name."""
    if (folder / "meta.json").is_file():
        return TokenWindows(folder)
    dtype = np.dtype(np.uint16) if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        num_tokens = num_windows = 0
        with (
            open(tmp / "tokens.bin", "wb") as tokens,
            open(tmp / "windows.bin", "wb") as windows,
            tqdm(total=len(documents), desc=desc, unit="doc", dynamic_ncols=True) as progress,
        ):
            for batch in documents.iter(batch_size=DOCS_PER_BATCH):
                encoded = tokenizer(
                    batch["text"],
                    add_special_tokens=False,
                    return_attention_mask=False,
                    return_token_type_ids=False,
                    verbose=False,
                )["input_ids"]
                lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
                bounds, doc = window_bounds(lengths, body, stride)
                offsets = num_tokens + np.cumsum(lengths) - lengths
                (bounds + offsets[doc, None]).tofile(windows)
                flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype, count=int(lengths.sum()))
                flat.tofile(tokens)
                num_tokens += int(lengths.sum())
                num_windows += len(bounds)
                progress.update(len(encoded))
            for f in (tokens, windows):
                f.flush()
                os.fsync(f.fileno())
        meta = {
            "format": FORMAT,
            "dtype": dtype.name,
            "num_tokens": num_tokens,
            "num_windows": num_windows,
            "num_documents": len(documents),
            "prefix": prefix,
            "suffix": suffix,
        }
        (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # not built by another process meanwhile
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenWindows(folder)
