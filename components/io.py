"""Crash-safe writes: a file or folder appears complete under its final name, or not at all.

A run also confines its writes: once ``set_write_root`` names the run's ``output_dir``,
every write made through this module (checkpoints, the student, smoke assets, logs) must land
inside it, so no path in a config can make a recipe write elsewhere.
"""

import errno
import fcntl
import logging
import os
import re
import shutil
import socket
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from components.errors import LockingUnsupported, OutputDirBusy, UnsafePathError

log = logging.getLogger(__name__)
_write_root: Optional[Path] = None
# flock's answer on a filesystem that has no locks (Lustre without -o flock, some NFS setups)
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
# ".NAME.tmp-HOST-PID" / ".NAME.old-HOST-PID"; the older ".NAME.tmp-PID" form means this host.
# HOST never holds a dot (see _host), so the last ".tmp-"/".old-" is the one we wrote.
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<host>[A-Za-z0-9_-]+)-)?(?P<pid>\d+)$")


def looks_like_local_path(text: str) -> bool:
    """Whether a string names a local path rather than a Hub id like "org/name"."""
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or os.path.exists(os.path.expanduser(text))


def set_write_root(root: Optional[os.PathLike]) -> None:
    """Confine this process's writes to ``root`` (``None`` lifts the restriction)."""
    global _write_root
    _write_root = Path(root).resolve() if root is not None else None


@contextmanager
def write_root(root: Optional[os.PathLike]) -> Iterator[None]:
    """Inside the block writes are confined to ``root`` (``None``: anywhere); then the previous
    confinement returns. For a process that runs recipes and writes its own files beside them
    (a benchmark's results)."""
    previous = _write_root
    set_write_root(root)
    try:
        yield
    finally:
        set_write_root(previous)


def check_write_path(path: os.PathLike, what: str = "output") -> Path:
    """``path`` resolved, if it lies inside the write root; else ``UnsafePathError``."""
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


def _host() -> str:
    """This host's name as it appears in temporary names: dots and anything unusual become "_"."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "localhost"


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{_host()}-{os.getpid()}")


def _old_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.old-{_host()}-{os.getpid()}")


def _remove(path: Path) -> None:
    """Delete a file, folder or symlink; a symlink goes, never what it points at."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


@contextmanager
def atomic_directory(final: os.PathLike, what: str = "folder") -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``final``.

    The files are fsynced before the rename, so after a crash ``final`` holds either the old
    complete contents or the new complete contents (a crash between the two renames of a
    replacement leaves the old contents under a hidden name, which
    ``recover_interrupted_writes`` puts back). On any error the temporary folder is removed
    and ``final`` is left as it was.
    """
    final = check_write_path(final, what)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    _remove(tmp)  # left by an earlier failure of this process id (a container restart reuses it)
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
            _remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(final: os.PathLike, what: str = "file", mode: str = "w") -> Iterator:
    """Open a temporary sibling of ``final`` for writing; on success it replaces ``final``."""
    final = check_write_path(final, what)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    _remove(tmp)
    try:
        # O_EXCL: a symlink planted under the temporary name is refused, never written through
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
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
    file open), so two runs never write, clean up or resume in one output_dir at once.

    ``.lock`` is opened without following a symlink and must be a plain file with one name:
    the process id written into it must not land in a file elsewhere.
    """
    path = Path(folder) / ".lock"
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError:
        if path.is_symlink():
            raise UnsafePathError(
                f"{path} is a symlink (to {os.readlink(path)}); the lock file must be a plain file in output_dir "
                f"{folder}. Remove the symlink and run again"
            ) from None
        raise
    handle = os.fdopen(fd, "r+", encoding="utf-8")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
            what = "is not a plain file" if not stat.S_ISREG(info.st_mode) else "has other names (hard links)"
            raise UnsafePathError(
                f"{path} {what}; the lock file must be a plain file of its own. Remove it and run again"
            )
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise OutputDirBusy(f"output_dir {folder} is in use by another run (process {owner})") from None
    except OSError as e:
        handle.close()
        if e.errno not in _NO_FLOCK:
            raise
        raise LockingUnsupported(
            f"Cannot lock output_dir {folder}: its filesystem does not support file locks (flock: "
            f"{os.strerror(e.errno)}). The lock is what keeps two runs from writing, cleaning up or resuming in one "
            "folder at once. Put output_dir on a local disk or a filesystem with locking (Lustre mounted with "
            "-o flock, or -o localflock when only one node writes there; NFS mounted without -o nolock, with its lock "
            "service running)"
        ) from None
    except BaseException:
        handle.close()
        raise
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _why_kept(host: Optional[str], pid: int) -> Optional[str]:
    """Why the process that wrote a leftover may still be writing it; ``None`` if it is gone."""
    if host is not None and host != _host():
        return f"it was written on the host {host}, where its writer may still run"
    if pid == os.getpid():
        return None  # ours, from a write that failed earlier: recovery runs before this process writes
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # it exists, under another user
    return f"process {pid} on this host is still running and may be writing it"


def recover_interrupted_writes(folder: os.PathLike) -> list:
    """Clean up after a process killed inside ``atomic_directory`` / ``atomic_file``.

    A temporary ``.NAME.tmp-HOST-PID`` leftover is deleted; an ``.NAME.old-HOST-PID`` whose
    ``NAME`` is missing (killed between the two renames) is renamed back, otherwise deleted.
    Only leftovers whose writer is gone are touched: written on this host by a process that no
    longer runs (or by this one, before it writes anything). A leftover from another host or a
    live process, and any symlink, is left in place and logged. Returns what was done.
    """
    folder = Path(folder)
    done = []
    if not folder.is_dir():
        return done
    for path in sorted(folder.iterdir()):
        match = _LEFTOVER.match(path.name)
        if not match:
            continue
        if path.is_symlink():
            log.warning("Left %s alone: it is a symlink, which no write of ours leaves; remove it yourself", path)
            continue
        reason = _why_kept(match["host"], int(match["pid"]))
        if reason is not None:
            log.warning("Left %s in place: %s. Delete it yourself once that run is over", path, reason)
            continue
        if match["kind"] == "tmp":
            _remove(path)
            done.append(f"removed the unfinished write {path}")
            continue
        original = folder / match["name"]
        if os.path.lexists(original):
            _remove(path)
            done.append(f"removed the replaced copy {path}")
        else:
            os.rename(path, original)
            done.append(f"restored {original} from {path}")
    return done
