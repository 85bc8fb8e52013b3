"""What a run was trained on, recorded in every checkpoint so that a resume cannot silently
continue on other data or another teacher.

A fingerprint is a small JSON-able dict. For files: each file's name, size and SHA-256, the
hash taken over samples of a big file (its size plus ``SAMPLES`` evenly spaced 1 MiB blocks),
so fingerprinting a Wikipedia dump costs milliseconds, not minutes.
"""

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

BLOCK = 1 << 20
FULL_HASH_UP_TO = 64 * BLOCK  # files up to this size are hashed whole
SAMPLES = 16


def file_digest(path: os.PathLike) -> str:
    """SHA-256 of a file, or of its size and ``SAMPLES`` spread blocks when it is big."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_UP_TO:
            for block in iter(lambda: f.read(BLOCK), b""):
                digest.update(block)
            return digest.hexdigest()
        digest.update(f"sampled {size}".encode())
        for i in range(SAMPLES):
            f.seek((size - BLOCK) * i // (SAMPLES - 1))
            digest.update(f.read(BLOCK))
    return "sampled:" + digest.hexdigest()


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


def model_folder_fingerprint(folder: os.PathLike, weight_files: Sequence[os.PathLike]) -> Dict[str, Any]:
    """A model checkpoint folder: its ``config.json`` and weight files, plus the Hub revision
    when the folder is a snapshot in the Hugging Face cache (``.../snapshots/<commit>``)."""
    folder = Path(folder)
    files = [folder / "config.json", *weight_files] if (folder / "config.json").is_file() else list(weight_files)
    found = files_fingerprint(files, root=folder)
    if folder.parent.name == "snapshots":
        found["revision"] = folder.name
    return found
