"""A model folder's weight files: single or sharded, safetensors or ``.bin``, read lazily.

Folders come from strangers: a shard index may only name files inside its folder, ``.bin``
files load with ``weights_only=True`` (a pickled payload is refused, never run), and shapes come
from headers before any tensor is read.
"""

import functools
import json
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Dict, Iterator, List, Tuple

import torch
from safetensors import safe_open

from components.errors import CheckpointError

# Index files of sharded checkpoints, and what each shard is.
_FORMATS = (
    ("safetensors", "model.safetensors", "model.safetensors.index.json"),
    ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def weight_files(folder: Path) -> Tuple[str, list]:
    """("safetensors" | "bin", files) for a model folder, sharded or not."""
    return find_weights(folder)[:2]


def find_weights(folder: Path) -> Tuple[str, list, Path]:
    """(kind, files, what to name in messages: the single file or the shard index)."""
    for kind, single, index in _FORMATS:
        if (folder / single).is_file():
            return kind, [folder / single], folder / single
        if (folder / index).is_file():
            shards = _read_index(folder, folder / index)
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{folder / index} lists shards that are missing: {missing}")
            return kind, [folder / s for s in shards], folder / index
    raise CheckpointError(f"No weights in {folder}: expected model.safetensors, pytorch_model.bin, or a sharded index")


def _read_index(folder: Path, index: Path) -> List[str]:
    """The shard files a ``*.index.json`` names, each checked to stay inside ``folder``."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index} is not a readable JSON shard index: {e}") from e
    except (KeyError, TypeError):
        raise CheckpointError(f'{index} is not a shard index: it has no "weight_map"') from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f'{index}: "weight_map" must map weight names to shard files, got {type(weight_map).__name__}'
        )
    bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise CheckpointError(f'{index}: "weight_map" entry {bad[0]!r} names no shard file: {bad[1]!r}')
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        _check_shard_path(folder, index, shard)
    return shards


def _check_shard_path(folder: Path, index: Path, shard: str) -> None:
    """A shard must be a file of ``folder`` (or below): a stranger's index naming ``/etc/...``,
    ``../..`` or a link out of the folder would make us read (and report on) any file."""
    pure = PurePosixPath(shard)
    if (
        pure.is_absolute()
        or PureWindowsPath(shard).drive
        or PureWindowsPath(shard).root
        or ".." in pure.parts
        or "\0" in shard
    ):
        raise CheckpointError(f"{index} names a shard outside {folder}: {shard!r}; shards must be files in the folder")
    target = (folder / shard).resolve()
    roots = [folder.resolve()]
    # a Hub download: snapshots/<commit>/ holds links into the repository's blobs/
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        roots.append((folder.parent.parent / "blobs").resolve())
    if not any(target == root or root in target.parents for root in roots):
        raise CheckpointError(
            f"{index} names a shard outside {folder}: {shard!r} resolves to {target}; shards must be files in the folder"
        )


def _read_bin(file: Path) -> Dict[str, torch.Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        # files saved before torch 1.6 (common for BioBERT-era checkpoints) cannot be mapped
        return torch.load(file, map_location="cpu", weights_only=True)


def _lazy_tensors(folder: Path) -> Iterator[Tuple[str, Tuple[int, ...], Callable[[], torch.Tensor]]]:
    """(name, shape, read) for every tensor of a checkpoint; ``read()`` loads that one tensor
    (call it before advancing). safetensors shapes come from the file header and tensors are read
    one at a time; .bin files are memory-mapped (files saved before torch 1.6 cannot be, and load
    whole)."""
    kind, files = weight_files(folder)
    for file in files:
        try:
            if kind == "safetensors":
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        yield name, tuple(f.get_slice(name).get_shape()), functools.partial(f.get_tensor, name)
            else:
                for name, tensor in _read_bin(file).items():
                    if not isinstance(tensor, torch.Tensor):
                        raise TypeError(f"{name} is a {type(tensor).__name__}, not a tensor")
                    yield name, tuple(tensor.shape), functools.partial(lambda t: t, tensor)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"Could not read weights from {file}: {e}") from e


def weight_shapes(folder: Path) -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of every tensor of a checkpoint, without reading the tensors."""
    return {name: shape for name, shape, _ in _lazy_tensors(folder)}


def iter_weights(folder: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a checkpoint, one tensor at a time."""
    for name, _, read in _lazy_tensors(folder):
        try:
            tensor = read()
        except Exception as e:
            raise CheckpointError(f"Could not read {name} from the weights in {folder}: {e}") from e
        yield name, tensor
