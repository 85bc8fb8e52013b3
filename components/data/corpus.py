"""Text -> documents -> token windows.

A corpus is local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` files (paths, folders or
globs, optionally compressed) or the name of a dataset on the Hugging Face Hub. Documents are
tokenised with the teacher's tokenizer (no truncation) and cut into windows of ``max_length``
tokens, special tokens included, whose starts are ``stride`` tokens apart. The tokens are kept
in a memory-mapped store (``components.data.store``), not as one list per window.

Local files are read here, streamed into a ``datasets`` Arrow table whose fingerprint is a hash
of the files' content (``components.fingerprint.file_digest``) and of how they are read, so
every cache built from them (the Arrow table, the token store) follows their content, not their
paths or modification times. (``datasets``' own local-file builders key their caches on mtime,
and split paragraphs only at ``"\n\n"``.) A paragraph ends at a blank line: one holding nothing
but spaces, tabs and a carriage return at most, the same rule the one-giant-document guard uses.
"""

import bz2
import glob
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import datasets
import fsspec
import pyarrow.parquet as pq

from components.data.store import build_store, store_key, TokenWindows
from components.errors import CorpusError
from components.fingerprint import cache_root, file_digest, files_fingerprint
from components.io import looks_like_local_path

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
            found = sorted(str(p) for p in Path(source).rglob("*") if p.is_file() and _file_kind(str(p)))
            if not found:
                raise CorpusError(f"Corpus folder {source} holds no {sorted(BUILDERS)} files")
        else:
            found = sorted(glob.glob(source, recursive=True))
            if not found:
                raise CorpusError(f"Corpus file not found: {source}")
        unsupported = [f for f in found if _file_kind(f) is None]
        if unsupported:
            raise CorpusError(f"Unsupported corpus file type: {unsupported[0]} (supported: {sorted(BUILDERS)})")
        files.extend(found)
    return files


