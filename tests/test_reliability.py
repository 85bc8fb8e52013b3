"""Crash safety: kills, signals, damaged checkpoints, full disks; bad input; confined writes."""

import errno
import os
import pickle
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from components.checkpointing import CheckpointError, hf_teacher, load_student
from components.checkpointing.resume import list_checkpoints, load_checkpoint
from components.data import CorpusError, load_documents
from components.io import (
    atomic_directory,
    atomic_file,
    recover_interrupted_writes,
    set_write_root,
    UnsafePathError,
    write_root,
)
from tests.helpers import make_hf_teacher, REPO, tune_command
from tests.recipe_helpers import logged, run_recipe, tiny_config

STEPS = 60


def start(config_file: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        tune_command("distill_recursive", "--config", config_file, *overrides),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: int = 300):
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def wait_for_step(output_dir: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    metrics = output_dir / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            if any(f'"step": {step},' in line for line in lines):
                return
        assert process.poll() is None, f"the run ended before step {step}: {finish(process)}"
        time.sleep(0.005)
    raise AssertionError(f"step {step} never came")


@pytest.fixture(scope="module")
def run_config(tmp_path_factory, teacher_dir, corpus_file):
    folder = tmp_path_factory.mktemp("cfg")
    cfg = tiny_config(
        folder / "unused",
        teacher_dir,
        corpus_file,
        max_steps=STEPS,
        save_every_n_steps=4,
        eval_every_n_steps=20,
        **{"data.batch_size": 16, "data.max_length": 64, "data.stride": 32},
    )
    path = folder / "run.yaml"
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, run_config):
    out = tmp_path_factory.mktemp("straight") / "run"
    code, _, stderr = finish(start(run_config, f"output_dir={out}"))
    assert code == 0, stderr[-3000:]
    return out


def assert_same_run(a: Path, b: Path) -> None:
    first, second = logged(a), logged(b)
    assert sorted(first) == sorted(second) == list(range(1, STEPS + 1))
    for step in first:
        assert first[step].keys() == second[step].keys(), step
        for key, value in first[step].items():
            if key not in ("time", "tokens_per_second"):
                assert second[step][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)
    x, y = load_student(str(a / "student")), load_student(str(b / "student"))
    for (name, p), (_, q) in zip(x.state_dict().items(), y.state_dict().items()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7), name


