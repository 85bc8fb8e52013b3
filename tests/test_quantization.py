"""Quantisation: the numerics against ONNX Runtime, QAT stages, resume, and the export recipe."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort  # the README's install has it: no skip, a missing one is a broken install
import pytest
import torch

from components.checkpointing import load_student, student_metadata
from components.errors import CheckpointError, ConfigError, ExportError, MissingDependencyError
from components.models import recursive_tiny
from components.quantization import convert_qat, get_scheme, prepare_qat, set_fake_quantize
from components.quantization.schemes import (
    activation_qparams,
    dequantize_weight,
    fake_quantize_activation,
    fake_quantize_weight,
    group_for,
    quantize_weight,
    round_activation,
    SCHEMES,
)
from tests.recipe_helpers import logged, run_recipe, tiny_config

REPO = Path(__file__).resolve().parents[1]
QAT_STAGES = [{"name": "distill", "steps": 3}, {"name": "qat", "fake_quantize": True}]


# ------------------------------------------------------------------ numerics
def test_weight_integers_by_hand():
    w = torch.tensor([[0.5, -1.27, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0]])
    q, scale = quantize_weight(w, bits=8)
    assert scale[0, 0] == pytest.approx(1.27 / 127) and scale[1, 0] == 1.0  # an all-zero row: scale 1
    assert q[0].tolist() == [50, -127, 0, 30] and q[1].tolist() == [0, 0, 0, 0]
    # int4 in groups of 2: absmax / 7 per group, values in [-7, 7]
    q4, scale4 = quantize_weight(torch.tensor([[1.75, -0.875, 0.5, -3.5]]), bits=4, group_size=2)
    assert scale4.tolist() == [[0.25, 0.5]]
    assert q4.tolist() == [[7, -4, 1, -7]]  # -3.5 rounds half to even: -4
    assert dequantize_weight(q4, scale4).tolist() == [[1.75, -1.0, 0.5, -3.5]]
    # a layer whose inputs the group does not divide takes its largest power-of-two divisor
    assert group_for(768, 32) == 32 and group_for(48, 32) == 16 and group_for(16, 32) == 16 and group_for(72, 64) == 8
    assert quantize_weight(torch.randn(4, 48), bits=4, group_size=32)[1].shape == (4, 3)


def _dynamic_quantize_linear(x: torch.Tensor):
    """(y, scale, zero_point) of ONNX Runtime's DynamicQuantizeLinear on ``x``."""
    from onnx import helper, TensorProto

    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "scale", "zero_point"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [
            helper.make_tensor_value_info("y", TensorProto.UINT8, list(x.shape)),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("zero_point", TensorProto.UINT8, []),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy()})


@pytest.mark.parametrize("shift", [0.0, 3.0, -3.0])
def test_activation_rounding_is_onnx_runtimes_dynamic_quantize_linear(shift):
    x = torch.randn(4, 33, 16) + shift
    x[0, 0, 0] = 12.0  # an outlier, as BERT activations have
    y, scale, zero_point = _dynamic_quantize_linear(x)
    ours_scale, ours_zero_point = activation_qparams(x)
    assert float(scale) == pytest.approx(float(ours_scale), rel=1e-6)
    assert int(zero_point) == int(ours_zero_point)
    dequantized = (y.astype(np.float32) - float(zero_point)) * float(scale)
    assert np.abs(dequantized - round_activation(x).numpy()).max() <= 1e-6


def test_fake_quantised_linear_is_onnx_runtimes_int8_linear(tmp_path):
    """One Linear through quantize_dynamic (ORT's own weight integers, reduced range) against our
    fake quantisation: the same up to float summation order, on CPUs with and without VNNI."""
    from onnxruntime.quantization import quantize_dynamic, QuantType

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 160)
    x = torch.randn(3, 17, 96)
    x[1, 2, 3] = 9.0
    torch.onnx.export(linear, (x,), str(tmp_path / "f.onnx"), dynamo=True, opset_version=21, external_data=False)
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), op_types_to_quantize=["MatMul"],
                     per_channel=True, reduce_range=True, weight_type=QuantType.QInt8)
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        qmax = SCHEMES["int8_dynamic"].weight_qmax
        simulated = torch.nn.functional.linear(fake_quantize_activation(x), fake_quantize_weight(linear.weight, 8, qmax=qmax), linear.bias)
        exact = linear(x)
    assert np.abs(y - simulated.numpy()).max() <= 1e-5
    assert np.abs(y - exact.numpy()).max() > 1e-3  # the check above is not trivially true


