"""What a run was trained on, recorded in every checkpoint so that a resume cannot silently
continue on other data or another teacher; and the content keys of the caches built from it.

A fingerprint is a small JSON-able dict. For files: each file's name, size and SHA-256 of its
whole content. Hashing is paid once per version of a file: the digest is cached under
``cache_root`` by the file's (device, inode, size, mtime, ctime). ctime is set by the
kernel on every write and cannot be set back, so a file rewritten in place with its old mtime
restored (``cp -p``, ``rsync -t``, ``touch -d``) gets a new key and is hashed again. SHA-256
runs at about 1.7 GB/s on one core with SHA instructions (x86 SHA-NI, ARMv8 SHA2) and about
0.5 GB/s without: seconds per GB, once.
"""

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

BLOCK = 1 << 20
RACY_NS = 2 * 10**9  # files changed this recently are hashed again each time


def cache_root() -> Path:
    """Where this library keeps what it derives from inputs (token stores, file digests):
    ``$RECURSIVE_DISTILL_CACHE``, else ``recursive_distill/`` inside the ``datasets`` cache."""
    if os.environ.get("RECURSIVE_DISTILL_CACHE"):
        return Path(os.environ["RECURSIVE_DISTILL_CACHE"]).expanduser()
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "recursive_distill"


def file_digest(path: os.PathLike) -> str:
    """SHA-256 of a file's whole content, cached per version of the file (see the module
    docstring); a cache that cannot be written only costs hashing again next time."""
    stat = os.stat(path)
    key = f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
    record = cache_root() / "digests" / hashlib.sha256(key.encode()).hexdigest()[:32]
    try:
        cached = json.loads(record.read_text())
        if cached.get("key") == key:
            return cached["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
    # Not cached: a file written while we read it, or so recently that another write could still
    # fall into the same tick of the kernel's coarse clock and leave ctime as it is ("racy git").
    if os.stat(path).st_ctime_ns != stat.st_ctime_ns or time.time_ns() - stat.st_ctime_ns < RACY_NS:
        return digest.hexdigest()
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{record.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "sha256": digest.hexdigest()}))
        os.replace(tmp, record)
    except OSError:
        pass
    return digest.hexdigest()


def files_fingerprint(files: Sequence[os.PathLike], root: Optional[os.PathLike] = None) -> Dict[str, Any]:
    """``{"files": [{name, bytes, sha256}, ...]}``; names relative to ``root`` when given."""
    entries = []
    for file in files:
        file = Path(file)
        name = str(file.relative_to(root)) if root is not None else str(file)
        entries.append({"name": name, "bytes": file.stat().st_size, "sha256": file_digest(file)})
    return {"files": entries}


def fingerprint_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    """Human-readable differences between two fingerprints (empty when they agree)."""
    if old == new:
        return []
    if "files" in old and "files" in new:
        before = {e["name"]: e for e in old["files"]}
        after = {e["name"]: e for e in new["files"]}
        found = [f"{name} is gone" for name in before if name not in after]
        found += [f"{name} is new" for name in after if name not in before]
        for name in before.keys() & after.keys():
            a, b = before[name], after[name]
            if a["bytes"] != b["bytes"]:
                found.append(f"{name} changed size ({a['bytes']} -> {b['bytes']} bytes)")
            elif a["sha256"] != b["sha256"]:
                found.append(f"{name} changed content")
        rest = {k: v for k, v in old.items() if k != "files"}, {k: v for k, v in new.items() if k != "files"}
        if rest[0] != rest[1]:
            found.append(f"{rest[0]} -> {rest[1]}")
        return sorted(found) or ["the file order changed"]
    return [f"{dict(old)} -> {dict(new)}"]


# Any one of these gives a tokenizer its vocabulary
VOCABULARY_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tokenizer.model",
)
# Everything that decides how a model folder's tokenizer cuts text
TOKENIZER_FILES = VOCABULARY_FILES + (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
)


def model_folder_fingerprint(folder: os.PathLike, weight_files: Sequence[os.PathLike]) -> Dict[str, Any]:
    """A model checkpoint folder: its ``config.json``, weight files and tokenizer files (a changed
    tokenizer cuts the corpus into other windows), plus the Hub revision when the folder is a
    snapshot in the Hugging Face cache (``.../snapshots/<commit>``)."""
    folder = Path(folder)
    tokenizer = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    config = [folder / "config.json"] if (folder / "config.json").is_file() else []
    found = files_fingerprint([*config, *weight_files, *tokenizer], root=folder)
    if folder.parent.name == "snapshots":
        found["revision"] = folder.name
    return found
