"""Resume checkpoints: ``<output_dir>/checkpoints/step_XXXXXXXX/`` with everything a run needs
to continue exactly (model and loss weights, optimizer, schedule, data position, RNG).

Each checkpoint folder is written atomically (see ``io.atomic_directory``) with ``state.pt``
and, last, ``meta.json``; a folder without a readable ``meta.json`` is incomplete and skipped.
State is loaded with ``torch.load(weights_only=True)``: tensors and plain containers only.
"""

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from components.checkpointing.io import atomic_directory

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> List[Path]:
    """Checkpoint folders that look complete, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and (path / "meta.json").is_file() and (path / "state.pt").is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def save_checkpoint(output_dir: Path, step: int, state: Dict[str, Any], keep_last: int = 2) -> Path:
    """Write the state for ``step`` and keep only the newest ``keep_last`` checkpoints."""
    final = checkpoints_dir(output_dir) / f"step_{step:08d}"
    with atomic_directory(final) as tmp:
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step}) + "\n")
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> Dict[str, Any]:
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)


def load_latest_checkpoint(output_dir: Path) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """(path, state) of the newest checkpoint that loads; unreadable ones are reported and
    skipped, so a checkpoint damaged by a crash falls back to the one before it."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            return path, load_checkpoint(path)
        except Exception as e:
            log.warning("Skipping unreadable checkpoint %s: %s: %s", path, type(e).__name__, e)
    return None
