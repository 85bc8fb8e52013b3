"""The student as an int8 (or int4) ONNX model for ONNX Runtime on CPU.

1. ``torch.onnx.export`` (dynamo) of the fp32 ``ServingEncoder``, with dynamic batch and
   sequence axes.
2. Weights as constants, each written once: the exporter transposes large weights at run time
   (a ``Transpose`` node per use: six per shared weight for miniALBERT) and small ones into a
   copy per use; transposes of initializers are folded and identical initializers merged.
3. The scheme:
   * ``int8_dynamic``: ``onnxruntime.quantization.quantize_dynamic`` on the MatMuls whose second
     input is a weight (activation x activation products, QK^T and PV, stay fp32), int8
     per-channel symmetric weights in ONNX Runtime's reduced range [-64, 64] (exact on CPUs
     without VNNI too). It computes the same integers as
     ``components.quantization.schemes.quantize_weight`` with the scheme's ``weight_qmax``; the
     file stores them negated, with negated scales (``negate_integer_weights``: the same
     products bit for bit, and no per-row int8 kernel on ARM CPUs with SME).
   * ``int8_weight`` / ``int4_weight``: each such MatMul becomes ONNX Runtime's ``MatMulNBits``
     holding our integers and scales, computing in fp32.
   * every scheme: the word-embedding ``Gather`` reads int8 rows and multiplies by each row's scale.
"""

import hashlib
import logging
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from components.errors import require
from components.quantization.program import ServingEncoder
from components.quantization.schemes import EMBEDDING_BITS, group_for, quantize_weight, Scheme

log = logging.getLogger(__name__)
OPSET = 21  # blocked and int4 DequantizeLinear


def export_float_onnx(serving: ServingEncoder, example: Tuple[torch.Tensor, ...], max_length: int):
    """The fp32 serving module as an in-memory ``onnx.ModelProto``."""
    onnx = require("onnx")
    require("onnxscript")
    with warnings.catch_warnings(), _quiet("torch.onnx", "onnxscript", "onnx_ir"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            serving,
            example,
            dynamo=True,
            dynamic_shapes=serving.dynamic_shapes(max_length),
            input_names=serving.input_names,
            output_names=serving.output_names,
            opset_version=OPSET,
            verbose=False,
        )
    model = program.model_proto
    onnx.checker.check_model(model)
    return model


class _quiet:
    """Raise the given loggers to ERROR for a block (the exporters narrate every pass)."""

    def __init__(self, *names: str):
        self.loggers = [logging.getLogger(n) for n in names]

    def __enter__(self):
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)


def fold_weight_transposes(model) -> int:
    """Replace ``Transpose(initializer)`` by a transposed initializer. The exporter folds the
    transposes of small weights itself but leaves those of large ones as graph nodes: they would
    run at every call (once per iteration for a shared layer) and hide the weight from the
    quantiser. Returns how many nodes went; unused initializers are dropped."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    folded: Dict[Tuple, str] = {}
    replaced: Dict[str, str] = {}
    for node in list(model.graph.node):
        if node.op_type != "Transpose" or node.input[0] not in initializers:
            continue
        perm = tuple(next((a.ints for a in node.attribute if a.name == "perm"), ()))
        key = (node.input[0], perm)
        if key not in folded:
            array = numpy_helper.to_array(initializers[node.input[0]])
            name = f"{node.input[0]}.T"
            model.graph.initializer.append(numpy_helper.from_array(array.transpose(perm or None).copy(), name))
            folded[key] = name
        replaced[node.output[0]] = folded[key]
        model.graph.node.remove(node)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in replaced:
                node.input[i] = replaced[name]
    drop_unused_initializers(model)
    return len(replaced)


def drop_unused_initializers(model) -> None:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)


def merge_identical_initializers(model) -> int:
    """Point every use of a repeated initializer at its first copy; returns how many went."""
    from onnx import numpy_helper

    first: Dict[Tuple, str] = {}
    renamed: Dict[str, str] = {}
    for init in list(model.graph.initializer):
        array = numpy_helper.to_array(init)
        key = (init.data_type, tuple(init.dims), hashlib.sha256(array.tobytes()).hexdigest())
        if key in first:
            renamed[init.name] = first[key]
            model.graph.initializer.remove(init)
        else:
            first[key] = init.name
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    return len(renamed)


def weight_matmuls(model) -> List:
    """MatMul nodes whose second input is an initializer (a Linear's weight, ``[in, out]``)."""
    weights = {init.name for init in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def _initializer(model, name: str):
    return next(init for init in model.graph.initializer if init.name == name)


def quantize_embedding_gather(model, table_name: str) -> None:
    """``Gather(table, ids)`` -> ``Gather(int8 table, ids) * Gather(row scales, ids)``."""
    from onnx import helper, numpy_helper, TensorProto

    init = _initializer(model, table_name)
    q, scale = quantize_weight(torch.from_numpy(numpy_helper.to_array(init).copy()), EMBEDDING_BITS)
    model.graph.initializer.remove(init)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(q.numpy(), table_name + "_int8"),
            numpy_helper.from_array(scale.numpy().astype(np.float32), table_name + "_scale"),
        ]
    )
    nodes = list(model.graph.node)
    for node in nodes:
        if node.op_type != "Gather" or node.input[0] != table_name:
            continue
        ids, out = node.input[1], node.output[0]
        position = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        new = [
            helper.make_node("Gather", [table_name + "_int8", ids], [out + "_int8"], name=node.name + "_int8", axis=0),
            helper.make_node("Cast", [out + "_int8"], [out + "_rows"], name=node.name + "_cast", to=TensorProto.FLOAT),
            helper.make_node(
                "Gather", [table_name + "_scale", ids], [out + "_scales"], name=node.name + "_scales", axis=0
            ),
            helper.make_node("Mul", [out + "_rows", out + "_scales"], [out], name=node.name + "_dequantize"),
        ]
        for offset, n in enumerate(new):
            model.graph.node.insert(position + offset, n)


