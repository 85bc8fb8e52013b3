"""A sentence-embedding teacher's student, written as a sentence-transformers folder too.

A teacher folder with ``modules.json`` (sentence-transformers/all-MiniLM-L6-v2: a ``BertModel``,
mean pooling, normalisation) is a sentence-transformers model, and its student is meant to be
used the same way. ``save_student`` then gives the student folder the teacher's pipeline with
the student as its Transformer module, at the folder root where the transformers files already
are: ``modules.json``, ``sentence_bert_config.json`` (``max_seq_length`` capped at the student's
positions), the teacher's Pooling (its width set to the student's) and Normalize configs, and
``config_sentence_transformers.json`` (prompts, similarity function). So
``SentenceTransformer(student)`` and MTEB take the folder as it is: an adapter-free student is an
ALBERT, which transformers knows; a native student (adapters) needs ``import components`` first,
which registers its model type (sentence-transformers >= 6 imports no module class outside its
own package without ``trust_remote_code``, so the registration is the route that runs no code
from the folder).

Only modules without weights follow the student: a Dense layer (or any other module) was trained
on the teacher's embeddings, not the student's, and is left out with a warning. The teacher's
files are read once, when the run starts (``teacher_sentence_modules``), so a broken
``modules.json`` stops the run before training, not at the export.
"""

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from components.checkpointing.hub import resolve_checkpoint_dir
from components.errors import CheckpointError

log = logging.getLogger(__name__)

MODULES_FILE = "modules.json"
TRANSFORMER_CONFIG_FILE = "sentence_bert_config.json"
MODEL_CONFIG_FILE = "config_sentence_transformers.json"
_PACKAGE = "sentence_transformers."
_WITHOUT_WEIGHTS = ("Pooling", "Normalize")  # they apply to any encoder's token embeddings
_POOLING_WIDTH_KEYS = ("word_embedding_dimension", "embedding_dimension")  # before / since v6
# one folder name, as sentence-transformers writes them ("1_Pooling"): no dots, so never a file of the student's
_MODULE_PATH = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class SentenceModules:
    """What a teacher's sentence-transformers files say, as the student's folder will repeat it."""

    source: Path  # the teacher's modules.json, for messages
    transformer: Dict[str, Any]  # the Transformer module's modules.json entry (its class, as the teacher names it)
    transformer_config: Dict[str, Any]  # its sentence_bert_config.json
    modules: Tuple[Tuple[Dict[str, Any], Optional[Dict[str, Any]]], ...]  # (modules.json entry, config.json)
    model_config: Optional[Dict[str, Any]]  # config_sentence_transformers.json


def _class_name(module_type: str) -> Optional[str]:
    """``Pooling`` for ``sentence_transformers.models.Pooling`` (any of the package's paths for
    it); ``None`` for a class outside sentence-transformers."""
    return module_type.rsplit(".", 1)[-1] if module_type.startswith(_PACKAGE) else None


def _read_json(file: Path, kind: type, what: str):
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not readable JSON: {e}") from e
    if not isinstance(value, kind):
        raise CheckpointError(f"{file} must hold {what}, got {type(value).__name__}")
    return value


def _entry(index: Path, i: int, entry: Any) -> Dict[str, Any]:
    """One ``modules.json`` entry, checked: its ``path`` is copied into the student's folder."""
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("name", "type")):
        raise CheckpointError(f'{index}: entry {i} must be an object with "name" and "type" strings, got {entry!r}')
    path = entry.get("path", "")
    if not isinstance(path, str) or (path and not _MODULE_PATH.match(path)):
        raise CheckpointError(
            f'{index}: entry {i} has "path" {path!r}; a module must be the folder itself ("") or one folder in it'
        )
    if "kwargs" in entry and not isinstance(entry["kwargs"], list):
        raise CheckpointError(f'{index}: entry {i} has "kwargs" {entry["kwargs"]!r}; it must be a list')
    return {**entry, "path": path}


