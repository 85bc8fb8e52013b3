"""Text -> documents -> token windows, through the ``datasets`` library.

A corpus is local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` files (paths, folders or
globs, optionally compressed) or the name of a dataset on the Hugging Face Hub. Documents are
tokenised with the teacher's tokenizer (no truncation) and cut into windows of ``max_length``
tokens, special tokens included, whose starts are ``stride`` tokens apart. The tokens are kept
in a memory-mapped store (``components.data.store``), not as one list per window.
"""

import glob
import logging
import os
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import datasets

from components.checkpointing.io import looks_like_local_path
from components.data.store import build_store, cache_root, store_key, TokenWindows
from components.errors import CorpusError
from components.fingerprint import files_fingerprint

log = logging.getLogger(__name__)

BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def _file_kind(path: str) -> Optional[str]:
    name = path.lower()
    for ext in COMPRESSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
    return BUILDERS.get(os.path.splitext(name)[1])


def _looks_local(source: str) -> bool:
    return looks_like_local_path(source) or any(c in source for c in "*?[") or _file_kind(source) is not None


def local_files(sources: Sequence[str]) -> List[str]:
    """Expand paths, folders and globs into a sorted list of supported files."""
    files: List[str] = []
    for source in sources:
        source = os.path.expanduser(source)
        if os.path.isdir(source):
            found = sorted(
                str(p) for p in Path(source).rglob("*") if p.is_file() and _file_kind(str(p))
            )
            if not found:
                raise CorpusError(f"Corpus folder {source} holds no {sorted(BUILDERS)} files")
        else:
            found = sorted(glob.glob(source, recursive=True))
            if not found:
                raise CorpusError(f"Corpus file not found: {source}")
        unsupported = [f for f in found if _file_kind(f) is None]
        if unsupported:
            raise CorpusError(
                f"Unsupported corpus file type: {unsupported[0]} (supported: {sorted(BUILDERS)})"
            )
        files.extend(found)
    return files


def _open_any(file: str):
    """A binary file object that decompresses what it reads."""
    import bz2
    import gzip
    import lzma

    openers = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
    return openers.get(os.path.splitext(file)[1].lower(), open)(file, "rb")


