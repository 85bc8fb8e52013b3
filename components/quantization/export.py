"""Export a student as ``model.onnx`` (ONNX Runtime, int8) and ``model.pt2`` (torch.export), and
measure both against the fp32 student on a held-out batch.

The two files take ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the student has
token types), with any batch size and sequence length up to the student's positions, and return
``last_hidden_state`` (and ``logits`` at every position when the student has an MLM head). Neither
needs this project to load: ``onnxruntime.InferenceSession("model.onnx")``;
``torch.export.load("model.pt2").module()``.
"""

import copy
import logging
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from components.errors import require
from components.quantization.onnx_export import export_onnx
from components.quantization.program import quantize_modules, ServingEncoder
from components.quantization.qat import convert_qat, prepare_qat, set_fake_quantize
from components.quantization.schemes import Scheme

log = logging.getLogger(__name__)


def float_student(student: torch.nn.Module) -> torch.nn.Module:
    """A float32, eval-mode copy with plain Linear modules (QAT modules converted back)."""
    return convert_qat(copy.deepcopy(student)).float().eval()


def fp32_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's tensors in fp32, each once (a tied decoder shares the embeddings):
    the size the quantised files are compared with."""
    unique = {t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * 4 for t in unique.values())


def heldout_batch(tokenizer, texts: Sequence[str], batch_size: int, max_length: int) -> Dict[str, torch.Tensor]:
    """The first ``batch_size`` texts, tokenised, truncated and padded (lengths differ)."""
    encoded = tokenizer(
        list(texts[:batch_size]), truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    batch["token_type_ids"] = encoded.get("token_type_ids", torch.zeros_like(encoded["input_ids"]))
    return batch


def _inputs(serving: ServingEncoder, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    return tuple(batch[name] for name in serving.input_names)


@torch.no_grad()
def _run_torch(module: torch.nn.Module, inputs) -> List[np.ndarray]:
    return [t.float().numpy() for t in module(*inputs)]


def _run_onnx(path: Path, names: Sequence[str], inputs) -> List[np.ndarray]:
    ort = require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {name: t.numpy() for name, t in zip(names, inputs)})


def _differences(
    outputs: List[np.ndarray], reference: List[np.ndarray], names: Sequence[str], mask: np.ndarray
) -> Dict:
    """Max |difference| per output at real tokens, and the mean cosine of the hidden states."""
    report = {name: float(np.abs(a - b)[mask].max()) for name, a, b in zip(names, outputs, reference)}
    a, b = outputs[0][mask], reference[0][mask]
    cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    report["hidden_cosine"] = float(cosine.mean())
    return report


def export_quantized(student: torch.nn.Module, folder: Path, scheme: Scheme, batch: Dict[str, torch.Tensor]) -> Dict:
    """Write ``model.onnx`` and ``model.pt2`` for ``student`` under ``folder``; return the
    measurements (max differences at non-padding tokens) for ``export.json``."""
    folder = Path(folder)
    student = float_student(student)
    serving = ServingEncoder(student).eval()
    inputs = _inputs(serving, batch)
    # batch and length stay symbolic (a size of 1 would not); clones, because torch.export also
    # guards on the shapes of a view's base (a slice of a 128-long batch fixed "length != 128")
    example = tuple(t[:2].clone() for t in inputs)
    max_length = student.config["max_position_embeddings"]

    log.info("Writing model.onnx (%s)", scheme.name)
    export_onnx(student, scheme, folder / "model.onnx", example, max_length)

    log.info("Writing model.pt2 (torch.export)")
    quantized = ServingEncoder(quantize_modules(student, scheme)).eval()
    program = torch.export.export(quantized, example, dynamic_shapes=quantized.dynamic_shapes(max_length))
    torch.export.save(program, str(folder / "model.pt2"))

    log.info("Measuring both files against the fp32 student on %s tokens", tuple(batch["input_ids"].shape))
    fake = ServingEncoder(prepare_qat(copy.deepcopy(student), scheme)).eval()
    set_fake_quantize(fake, True)
    reference = _run_torch(serving, inputs)
    simulated = _run_torch(fake, inputs)
    files = {
        "model.onnx": _run_onnx(folder / "model.onnx", serving.input_names, inputs),
        "model.pt2": _run_torch(torch.export.load(str(folder / "model.pt2")).module(), inputs),
    }
    mask = batch["attention_mask"].bool().numpy()
    names = serving.output_names
    return {
        "inputs": serving.input_names,
        "outputs": names,
        "heldout_batch": list(batch["input_ids"].shape),
        "max_abs_diff_vs_fp32": {f: _differences(out, reference, names, mask) for f, out in files.items()},
        "max_abs_diff_vs_fake_quantized": {f: _differences(out, simulated, names, mask) for f, out in files.items()},
        "fake_quantized_vs_fp32": _differences(simulated, reference, names, mask),
    }
