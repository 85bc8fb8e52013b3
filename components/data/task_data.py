"""Downstream-task data (GLUE-style sentence tasks, CoNLL-style NER) -> token rows to fine-tune on.

A task's data is a Hub dataset, a folder written by ``datasets``' ``save_to_disk``, or one local
file per split. Every split is read whole, its labels are turned into ids against one label set
(fixed by the config, by the data's ``ClassLabel`` feature, or by the train split), and its
text is tokenised with the student's tokenizer, truncated to ``max_length``.

Rows keep ``index``, their row number in the source split, so that predictions can be written
back in the source's order (GLUE's test files are numbered that way). For NER, labels sit on
the first word piece of each word only (-100 elsewhere, as in BERT's paper), and
``word_starts`` marks those pieces even where there are no labels, so predictions for an
unlabelled test split can still be read off word by word.
"""

import csv
import difflib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import datasets
import pyarrow.parquet as pq
import torch

from components.data.mlm import round_up, step_generator
from components.errors import TaskDataError
from components.fingerprint import cache_root, file_digest, files_fingerprint
from components.io import looks_like_local_path

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
REQUIRED_SPLITS = ("train", "validation")  # we fine-tune on one and pick checkpoints on the other
FILE_TYPES = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".conll": "conll",
    ".txt": "conll",
}
NO_LABEL = -1  # GLUE's test splits on the Hub carry this label (and STS-B -1.0)
IGNORE_INDEX = -100  # label of word pieces the NER loss and metrics skip
_ORDER_STREAM = 11  # random stream of the shuffled order (MLM noise uses others)


@dataclass
class TaskData:
    task_type: str
    label_names: Optional[List[str]]  # id -> label name (str); None for regression
    label_values: Optional[List[Any]]  # id -> the label as written in the data: what prediction files print
    splits: Dict[str, datasets.Dataset]  # "train", "validation", and "test" when present
    labelled: Dict[str, bool]  # GLUE test splits carry label -1 / no label column: False
    sources: Dict[str, str]  # split -> where it came from, for messages
    fingerprint: Optional[Dict[str, Any]] = None  # what identifies the data (see task_data_fingerprint)

    @property
    def num_labels(self) -> int:
        """Outputs the task head needs: one per label, one for regression."""
        return 1 if self.label_names is None else len(self.label_names)


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _file_type(path: str) -> Optional[str]:
    return FILE_TYPES.get(os.path.splitext(path.lower())[1])


# ---------------------------------------------------------------------------------------- reading


def read_conll(path: str, tokens_column: str = "tokens", tags_column: str = "ner_tags") -> datasets.Dataset:
    """One row per sentence of a CoNLL file: whitespace-separated columns, the token first and the
    tag last; blank lines end sentences; ``-DOCSTART-`` lines are skipped. A file with one column
    (tokens only) gives no tags column."""
    sentences: List[List[str]] = []
    tags: List[List[str]] = []
    words: List[str] = []
    word_tags: List[str] = []
    tagged: Optional[bool] = None
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                parts = line.split()
                if parts and parts[0] == "-DOCSTART-":
                    parts = []
                if not parts:
                    if words:
                        sentences.append(words)
                        tags.append(word_tags)
                    words, word_tags = [], []
                    continue
                if tagged is None:
                    tagged = len(parts) > 1
                if tagged != (len(parts) > 1):
                    raise TaskDataError(
                        f"{path}, line {number}: {len(parts)} column(s) where earlier lines had "
                        f"{'a token and a tag' if tagged else 'a token only'} (columns {tokens_column!r}, {tags_column!r})"
                    )
                words.append(parts[0])
                word_tags.append(parts[-1])
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{path} is not valid UTF-8 ({e})") from None
    except OSError as e:
        raise TaskDataError(f"Cannot read {path}: {e}") from None
    if words:
        sentences.append(words)
        tags.append(word_tags)
    columns = {tokens_column: sentences}
    if tagged:
        columns[tags_column] = tags
    return datasets.Dataset.from_dict(columns)