def test_fake_quantisation_passes_gradients_straight_through():
    w = torch.randn(8, 16, requires_grad=True)
    x = torch.randn(4, 16, requires_grad=True)
    (fake_quantize_weight(w, 8) * 2).sum().backward()
    (fake_quantize_activation(x) * 3).sum().backward()
    assert torch.equal(w.grad, torch.full_like(w, 2.0)) and torch.equal(x.grad, torch.full_like(x, 3.0))


# ------------------------------------------------------------------ QAT modules and stages
def test_prepare_keeps_weights_and_names_and_stages_switch_it():
    torch.manual_seed(0)
    student = recursive_tiny(vocab_size=300, dropout=0.0, attention_dropout=0.0).eval()
    ids = torch.randint(5, 300, (2, 16))
    before, names = student(ids).logits, list(student.state_dict())
    prepare_qat(student, get_scheme("int8_dynamic"))
    assert list(student.state_dict()) == names
    assert torch.equal(student(ids).logits, before)  # prepared, fake quantisation off
    set_fake_quantize(student, True)
    on = student(ids).logits
    assert (on - before).abs().max() > 1e-3  # a QAT stage changes the forward outputs
    set_fake_quantize(student, False)
    assert torch.equal(student(ids).logits, before)
    convert_qat(student)
    assert not any("FakeQuantized" in type(m).__name__ for m in student.modules())
    assert torch.equal(student(ids).logits, before)


def test_group_size_that_does_not_divide_a_layer_is_a_config_error(tmp_path, teacher_dir, corpus_file):
    # the FFN's output layer has 72 inputs: its largest power-of-two group is 8
    cfg = tiny_config(tmp_path / "run", teacher_dir, corpus_file, stages=QAT_STAGES,
                      quantization={"scheme": "int4_weight", "group_size": 64}, **{"student.intermediate_size": 72})
    with pytest.raises(ConfigError, match=r"quantization: .*group_size=64: the inputs of \['layer.ffn_out'\] have no"):
        run_recipe(cfg)


def test_qat_from_the_start_still_learns(tmp_path, teacher_dir, corpus_file):
    out = tmp_path / "run"
    stages = [{"name": "qat", "fake_quantize": True}]
    run_recipe(tiny_config(out, teacher_dir, corpus_file, max_steps=24, save_every_n_steps=None, stages=stages,
                           **{"optimizer.lr": 3e-3}))
    records = logged(out)
    early = sum(records[s]["loss/total"] for s in (1, 2, 3)) / 3
    late = sum(records[s]["loss/total"] for s in (22, 23, 24)) / 3
    assert late < 0.8 * early
    meta = student_metadata(str(out / "student"))["quantization_aware"]
    assert meta == {"scheme": "int8_dynamic", "group_size": None, "steps": 24}


