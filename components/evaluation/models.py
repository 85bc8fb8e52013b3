"""The models an evaluation compares, behind one interface: features for probes and similarity,
size, and latency.

* ``TorchModel``: any folder this library writes that holds an encoder (a student, native or
  ALBERT format) or a Hugging Face BERT-family checkpoint (folder or Hub id), run by torch in fp32.
* ``FinetunedModel``: a fine-tuned model (``model/`` of a ``tuning=full`` run) or an adapter set on
  its base (``adapter_set/``), scored on its own task as it is, and on probes with its encoder.
* ``OnnxModel``: an export folder (``model.onnx`` + ``export.json``, recipes/export_student.py),
  run by ONNX Runtime as it is served.

Features are the mean over real tokens of the last hidden state (what sentence-embedding models
and benchmarks/quality.py's probe use). Latency is the median wall time of one forward pass on
random token ids, measured after warm-up on this process's threads.
"""

import json
import statistics
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from components.checkpointing.finetuned import (
    ADAPTER_SET_FILE,
    ADAPTER_WEIGHTS_FILE,
    FINETUNED_MODEL_TYPE,
    load_encoder,
    load_task_model,
)
from components.checkpointing.hub import resolve_checkpoint_dir
from components.checkpointing.tokenizers import load_tokenizer
from components.checkpointing.weights import weight_files
from components.errors import CheckpointError, require
from components.fingerprint import files_fingerprint, model_folder_fingerprint
from components.inference.adapter_sets import MultiTaskModel
from components.losses.distillation import segment_means
from components.models.adapters import takes_adapters

