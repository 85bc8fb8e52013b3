"""The output_dir lock and the start-of-run recovery: filesystems without flock, planted
symlinks, leftovers of writers that still run (here or on another host), damaged checkpoints
set aside twice, meta.json of the wrong shape. Each test also checks that nothing already
written was lost or changed."""

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from components import io
from components.checkpointing.resume import list_checkpoints, load_checkpoint, load_latest_checkpoint, save_checkpoint
from components.errors import CheckpointError, LockingUnsupported, UnsafePathError, UserError
from components.io import atomic_directory, atomic_file, lock_output_dir, recover_interrupted_writes, set_write_root
from components.training.run import Run


@pytest.fixture(autouse=True)
def no_write_root():
    set_write_root(None)
    yield
    set_write_root(None)


@pytest.fixture
def live_pid():
    """The id of a process on this host that is running (and is not this one)."""
    process = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


def dead_pid() -> int:
    """The id of a process on this host that has exited."""
    process = subprocess.Popen([sys.executable, "-S", "-c", ""])
    process.wait()
    return process.pid


def state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((4,), float(step))}, "optimizer": {}}


def save(out: Path, *steps: int) -> None:
    for step in steps:
        save_checkpoint(out, step, state(step), keep_last=0)


def assert_loads(out: Path, step: int) -> None:
    loaded = load_checkpoint(out / "checkpoints" / f"step_{step:08d}")
    assert loaded["step"] == step and torch.equal(loaded["model"]["w"], state(step)["model"]["w"])


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (not following symlinks) and its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


