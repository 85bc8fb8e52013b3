"""Export settings against what a student trained for: a student trained quantisation-aware
(int4_weight, group size 16) exports at exactly those settings; another scheme or group size is
refused, naming both, before anything is written, unless ``requantize=true`` asks for
post-training re-quantisation. A plain fp32 student exports at any settings, as before."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from components.checkpointing import student_metadata
from components.errors import ConfigError
from tests.recipe_helpers import run_export as export
from tests.recipe_helpers import run_recipe, tiny_config

QAT = {"scheme": "int4_weight", "group_size": 16}


def contents(root: Path) -> dict:
    """Every file and folder under ``root`` with a SHA-256 of its bytes (None for folders)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return out


@pytest.fixture(scope="module")
def qat_student(tmp_path_factory, teacher_dir, corpus_file):
    """A student whose last 2 of 4 steps trained under int4_weight fake quantisation, groups of 16."""
    root = tmp_path_factory.mktemp("qat_int4")
    stages = [{"name": "distill", "steps": 2}, {"name": "qat", "fake_quantize": True}]
    run_recipe(
        tiny_config(
            root / "run",
            teacher_dir,
            corpus_file,
            max_steps=4,
            save_every_n_steps=None,
            stages=stages,
            quantization=QAT,
        )
    )
    folder = root / "run" / "student"
    assert student_metadata(str(folder))["quantization_aware"] == {**QAT, "steps": 2}
    return folder


@pytest.mark.parametrize(
    "asked, message",
    [
        (
            {"group_size": 32},
            r"group_size=32: the student in \S+ was trained quantisation-aware for int4_weight with "
            r"group_size=16 \(\S+config\.json: recursive_distill\.quantization_aware\), not for "
            r"int4_weight with group_size=32; .*Pass requantize=true",
        ),
        (
            {"scheme": "int4_weight", "group_size": 64},
            r"scheme=int4_weight, group_size=64: .*trained quantisation-aware "
            r"for int4_weight with group_size=16 .*not for int4_weight with group_size=64",
        ),
        (
            {"scheme": "int8_dynamic"},
            r"scheme=int8_dynamic: .*trained quantisation-aware for int4_weight with "
            r"group_size=16 .*not for int8_dynamic; .*Pass requantize=true",
        ),
    ],
)
def test_other_settings_than_qat_trained_for_are_refused_before_anything_is_written(
    qat_student, tmp_path, asked, message
):
    # an earlier export (overwrite=True would replace it) and a fresh folder: neither is touched
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "export.json").write_text(json.dumps({"scheme": "int4_weight", "group_size": 16}))
    (earlier / "model.onnx").write_bytes(b"\x08\x07earlier")
    before, student_before = contents(tmp_path), contents(qat_student)
    for out, overwrite in ((earlier, True), (tmp_path / "fresh", False)):
        with pytest.raises(ConfigError, match=message) as refused:
            export(qat_student, out, overwrite=overwrite, **asked)
        assert "\n" not in str(refused.value)
    assert contents(tmp_path) == before and not (tmp_path / "fresh").exists()
    assert contents(qat_student) == student_before


@pytest.mark.slow  # an export (torch.onnx, torch.export, ONNX Runtime's quantiser)
def test_requantize_true_exports_at_the_asked_settings_with_a_warning(qat_student, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="export_student"):
        report = export(qat_student, tmp_path / "g32", group_size=32, requantize=True)
    assert (report["scheme"], report["group_size"]) == ("int4_weight", 32)
    assert report["quantization_aware"] == {**QAT, "steps": 2}
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("int4_weight with group_size=16" in w and "int4_weight with group_size=32" in w for w in warned), warned


@pytest.mark.slow  # an export
def test_a_plain_student_exports_at_any_settings_without_a_word(qat_student, tmp_path, caplog):
    plain = tmp_path / "plain"  # the same weights, without the record of QAT
    shutil.copytree(qat_student, plain)
    config = json.loads((plain / "config.json").read_text())
    del config["recursive_distill"]
    (plain / "config.json").write_text(json.dumps(config))
    assert student_metadata(str(plain)) == {}
    with caplog.at_level("WARNING", logger="export_student"):
        report = export(plain, tmp_path / "w4", scheme="int4_weight", group_size=32)
    assert (report["scheme"], report["group_size"], report["quantization_aware"]) == ("int4_weight", 32, None)
    assert not [r for r in caplog.records if r.levelname == "WARNING" and r.name == "export_student"]


@pytest.mark.slow  # an export
def test_an_export_holds_its_output_dir_as_every_run_does(qat_student, tmp_path):
    """The output folder is locked while the export writes (components.training.run's rules):
    an export into a folder another run holds stops at once and writes nothing."""
    from components.errors import OutputDirBusy
    from components.io import lock_output_dir

    out = tmp_path / "busy"
    out.mkdir()
    held = lock_output_dir(out)  # another process's run, writing there
    try:
        with pytest.raises(OutputDirBusy, match="in use by another run"):
            export(qat_student, out)
        assert [p.name for p in out.iterdir()] == [".lock"]
    finally:
        held.close()
    export(qat_student, out)  # free again: the export takes it
    assert (out / "export.json").is_file() and (out / "model.onnx").is_file()