def _block_size(inputs: int, group_size: Optional[int]) -> int:
    """MatMulNBits' block: the scheme's group, or for one scale per channel the largest power
    of two up to 256 dividing the input width (its scale is then repeated over the blocks)."""
    if group_size is not None:
        block = group_for(inputs, group_size)
        if block < 16:
            raise ValueError(f"a layer with {inputs} inputs has no group of 16 or more, which MatMulNBits needs")
        return block
    for block in (256, 128, 64, 32, 16):
        if inputs % block == 0:
            return block
    raise ValueError(f"a weight with {inputs} inputs cannot be stored in blocks of 16 or more")


def weight_only_matmuls(model, scheme: Scheme) -> None:
    """Weight-only schemes: each weight MatMul becomes ONNX Runtime's ``MatMulNBits`` holding our
    integers (offset by ``2**(bits-1)``, its default zero point) and scales, with
    ``accuracy_level=0``: inputs stay fp32. (Left as ``DequantizeLinear -> MatMul``, ONNX
    Runtime fuses such pairs into ``MatMulNBits`` itself, but with its default accuracy level,
    which rounds the inputs to int8 blocks: not the scheme trained for.)"""
    from onnx import helper, numpy_helper

    offset = 2 ** (scheme.weight_bits - 1)
    nodes = weight_matmuls(model)
    shapes: Dict[str, Tuple[int, int, int]] = {}  # weight -> (K, N, block)
    for name in dict.fromkeys(node.input[1] for node in nodes):
        init = _initializer(model, name)
        weight = torch.from_numpy(numpy_helper.to_array(init).copy()).T  # [N, K], as in torch
        n, k = weight.shape
        block = _block_size(k, scheme.group_size)
        q, scale = quantize_weight(weight, scheme.weight_bits, scheme.group_size, scheme.weight_qmax)
        scale = scale.expand(n, k // block)  # one scale per channel: repeated over its blocks
        packed = (q.to(torch.int16) + offset).to(torch.uint8).view(n, k // block, block)
        if scheme.weight_bits == 4:  # two to a byte, the first in the low nibble
            packed = packed[..., 0::2] | (packed[..., 1::2] << 4)
        model.graph.initializer.remove(init)
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(packed.contiguous().numpy(), name + "_nbits"),
                numpy_helper.from_array(scale.contiguous().numpy().astype(np.float32), name + "_scales"),
            ]
        )
        shapes[name] = (k, n, block)
    for node in nodes:
        name = node.input[1]
        k, n, block = shapes[name]
        fused = helper.make_node(
            "MatMulNBits",
            [node.input[0], name + "_nbits", name + "_scales"],
            list(node.output),
            name=node.name + "_nbits",
            domain="com.microsoft",
            K=k,
            N=n,
            bits=scheme.weight_bits,
            block_size=block,
            accuracy_level=0,
        )
        position = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        model.graph.node.insert(position, fused)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def export_onnx(
    student: torch.nn.Module, scheme: Optional[Scheme], path: Path, example: Tuple[torch.Tensor, ...], max_length: int
) -> None:
    """Write ``student`` (fp32, eval) quantised with ``scheme`` (``None``: left in fp32, the
    baseline the benchmarks compare with) to ``path`` as one ONNX file."""
    onnx = require("onnx")
    serving = ServingEncoder(student).eval()
    model = export_float_onnx(serving, example, max_length)
    folded = fold_weight_transposes(model)
    merged = merge_identical_initializers(model)
    log.info("ONNX: folded %d weight transposes, merged %d repeated initializers", folded, merged)
    if scheme is None:
        onnx.save(model, str(path))
        return
    table = _word_embedding_initializer(model, student)
    if scheme.dynamic_activations:
        _quantize_dynamic(model, path)
        model = onnx.load(str(path))
        negate_integer_weights(model)
    else:
        weight_only_matmuls(model, scheme)
    if table is not None:
        quantize_embedding_gather(model, table)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _word_embedding_initializer(model, student) -> str:
    """The initializer holding the word-embedding table (matched by value)."""
    from onnx import numpy_helper

    table = student.embeddings.word_embeddings.weight.detach().float().numpy()
    for init in model.graph.initializer:
        if tuple(init.dims) == table.shape and np.array_equal(numpy_helper.to_array(init), table):
            return init.name
    return None