def read_task_file(path: str, split: str, data: Mapping, task_type: str) -> datasets.Dataset:
    """One split from one local file (which file types suit which tasks is checked here)."""
    kind = _file_type(path)
    if kind is None:
        raise TaskDataError(
            f"Unsupported task data file type: {path} (data.source.{split}); supported: {sorted(FILE_TYPES)}"
        )
    if not os.path.isfile(path):
        raise TaskDataError(f"Task data file not found: {path} (data.source.{split})")
    if kind == "conll":
        if task_type != "token_classification":
            raise TaskDataError(
                f"{path} (data.source.{split}) is read as a CoNLL token/tag file, which only "
                f"task.type token_classification uses; for {task_type} give a .csv, .tsv, .jsonl, .json or .parquet file"
            )
        return read_conll(path, data["tokens_column"], data["tags_column"])
    if kind in ("csv", "tsv") and task_type == "token_classification":
        raise TaskDataError(
            f"{path} (data.source.{split}): CSV/TSV cells cannot hold the word lists of column "
            f"{data['tokens_column']!r}; for token_classification give .conll, .txt, .jsonl, .json or .parquet"
        )
    options: Dict[str, Any] = {}
    if kind in ("csv", "tsv"):
        # Keep text such as "null" or "NA" as written instead of turning it into a missing value.
        options["keep_default_na"] = False
    if kind == "tsv":
        # GLUE's TSVs leave quotes unescaped inside sentences.
        options.update(sep="\t", quoting=csv.QUOTE_NONE)
    builder = "csv" if kind == "tsv" else kind
    # datasets keys its cache of a local file on the file's path and mtime: a file rewritten with
    # its mtime kept would be read from the old cache. Key it on the content.
    cache_dir = cache_root() / "task_files" / file_digest(path)[:32]
    try:
        return datasets.load_dataset(builder, data_files=path, split="train", cache_dir=str(cache_dir), **options)
    except Exception as e:
        if _holds_no_rows(path, kind):  # datasets refuses a file without rows
            column = data["tokens_column"] if task_type == "token_classification" else data["text_column"]
            raise TaskDataError(f"{path} is empty: no rows to read column {column!r} from") from None
        raise TaskDataError(f"Could not read {path} (data.source.{split}): {type(e).__name__}: {e}") from e


def _holds_no_rows(path: str, kind: str) -> bool:
    try:
        if kind == "parquet":
            return pq.read_metadata(path).num_rows == 0
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = sum(1 for line in f if line.strip())
        return lines <= (1 if kind in ("csv", "tsv") else 0)  # a CSV header is not a row
    except Exception:
        return False


