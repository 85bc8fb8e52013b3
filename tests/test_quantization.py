"""Quantisation: the numerics against ONNX Runtime, QAT stages, resume, and the export recipe."""

import copy
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import onnx
import onnxruntime as ort  # the README's install has it: no skip, a missing one is a broken install
import pytest
import torch
from onnx import numpy_helper

from components.checkpointing import load_student, student_metadata
from components.errors import CheckpointError, ConfigError, ExportError, MissingDependencyError
from components.models import recursive_tiny
from components.quantization import convert_qat, get_scheme, prepare_qat, set_fake_quantize
from components.quantization.export import float_student, heldout_batch
from components.quantization.program import ServingEncoder
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
from tests.helpers import tune_run
from tests.recipe_helpers import logged, run_recipe, tiny_config
from tests.recipe_helpers import run_export as export

QAT_STAGES = [{"name": "distill", "steps": 3}, {"name": "qat", "fake_quantize": True}]
U = 2.0**-24  # float32's unit roundoff: one correctly rounded operation is off by at most U * |result|


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
    """One Linear through quantize_dynamic (ORT's own weight integers, reduced range; stored
    negated as the export does) against our fake quantisation. Both round the same input to the
    same integers and approximate the same exact ``sum_k xq_k * wq_k + b``: ONNX Runtime within
    4U * (|acc * scales| + |b|) (the per-node test below says why), torch's float32 ``linear``
    of the dequantised values within gamma_(K+1) * (sum_k |xq_k * wq_k| + |b|) in any summation
    order. The two bounds add up to the one checked."""
    from onnxruntime.quantization import quantize_dynamic, QuantType

    from components.quantization.onnx_export import negate_integer_weights

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 160)
    x = torch.randn(3, 17, 96)
    x[1, 2, 3] = 9.0
    torch.onnx.export(linear, (x,), str(tmp_path / "f.onnx"), dynamo=True, opset_version=21, external_data=False)
    quantize_dynamic(
        str(tmp_path / "f.onnx"),
        str(tmp_path / "q.onnx"),
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        reduce_range=True,
        weight_type=QuantType.QInt8,
    )
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert negate_integer_weights(model) == 1
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        qmax = SCHEMES["int8_dynamic"].weight_qmax
        xq, wq = fake_quantize_activation(x), fake_quantize_weight(linear.weight, 8, qmax=qmax)
        simulated = torch.nn.functional.linear(xq, wq, linear.bias)
        size = (xq.abs().double() @ wq.abs().double().T + linear.bias.abs().double()).numpy()
        exact = linear(x)
    bound = (x.shape[-1] + 2 + 4) * U * size  # torch: gamma_(K+1) < (K + 2) U; ONNX Runtime: 4U
    assert (np.abs(y - simulated.numpy()) <= bound).all()
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
    cfg = tiny_config(
        tmp_path / "run",
        teacher_dir,
        corpus_file,
        stages=QAT_STAGES,
        quantization={"scheme": "int4_weight", "group_size": 64},
        **{"student.intermediate_size": 72},
    )
    with pytest.raises(ConfigError, match=r"quantization: .*group_size=64: the inputs of \['layer.ffn_out'\] have no"):
        run_recipe(cfg)


def test_qat_from_the_start_still_learns(tmp_path, teacher_dir, corpus_file):
    out = tmp_path / "run"
    stages = [{"name": "qat", "fake_quantize": True}]
    run_recipe(
        tiny_config(
            out,
            teacher_dir,
            corpus_file,
            max_steps=24,
            save_every_n_steps=None,
            stages=stages,
            **{"optimizer.lr": 3e-3},
        )
    )
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
# Every test from here on exports (torch.onnx, torch.export, ONNX Runtime's quantiser): slow tier.
EXPORTS = pytest.mark.slow