# ---------------------------------------------------------------- 1: no flock on the filesystem
@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_a_filesystem_without_flock_is_a_clear_error(tmp_path, monkeypatch, code):
    out = tmp_path / "run"
    save(out, 2)
    before = snapshot(out)

    def no_flock(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(LockingUnsupported) as raised:
        lock_output_dir(out)
    message = str(raised.value)
    assert isinstance(raised.value, UserError) and isinstance(raised.value, OSError)
    assert f"output_dir {out}" in message and "does not support file locks" in message
    assert "-o flock" in message and "localflock" in message and "local disk" in message
    monkeypatch.undo()
    assert snapshot(out) == {".lock": b"", **before}  # nothing lost, nothing written but an empty .lock
    assert_loads(out, 2)
    lock_output_dir(out).close()  # and the folder is not left locked


# ---------------------------------------------------------------- 2: symlinks are never followed
def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    out = tmp_path / "run"
    save(out, 2)
    (out / ".lock").symlink_to(outside)
    with pytest.raises(UnsafePathError, match=r"\.lock is a symlink .*Remove the symlink"):
        lock_output_dir(out)
    assert outside.read_text() == "precious"

    (out / ".lock").unlink()
    (out / ".lock").symlink_to(tmp_path / "nowhere")  # dangling: opening must not create the target
    with pytest.raises(UnsafePathError, match="is a symlink"):
        lock_output_dir(out)
    assert not (tmp_path / "nowhere").exists()

    (out / ".lock").unlink()
    os.link(outside, out / ".lock")  # a hard link would let the pid overwrite the file too
    with pytest.raises(UnsafePathError, match="hard links"):
        lock_output_dir(out)
    assert outside.read_text() == "precious"
    assert_loads(out, 2)


def test_recovery_never_follows_or_restores_a_symlink(tmp_path, caplog):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("mine")
    (out / ".student.tmp-123").symlink_to(outside)  # would be rmtree'd through
    (out / f".export.old-{io._host()}-{dead_pid()}").symlink_to(outside)  # would be "restored" as export/
    (out / f".config.yaml.tmp-{dead_pid()}").symlink_to(outside / "keep.txt")
    links = sorted(p.name for p in out.iterdir() if p.is_symlink())
    with caplog.at_level("WARNING"):
        notes = recover_interrupted_writes(out)
    assert notes == []
    assert (outside / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in out.iterdir() if p.is_symlink()) == links
    assert not (out / "export").exists() and not (out / "student").exists()
    assert (out / "config.yaml").read_text() == "mine"
    assert caplog.text.count("it is a symlink") == 3


def test_an_atomic_write_does_not_write_through_a_planted_symlink(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    (out / f".config.yaml.tmp-{io._host()}-{os.getpid()}").symlink_to(outside)
    with atomic_file(out / "config.yaml") as f:
        f.write("new")
    assert outside.read_text() == "precious"
    assert (out / "config.yaml").read_text() == "new" and not (out / "config.yaml").is_symlink()
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


# ---------------------------------------------------------------- 3: only a gone writer's leftovers go
def test_leftovers_of_live_writers_and_other_hosts_stay(tmp_path, live_pid, caplog):
    host, dead = io._host(), dead_pid()
    out = tmp_path / "run"
    out.mkdir()

    def leftover(name: str, content: str = "half") -> None:
        (out / name).mkdir()
        (out / name / "file").write_text(content)

    kept = [
        f".a.tmp-{host}-{live_pid}",  # a live process here may still be writing
        f".b.tmp-{live_pid}",  # the older name form: this host's
        f".c.tmp-otherhost-{dead}",  # another host: its pid says nothing here
        f".d.tmp-node-7-{dead}",  # a host name with dashes
        f".student.old-otherhost-{dead}",  # killed between the renames on another host, maybe not
        f".h.old-{host}-{live_pid}",  # a live replacement between its two renames
    ]
    for name in kept:
        leftover(name)
    leftover(f".e.tmp-{host}-{dead}")
    leftover(f".f.tmp-{dead}")
    leftover(f".g.tmp-{host}-{os.getpid()}")  # ours, from a write that failed in this process
    leftover(f".export.old-{host}-{dead}", "the previous export")  # killed between the renames
    leftover("kept")
    leftover(f".kept.old-{dead}")
    before = {name: (out / name / "file").read_text() for name in kept + ["kept"]}

    with caplog.at_level("WARNING"):
        notes = recover_interrupted_writes(out)
    assert len(notes) == 5
    assert sorted(p.name for p in out.iterdir()) == sorted(kept + ["export", "kept"])
    assert {name: (out / name / "file").read_text() for name in kept + ["kept"]} == before
    assert (out / "export" / "file").read_text() == "the previous export"
    assert not (out / "student").exists()
    assert caplog.text.count(f"process {live_pid} on this host is still running") == 3
    assert "written on the host otherhost" in caplog.text and "written on the host node-7" in caplog.text


def test_a_writer_killed_mid_write_is_cleaned_up_only_once_it_is_gone(tmp_path):
    out = tmp_path / "run"
    with atomic_directory(out / "student") as tmp:
        assert tmp.name == f".student.tmp-{io._host()}-{os.getpid()}"
        (tmp / "weights").write_text("old")
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # a second writer that is killed inside its write
        try:
            with atomic_directory(out / "student") as tmp:
                (tmp / "weights").write_text("new, half written")
                os.write(ready_w, b"x")
                time.sleep(60)
        finally:
            os._exit(1)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"x"
    os.close(ready_r)
    unfinished = out / f".student.tmp-{io._host()}-{child}"
    try:
        assert recover_interrupted_writes(out) == []  # still running: its write stays
        assert (unfinished / "weights").read_text() == "new, half written"
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    assert recover_interrupted_writes(out) == [f"removed the unfinished write {unfinished}"]
    assert sorted(p.name for p in out.iterdir()) == ["student"]
    assert (out / "student" / "weights").read_text() == "old"


# ---------------------------------------------------------------- 4: set aside twice
def test_a_checkpoint_damaged_again_is_set_aside_under_a_free_name(tmp_path, caplog):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    for round, aside in enumerate(["damaged-step_00000004", "damaged-step_00000004.1", "damaged-step_00000004.2"]):
        save(out, 2, 4)
        (checkpoints / "step_00000004" / "state.pt").write_bytes(b"cut short " + bytes([round]))
        earlier = {p.name: snapshot(p) for p in checkpoints.glob("damaged-*")}
        damaged = snapshot(checkpoints / "step_00000004")
        with caplog.at_level("WARNING"):
            path, loaded = load_latest_checkpoint(out)
        assert path.name == "step_00000002" and loaded["step"] == 2
        assert f"Renamed the damaged checkpoint step_00000004 to {aside}" in caplog.text
        assert snapshot(checkpoints / aside) == damaged
        assert {name: snapshot(checkpoints / name) for name in earlier} == earlier  # none replaced
        assert [p.name for p in list_checkpoints(out)] == ["step_00000002"]
        assert_loads(out, 2)
    assert sorted(p.name for p in checkpoints.glob("damaged-*")) == [
        "damaged-step_00000004",
        "damaged-step_00000004.1",
        "damaged-step_00000004.2",
    ]
    found = Run._run_outputs(SimpleNamespace(output_dir=out, outputs=()))  # what a resume reports
    assert found == [f"checkpoints/damaged-step_00000004{s} (damaged)" for s in ("", ".1", ".2")]


# ---------------------------------------------------------------- 5: meta.json of the wrong shape
@pytest.mark.parametrize(
    "meta, named",
    [
        ("[]", "not an object"),
        ("3", "not an object"),
        ('"x"', "not an object"),
        ("null", "not an object"),
        ('{"step": 4, "bytes": "BYTES"}', '"bytes"'),
        ('{"step": 4, "bytes": true}', '"bytes"'),
        ('{"step": 4, "bytes": BYTES.0}', '"bytes"'),
        ('{"step": 4, "sha256": 5}', '"sha256"'),
        ('{"step": 4, "sha256": ["SHA"]}', '"sha256"'),
    ],
)
def test_a_meta_json_of_the_wrong_shape_is_damage(tmp_path, caplog, meta, named):
    out = tmp_path / "run"
    save(out, 2, 4)
    newest = out / "checkpoints" / "step_00000004"
    written = json.loads((newest / "meta.json").read_text())
    meta = meta.replace("BYTES", str(written["bytes"])).replace("SHA", written["sha256"])
    (newest / "meta.json").write_text(meta)
    with pytest.raises(CheckpointError, match=f"{newest / 'meta.json'} is damaged: .*{named}"):
        load_checkpoint(newest)
    with caplog.at_level("WARNING"):
        path, loaded = load_latest_checkpoint(out)
    assert path.name == "step_00000002" and loaded["step"] == 2
    assert_loads(out, 2)
    assert (out / "checkpoints" / "damaged-step_00000004" / "meta.json").read_text() == meta