def _load_source_splits(
    data: Mapping, task_type: str
) -> Tuple[Dict[str, datasets.Dataset], Dict[str, str], Dict[str, Any]]:
    """(our split -> dataset, our split -> where it came from, the data's fingerprint): local
    files by the SHA-256 of their content (named by split, so that moved files are the same
    data), a ``save_to_disk`` folder by its files', a Hub dataset by its name, configuration and
    ``datasets`` fingerprints."""
    source = data["source"]
    found: Dict[str, datasets.Dataset] = {}
    where: Dict[str, str] = {}
    if isinstance(source, Mapping):
        unknown = [k for k in source if k not in SPLITS]
        if unknown:
            raise TaskDataError(
                f"data.source names files for splits {list(source)}; {unknown[0]!r} is not one of "
                f"{list(SPLITS)}{_did_you_mean(unknown[0], SPLITS)}"
            )
        for split in SPLITS:
            path = source.get(split)
            if path is None:
                if split in REQUIRED_SPLITS:
                    raise TaskDataError(f"data.source has no {split!r} file (it names {list(source)})")
                continue
            path = os.path.expanduser(str(path))
            found[split], where[split] = read_task_file(path, split, data, task_type), path
        files = [
            {"name": f"data.source.{s}", "bytes": os.path.getsize(p), "sha256": file_digest(p)}
            for s, p in where.items()
        ]
        return found, where, {"files": files}
    if not isinstance(source, (str, os.PathLike)):
        raise TaskDataError(
            f"data.source must be a Hub dataset name, a save_to_disk folder or a mapping split -> file, "
            f"got {type(source).__name__} {source!r}"
        )
    source = str(source)
    path = os.path.expanduser(source)
    hub_config = data["hub_config"]
    if os.path.isdir(path):
        try:
            loaded = datasets.load_from_disk(path)
        except Exception as e:
            raise TaskDataError(
                f"data.source {path} is a folder but not one written by datasets' save_to_disk "
                f"({type(e).__name__}: {e}); for plain files give a mapping split -> file"
            ) from e
        if not isinstance(loaded, datasets.DatasetDict):
            raise TaskDataError(
                f"data.source {path} holds a single Dataset; save a DatasetDict with splits "
                f"{list(SPLITS)}, or give a mapping split -> file"
            )
        described = f"{path} (save_to_disk folder)"
        fingerprint = files_fingerprint(sorted(p for p in Path(path).rglob("*") if p.is_file()), root=path)

        def name(split):
            return f"{path} split {split!r}"

    elif os.path.isfile(path):
        raise TaskDataError(
            f"data.source {path} is one file; give a mapping of splits to files, e.g. "
            "{train: train.tsv, validation: dev.tsv, test: test.tsv}"
        )
    elif looks_like_local_path(source) or _file_type(source) is not None:
        raise TaskDataError(f"Task data not found: {source} (data.source)")
    else:
        try:
            loaded = datasets.load_dataset(source, hub_config)
        except Exception as e:
            raise TaskDataError(
                f"{source!r} (data.source) is not a local folder, and loading it as a Hugging Face "
                f"dataset{f' with configuration {hub_config!r}' if hub_config else ''} failed "
                f"({type(e).__name__}: {e})"
            ) from e
        described = f"{source}/{hub_config}" if hub_config else source
        fingerprint = {
            "hub": source,
            "config": hub_config,
            "fingerprints": {k: d._fingerprint for k, d in loaded.items()},
        }

        def name(split):
            return f"{described} {split}"

    splits = dict(data["splits"] or {})
    unknown = [k for k in splits if k not in SPLITS]
    if unknown:
        raise TaskDataError(
            f"data.splits has the key {unknown[0]!r}; its keys are our splits {list(SPLITS)}"
            f"{_did_you_mean(unknown[0], SPLITS)}"
        )
    for ours in SPLITS:
        theirs = splits.get(ours)
        if theirs is None and ours in REQUIRED_SPLITS:
            raise TaskDataError(f"data.splits.{ours} is not set: which split of {described} is {ours!r}?")
        if theirs is None:
            continue
        if theirs not in loaded:
            if ours == "test" and theirs == "test":  # the default: a source without a test split is fine
                log.info("%s has no test split: no test predictions", described)
                continue
            raise TaskDataError(
                f"{described} has no split {theirs!r} (data.splits.{ours}); its splits are "
                f"{list(loaded)}{_did_you_mean(theirs, list(loaded))}"
            )
        found[ours], where[ours] = loaded[theirs], name(theirs)
    return found, where, fingerprint


def _require_column(ds: datasets.Dataset, column: str, key: str, where: str) -> None:
    if column not in ds.column_names:
        raise TaskDataError(
            f"{where} has no column {column!r} (data.{key}); its columns are {ds.column_names}"
            f"{_did_you_mean(column, ds.column_names)}"
        )


# ----------------------------------------------------------------------------------------- labels


def _values(ds: datasets.Dataset, column: str) -> List[Any]:
    # Slicing reads the column in one go; iterating ``ds[column]`` reads it row by row (200x slower).
    return ds[column][:]