def _first_undecodable(files: Sequence[str]) -> Optional[Tuple[str, int, int, int]]:
    """(file, line, column, byte) of the first byte sequence that is not UTF-8, if any."""
    for file in files:
        with _open_any(file) as f:
            for number, line in enumerate(f, start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    return file, number, e.start + 1, line[e.start]
    return None


# A "paragraph" this long is a file without blank lines (one sentence per line, say): read
# as one document it is built quadratically by ``datasets`` and tokenised whole.
PARAGRAPH_LIMIT = 1 << 20  # bytes
BLANK_LINE = re.compile(rb"\n[ \t\r]*\n")


def giant_paragraph_files(files: Sequence[str], limit: int = PARAGRAPH_LIMIT) -> List[str]:
    """The files whose first ``limit`` bytes hold no blank line although they are longer: read
    by paragraph, they would start with a paragraph of more than ``limit`` bytes."""
    found = []
    for file in files:
        try:
            with _open_any(file) as f:
                head = f.read(limit + 1)
        except (OSError, EOFError, ValueError):  # compressed formats we cannot peek into
            continue
        if len(head) > limit and not BLANK_LINE.search(head):
            found.append(file)
    return found


def _not_utf8(files: Sequence[str], kind: str) -> CorpusError:
    found = _first_undecodable(files)
    where = f"{found[0]}, line {found[1]}, column {found[2]} (byte 0x{found[3]:02x})" if found else ", ".join(files[:3])
    hint = (
        "set data.encoding_errors=replace to replace undecodable bytes with U+FFFD, or re-encode the file"
        if kind == "text"
        else "JSON and Parquet text must be UTF-8; re-encode the file"
    )
    return CorpusError(f"Corpus is not valid UTF-8 at {where}: {hint}")


def _is_decode_error(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, UnicodeDecodeError):
            return True
        e = e.__cause__ or e.__context__
    return False


def load_documents(
    source: Union[str, Sequence[str]],
    text_column: str = "text",
    hub_config: Optional[str] = None,
    split: str = "train",
    sample_by: str = "paragraph",
    encoding_errors: str = "strict",
    num_proc: Optional[int] = None,
) -> datasets.Dataset:
    """A dataset with one non-empty document per row in the column ``text``.

    Args:
        source: local path(s)/folder(s)/glob(s), or a Hub dataset name.
        text_column: the column holding text in .jsonl/.parquet/Hub data.
        hub_config: the Hub dataset's configuration name (e.g. ``"20231101.en"``).
        split: the split of a Hub dataset.
        sample_by: how plain text files split into documents: ``"paragraph"`` (blank lines),
            ``"line"`` or ``"document"`` (one per file). A file whose first megabyte holds
            no blank line has no paragraphs: it is read by line, with a warning.
        encoding_errors: for plain text files, ``"strict"`` refuses bytes that are not UTF-8
            (the error names the file, line and byte), ``"replace"`` turns them into U+FFFD
            and logs how many documents held such bytes.

    Empty and whitespace-only documents are dropped and counted.
    """
    if encoding_errors not in ("strict", "replace"):
        raise ValueError(f"data.encoding_errors must be 'strict' or 'replace', got {encoding_errors!r}")
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not sources:
        raise CorpusError("data.source is empty")
    sources = [str(s) for s in sources]
    files: List[str] = []
    kind = "hub"
    if all(_looks_local(s) for s in sources):
        files = local_files(sources)
        kinds = {_file_kind(f) for f in files}
        if len(kinds) > 1:
            raise CorpusError(f"Corpus mixes file types {sorted(kinds)}; use one type per run")
        kind = kinds.pop()
        if kind == "text" and sample_by == "paragraph":
            giant = giant_paragraph_files(files)
            if giant:
                log.warning(
                    "%s has no blank line in its first %d MiB: read by paragraph it would be one "
                    "enormous document, so the corpus is read by line (one document per line). "
                    "Set data.sample_by=line to say so, or separate documents with blank lines",
                    giant[0] if len(giant) == 1 else f"{len(giant)} files ({giant[0]}, ...)",
                    PARAGRAPH_LIMIT >> 20,
                )
                sample_by = "line"
        options = {"sample_by": sample_by, "encoding_errors": encoding_errors} if kind == "text" else {}
        described = files[0] if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"
        try:
            ds = datasets.load_dataset(kind, data_files=files, split="train", num_proc=num_proc, **options)
        except Exception as e:
            if _is_decode_error(e):
                raise _not_utf8(files, kind) from None
            raise CorpusError(f"Could not read corpus {described}: {type(e).__name__}: {e}") from e
        if kind == "text":
            text_column = "text"
    elif len(sources) == 1:
        described = sources[0]
        try:
            ds = datasets.load_dataset(sources[0], hub_config, split=split)
        except Exception as e:
            raise CorpusError(
                f"{sources[0]!r} is not a local file, and loading it as a Hugging Face dataset "
                f"failed ({type(e).__name__}: {e})"
            ) from e
    else:
        raise CorpusError(f"Corpus sources must all be local files, got {sources}")
    if text_column not in ds.column_names:
        raise CorpusError(
            f"Corpus {described} has no column {text_column!r} (columns: {ds.column_names}); "
            "set data.text_column"
        )
    ds = ds.select_columns([text_column])
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    total = len(ds)
    try:
        ds = ds.filter(
            lambda batch: [isinstance(t, str) and bool(t.strip()) for t in batch["text"]],
            batched=True,
            num_proc=num_proc,
            desc="Dropping empty documents",
        )
    except Exception as e:
        # JSON lines are not decoded when read: bad bytes surface here
        if files and _is_decode_error(e):
            raise _not_utf8(files, kind) from None
        raise
    if len(ds) == 0:
        raise CorpusError(f"Corpus {described} is empty: {total} documents, none with text")
    if len(ds) < total:
        log.info("Dropped %d empty documents of %d in %s", total - len(ds), total, described)
    if encoding_errors == "replace":
        replaced = sum(ds.map(lambda b: {"n": ["\ufffd" in t for t in b["text"]]}, batched=True, remove_columns=["text"])["n"])
        if replaced:
            log.warning("%d documents of %s held bytes that are not UTF-8 (replaced by U+FFFD)", replaced, described)
    return ds


def data_fingerprint(
    source: Union[str, Sequence[str]], documents: datasets.Dataset, hub_config: Optional[str] = None, split: str = "train"
) -> dict:
    """What identifies the corpus: each local file's name, size and (sampled) content hash, or
    the Hub dataset's name, configuration, split, revision and ``datasets`` fingerprint."""
    sources = [str(source)] if isinstance(source, (str, os.PathLike)) else [str(s) for s in source]
    if all(_looks_local(s) for s in sources):
        files = [os.path.abspath(f) for f in local_files(sources)]
        # names relative to the files' common folder: moving the corpus is not changing it
        root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
        return files_fingerprint(files, root=root)
    info = documents.info
    return {
        "hub": sources[0],
        "config": hub_config,
        "split": split,
        "revision": getattr(info, "version", None) and str(info.version),
        "checksums": {k: v.get("checksum") for k, v in (info.download_checksums or {}).items()},
        "fingerprint": documents._fingerprint,
    }


def window_starts(num_tokens: int, body: int, stride: int) -> List[int]:
    """Starts of the windows over a document: every ``stride`` tokens until one reaches the end."""
    if num_tokens == 0:
        return []
    starts = [0]
    while starts[-1] + body < num_tokens:
        starts.append(starts[-1] + stride)
    return starts


def special_tokens_template(tokenizer) -> Tuple[List[int], List[int]]:
    """The special tokens a tokenizer puts before and after a single sequence, e.g.
    ([CLS], [SEP]) for BERT and (<s>, </s>) for RoBERTa."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    raise ValueError(f"Cannot tell where {type(tokenizer).__name__} puts its special tokens")


def tokenize_windows(
    documents: datasets.Dataset,
    tokenizer,
    max_length: int,
    stride: int,
    cache_dir: Optional[Union[str, Path]] = None,
    desc: str = "Tokenising into windows",
) -> TokenWindows:
    """Token windows of at most ``max_length`` tokens, special tokens included, read from a
    memory-mapped store (see ``components.data.store``) built on first use. Each document is
    cut on its own; the last window of a document may be shorter."""
    prefix, suffix = special_tokens_template(tokenizer)
    body = max_length - len(prefix) - len(suffix)
    if body < 1:
        raise ValueError(f"data.max_length={max_length} leaves no room for text after special tokens")
    if not 1 <= stride <= body:
        raise ValueError(
            f"data.stride={stride} must be between 1 and {body} (max_length minus special "
            "tokens), or tokens between windows would be skipped"
        )
    key = store_key(documents._fingerprint, tokenizer, max_length, stride)
    folder = Path(cache_dir) if cache_dir is not None else cache_root()
    return build_store(documents, tokenizer, body, stride, prefix, suffix, folder / key, desc)


def split_documents(
    documents: datasets.Dataset, eval_fraction: float, seed: int
) -> Tuple[datasets.Dataset, Optional[datasets.Dataset]]:
    """Hold out whole documents (windows overlap, so splitting windows would leak)."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0:
        return documents, None
    if len(documents) < 2:
        raise CorpusError(
            f"Cannot hold out documents for evaluation from a corpus of {len(documents)} "
            "document; set data.eval_fraction=0 or split the text into more documents"
        )
    n_eval = min(max(1, round(eval_fraction * len(documents))), len(documents) - 1)
    parts = documents.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