@pytest.mark.slow  # tune run launches, killed from outside
def test_sigkill_at_a_random_step_then_resume(tmp_path, run_config, uninterrupted):
    # a random point in the first half: the second half is the margin a loaded machine's
    # polling needs to land the kill before the run ends (which would make the test vacuous)
    # after the first checkpoint (step 4): a run killed before it has nothing to resume from,
    # and resuming it is refused (test_resume_without_a_checkpoint_never_replaces_a_run)
    kill_at = random.Random().randint(5, STEPS // 2)
    out = tmp_path / "killed"
    process = start(run_config, f"output_dir={out}")
    wait_for_step(out, kill_at, process)
    process.send_signal(signal.SIGKILL)
    code, _, _ = finish(process)
    assert code == -signal.SIGKILL, f"killed at step {kill_at}"
    code, _, stderr = finish(start(run_config, f"output_dir={out}", "resume_from_checkpoint=True"))
    assert code == 0, f"killed at step {kill_at}: {stderr[-3000:]}"
    assert_same_run(uninterrupted, out)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.slow  # tune run launches, stopped from outside
def test_sigterm_stops_after_the_step_with_a_checkpoint(tmp_path, run_config, uninterrupted):
    out = tmp_path / "preempted"
    process = start(run_config, f"output_dir={out}")
    wait_for_step(out, 9, process)
    process.send_signal(signal.SIGTERM)
    code, _, stderr = finish(process)
    assert code == 128 + signal.SIGTERM
    assert "Stopped by SIGTERM after step" in stderr and "resume_from_checkpoint=True" in stderr
    stopped_at = int(stderr.split("after step ")[1].split()[0])
    assert list_checkpoints(out)[-1].name == f"step_{stopped_at:08d}"
    assert not (out / "student").exists()
    code, _, stderr = finish(start(run_config, f"output_dir={out}", "resume_from_checkpoint=True"))
    assert code == 0, stderr[-3000:]
    assert_same_run(uninterrupted, out)


def damage(path: Path, how: str) -> None:
    state = path / "state.pt"
    if how == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif how == "flipped byte":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
    elif how == "no meta.json":
        (path / "meta.json").unlink()


@pytest.fixture(scope="module")
def straight(tmp_path_factory, teacher_dir, corpus_file):
    """A 6-step run with checkpoints at steps 2, 4 and 6 (read only)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_recipe(tiny_config(out, teacher_dir, corpus_file, max_steps=6, save_every_n_steps=2, keep_last_n_checkpoints=3))
    return out


@pytest.mark.parametrize("how", ["truncated", "flipped byte", "no meta.json"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, teacher_dir, corpus_file, caplog, how, straight):
    out = tmp_path / "resumed"
    for name in ("step_00000002", "step_00000004"):
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        os.system(f"cp -r {straight / 'checkpoints' / name} {out / 'checkpoints' / name}")
    damage(out / "checkpoints" / "step_00000004", how)
    with caplog.at_level("WARNING"):
        recipe = run_recipe(
            tiny_config(out, teacher_dir, corpus_file, max_steps=6, save_every_n_steps=2, resume_from_checkpoint=True)
        )
    assert "Skipping checkpoint step_00000004" in caplog.text and "older checkpoint step_00000002" in caplog.text
    assert recipe.step == 6
    a, b = logged(straight), logged(out)
    for step in (3, 4, 5, 6):
        assert b[step]["loss/total"] == pytest.approx(a[step]["loss/total"], rel=1e-6)


def test_damaged_checkpoints_are_set_aside_not_pruned_over_good_ones(tmp_path, teacher_dir, corpus_file):
    out = tmp_path / "run"
    run_recipe(tiny_config(out, teacher_dir, corpus_file, max_steps=6, save_every_n_steps=2, keep_last_n_checkpoints=2))
    assert [p.name for p in list_checkpoints(out)] == ["step_00000004", "step_00000006"]
    damage(out / "checkpoints" / "step_00000006", "truncated")
    # resume from step 4 and go on to 8 keeping 1: the damaged step 6 must not outlive the good ones
    run_recipe(
        tiny_config(
            out,
            teacher_dir,
            corpus_file,
            max_steps=8,
            save_every_n_steps=2,
            keep_last_n_checkpoints=1,
            resume_from_checkpoint=True,
            **{"lr_schedule.warmup_steps": 1},
        )
    )
    assert [p.name for p in list_checkpoints(out)] == ["step_00000008"]
    assert (out / "checkpoints" / "damaged-step_00000006").is_dir()
    assert load_checkpoint(out / "checkpoints" / "step_00000008")["step"] == 8


def test_two_runs_cannot_share_an_output_dir(tmp_path, teacher_dir, corpus_file):
    from components.io import lock_output_dir, OutputDirBusy

    out = tmp_path / "run"
    out.mkdir()
    held = lock_output_dir(out)
    try:
        with pytest.raises(OutputDirBusy, match=f"in use by another run \\(process {os.getpid()}\\)"):
            run_recipe(tiny_config(out, teacher_dir, corpus_file, max_steps=2))
    finally:
        held.close()
    run_recipe(tiny_config(out, teacher_dir, corpus_file, max_steps=2))  # free again


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path, teacher_dir, corpus_file, distilled_run):
    out = tmp_path / "run"
    shutil.copytree(distilled_run, out)  # a finished run (its one checkpoint: the last step's)
    assert len(list_checkpoints(out)) == 1
    damage(list_checkpoints(out)[0], "truncated")
    with pytest.raises(CheckpointError, match="No usable checkpoint to resume from: .*truncated"):
        run_recipe(tiny_config(out, teacher_dir, corpus_file, max_steps=6, resume_from_checkpoint=True))


def test_resume_without_a_checkpoint_never_replaces_a_run(tmp_path, teacher_dir, corpus_file, distilled_run):
    """A finished run whose checkpoints are gone, or a run killed before its first checkpoint:
    resume_from_checkpoint=True refuses, names what it found, and leaves it all in place."""
    out = tmp_path / "run"
    shutil.copytree(distilled_run, out)  # a finished run
    shutil.rmtree(out / "checkpoints")
    metrics = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(
        CheckpointError,
        match=r"has no checkpoint to resume from while it holds a run's outputs "
        r"\(student/, metrics.jsonl, tensorboard/\)",
    ):
        run_recipe(tiny_config(out, teacher_dir, corpus_file, max_steps=6, resume_from_checkpoint=True))
    assert (out / "metrics.jsonl").read_bytes() == metrics and (out / "student" / "config.json").is_file()

    killed = tmp_path / "killed"  # as a run killed at step 2 of save_every_n_steps=4 leaves it
    killed.mkdir()
    (killed / "metrics.jsonl").write_text('{"step": 1, "loss/total": 9.0}\n')
    with pytest.raises(CheckpointError, match=r"holds a run's outputs \(metrics.jsonl\)"):
        run_recipe(tiny_config(killed, teacher_dir, corpus_file, max_steps=2, resume_from_checkpoint=True))

    fresh = tmp_path / "fresh"  # nothing there yet: resuming starts at step 0
    recipe = run_recipe(tiny_config(fresh, teacher_dir, corpus_file, max_steps=2, resume_from_checkpoint=True))
    assert recipe.step == 2


# what a full disk looks like from Python's own writes, and from torch.save's C++ writer
FULL_DISK = [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: No space left on device"),
]


@pytest.mark.parametrize("failure", FULL_DISK, ids=["OSError", "RuntimeError"])
def test_a_full_disk_at_checkpoint_time(tmp_path, teacher_dir, corpus_file, monkeypatch, failure):
    import components.checkpointing.resume as resume

    real_save, calls = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            real_save(obj, f, *args, **kwargs)  # half the bytes reach the disk, then it is full
            Path(f).write_bytes(Path(f).read_bytes()[:100])
            raise failure
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(resume.torch, "save", save)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"step 6 .*No space left on device.*step_00000003\) are intact"):
        run_recipe(tiny_config(out, teacher_dir, corpus_file))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003"]
    assert load_checkpoint(out / "checkpoints" / "step_00000003")["step"] == 3


def test_atomic_directory_keeps_the_old_contents_on_failure(tmp_path):
    folder = tmp_path / "student"
    with atomic_directory(folder) as tmp:
        (tmp / "model.safetensors").write_text("old")
    with pytest.raises(OSError):
        with atomic_directory(folder) as tmp:
            (tmp / "model.safetensors").write_text("new, half written")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (folder / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_interrupted_writes_are_recovered(tmp_path):
    (tmp_path / ".step_00000009.tmp-4194401").mkdir()
    (tmp_path / ".config.yaml.tmp-4194402").write_text("half")
    (tmp_path / ".student.old-4194403").mkdir()  # killed between the two renames of a replacement
    (tmp_path / ".student.old-4194403" / "config.json").write_text("{}")
    (tmp_path / "kept").mkdir()
    (tmp_path / ".kept.old-4194404").mkdir()
    notes = recover_interrupted_writes(tmp_path)
    assert len(notes) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "student"]
    assert (tmp_path / "student" / "config.json").is_file()


# ---------------------------------------------------------------- bad input: teachers
def test_teacher_folder_problems_are_named(tmp_path, tokenizer):
    def fresh(name):
        return make_hf_teacher(tmp_path / name, tokenizer, layers=2)

    bad_json = fresh("bad_json")
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"Could not read .*bad_json/config.json"):
        hf_teacher(str(bad_json))

    truncated = fresh("truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"Could not read weights from .*truncated/model.safetensors"):
        hf_teacher(str(truncated))

    no_tokenizer = fresh("no_tokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / f).unlink()
    with pytest.raises(CheckpointError, match=r"Could not load the tokenizer from .*no_tokenizer"):
        hf_teacher(str(no_tokenizer))

    wrong_shape = fresh("wrong_shape")
    config = (wrong_shape / "config.json").read_text().replace('"intermediate_size": 64', '"intermediate_size": 65')
    (wrong_shape / "config.json").write_text(config)
    with pytest.raises(
        CheckpointError,
        match=r"wrong_shape: layers.0.ffn_in.(weight|bias) has shape \(64(, 32)?,?\), config implies \(65(, 32)?,?\)",
    ):
        hf_teacher(str(wrong_shape))

    missing_layer = fresh("missing_layer")
    config = (missing_layer / "config.json").read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3')
    (missing_layer / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=r"missing \['layers.2.attention.key.bias'"):
        hf_teacher(str(missing_layer))


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


def test_pickled_code_in_a_teacher_is_never_run(tmp_path, tokenizer):
    folder = make_hf_teacher(tmp_path / "t", tokenizer, layers=2)
    (folder / "model.safetensors").unlink()
    _Exploit.marker = tmp_path / "pwned"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"bert.embeddings.word_embeddings.weight": _Exploit()}, f)
    with pytest.raises(CheckpointError, match="Could not read weights from .*pytorch_model.bin"):
        hf_teacher(str(folder))
    assert not _Exploit.marker.exists()


def test_remote_code_in_a_teacher_is_never_run(tmp_path, tokenizer):
    folder = make_hf_teacher(tmp_path / "t", tokenizer, layers=2)
    marker = tmp_path / "pwned"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (folder / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = (
        (folder / "config.json")
        .read_text()
        .replace(
            '"model_type": "bert"', '"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}'
        )
    )
    (folder / "config.json").write_text(config)
    with pytest.raises(CheckpointError):
        hf_teacher(str(folder))
    assert not marker.exists()


# ---------------------------------------------------------------- bad input: corpora
def test_corpus_that_is_not_utf8(tmp_path, caplog):
    (tmp_path / "a.txt").write_bytes(b"fine text\n\nmore fine text\n\nbroken \xff\xfe here\n")
    with pytest.raises(
        CorpusError, match=r"not valid UTF-8 at .*a.txt, line 5, column 8 \(byte 0xff\).*encoding_errors=replace"
    ):
        load_documents(str(tmp_path / "a.txt"))
    with caplog.at_level("WARNING"):
        docs = load_documents(str(tmp_path / "a.txt"), encoding_errors="replace")
    assert len(docs) == 3 and "\ufffd" in docs["text"][2]
    assert "1 documents of" in caplog.text and "replaced by U+FFFD" in caplog.text
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "bad \xff"}\n')
    with pytest.raises(CorpusError, match=r"not valid UTF-8 at .*b.jsonl, line 2, column 15 \(byte 0xff\): JSON"):
        load_documents(str(tmp_path / "b.jsonl"))


def test_empty_and_long_documents(tmp_path, tokenizer, caplog):
    from components.data import tokenize_windows

    long_doc = " ".join(f"word{i % 50} value" for i in range(400))
    (tmp_path / "c.txt").write_text(f"\n\n{long_doc}\n\n   \n\nshort one\n\n")
    with caplog.at_level("INFO"):
        docs = load_documents(str(tmp_path / "c.txt"), sample_by="line")
    assert docs["text"] == [long_doc, "short one"]
    assert "Dropped 6 empty documents of 8" in caplog.text
    windows = tokenize_windows(docs, tokenizer, max_length=32, stride=16)["input_ids"]
    assert len(windows) > 10 and all(len(w) <= 32 for w in windows)


# ---------------------------------------------------------------- writes stay in output_dir
def test_config_paths_cannot_write_outside_output_dir(tmp_path, teacher_dir, corpus_file):
    elsewhere = tmp_path / "elsewhere"
    cfg = tiny_config(tmp_path / "run", teacher_dir, corpus_file)
    cfg["teacher"] = {"_component_": "components.smoke.smoke_teacher", "assets_dir": str(elsewhere)}
    with pytest.raises(UnsafePathError, match=r"smoke assets to .*elsewhere: it is outside output_dir"):
        run_recipe(cfg)
    assert not elsewhere.exists()


def test_a_symlink_cannot_redirect_checkpoints(tmp_path):
    outside, run = tmp_path / "outside", tmp_path / "run"
    outside.mkdir()
    run.mkdir()
    (run / "checkpoints").symlink_to(outside)
    set_write_root(run)
    try:
        with pytest.raises(UnsafePathError, match="outside output_dir"):
            with atomic_directory(run / "checkpoints" / "step_00000001", "checkpoint"):
                pass
    finally:
        set_write_root(None)
    assert list(outside.iterdir()) == []


def test_write_root_lifts_for_a_block_and_comes_back(tmp_path):
    """A process that runs a recipe and writes its own files beside it (quality.py's results)."""
    run, results = tmp_path / "run", tmp_path / "results.json"
    run.mkdir()
    set_write_root(run)
    try:
        with write_root(None), atomic_file(results, "results") as f:
            f.write("{}")
        with pytest.raises(UnsafePathError, match="outside output_dir"):  # confined again
            with atomic_file(tmp_path / "other.json", "results") as f:
                f.write("{}")
    finally:
        set_write_root(None)
    assert results.read_text() == "{}" and not (tmp_path / "other.json").exists()


def test_old_format_bin_teachers_load(tmp_path, tokenizer):
    from safetensors.torch import load_file

    folder = make_hf_teacher(tmp_path / "t", tokenizer, layers=2)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert hf_teacher(str(folder)).spec.num_layers == 2


def test_a_tokenizer_without_pad_token_is_named(tmp_path, tokenizer):
    import json

    folder = make_hf_teacher(tmp_path / "t", tokenizer, layers=2)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["pad_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="the tokenizer has no pad token"):
        hf_teacher(str(folder))