def _class_label(ds: datasets.Dataset, column: str) -> Optional[datasets.ClassLabel]:
    """The ClassLabel of a label column, or of the items of a tags column."""
    feature = ds.features.get(column)
    if isinstance(feature, datasets.ClassLabel):
        return feature
    inner = getattr(feature, "feature", None)
    return inner if isinstance(inner, datasets.ClassLabel) else None


def _is_missing_label(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == NO_LABEL)


def _has_labels(ds: datasets.Dataset, column: str, task_type: str) -> bool:
    """Whether a (test) split carries labels: not when the column is absent or every value is
    missing (GLUE's Hub test splits hold -1)."""
    if column not in ds.column_names:
        return False
    values = _values(ds, column)
    if task_type == "token_classification":
        return any(v is not None for v in values)
    return not all(_is_missing_label(v) for v in values)


def _sort_key(value):
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


class LabelSet:
    """Label ids for a classification or NER task, and how raw values from the data map to them.

    A value from a column with a ClassLabel feature is its id; it matches a label by its
    ClassLabel name (or, failing that, by the id written as text). Any other value matches by
    ``str(value)``, so ``task.labels: ["0", "1"]`` fits integer labels.
    """

    def __init__(self, names: List[str], values: List[Any], origin: str):
        self.names = names
        self.values = values
        self.origin = origin  # where the set came from, for messages
        self.ids = {name: i for i, name in enumerate(names)}

    @classmethod
    def build(cls, task: Mapping, train: datasets.Dataset, column: str, per_item: bool) -> "LabelSet":
        class_label = _class_label(train, column)
        if task["labels"] is not None:
            names = [str(n) for n in task["labels"]]
            if len(set(names)) != len(names):
                raise TaskDataError(f"task.labels lists a label twice: {names}")
            values: List[Any] = list(names)
            if class_label is not None:
                values = [class_label.str2int(n) if n in class_label.names else n for n in names]
            else:  # print labels as the data writes them (ints stay ints)
                seen = {}
                for v in _flat(_values(train, column), per_item):
                    seen.setdefault(str(v), v)
                values = [seen.get(n, n) for n in names]
            return cls(names, values, "task.labels")
        if class_label is not None:
            origin = f"the ClassLabel feature of column {column!r}"
            return cls(list(class_label.names), list(range(class_label.num_classes)), origin)
        unique = {v for v in _flat(_values(train, column), per_item) if v is not None}
        ordered = sorted(unique, key=_sort_key)
        if per_item and "O" in unique:
            ordered = ["O"] + [v for v in ordered if v != "O"]
        return cls([str(v) for v in ordered], ordered, "the values of the train split")

    def id_of(self, value, class_label: Optional[datasets.ClassLabel]) -> Optional[int]:
        if class_label is not None and isinstance(value, int) and 0 <= value < class_label.num_classes:
            found = self.ids.get(class_label.int2str(value))
            if found is not None:
                return found
        return self.ids.get(str(value))


def _flat(values, per_item: bool):
    if not per_item:
        return values
    return (tag for tags in values if tags is not None for tag in tags)


def _label_ids(ds: datasets.Dataset, column: str, labels: Optional[LabelSet], task_type: str, where: str) -> List[Any]:
    """Per row: a class id, a float (regression) or a list of tag ids (NER)."""
    class_label = _class_label(ds, column)
    out: List[Any] = []
    for row, value in enumerate(_values(ds, column)):
        if task_type == "regression":
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise TaskDataError(
                    f"{where}, row {row}: label {value!r} in column {column!r} is not a finite number, "
                    "which task.type regression needs"
                )
            out.append(number)
            continue
        items = value if task_type == "token_classification" else [value]
        if items is None:
            raise TaskDataError(f"{where}, row {row}: no tags in column {column!r}")
        ids = []
        for item in items:
            found = labels.id_of(item, class_label)
            if found is None:
                raise TaskDataError(
                    f"{where}, row {row}: label {item!r} in column {column!r} is not in the label set "
                    f"{labels.names} (from {labels.origin}); list every label in task.labels"
                )
            ids.append(found)
        out.append(ids if task_type == "token_classification" else ids[0])
    return out