EXPORT_FILE, ONNX_FILE = "export.json", "model.onnx"


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, H]`` -> ``[batch, H]``: the mean over positions where ``mask`` is 1 (the
    distillation loss's pooling, ``segment_means``, with one sequence per row)."""
    pooled, _ = segment_means(hidden, mask)
    return pooled[:, 0].to(hidden.dtype)


def parameter_count(module: torch.nn.Module) -> int:
    """Parameters of ``module``, a tied tensor counted once."""
    return sum(p.numel() for p in {p.data_ptr(): p for p in module.parameters()}.values())


def _median_ms(run, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def _random_inputs(vocab_size: int, batch: int, seq: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # ids above the first 1000 (or the upper half of a small vocabulary): ordinary pieces, not specials
    low = min(1000, vocab_size // 2)
    ids = torch.randint(low, vocab_size, (batch, seq), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


class TorchModel:
    """A student or BERT-family encoder, in fp32 on ``device``."""

    kind = "torch"

    def __init__(self, name: str, path: str, device: torch.device):
        self.name, self.path, self.device = name, str(path), device
        self.folder = resolve_checkpoint_dir(self.path)
        self.encoder, self.tokenizer = load_encoder(str(self.folder))
        self.encoder.to(device).eval()

    @property
    def tunings(self) -> Tuple[str, ...]:
        """The fine-tuning modes this model takes: adapters where it has them or has sites for
        fresh ones (not a bottleneck student)."""
        adapters = getattr(self.encoder, "adapters", None) is not None or takes_adapters(self.encoder)
        return ("full", "adapters", "head") if adapters else ("full", "head")

    @property
    def max_length(self) -> int:
        config = self.encoder.config
        return config["max_position_embeddings"] - config.get("position_offset", 0)

    def fingerprint(self) -> Dict:
        return model_folder_fingerprint(self.folder, weight_files(self.folder)[1])

    @torch.no_grad()
    def features(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = [batch.get(k) for k in ("input_ids", "attention_mask", "token_type_ids")]
        inputs = [t.to(self.device) if t is not None else None for t in inputs]
        hidden = self.encoder(*inputs, return_logits=False).last_hidden_state.float()
        return mean_pool(hidden, inputs[1]).cpu()

    def size(self) -> Dict[str, int]:
        """Parameters of the encoder (no MLM head) and bytes of its weight files on disk."""
        files = weight_files(self.folder)[1]
        return {
            "parameters": parameter_count(self.encoder),
            "bytes": sum(Path(f).stat().st_size for f in files),
        }

    @torch.no_grad()
    def latency_ms(self, batch: int, seq: int, warmup: int, repeats: int) -> float:
        inputs = _random_inputs(self.encoder.config["vocab_size"], batch, seq)
        args = [inputs[k].to(self.device) for k in ("input_ids", "attention_mask", "token_type_ids")]

        def run():
            self.encoder(*args, return_logits=False)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

        return _median_ms(run, warmup, repeats)

    def close(self) -> None:
        del self.encoder


class FinetunedModel(TorchModel):
    """A model fine-tuned by recipes/finetune.py: its ``model/`` folder (tuning=full) or its
    ``adapter_set/`` on the base the manifest names. It is not trained again: its task's column
    gets its predictions; probes and similarity read its encoder (with the set's adapters)."""

    kind = "finetuned"
    tunings: Tuple[str, ...] = ()

    def __init__(self, name: str, path: str, device: torch.device):
        self.name, self.path, self.device = name, str(path), device
        self.folder = Path(path)
        if (self.folder / ADAPTER_SET_FILE).is_file():
            manifest = json.loads((self.folder / ADAPTER_SET_FILE).read_text())
            base = str((manifest.get("base") or {}).get("path"))
            tasks = MultiTaskModel(base, device)
            tasks.add(name, str(self.folder))  # checks the set against its base
            self.task_model, self.tokenizer, self.task = tasks.task_model(name), tasks.tokenizer, manifest["task"]
            self.base_folder = resolve_checkpoint_dir(base)
            self.files = [self.folder / ADAPTER_SET_FILE, self.folder / ADAPTER_WEIGHTS_FILE]
        else:
            self.task_model, self.task = load_task_model(str(self.folder))
            self.base_folder = None
            self.files = weight_files(self.folder)[1]
            self.tokenizer = load_tokenizer(self.folder, self.task_model.encoder.spec.vocab_size)
        self.task_model.to(device).eval()
        self.encoder = self.task_model.encoder
        self.tuning = self.task.get("tuning", "full")

    def fingerprint(self) -> Dict:
        found = files_fingerprint(
            [self.folder / "config.json", *self.files] if self.base_folder is None else self.files, root=self.folder
        )
        if self.base_folder is not None:
            found["base"] = model_folder_fingerprint(self.base_folder, weight_files(self.base_folder)[1])
        return found

    def size(self) -> Dict[str, int]:
        """The encoder's parameters; bytes of what it needs on disk (an adapter set: its base's
        weights and the set)."""
        files = list(self.files) + (weight_files(self.base_folder)[1] if self.base_folder is not None else [])
        return {
            "parameters": parameter_count(self.encoder),
            "bytes": sum(Path(f).stat().st_size for f in files),
        }

    def close(self) -> None:
        del self.encoder, self.task_model


class OnnxModel:
    """An int8 export (recipes/export_student.py) run by ONNX Runtime on the CPU."""

    kind = "onnx"
    tunings: Tuple[str, ...] = ()  # a served file is not fine-tuned: it is evaluated on its features

    def __init__(self, name: str, path: str, threads: int):
        ort = require("onnxruntime")
        self.name, self.path, self.folder = name, str(path), Path(path)
        self.report = json.loads((self.folder / EXPORT_FILE).read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.folder / ONNX_FILE), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.vocab_size = self._vocab_size()
        self.tokenizer = load_tokenizer(self.folder, self.vocab_size)

    def _vocab_size(self) -> int:
        import onnx

        model = onnx.load(str(self.folder / ONNX_FILE), load_external_data=False)
        # the largest first dimension of a 2-D initializer is the word-embedding table
        rows = [init.dims[0] for init in model.graph.initializer if len(init.dims) == 2]
        if not rows:
            raise CheckpointError(f"{self.folder / ONNX_FILE} has no embedding table to read the vocabulary size from")
        return int(max(rows))

    @property
    def max_length(self) -> int:
        """The student's positions (the file takes sequences up to them), else BERT's 512."""
        student = self._student()
        return student["positions"] if student is not None else 512

    def fingerprint(self) -> Dict:
        return files_fingerprint([self.folder / ONNX_FILE, self.folder / EXPORT_FILE], root=self.folder)

    def _run(self, inputs: Dict[str, torch.Tensor]) -> np.ndarray:
        feed = {name: inputs[name].numpy().astype(np.int64) for name in self.input_names}
        return self.session.run(["last_hidden_state"], feed)[0]

    def features(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: batch[k] if k in batch else torch.zeros_like(batch["input_ids"]) for k in self.input_names}
        hidden = torch.from_numpy(self._run(inputs)).float()
        return mean_pool(hidden, batch["attention_mask"])

    def _student(self) -> Optional[Dict[str, int]]:
        """Parameters and positions of the student the file was exported from, when it is there."""
        if not hasattr(self, "_student_info"):
            student = Path(self.report.get("student") or "")
            self._student_info = None
            if (student / "config.json").is_file():
                encoder, _ = load_encoder(str(student))
                positions = encoder.config["max_position_embeddings"] - encoder.config.get("position_offset", 0)
                self._student_info = {"parameters": parameter_count(encoder), "positions": positions}
        return self._student_info

    def size(self) -> Dict[str, int]:
        """Parameters: the exported student's (its encoder, as for every other row; the file's
        int8 weights are the same tensors), or the file's weight elements when the student is gone;
        bytes: model.onnx."""
        student = self._student()
        if student is not None:
            parameters = student["parameters"]
        else:
            import onnx

            model = onnx.load(str(self.folder / ONNX_FILE), load_external_data=False)
            parameters = sum(int(np.prod(init.dims)) for init in model.graph.initializer if len(init.dims) >= 1)
        return {"parameters": parameters, "bytes": (self.folder / ONNX_FILE).stat().st_size}

    def latency_ms(self, batch: int, seq: int, warmup: int, repeats: int) -> float:
        inputs = _random_inputs(self.vocab_size, batch, seq)
        return _median_ms(lambda: self._run(inputs), warmup, repeats)

    def close(self) -> None:
        del self.session


def open_model(name: str, path: str, device: torch.device, threads: int):
    """The model at ``path``: an export folder (``export.json`` + ``model.onnx``), a fine-tuned
    model or adapter set, or an encoder."""
    folder = Path(path)
    if (folder / EXPORT_FILE).is_file() and (folder / ONNX_FILE).is_file():
        return OnnxModel(name, path, threads)
    if (folder / EXPORT_FILE).is_file():
        raise CheckpointError(f"models.{name}: {folder} holds {EXPORT_FILE} but no {ONNX_FILE}")
    if (folder / ADAPTER_SET_FILE).is_file() or _model_type(folder) == FINETUNED_MODEL_TYPE:
        return FinetunedModel(name, path, device)
    return TorchModel(name, path, device)


def _model_type(folder: Path) -> Optional[str]:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # not a local folder with a config: a Hub id, or the loader's error to give


def features(model, batches: Iterable[Dict[str, torch.Tensor]]) -> np.ndarray:
    """Mean-pooled features of every row, in order, as float64 for scikit-learn."""
    out: List[torch.Tensor] = [model.features(batch) for batch in batches]
    return torch.cat(out).double().numpy()


def latencies(model, shapes: Iterable, warmup: int, repeats: int, max_length: Optional[int] = None) -> Dict[str, float]:
    """``{"BxS": milliseconds}`` for each ``(batch, seq)`` shape (seq capped at the model's positions)."""
    out = {}
    for batch, seq in shapes:
        seq = min(seq, max_length or seq)
        out[f"{batch}x{seq}"] = round(model.latency_ms(batch, seq, warmup, repeats), 3)
    return out
