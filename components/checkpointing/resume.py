"""Resume checkpoints: ``<output_dir>/checkpoints/step_XXXXXXXX/`` with everything a run needs
to continue exactly (model and loss weights, optimizer, schedule, data position, RNG).

Each checkpoint folder is written atomically (see ``io.atomic_directory``): ``state.pt``, then
``meta.json`` with its size and SHA-256. On resume a checkpoint is used only if its
``meta.json`` reads, the size and checksum match, and ``torch.load(weights_only=True)``
succeeds; otherwise it is reported and the previous one is tried.
"""

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from components.errors import CheckpointError
from components.io import atomic_directory

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{8})$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
REQUIRED_KEYS = ("step", "model", "optimizer")


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"step_{step:08d}"


def list_checkpoints(output_dir: Path) -> List[Path]:
    """Checkpoint folders, oldest first (complete or not: see ``load_latest_checkpoint``)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(output_dir: Path, step: int, state: Dict[str, Any], keep_last: int = 2) -> Path:
    """Write the state for ``step`` and keep only the newest ``keep_last`` checkpoints.

    Raises ``CheckpointError`` if the write fails (a full disk, say); the checkpoints
    already on disk are left as they were.
    """
    final = checkpoint_path(output_dir, step)
    try:
        with atomic_directory(final, "checkpoint") as tmp:
            torch.save(state, tmp / "state.pt")
            meta = {"step": step, "bytes": (tmp / "state.pt").stat().st_size, "sha256": _sha256(tmp / "state.pt")}
            (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
    except Exception as e:  # a full disk is an OSError from Python, a RuntimeError from torch.save
        previous = [p.name for p in list_checkpoints(output_dir)]
        kept = (
            f"the existing checkpoints ({', '.join(previous)}) are intact"
            if previous
            else "no checkpoint was written yet"
        )
        raise CheckpointError(
            f"Could not write the checkpoint of step {step} to {final}: {e}. Nothing was changed: {kept}"
        ) from e
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """The state of one checkpoint, verified; raises ``CheckpointError`` naming the problem."""
    path = Path(path)
    meta_file = path / "meta.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is incomplete: meta.json is missing or unreadable ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{meta_file} is damaged: it holds {type(meta).__name__} {str(meta)[:40]!r}, not an object"
        )
    written = meta.get("bytes")
    if "bytes" in meta and (not isinstance(written, int) or isinstance(written, bool) or written < 0):
        raise CheckpointError(f'{meta_file} is damaged: its "bytes" is {written!r}, not a size')
    if "sha256" in meta and not (isinstance(meta["sha256"], str) and SHA256.match(meta["sha256"])):
        raise CheckpointError(f'{meta_file} is damaged: its "sha256" is {str(meta["sha256"])[:80]!r}, not a SHA-256')
    state_file = path / "state.pt"
    if not state_file.is_file():
        raise CheckpointError(f"{path} is incomplete: state.pt is missing")
    size = state_file.stat().st_size
    if "bytes" in meta and size != written:
        raise CheckpointError(f"{state_file} is truncated or damaged: {size} bytes, {written} written")
    if "sha256" in meta and _sha256(state_file) != meta["sha256"]:
        raise CheckpointError(f"{state_file} is damaged: its SHA-256 differs from the one written")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{state_file} could not be loaded: {type(e).__name__}: {e}") from e
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{state_file} lacks {missing}")
    return state


def _set_aside(bad: Path) -> None:
    """Rename a damaged checkpoint to the first free ``damaged-`` name; never onto an earlier one."""
    aside = bad.with_name("damaged-" + bad.name)
    n = 0
    while os.path.lexists(aside):
        n += 1
        aside = bad.with_name(f"damaged-{bad.name}.{n}")
    try:
        os.rename(bad, aside)
    except OSError as e:  # left as step_X it would count as a checkpoint when good ones are pruned
        raise CheckpointError(
            f"Could not rename the damaged checkpoint {bad} to {aside.name} ({e}); move it away and resume again"
        ) from e
    log.warning("Renamed the damaged checkpoint %s to %s", bad.name, aside.name)


def load_latest_checkpoint(output_dir: Path) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """(path, state) of the newest checkpoint that verifies and loads. Damaged ones are
    reported and renamed ``damaged-step_XXXXXXXX`` (``damaged-step_XXXXXXXX.1``, ``.2``... when
    that name is taken by one set aside before; kept for inspection, never loaded or counted
    when old checkpoints are pruned), and the one before is tried. ``None`` if there
    are no checkpoints at all; an error if none is usable (so none is overwritten by a fresh
    start)."""
    problems, damaged = [], []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            log.warning("Skipping checkpoint %s: %s", path.name, e)
            problems.append(str(e))
            damaged.append(path)
            continue
        if problems:
            log.warning("Resuming from the older checkpoint %s instead", path.name)
            for bad in damaged:
                _set_aside(bad)
        return path, state
    if problems:
        raise CheckpointError("No usable checkpoint to resume from: " + "; ".join(problems))
    return None