# ----------------------------------------------------------------------------------- tokenisation


def _text_batch(batch, column: str, indices: List[int], where: str) -> List[str]:
    texts = batch[column]
    for text, row in zip(texts, indices):
        if not isinstance(text, str):
            raise TaskDataError(f"{where}, row {row}: column {column!r} holds {text!r}, not text")
    return texts


def _encode_sentences(ds, tokenizer, data, labels, where) -> datasets.Dataset:
    pair_column = data["text_pair_column"]

    def encode(batch, indices):
        texts = _text_batch(batch, data["text_column"], indices, where)
        pairs = _text_batch(batch, pair_column, indices, where) if pair_column else None
        encoded = tokenizer(
            texts, pairs, truncation=True, max_length=data["max_length"], return_attention_mask=False, verbose=False
        )
        out = {"input_ids": encoded["input_ids"], "index": indices}
        if "token_type_ids" in encoded:
            out["token_type_ids"] = encoded["token_type_ids"]
        if labels is not None:
            out["labels"] = [labels[i] for i in indices]
        return out

    return ds.map(
        encode,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        num_proc=data["num_proc"],
        desc="Tokenising",
    )


def align_word_labels(
    word_ids: Sequence[Optional[int]], word_labels: Optional[Sequence[int]]
) -> Tuple[List[int], List[int]]:
    """(word_starts, labels) for the pieces of one sentence: the first piece of each word gets
    the word's label, every other piece and every special token ``IGNORE_INDEX``."""
    starts, labels = [], []
    previous = None
    for word in word_ids:
        first = word is not None and word != previous
        starts.append(int(first))
        if word_labels is not None:
            labels.append(word_labels[word] if first else IGNORE_INDEX)
        previous = word
    return starts, labels


def _encode_words(ds, tokenizer, data, labels, where) -> datasets.Dataset:
    column = data["tokens_column"]
    tags_column = data["tags_column"]

    def encode(batch, indices):
        sentences = batch[column]
        for words, row in zip(sentences, indices):
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise TaskDataError(f"{where}, row {row}: column {column!r} must hold a list of words, got {words!r}")
            if labels is not None and len(labels[row]) != len(words):
                raise TaskDataError(
                    f"{where}, row {row}: {len(words)} words in column {column!r} but "
                    f"{len(labels[row])} tags in column {tags_column!r}"
                )
        encoded = tokenizer(
            sentences,
            is_split_into_words=True,
            truncation=True,
            max_length=data["max_length"],
            return_attention_mask=False,
            verbose=False,
        )
        out = {"input_ids": encoded["input_ids"], "index": indices, "num_words": [len(w) for w in sentences]}
        if "token_type_ids" in encoded:
            out["token_type_ids"] = encoded["token_type_ids"]
        aligned = [
            align_word_labels(encoded.word_ids(j), labels[row] if labels is not None else None)
            for j, row in enumerate(indices)
        ]
        out["word_starts"] = [starts for starts, _ in aligned]
        if labels is not None:
            out["labels"] = [tags for _, tags in aligned]
        return out

    return ds.map(
        encode,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        num_proc=data["num_proc"],
        desc="Tokenising words",
    )


# ------------------------------------------------------------------------------------------- main


def _check_task(task: Mapping) -> None:
    if task["type"] not in ("classification", "regression", "token_classification"):
        raise TaskDataError(
            f"task.type must be classification, regression or token_classification, got {task['type']!r}"
        )
    if task["input"] not in ("single", "pair"):
        raise TaskDataError(f"task.input must be 'single' or 'pair', got {task['input']!r}")
    if task["labels"] is not None and task["type"] == "regression":
        raise TaskDataError("task.labels is set, but task.type regression has no label set; set task.labels: null")


