"""Crash-safe writes: a file or folder appears complete under its final name, or not at all.

A run also confines its writes: once :func:`set_write_root` names the run's ``output_dir``,
every write made through this module (checkpoints, the student, smoke assets, logs) must land
inside it, so no path in a config can make a recipe write elsewhere.
"""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from components.errors import OutputDirBusy, UnsafePathError

_write_root: Optional[Path] = None


def looks_like_local_path(text: str) -> bool:
    """Whether a string names a local path rather than a Hub id like "org/name"."""
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or os.path.exists(os.path.expanduser(text))


def set_write_root(root: Optional[os.PathLike]) -> None:
    """Confine this process's writes to ``root`` (``None`` lifts the restriction)."""
    global _write_root
    _write_root = Path(root).resolve() if root is not None else None


def check_write_path(path: os.PathLike, what: str = "output") -> Path:
    """``path`` resolved, if it lies inside the write root; else :class:`UnsafePathError`."""
    resolved = Path(path).resolve()
    if _write_root is not None and resolved != _write_root and _write_root not in resolved.parents:
        raise UnsafePathError(f"Refusing to write the {what} to {path}: it is outside output_dir {_write_root}")
    return resolved


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and the folders holding them to disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def _old_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.old-{os.getpid()}")


@contextmanager
def atomic_directory(final: os.PathLike, what: str = "folder") -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``final``.

    The files are fsynced before the rename, so after a crash ``final`` holds either the old
    complete contents or the new complete contents (a crash between the two renames of a
    replacement leaves the old contents under a hidden name, which
    :func:`recover_interrupted_writes` puts back). On any error the temporary folder is removed
    and ``final`` is left as it was.
    """
    final = check_write_path(final, what)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if final.exists():
            old = _old_name(final)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync(final.parent)  # the renames are durable before the old copy goes
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(final: os.PathLike, what: str = "file", mode: str = "w") -> Iterator:
    """Open a temporary sibling of ``final`` for writing; on success it replaces ``final``."""
    final = check_write_path(final, what)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def lock_output_dir(folder: os.PathLike):
    """Hold an exclusive lock on ``folder/.lock`` for this process's lifetime (keep the returned
    file open), so two runs never write, clean up or resume in one output_dir at once."""
    import fcntl

    path = Path(folder) / ".lock"
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise OutputDirBusy(f"output_dir {folder} is in use by another run (process {owner})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def recover_interrupted_writes(folder: os.PathLike) -> list:
    """Clean up after a process killed inside :func:`atomic_directory` / :func:`atomic_file`.

    Temporary ``.NAME.tmp-PID`` leftovers are deleted; an ``.NAME.old-PID`` whose ``NAME`` is
    missing (killed between the two renames) is renamed back. Returns what was done.
    """
    folder = Path(folder)
    done = []
    if not folder.is_dir():
        return done
    for path in sorted(folder.iterdir()):
        name = path.name
        if not name.startswith("."):
            continue
        if ".tmp-" in name:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            done.append(f"removed the unfinished write {path}")
        elif ".old-" in name:
            original = folder / name[1:].rsplit(".old-", 1)[0]
            if original.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                done.append(f"removed the replaced copy {path}")
            else:
                os.rename(path, original)
                done.append(f"restored {original} from {path}")
    return done
