"""Where a model folder comes from: a local folder, or a Hugging Face Hub id fetched into (or
read offline from) the local Hugging Face cache."""

import os
from pathlib import Path
from typing import Optional

import huggingface_hub
from huggingface_hub import constants

from components.errors import CheckpointError
from components.io import looks_like_local_path

# Files worth fetching from the Hub: config and tokenizer, then one format of weights.
HUB_PATTERNS = ["*.json", "*.txt", "*.model"]


def resolve_checkpoint_dir(path_or_id: str, revision: Optional[str] = None) -> Path:
    """A local folder as is, or a Hub model id: downloaded to the local Hugging Face cache, or
    read from that cache when offline (``HF_HUB_OFFLINE=1``) or when the Hub cannot be reached."""
    path = Path(os.path.expanduser(str(path_or_id)))
    if path.is_dir():
        return path
    text = str(path_or_id)
    if looks_like_local_path(text):
        raise CheckpointError(f"Checkpoint folder not found: {text}")
    if _hub_offline():
        return _cached_snapshot(text, revision, "HF_HUB_OFFLINE is set")
    try:
        files = huggingface_hub.list_repo_files(text, revision=revision)
        weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
        return Path(huggingface_hub.snapshot_download(text, revision=revision, allow_patterns=HUB_PATTERNS + weights))
    except Exception as e:  # no connection, unknown id, gated repo, ...: the cache may still hold it
        return _cached_snapshot(text, revision, f"{type(e).__name__}: {e}", cause=e)


def _hub_offline() -> bool:
    flags = (os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or any(f in {"1", "ON", "YES", "TRUE"} for f in flags)


def _cached_snapshot(repo_id: str, revision: Optional[str], why: str, cause: Optional[Exception] = None) -> Path:
    """The folder of ``repo_id`` in the local Hugging Face cache, without touching the network."""
    try:
        # only config and tokenizer patterns: weight_files says which weights are missing, if any
        folder = Path(
            huggingface_hub.snapshot_download(
                repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True
            )
        )
        if (folder / "config.json").is_file():
            return folder
        problem = f"the cached snapshot {folder} has no config.json"
    except Exception as e:
        problem = f"it is not in the local Hugging Face cache {constants.HF_HUB_CACHE} ({type(e).__name__})"
    raise CheckpointError(
        f"{repo_id!r} is not a local folder, and fetching it from the Hugging Face Hub failed ({why}); "
        f"{problem}. Download it once while online (e.g. `hf download {repo_id}`), or pass the path "
        "of a folder that holds it."
    ) from cause