def test_resume_in_the_middle_of_a_qat_stage(tmp_path, teacher_dir, corpus_file):
    # stage qat covers steps 4-6; the run dies after its step-4 checkpoint
    overrides = dict(stages=QAT_STAGES, save_every_n_steps=2, max_steps=6)
    straight = tmp_path / "straight"
    run_recipe(tiny_config(straight, teacher_dir, corpus_file, **overrides))
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")
    run_recipe(tiny_config(resumed, teacher_dir, corpus_file, **overrides, resume_from_checkpoint=True))
    a, b = logged(straight), logged(resumed)
    assert sorted(b) == [5, 6] and b[5]["stage"] == 1
    for step in (5, 6):
        for key in ("loss/total", "loss/mlm", "loss/output", "loss/hidden", "loss/attention", "grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6, abs=1e-9), (step, key)
    x, y = load_student(str(straight / "student")), load_student(str(resumed / "student"))
    for (name, p), (_, q) in zip(x.state_dict().items(), y.state_dict().items()):
        assert torch.equal(p, q), name


# ------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def students(tmp_path_factory, teacher_dir, corpus_file):
    """A plain fp32 student (post-training quantisation) and a QAT-trained one."""
    root = tmp_path_factory.mktemp("students")
    common = {"max_steps": 8, "save_every_n_steps": None, "student.dropout": 0.0, "student.attention_dropout": 0.0}
    run_recipe(tiny_config(root / "plain", teacher_dir, corpus_file, **common))
    run_recipe(tiny_config(root / "qat", teacher_dir, corpus_file, **common, stages=QAT_STAGES))
    return {"plain": root / "plain" / "student", "qat": root / "qat" / "student"}


def export(checkpoint_dir, output_dir, **overrides):
    from omegaconf import OmegaConf

    from recipes.export_student import export as run_export

    cfg = {"checkpoint_dir": str(checkpoint_dir), "output_dir": str(output_dir), "eval_batch_size": 4,
           "eval_max_length": 48, **overrides}
    return run_export(OmegaConf.create(cfg))


@pytest.fixture(scope="module")
def exports(students, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {
        "qat_int8_dynamic": (root / "qat", export(students["qat"], root / "qat")),
        "plain_int8_dynamic": (root / "plain", export(students["plain"], root / "plain")),
        "plain_int8_weight": (root / "w8", export(students["plain"], root / "w8", scheme="int8_weight")),
        "plain_int4_weight": (root / "w4", export(students["plain"], root / "w4", scheme="int4_weight", group_size=16)),
    }


def test_both_students_export_every_scheme_with_its_files(exports):
    for name, (folder, report) in exports.items():
        assert sorted(p.name for p in folder.iterdir()) == [
            "export.json", "model.onnx", "model.pt2", "tokenizer.json", "tokenizer_config.json"
        ], name
        assert json.loads((folder / "export.json").read_text()) == report
        assert report["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
        assert report["outputs"] == ["last_hidden_state", "logits"]
    assert exports["qat_int8_dynamic"][1]["scheme"] == "int8_dynamic"  # the scheme it trained for
    assert exports["qat_int8_dynamic"][1]["quantization_aware"]["steps"] == 5
    assert exports["plain_int8_dynamic"][1]["quantization_aware"] is None
    assert exports["plain_int4_weight"][1]["group_size"] == 16


def test_int8_products_cannot_saturate_on_cpus_without_vnni(exports):
    """ONNX Runtime's int8 kernel on AVX2 adds pairs of uint8 x int8 products in int16: every
    weight the integer MatMuls read stays within [-64, 64], so 2 * 255 * 64 < 32767."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(exports["qat_int8_dynamic"][0] / "model.onnx"))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    integer_nodes = [n for n in model.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
    assert integer_nodes
    for node in integer_nodes:
        w = weights[node.input[1]]
        assert w.dtype == np.int8 and np.abs(w.astype(np.int32)).max() <= 64, node.name


def test_converted_files_compute_what_fake_quantisation_trained_for(exports):
    """Stated tolerances, against the fake-quantised student on the held-out batch:
    * model.pt2 runs the same float operations: 1e-5;
    * weight-only ONNX files: the same integers, ONNX Runtime's kernels: 1e-4;
    * int8_dynamic ONNX: rounding activations to 255 levels amplifies float summation-order
      differences where a value sits on a rounding boundary; the files stay within a quarter of
      what quantisation itself changes, and much closer on average (hidden-state cosine)."""
    for name, (_, report) in exports.items():
        vs_fake, quantisation = report["max_abs_diff_vs_fake_quantized"], report["fake_quantized_vs_fp32"]
        assert vs_fake["model.pt2"]["last_hidden_state"] <= 1e-5 and vs_fake["model.pt2"]["logits"] <= 1e-5, name
        onnx_diff = vs_fake["model.onnx"]
        if name.endswith("weight"):
            assert onnx_diff["last_hidden_state"] <= 1e-4 and onnx_diff["logits"] <= 1e-4, name
        else:
            for output in ("last_hidden_state", "logits"):
                assert onnx_diff[output] <= 0.25 * quantisation[output], (name, output)
            assert onnx_diff["hidden_cosine"] > 0.99999, name
        assert quantisation["last_hidden_state"] > 1e-3, name  # quantisation did change something
        assert report["max_abs_diff_vs_fp32"]["model.onnx"]["hidden_cosine"] > (0.99 if "int4" in name else 0.999), name


def test_exported_files_run_without_this_project(exports, students, tmp_path):
    """A fresh `python -I` that cannot import this project loads both files and matches our fp32
    student within the quantisation error export.json reports."""
    folder, report = exports["qat_int8_dynamic"]
    student = load_student(str(students["qat"])).eval()
    torch.manual_seed(1)
    ids = torch.randint(5, student.spec.vocab_size, (3, 20))
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    with torch.no_grad():
        expected = student(ids, mask, torch.zeros_like(ids))
    np.savez(tmp_path / "inputs.npz", input_ids=ids.numpy(), attention_mask=mask.numpy(),
             token_type_ids=np.zeros_like(ids.numpy()))
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["components"] = sys.modules["recipes"] = None  # this project must not be needed
        import numpy as np, onnxruntime, torch
        inputs = dict(np.load({str(tmp_path / "inputs.npz")!r}))
        session = onnxruntime.InferenceSession({str(folder / "model.onnx")!r}, providers=["CPUExecutionProvider"])
        hidden, logits = session.run(None, inputs)
        program = torch.export.load({str(folder / "model.pt2")!r}).module()
        with torch.no_grad():
            p_hidden, p_logits = program(*(torch.from_numpy(inputs[k]) for k in ("input_ids", "attention_mask", "token_type_ids")))
        np.savez({str(tmp_path / "outputs.npz")!r}, hidden=hidden, logits=logits, p_hidden=p_hidden.numpy(), p_logits=p_logits.numpy())
        """
    )
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = np.load(tmp_path / "outputs.npz")
    real = mask.bool().numpy()
    bound = report["fake_quantized_vs_fp32"]
    for hidden, logits in ((out["hidden"], out["logits"]), (out["p_hidden"], out["p_logits"])):
        assert hidden.shape == (3, 20, 64) and logits.shape == (3, 20, student.spec.vocab_size)
        assert np.abs(hidden - expected.last_hidden_state.numpy())[real].max() <= 2 * bound["last_hidden_state"] + 1e-3
        assert np.abs(logits - expected.logits.numpy())[real].max() <= 2 * bound["logits"] + 1e-3


# ------------------------------------------------------------------ bad input
def test_export_bad_input_fails_with_one_error_and_writes_nothing(students, tmp_path, monkeypatch):
    out = tmp_path / "out"
    not_a_student = tmp_path / "folder"
    not_a_student.mkdir()
    with pytest.raises(CheckpointError, match="No student at"):
        export(not_a_student, out)
    with pytest.raises(ConfigError, match="'scheme' must be one of"):
        export(students["plain"], out, scheme="int3")
    assert not out.exists()

    export(students["plain"], out, scheme="int8_weight")
    before = (out / "model.onnx").read_bytes()
    with pytest.raises(ExportError, match="already holds an export: pass overwrite=True"):
        export(students["plain"], out)
    assert (out / "model.onnx").read_bytes() == before
    export(students["plain"], out, overwrite=True)
    assert json.loads((out / "export.json").read_text())["scheme"] == "int8_dynamic"

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="holds other files"):
        export(students["plain"], busy)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(MissingDependencyError, match=r'onnxruntime is not installed.*pip install -e "\.\[export\]"'):
        export(students["plain"], tmp_path / "none")
    assert not (tmp_path / "none").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_export_through_tune_run(students, tmp_path):
    tune = Path(sys.executable).with_name("tune")
    out = tmp_path / "int8"
    command = [str(tune), "run", "recipes/export_student.py", "--config", "configs/export_int8.yaml",
               f"checkpoint_dir={students['qat']}", f"output_dir={out}", "eval_batch_size=2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "model.onnx").is_file() and (out / "model.pt2").is_file()
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("error: output_dir")
    assert "Traceback" not in again.stderr