def read_sentence_modules(teacher_folder: Path) -> Optional[SentenceModules]:
    """The sentence-transformers modules of a teacher folder; ``None`` where it has no
    ``modules.json`` or its pipeline does not start with a Transformer module."""
    folder = Path(teacher_folder)
    index = folder / MODULES_FILE
    if not index.is_file():
        return None
    entries = [_entry(index, i, e) for i, e in enumerate(_read_json(index, list, "a list of modules"))]
    if not entries or _class_name(entries[0]["type"]) != "Transformer":
        first = entries[0]["type"] if entries else "nothing"
        log.warning(
            "%s starts with %s, not a sentence-transformers Transformer: the student is written without "
            "sentence-transformers files",
            index,
            first,
        )
        return None
    transformer_config = {}
    config_file = folder / entries[0]["path"] / TRANSFORMER_CONFIG_FILE
    if config_file.is_file():
        transformer_config = _read_json(config_file, dict, "an object")
        length = transformer_config.get("max_seq_length")
        if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
            raise CheckpointError(f"{config_file}: max_seq_length must be a positive integer, got {length!r}")
    modules, dropped = [], []
    for entry in entries[1:]:
        name = _class_name(entry["type"])
        if name not in _WITHOUT_WEIGHTS:
            dropped.append(f"{entry['type']} ({entry['path'] or 'the folder root'})")
            continue
        if not entry["path"] or any(entry["path"] == kept["path"] for kept, _ in modules):
            raise CheckpointError(f"{index}: the {name} module needs a folder of its own, got {entry['path']!r}")
        module_config = folder / entry["path"] / "config.json"
        if name == "Pooling" and not module_config.is_file():
            raise CheckpointError(f"{index} names a Pooling module, but {module_config} does not exist")
        config = _read_json(module_config, dict, "an object") if module_config.is_file() else None
        modules.append((entry, config))
    if dropped:
        log.warning(
            "%s: the student's sentence-transformers folder leaves out %s: modules with weights trained on "
            "the teacher's embeddings, not the student's",
            index,
            ", ".join(dropped),
        )
    model_file = folder / MODEL_CONFIG_FILE
    model_config = _read_json(model_file, dict, "an object") if model_file.is_file() else None
    return SentenceModules(index, entries[0], transformer_config, tuple(modules), model_config)


def teacher_sentence_modules(teacher: Mapping) -> Optional[SentenceModules]:
    """The sentence-transformers modules of the teacher a recipe's ``teacher`` section loads
    (``hf_teacher``'s ``path``: a folder, or a Hub id's snapshot in the local cache); ``None``
    for a teacher without them or without a ``path`` (the smoke teacher)."""
    path = teacher.get("path")
    if not isinstance(path, str):
        return None
    return read_sentence_modules(resolve_checkpoint_dir(path, teacher.get("revision")))


def _dump(file: Path, value: Any) -> None:
    file.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def write_sentence_modules(
    modules: SentenceModules, folder: Path, hidden_size: int, max_positions: Optional[int]
) -> None:
    """Write ``modules`` into a student folder (one being filled by ``save_student``), with the
    student as the Transformer module at its root."""
    folder = Path(folder)
    transformer_config = dict(modules.transformer_config)
    lengths = [n for n in (transformer_config.get("max_seq_length"), max_positions) if n is not None]
    if lengths:
        transformer_config["max_seq_length"] = min(lengths)
    _dump(folder / TRANSFORMER_CONFIG_FILE, transformer_config)
    index = [{**modules.transformer, "idx": 0, "path": ""}]
    for entry, config in modules.modules:
        index.append({**entry, "idx": len(index)})
        (folder / entry["path"]).mkdir()
        if config is not None:
            if _class_name(entry["type"]) == "Pooling":
                widths = [k for k in _POOLING_WIDTH_KEYS if k in config] or [_POOLING_WIDTH_KEYS[0]]
                config = {**config, **{k: hidden_size for k in widths}}
            _dump(folder / entry["path"] / "config.json", config)
    _dump(folder / MODULES_FILE, index)
    if modules.model_config is not None:
        _dump(folder / MODEL_CONFIG_FILE, modules.model_config)