@pytest.fixture(scope="module")
def students(tmp_path_factory, teacher_dir, corpus_file):
    """A plain fp32 student (post-training quantisation) and a QAT-trained one."""
    root = tmp_path_factory.mktemp("students")
    common = {"max_steps": 8, "save_every_n_steps": None, "student.dropout": 0.0, "student.attention_dropout": 0.0}
    run_recipe(tiny_config(root / "plain", teacher_dir, corpus_file, **common))
    run_recipe(tiny_config(root / "qat", teacher_dir, corpus_file, **common, stages=QAT_STAGES))
    return {"plain": root / "plain" / "student", "qat": root / "qat" / "student"}


@pytest.fixture(scope="module")
def exports(students, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {
        "qat_int8_dynamic": (root / "qat", export(students["qat"], root / "qat")),
        "plain_int8_dynamic": (root / "plain", export(students["plain"], root / "plain")),
        "plain_int8_weight": (root / "w8", export(students["plain"], root / "w8", scheme="int8_weight")),
        "plain_int4_weight": (root / "w4", export(students["plain"], root / "w4", scheme="int4_weight", group_size=16)),
    }


@EXPORTS
def test_both_students_export_every_scheme_with_its_files(exports):
    for name, (folder, report) in exports.items():
        assert sorted(p.name for p in folder.iterdir()) == [
            "export.json",
            "model.onnx",
            "model.pt2",
            "tokenizer.json",
            "tokenizer_config.json",
        ], name
        assert json.loads((folder / "export.json").read_text()) == report
        assert report["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
        assert report["outputs"] == ["last_hidden_state", "logits"]
    assert exports["qat_int8_dynamic"][1]["scheme"] == "int8_dynamic"  # the scheme it trained for
    assert exports["qat_int8_dynamic"][1]["quantization_aware"]["steps"] == 5
    assert exports["plain_int8_dynamic"][1]["quantization_aware"] is None
    assert exports["plain_int4_weight"][1]["group_size"] == 16


# ------------------------------------------------------------------ what the files compute


def _quantised_matmuls(model) -> List[Dict]:
    """Every quantised MatMul of an exported file, read from the file itself: the names of its float
    input ``x`` and output ``out`` in the graph, its integers ``q`` ([N, K], int64) and ``scale``
    ([N, K], one value repeated over each channel or group: ``q * scale`` is the weight), ``bias``
    (added in the file right after; None if none) and ``dynamic`` (``x`` is rounded to uint8 first)."""
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: Dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for node in model.graph.node:
        if node.op_type == "MatMulInteger":
            # DynamicQuantizeLinear(x) -> MatMulInteger(x_q, w, x_zp, w_zp) -> Cast -> Mul(., x_scale * w_scale) [-> Add(bias)]
            (cast,) = consumers[node.output[0]]
            (rescale,) = consumers[cast.output[0]]
            scales = producers[next(i for i in rescale.input if i != cast.output[0])]
            assert not values[node.input[3]].any(), node.name  # symmetric weights: zero points 0
            q = values[node.input[1]].T.astype(np.int64)
            scale = next(values[i] for i in scales.input if i in values)
            out, bias = rescale.output[0], None
            after = consumers.get(out, [])
            if len(after) == 1 and after[0].op_type == "Add" and any(i in values for i in after[0].input):
                out, bias = after[0].output[0], next(values[i] for i in after[0].input if i in values)
            found.append(
                dict(
                    name=node.name,
                    weight=node.input[1],
                    x=producers[node.input[0]].input[0],
                    out=out,
                    q=q,
                    scale=np.repeat(scale[:, None], q.shape[1], axis=1),
                    bias=bias,
                    dynamic=True,
                )
            )
        elif node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            n, k, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
            packed = values[node.input[1]].astype(np.int64)
            if bits == 4:  # two to a byte, the first in the low nibble
                packed = np.stack([packed & 0xF, packed >> 4], axis=-1)
            q = packed.reshape(n, k) - 2 ** (bits - 1)  # MatMulNBits' default zero point
            scale = np.repeat(values[node.input[2]].reshape(n, k // block), block, axis=1)
            found.append(
                dict(
                    name=node.name,
                    weight=node.input[1],
                    x=node.input[0],
                    out=node.output[0],
                    q=q,
                    scale=scale,
                    bias=None,
                    dynamic=False,
                )
            )
    return found


def _ours(node: Dict, student: torch.nn.Module, scheme) -> Tuple[np.ndarray, np.ndarray, str]:
    """``(q, scale)`` ([N, K], scale repeated as in the file) that ``quantize_weight`` gives the
    student's Linear this node multiplies by (the Linear whose weight is nearest the file's), and its name."""
    stored = node["q"] * node["scale"].astype(np.float64)
    candidates = [
        (name, m)
        for name, m in student.named_modules()
        if isinstance(m, torch.nn.Linear) and tuple(m.weight.shape) == stored.shape
    ]
    assert candidates, node["name"]
    name, linear = min(candidates, key=lambda c: np.abs(c[1].weight.detach().double().numpy() - stored).max())
    q, scale = quantize_weight(linear.weight, scheme.weight_bits, scheme.group_size, scheme.weight_qmax)
    return q.numpy().astype(np.int64), np.repeat(scale.numpy(), q.shape[1] // scale.shape[1], axis=1), name


def _capture(model, names: List[str]) -> ort.InferenceSession:
    """A session of a copy of ``model`` that also returns the values ``names``."""
    copy_ = onnx.ModelProto()
    copy_.CopyFrom(model)
    outputs = {o.name for o in copy_.graph.output}
    copy_.graph.output.extend(
        onnx.helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(names) if n not in outputs
    )
    return ort.InferenceSession(copy_.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def batch(documents, tokenizer):
    """Eight texts of 25 to 200 characters: sequences of different lengths, with padding."""
    return heldout_batch(tokenizer, [d[: 25 * (i + 1)] for i, d in enumerate(documents[:8])], 8, 48)


def _checkpoint(name: str, students) -> Path:
    return students["qat" if name.startswith("qat") else "plain"]


@EXPORTS
def test_int8_dynamic_weights_take_an_exact_kernel_on_every_cpu(exports):
    """ONNX Runtime picks its int8 kernel by CPU; two properties of the stored weights make each
    one it may pick compute the scheme's integers (so the check per node below holds on all):
    * x86 without VNNI (AVX2, AVX-512F/BW) adds pairs of uint8 x int8 products in int16
      (``vpmaddubsw``, which saturates): weights within [-64, 64] keep every pair within
      2 * 255 * 64 = 32640 < 32767. VNNI, AMX and ARM's NEON / dot-product / i8mm kernels
      accumulate in int32 and are exact anyway.
    * ARM with SME (ORT 1.23+): DynamicQuantizeMatMul runs KleidiAI's kernel, which rounds the
      activations per row, when all of a weight's scales are positive; the file stores
      ``(-q, -scale)``, the same weight bit for bit, so none is (``negate_integer_weights``)."""
    model = onnx.load(str(exports["qat_int8_dynamic"][0] / "model.onnx"))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = _quantised_matmuls(model)
    assert len(nodes) == sum(n.op_type == "MatMulInteger" for n in model.graph.node) > 0
    for node in nodes:
        w = weights[node["weight"]]
        assert w.dtype == np.int8 and np.abs(w.astype(np.int32)).max() <= 64, node["name"]
        assert (node["scale"] < 0).all(), node["name"]


@EXPORTS
def test_every_quantised_matmul_computes_the_integers_fake_quantisation_rounds_to(exports, students, batch):
    """Each quantised MatMul of each file, on ONNX Runtime's own float input to it (captured by
    making the node's input and output graph outputs of a copy of the file):

    * its weight is the student Linear's ``quantize_weight`` integers and scales (int8_dynamic
      stores ``(-q, -scale)``: the same weight, see the test above);
    * int8_dynamic: ``xq``, the input rounded by ``round_activation``'s rule, is what ORT's
      DynamicQuantizeLinear computes (the same float32 min, max, ``(max - min) / 255``, division
      and half-to-even rounding: every step correctly rounded, so the same integers on every
      CPU), and ``acc = (xq - zp) @ q.T`` is exact in int64. ORT's integer kernels accumulate
      ``acc`` exactly (int32; AVX2 thanks to [-64, 64]) and return ``acc * (x_scale * scale)
      + bias`` in float32: three roundings (the scales' product, the product with ``acc``, the
      bias addition; converting ``acc`` is exact below 2**24, and K * 255 * 64 = 2.1e6 here),
      each off by at most U times its result, so |ORT - exact| <= 3U * (|acc * x_scale * scale|
      + |bias|) to first order. The bound allows 4U: one rounding more, whatever order a kernel
      multiplies in. One activation or weight integer off by one moves the output by a whole
      product step, |q| / |acc| of it: ~1e-3 here (|acc| < 7e4), thousands of times the bound.
    * weight-only (MatMulNBits, accuracy_level 0): ``x @ w.T`` in float32, ``w`` the float32
      ``q * scale`` that ``dequantize_weight`` also computes. Summing K products in any order,
      with or without FMA, errs by at most gamma_K * sum|x_k * w_k|, gamma_K = K U / (1 - K U)
      (the standard bound); the bound allows (K + 2) U: gamma_K's second-order term, and one
      rounding more should a kernel dequantise the weight in another order. A kernel rounding
      ``x`` (accuracy_level 4 rounds it to int8 blocks) errs by ~3e-3, thousands of times more.
    Measured on the AVX-512 VNNI EPYC: at most 0.65 of the bound (2.6U) for int8_dynamic, 0.28
    for the weight-only files."""
    for name, (folder, report) in exports.items():
        scheme = get_scheme(report["scheme"], report["group_size"])
        student = float_student(load_student(str(_checkpoint(name, students))))
        model = onnx.load(str(folder / "model.onnx"))
        nodes = _quantised_matmuls(model)
        assert len(nodes) == sum(n.op_type in ("MatMulInteger", "MatMulNBits") for n in model.graph.node) > 0, name
        session = _capture(model, [n["x"] for n in nodes] + [n["out"] for n in nodes])
        values = dict(
            zip([o.name for o in session.get_outputs()], session.run(None, {k: v.numpy() for k, v in batch.items()}))
        )
        for node in nodes:
            q, scale, linear = _ours(node, student, scheme)
            sign = np.sign(node["scale"])
            assert np.array_equal(node["q"] * sign, q) and np.array_equal(np.abs(node["scale"]), scale), (
                name,
                node["name"],
                linear,
            )
            x, y = values[node["x"]], values[node["out"]].astype(np.float64)
            k = x.shape[-1]
            if node["dynamic"]:
                x_scale, zero_point = activation_qparams(torch.from_numpy(x))
                xq = torch.clamp(
                    torch.round(torch.from_numpy(x) / x_scale) + zero_point, 0, 255
                )  # round_activation's integers
                acc = (xq.numpy().astype(np.int64) - int(zero_point)).reshape(-1, k) @ q.T
                multiplier = np.float64(x_scale) * scale[:, 0].astype(np.float64)
                exact, size = acc * multiplier, np.abs(acc) * np.abs(multiplier)
                if node["bias"] is not None:
                    exact, size = exact + node["bias"], size + np.abs(node["bias"])
                bound = 4 * U * size
            else:
                w = (q.astype(np.float32) * scale).astype(np.float64)  # dequantize_weight's float32 product
                exact = x.reshape(-1, k).astype(np.float64) @ w.T
                bound = (k + 2) * U * (np.abs(x.reshape(-1, k)).astype(np.float64) @ np.abs(w).T)
            error = np.abs(y.reshape(exact.shape) - exact)
            assert (error <= bound).all(), (
                name,
                node["name"],
                linear,
                float(error.max()),
                float((error / bound).max()),
            )


def _outputs(folder: Path, checkpoint: Path, scheme, batch) -> Dict[str, List[np.ndarray]]:
    """fp32 student, fake-quantised student (as ``export_quantized`` builds it), model.pt2 and
    model.onnx on ``batch``."""
    student = float_student(load_student(str(checkpoint)))
    serving = ServingEncoder(student).eval()
    fake = ServingEncoder(prepare_qat(copy.deepcopy(student), scheme)).eval()
    set_fake_quantize(fake, True)
    inputs = tuple(batch[name] for name in serving.input_names)
    program = torch.export.load(str(folder / "model.pt2")).module()
    with torch.no_grad():
        out = {
            key: [t.numpy() for t in module(*inputs)]
            for key, module in (("fp32", serving), ("fake", fake), ("model.pt2", program))
        }
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    out["model.onnx"] = session.run(None, {name: t.numpy() for name, t in zip(serving.input_names, inputs)})
    return out


@EXPORTS
def test_converted_files_compute_what_fake_quantisation_trained_for(exports, students, batch):
    """End to end, against the fake-quantised student, at real tokens:

    * model.pt2 runs the fake quantisers' own functions (``round_activation``,
      ``dequantize_weight``) and the same ATen ops on the same shapes, so the same floats: the
      straight-through forms ``w + (r - w)`` and ``x + (r - x)`` equal ``r`` exactly (``r`` is
      0 or within a factor 2 of ``w``, so ``r - w`` is exact: Sterbenz). 0 measured; 1e-5 allows
      a last-bit difference but no activation rounded differently (that moves outputs ~1e-3).
    * weight-only ONNX: no rounding boundaries (activations stay float; the weights are the same
      float32 values, checked per node above), so the outputs differ by float32 rounding only,
      of order U times the values through the layers: 2.4e-6 measured on outputs up to ~4.
      1e-4 is 40 times that, and 50 times below a different computation (the same files with
      MatMulNBits rounding its inputs to int8, accuracy_level 4: 6e-3 to 2e-2).
    * int8_dynamic ONNX: every node computes the fake quantiser's integers from its own input
      (test above), but ONNX Runtime's LayerNorm, GELU, softmax and fp32 MatMuls sum in another
      order than torch's (and each CPU's kernels in yet another), and an activation within that
      float difference (~1e-6 relative) of a rounding boundary rounds the other way: a "flip",
      an error of one step s where quantisation errs by at most s / 2, and the networks differ
      from there on. So no bound on the maximum follows: one flip in the MLM head's input moves
      one token's logits by s * |w|, 0.28 of what quantisation moves them measured on this
      AVX-512 VNNI CPU (the old "<= 0.25 of it" held on an AVX2-only one by chance). What follows is
      that flips are rare: a value flips only within ~1e-6 of a boundary, ~1e-4 of a step, so
      about 1 rounding in 10^4. Propagated through the same network as the quantisation error
      (every rounding, RMS s / sqrt(12)), a share f of flips makes ||ONNX - fake|| about
      sqrt(12 f) of ||fake - fp32||, a few times more for flips next to the output: 0.03 at
      most measured. The bound 0.25 needs f > 0.5%, 50 times the float noise; a kernel that
      rounds differently everywhere (per-row activation scales, weights in [-127, 127])
      measured 0.66 to 1.2.
    Quantisation itself: it changes the outputs (> 1e-3) and keeps the hidden states' direction
    (cosine with fp32 > 0.999, 0.99 for int4), whatever the kernel (flips move it < 1e-6)."""
    for name, (folder, report) in exports.items():
        scheme = get_scheme(report["scheme"], report["group_size"])
        out = _outputs(folder, _checkpoint(name, students), scheme, batch)
        real = batch["attention_mask"].bool().numpy()
        for i, output in enumerate(report["outputs"]):
            fake = out["fake"][i][real]
            quantisation = fake - out["fp32"][i][real]
            assert np.abs(quantisation).max() > 1e-3, (name, output)  # quantisation did change something
            assert np.abs(out["model.pt2"][i][real] - fake).max() <= 1e-5, (name, output)
            onnx_diff = out["model.onnx"][i][real] - fake
            if scheme.dynamic_activations:
                ratio = np.linalg.norm(onnx_diff) / np.linalg.norm(quantisation)
                assert ratio <= 0.25, (name, output, ratio)
            else:
                assert np.abs(onnx_diff).max() <= 1e-4, (name, output, np.abs(onnx_diff).max())
        assert report["max_abs_diff_vs_fp32"]["model.onnx"]["hidden_cosine"] > (0.99 if "int4" in name else 0.999), name


@EXPORTS
def test_exported_files_run_without_this_project(exports, tmp_path):
    """A fresh `python -I` that cannot import this project loads both files and computes what
    they compute here, bit for bit: the same file, library build, CPU, inputs and thread counts
    (pinned on both sides: a kernel may split its sums by thread) make every kernel do the same
    float operations in the same order. (What the files compute: the tests above.)"""
    folder, _ = exports["qat_int8_dynamic"]
    torch.manual_seed(1)
    ids = torch.randint(5, 300, (3, 20))
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    inputs = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": np.zeros_like(ids.numpy())}
    np.savez(tmp_path / "inputs.npz", **inputs)
    threads = torch.get_num_threads()
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["components"] = sys.modules["recipes"] = None  # this project must not be needed
        import numpy as np, onnxruntime, torch
        torch.set_num_threads({threads})
        inputs = dict(np.load({str(tmp_path / "inputs.npz")!r}))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = {threads}
        session = onnxruntime.InferenceSession({str(folder / "model.onnx")!r}, options, providers=["CPUExecutionProvider"])
        hidden, logits = session.run(None, inputs)
        program = torch.export.load({str(folder / "model.pt2")!r}).module()
        with torch.no_grad():
            p_hidden, p_logits = program(*(torch.from_numpy(inputs[k]) for k in ("input_ids", "attention_mask", "token_type_ids")))
        np.savez({str(tmp_path / "outputs.npz")!r}, hidden=hidden, logits=logits, p_hidden=p_hidden.numpy(), p_logits=p_logits.numpy())
        """
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = np.load(tmp_path / "outputs.npz")
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    hidden, logits = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"]).run(
        None, inputs
    )
    with torch.no_grad():
        p_hidden, p_logits = (
            t.numpy()
            for t in torch.export.load(str(folder / "model.pt2")).module()(
                *(torch.from_numpy(inputs[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
            )
        )
    assert hidden.shape == (3, 20, 64) and logits.shape == (3, 20, 300)
    for key, here in (("hidden", hidden), ("logits", logits), ("p_hidden", p_hidden), ("p_logits", p_logits)):
        assert np.array_equal(out[key], here), key


# ------------------------------------------------------------------ bad input
@EXPORTS
def test_export_bad_input_fails_with_one_error_and_writes_nothing(students, exports, tmp_path, monkeypatch):
    out = tmp_path / "out"
    not_a_student = tmp_path / "folder"
    not_a_student.mkdir()
    with pytest.raises(CheckpointError, match="No student at"):
        export(not_a_student, out)
    with pytest.raises(ConfigError, match="'scheme' must be one of"):
        export(students["plain"], out, scheme="int3")
    assert not out.exists()

    shutil.copytree(exports["plain_int8_weight"][0], out)  # an export there (the one of the plain student)
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


@EXPORTS  # and a tune run launch: the command line and the import hook
def test_export_through_tune_run(students, tmp_path, run_main):
    out = tmp_path / "int8"
    args = [
        "--config",
        "configs/export_int8.yaml",
        f"checkpoint_dir={students['qat']}",
        f"output_dir={out}",
        "eval_batch_size=2",
    ]
    result = tune_run("export_student", *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "model.onnx").is_file() and (out / "model.pt2").is_file()
    again = run_main("export_student", *args)  # the same command line again, in this process
    assert again.code == 2
    assert again.stderr.strip().splitlines()[-1].startswith("error: output_dir")
    assert "Traceback" not in again.stderr