def _check_inputs(task: Mapping, data: Mapping, tokenizer, train: datasets.Dataset, where: str) -> None:
    """The columns a task reads fit its input kind (``where``: the train split's source)."""
    if task["type"] == "token_classification":
        if task["input"] == "pair" or data["text_pair_column"] is not None:
            raise TaskDataError(
                f"task.type token_classification reads one word list per row (column "
                f"{data['tokens_column']!r} of {where}); set task.input: single and data.text_pair_column: null"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise TaskDataError(
                "task.type token_classification needs a fast tokenizer (word_ids() places the tags); "
                f"{type(tokenizer).__name__} is not one"
            )
        return
    if task["input"] == "pair" and data["text_pair_column"] is None:
        raise TaskDataError(
            f"task.input is 'pair' but data.text_pair_column is null: name the second sentence's column "
            f"of {where} (next to data.text_column {data['text_column']!r}); its columns are {train.column_names}"
        )
    if task["input"] == "single" and data["text_pair_column"] is not None:
        raise TaskDataError(
            f"data.text_pair_column is {data['text_pair_column']!r} (a column of {where}) but task.input "
            "is 'single'; set task.input: pair to read sentence pairs, or data.text_pair_column: null"
        )


def load_task_data(data: Mapping, task: Mapping, tokenizer) -> TaskData:
    """Read, label and tokenise every split of a task.

    Args:
        data: the ``data`` config section, checked and complete (every field of
            ``components.training.schema.TaskDataConfig``).
        task: the ``task`` config section, likewise (``TaskConfig``).
        tokenizer: the student's (= teacher's) tokenizer; NER needs a fast one.
    """
    _check_task(task)
    task_type = task["type"]
    raw, sources, fingerprint = _load_source_splits(data, task_type)
    _check_inputs(task, data, tokenizer, raw["train"], sources["train"])

    if task_type == "token_classification":
        text_columns = [(data["tokens_column"], "tokens_column")]
        label_column, label_key = data["tags_column"], "tags_column"
    else:
        text_columns = [(data["text_column"], "text_column")]
        if data["text_pair_column"] is not None:
            text_columns.append((data["text_pair_column"], "text_pair_column"))
        label_column, label_key = data["label_column"], "label_column"

    labelled: Dict[str, bool] = {}
    for split, ds in raw.items():
        if len(ds) == 0:
            raise TaskDataError(f"{sources[split]} is empty: no rows to read column {text_columns[0][0]!r} from")
        for column, key in text_columns:
            _require_column(ds, column, key, sources[split])
        if split in REQUIRED_SPLITS:
            _require_column(ds, label_column, label_key, sources[split])
            if not _has_labels(ds, label_column, task_type):
                raise TaskDataError(
                    f"{sources[split]} has no labels: every value of column {label_column!r} is missing or {NO_LABEL}"
                )
            labelled[split] = True
        else:
            labelled[split] = _has_labels(ds, label_column, task_type)

    per_item = task_type == "token_classification"
    label_set = None if task_type == "regression" else LabelSet.build(task, raw["train"], label_column, per_item)
    encode = _encode_words if per_item else _encode_sentences
    splits = {}
    for split, ds in raw.items():
        ids = _label_ids(ds, label_column, label_set, task_type, sources[split]) if labelled[split] else None
        splits[split] = encode(ds, tokenizer, data, ids, sources[split])
    log.info(
        "Task data (%s): %s; labels %s",
        task_type,
        ", ".join(
            f"{s} {len(d)} rows ({sources[s]}{'' if labelled[s] else ', unlabelled'})" for s, d in splits.items()
        ),
        label_set.names if label_set is not None else "none (regression)",
    )
    return TaskData(
        task_type=task_type,
        label_names=label_set.names if label_set is not None else None,
        label_values=label_set.values if label_set is not None else None,
        splits=splits,
        labelled=labelled,
        sources=sources,
        fingerprint=fingerprint,
    )


def encode_inputs(inputs: Sequence, tokenizer, task_type: str, pair: bool, max_length: int) -> datasets.Dataset:
    """Rows for unlabelled inputs, tokenised exactly as a task's splits are: sentences or
    ``(sentence, sentence)`` pairs, or word lists for token classification."""
    inputs = list(inputs)
    data = {"max_length": max_length, "num_proc": None}
    if task_type == "token_classification":
        ds = datasets.Dataset.from_dict({"tokens": [list(words) for words in inputs]})
        return _encode_words(ds, tokenizer, {**data, "tokens_column": "tokens", "tags_column": None}, None, "inputs")
    columns = {"text": [x[0] if pair else x for x in inputs]}
    if pair:
        columns["pair"] = [x[1] for x in inputs]
    data.update(text_column="text", text_pair_column="pair" if pair else None)
    return _encode_sentences(datasets.Dataset.from_dict(columns), tokenizer, data, None, "inputs")


# ---------------------------------------------------------------------------------------- batches


def collate_task_batch(rows: List[dict], pad_token_id: int, pad_to_multiple_of: int = 8) -> Dict[str, torch.Tensor]:
    """Right-pad rows into tensors: ``input_ids``, ``attention_mask`` (1 token / 0 padding),
    ``token_type_ids``, ``labels`` (class ids as long, regression targets as float, NER tags
    padded with -100), ``word_starts`` (padded 0), ``num_words`` and ``index``, each when present."""
    length = round_up(max(len(r["input_ids"]) for r in rows), pad_to_multiple_of)

    def padded(key, value):
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r[key])] = torch.as_tensor(r[key], dtype=torch.long)
        return out

    batch = {"input_ids": padded("input_ids", pad_token_id)}
    batch["attention_mask"] = torch.zeros_like(batch["input_ids"])
    for i, r in enumerate(rows):
        batch["attention_mask"][i, : len(r["input_ids"])] = 1
    if "token_type_ids" in rows[0]:
        batch["token_type_ids"] = padded("token_type_ids", 0)
    if "labels" in rows[0]:
        first = rows[0]["labels"]
        if isinstance(first, list):
            batch["labels"] = padded("labels", IGNORE_INDEX)
        else:
            dtype = torch.float32 if isinstance(first, float) else torch.long
            batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=dtype)
    if "word_starts" in rows[0]:
        batch["word_starts"] = padded("word_starts", 0)
    for key in ("num_words", "index"):
        if key in rows[0]:
            batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
    return batch