def _open_any(file: str):
    """A binary file object that decompresses what it reads."""
    extension = os.path.splitext(file)[1].lower()
    if extension in (".zst", ".lz4"):  # through fsspec, when the codec's package is installed
        package = {".zst": "zstandard", ".lz4": "lz4"}[extension]
        try:
            return fsspec.open(file, "rb", compression={".zst": "zstd", ".lz4": "lz4"}[extension]).open()
        except ValueError:
            raise CorpusError(f"Reading {file} needs the {package} package: pip install {package}") from None
    return {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(extension, open)(file, "rb")


# A "paragraph" this long is a file without blank lines (one sentence per line, say): read
# as one document it would be tokenised whole.
PARAGRAPH_LIMIT = 1 << 20  # bytes
BLANK = " \t\r\n"  # a line holding only these is blank: it ends a paragraph
BLANK_LINE = re.compile(rb"\n[ \t\r]*\n")  # the same rule, over bytes


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


def _decode(raw: bytes, file: str, line: int, errors: str, kind: str) -> str:
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        hint = (
            "set data.encoding_errors=replace to replace undecodable bytes with U+FFFD, or re-encode the file"
            if kind == "text"
            else "JSON text must be UTF-8; re-encode the file"
        )
        raise CorpusError(
            f"Corpus is not valid UTF-8 at {file}, line {line}, column {e.start + 1} (byte 0x{raw[e.start]:02x}): {hint}"
        ) from None


def _text_documents(file: str, sample_by: str, errors: str) -> Iterator[str]:
    with _open_any(file) as f:
        if sample_by == "document":
            yield _decode(f.read(), file, 1, errors, "text")
            return
        paragraph: List[str] = []
        for number, raw in enumerate(f, start=1):
            line = _decode(raw, file, number, errors, "text").rstrip("\r\n")
            if sample_by == "line":
                yield line
            elif line.strip(BLANK):
                paragraph.append(line)
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
        if paragraph:
            yield "\n".join(paragraph)


def _json_documents(file: str, column: str) -> Iterator[Any]:
    """JSON Lines, or one JSON array of records."""
    with _open_any(file) as f:
        first = f.read(1 << 16).lstrip()[:1]
    if first == b"[":
        with _open_any(file) as f:
            try:
                records = json.loads(_decode(f.read(), file, 1, "strict", "json"))
            except ValueError as e:
                raise CorpusError(f"Corpus {file} is not valid JSON: {e}") from None
        for number, record in enumerate(records, start=1):
            yield _column(record, column, file, f"record {number}")
        return
    with _open_any(file) as f:
        for number, raw in enumerate(f, start=1):
            text = _decode(raw, file, number, "strict", "json")
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except ValueError as e:
                raise CorpusError(f"Corpus {file}, line {number} is not valid JSON: {e}") from None
            yield _column(record, column, file, f"line {number}")


def _column(record: Any, column: str, file: str, where: str) -> Any:
    if not isinstance(record, dict) or column not in record:
        held = f"columns: {sorted(record)}" if isinstance(record, dict) else f"a {type(record).__name__}, not a record"
        raise CorpusError(f"Corpus {file}, {where} has no column {column!r} ({held}); set data.text_column")
    return record[column]


def _parquet_documents(file: str, column: str) -> Iterator[Any]:
    try:
        table = pq.ParquetFile(file)
    except Exception as e:
        raise CorpusError(f"Could not read corpus {file}: {type(e).__name__}: {e}") from e
    names = table.schema_arrow.names
    if column not in names:
        raise CorpusError(f"Corpus {file} has no column {column!r} (columns: {names}); set data.text_column")
    for batch in table.iter_batches(columns=[column]):
        yield from batch.column(0).to_pylist()


def _read_local(files: List[str], kind: str, text_column: str, sample_by: str, encoding_errors: str) -> Iterator[dict]:
    """One row per document of ``files`` (``datasets.Dataset.from_generator`` shards ``files``)."""
    for file in files:
        if kind == "text":
            texts = _text_documents(file, sample_by, encoding_errors)
        elif kind == "json":
            texts = _json_documents(file, text_column)
        else:
            texts = _parquet_documents(file, text_column)
        for text in texts:
            yield {"text": text if isinstance(text, str) else None}


READER_VERSION = 1  # part of every local corpus's fingerprint: bump it when _read_local changes


def _load_local(files: List[str], kind: str, text_column: str, sample_by: str, encoding_errors: str, num_proc):
    options = {"kind": kind, "text_column": text_column, "sample_by": sample_by, "encoding_errors": encoding_errors}
    content = [file_digest(f) for f in files]
    fingerprint = hashlib.sha256(json.dumps([READER_VERSION, options, content]).encode()).hexdigest()[:32]
    try:
        return datasets.Dataset.from_generator(
            _read_local,
            features=datasets.Features({"text": datasets.Value("string")}),
            gen_kwargs={"files": files, **options},
            num_proc=num_proc if num_proc and num_proc > 1 and len(files) > 1 else None,
            fingerprint=fingerprint,
        )
    except Exception as e:
        cause = e
        while cause is not None and not isinstance(cause, CorpusError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:  # raised by our reader inside datasets' generator
            raise CorpusError(str(cause)) from None
        described = files[0] if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"
        raise CorpusError(f"Could not read corpus {described}: {type(e).__name__}: {e}") from e


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
        described = files[0] if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"
        ds = _load_local(files, kind, text_column, sample_by, encoding_errors, num_proc)
    elif len(sources) == 1:
        described = sources[0]
        try:
            ds = datasets.load_dataset(sources[0], hub_config, split=split)
        except Exception as e:
            raise CorpusError(
                f"{sources[0]!r} is not a local file, and loading it as a Hugging Face dataset "
                f"failed ({type(e).__name__}: {e})"
            ) from e
        if text_column not in ds.column_names:
            raise CorpusError(
                f"Corpus {described} has no column {text_column!r} (columns: {ds.column_names}); set data.text_column"
            )
        ds = ds.select_columns([text_column])
        if text_column != "text":
            ds = ds.rename_column(text_column, "text")
    else:
        raise CorpusError(f"Corpus sources must all be local files, got {sources}")
    total = len(ds)
    ds = ds.filter(
        lambda batch: [isinstance(t, str) and bool(t.strip()) for t in batch["text"]],
        batched=True,
        num_proc=num_proc,
        desc="Dropping empty documents",
    )
    if len(ds) == 0:
        raise CorpusError(f"Corpus {described} is empty: {total} documents, none with text")
    if len(ds) < total:
        log.info("Dropped %d empty documents of %d in %s", total - len(ds), total, described)
    if encoding_errors == "replace":
        replaced = sum(
            ds.map(lambda b: {"n": ["\ufffd" in t for t in b["text"]]}, batched=True, remove_columns=["text"])["n"]
        )
        if replaced:
            log.warning("%d documents of %s held bytes that are not UTF-8 (replaced by U+FFFD)", replaced, described)
    return ds


def data_fingerprint(
    source: Union[str, Sequence[str]],
    documents: datasets.Dataset,
    hub_config: Optional[str] = None,
    split: str = "train",
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
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "stores"
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