def negate_integer_weights(model) -> int:
    """Store every int8 weight the ``MatMulInteger`` nodes read as ``(-q, -scale)`` instead of
    ``(q, scale)``; returns how many weights changed.

    The file computes the same numbers bit for bit: negation is exact for integers and floats,
    and rounding to nearest is symmetric, so ``float(-acc) * (a_scale * -scale)`` rounds to
    exactly ``float(acc) * (a_scale * scale)``, and ``|-q| <= 64`` keeps the AVX2 bound (checked
    on x86: identical outputs, the same fused kernels). What it changes is which kernel ONNX
    Runtime picks on ARM CPUs with SME (Apple's M4, for one; ORT 1.23 and later, built with
    KleidiAI): there a ``DynamicQuantizeMatMul`` whose constant, symmetric weight has only
    positive scales runs KleidiAI's ``qai8dxp`` kernel, which quantises the activations to int8
    with one scale per row instead of ``DynamicQuantizeLinear``'s one uint8 scale per tensor:
    not what QAT trained for. A negative scale keeps the node on MLAS's integer GEMM, which
    computes the scheme's integers exactly, as on x86 (``PrePack`` in ORT's
    ``onnxruntime/contrib_ops/cpu/quantization/dynamic_quantize_matmul.cc``; not run on SME here).
    """
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: Dict[str, List] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_consumer(name: str, op_type: str):
        nodes = consumers.get(name, [])
        if len(nodes) != 1 or nodes[0].op_type != op_type:
            raise ValueError(f"quantize_dynamic wrote an unexpected graph: {name} does not feed one {op_type}")
        return nodes[0]

    negated: Dict[str, str] = {}  # weight -> its scale
    for node in [n for n in model.graph.node if n.op_type == "MatMulInteger"]:
        # MatMulInteger(x_q, w_q, x_zp, w_zp) -> Cast -> Mul(., Mul(x_scale, w_scale))
        cast = only_consumer(node.output[0], "Cast")
        rescale = only_consumer(cast.output[0], "Mul")
        scales = producers[next(i for i in rescale.input if i != cast.output[0])]
        weight, scale = node.input[1], next(i for i in scales.input if i in initializers)
        negated.setdefault(weight, scale)
        if negated[weight] != scale or [w for w, s in negated.items() if s == scale] != [weight]:
            raise ValueError(f"quantize_dynamic wrote an unexpected graph: {weight} and {scale} are not one pair")
    for weight, scale in negated.items():
        for name in (weight, scale):
            array = numpy_helper.to_array(initializers[name])
            if array.dtype == np.int8 and array.min() < -127:
                raise ValueError(f"{name} holds -128, which has no int8 negation")
            initializers[name].CopyFrom(numpy_helper.from_array(np.negative(array), name))
    return len(negated)


def _quantize_dynamic(model, path: Path) -> None:
    onnx = require("onnx")
    quantization = require("onnxruntime.quantization")
    float_path = path.with_name(path.stem + ".float.onnx")
    onnx.save(model, str(float_path))
    try:
        with _quiet("root"):
            quantization.quantize_dynamic(
                str(float_path),
                str(path),
                op_types_to_quantize=["MatMul"],
                nodes_to_quantize=[n.name for n in weight_matmuls(model)],
                per_channel=True,
                reduce_range=True,  # weights in [-64, 64]: see components/quantization/schemes.py
                weight_type=quantization.QuantType.QInt8,
            )
    finally:
        float_path.unlink(missing_ok=True)