def num_batches(dataset, batch_size: int) -> int:
    """Batches in one pass; the last one may be short (nothing is dropped)."""
    return -(-len(dataset) // batch_size)


def task_batches(
    dataset,
    batch_size: int,
    pad_token_id: int,
    pad_to_multiple_of: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    start: int = 0,
) -> Iterator[Dict[str, torch.Tensor]]:
    """Collated batches of one pass over ``dataset``, from batch number ``start`` on.

    With ``shuffle`` the order is a permutation drawn from (seed, epoch) alone, so a resumed run
    that skips to batch ``start`` sees exactly the batches the interrupted run would have.
    """
    n = len(dataset)
    if shuffle:
        order = torch.randperm(n, generator=step_generator(seed, epoch, _ORDER_STREAM)).tolist()
    else:
        order = list(range(n))
    for b in range(start, num_batches(dataset, batch_size)):
        picked = dataset[order[b * batch_size : (b + 1) * batch_size]]
        rows = [dict(zip(picked, values)) for values in zip(*picked.values())]
        yield collate_task_batch(rows, pad_token_id, pad_to_multiple_of)


def per_word(values: torch.Tensor, word_starts: torch.Tensor) -> List[List[Any]]:
    """Per sentence of a batch, ``values`` (e.g. predicted tag ids or labels) at the first piece
    of each word: one item per word that survived truncation."""
    return [row[starts.bool()].tolist() for row, starts in zip(values, word_starts)]
