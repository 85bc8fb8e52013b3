"""Fine-tuning's models on disk: the encoder a run starts from, the fine-tuned model, and
adapter sets (one base, many tasks).

* ``load_encoder``: a student folder this library wrote (native or ALBERT format) or any Hugging
  Face BERT-family checkpoint (folder or Hub id), without its MLM head, with its tokenizer.
* A fine-tuned model (``tuning=full``): a folder with ``config.json`` (the encoder's family and
  builder arguments, the head, the labels), ``model.safetensors`` and the tokenizer.
* An adapter set (``tuning=adapters`` or ``head``): only the tensors the run trained (adapters
  and head, or the head) in ``adapters.safetensors``, and ``adapter_set.json`` naming the base
  by a SHA-256 of its frozen weights; loading a set onto another base is an error.
"""

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from components.checkpointing.hf_bert import load_hf_encoder, load_tokenizer, resolve_checkpoint_dir, SUPPORTED_MODEL_TYPES
from components.checkpointing.io import atomic_directory
from components.checkpointing.student import load_student, STUDENT_MODEL_TYPES
from components.errors import CheckpointError
from components.models.families import encoder_family, ENCODERS
from components.models.tasks import TaskModel

FINETUNED_MODEL_TYPE = "finetuned_encoder"
ADAPTER_SET_FILE, ADAPTER_WEIGHTS_FILE = "adapter_set.json", "adapters.safetensors"
FORMAT_VERSION = 1
# 2: the base fingerprint covers the base's own adapters wherever the set does not replace them
ADAPTER_SET_VERSION = 2


def load_encoder(path: str, revision: Optional[str] = None) -> Tuple[nn.Module, Any]:
    """(encoder without MLM head, tokenizer) from a student folder or a Hugging Face
    BERT-family checkpoint (local folder or Hub id)."""
    folder = resolve_checkpoint_dir(path, revision)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"No model at {folder}: {config_file} does not exist")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except ValueError as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from e
    if model_type in STUDENT_MODEL_TYPES:
        encoder = load_student(str(folder), mlm_head=False)
    elif model_type in SUPPORTED_MODEL_TYPES:
        encoder, _ = load_hf_encoder(folder, mlm_head=False)
    else:
        raise CheckpointError(
            f"{config_file}: model_type {model_type!r} is neither a student of this library "
            f"{sorted(STUDENT_MODEL_TYPES)} nor a supported teacher family {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    return encoder, load_tokenizer(folder, encoder.spec.vocab_size)


def base_fingerprint(state: Mapping[str, torch.Tensor], replaced: Iterable[str] = ()) -> str:
    """SHA-256 of the base weights an adapter set depends on: every tensor of the encoder's
    ``state`` but the ones the set replaces (``replaced``: the adapter tensors it holds, by their
    names in ``state``) and the MLM head (unused), by name, dtype, shape and bytes. A head-only
    set replaces nothing: the base's own adapters are part of what it was trained on."""
    replaced = set(replaced)
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        if name in replaced or name.startswith("mlm_head."):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _tensor_bytes(state: Dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# ------------------------------------------------------------------ full fine-tuned models
def save_task_model(model: TaskModel, folder: Path, task: Dict[str, Any], tokenizer=None) -> None:
    """Write a whole fine-tuned model atomically; ``task`` is the task description (labels...)."""
    family = encoder_family(model.encoder)
    config = {
        "model_type": FINETUNED_MODEL_TYPE,
        # the transformers class that loads it (components.checkpointing.auto)
        "architectures": [
            "FinetunedEncoderFor"
            + ("TokenClassification" if model.task_type == "token_classification" else "SequenceClassification")
        ],
        "format_version": FORMAT_VERSION,
        "encoder": {"family": family, "config": model.encoder.config},
        "head": model.head_config,
        "task": task,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_directory(Path(folder), "fine-tuned model") as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), {"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))


def load_task_model(path: str) -> Tuple[TaskModel, Dict[str, Any]]:
    """(model, task description) from a folder written by :func:`save_task_model`."""
    folder = Path(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"No fine-tuned model at {folder}: {e}") from e
    if config.get("model_type") != FINETUNED_MODEL_TYPE:
        raise CheckpointError(f"{folder / 'config.json'}: not a fine-tuned model (model_type {config.get('model_type')!r})")
    encoder = ENCODERS[config["encoder"]["family"]](**config["encoder"]["config"])
    head = config["head"]
    model = TaskModel(encoder, head["task_type"], head["num_labels"], head["dropout"])
    try:
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{folder / 'model.safetensors'} does not fit its config: {e}") from e
    return model.eval(), config["task"]


# ------------------------------------------------------------------ adapter sets
def save_adapter_set(
    model: TaskModel, folder: Path, trained: Dict[str, torch.Tensor], task: Dict[str, Any], base: Dict[str, Any]
) -> Dict[str, Any]:
    """Write the ``trained`` tensors (``encoder.adapters.*``, ``head.*``) and a manifest naming the
    base (``base["sha256"]``: :func:`base_fingerprint` of the base, less the adapter tensors the
    set holds); returns the manifest."""
    state = {k: v.detach().cpu().contiguous() for k, v in trained.items()}
    base_state = {k: v for k, v in model.encoder.state_dict().items() if not k.startswith("mlm_head.")}
    manifest = {
        "format": "adapter_set",
        "format_version": ADAPTER_SET_VERSION,
        "base": base,
        "encoder": {"family": encoder_family(model.encoder), "config": model.encoder.config},
        "head": model.head_config,
        "task": task,
        "tensors": sorted(state),
        "bytes": _tensor_bytes(state),
        "base_bytes": _tensor_bytes(base_state),
    }
    with atomic_directory(Path(folder), "adapter set") as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS_FILE), {"format": "pt"})
        (tmp / ADAPTER_SET_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_adapter_set(path: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(manifest, tensors) of an adapter set folder."""
    folder = Path(path)
    try:
        manifest = json.loads((folder / ADAPTER_SET_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"No adapter set at {folder}: {folder / ADAPTER_SET_FILE} is missing or unreadable ({e})") from e
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS_FILE))
    except Exception as e:
        raise CheckpointError(f"Could not read {folder / ADAPTER_WEIGHTS_FILE}: {e}") from e
    return manifest, tensors


def check_base(manifest: Dict[str, Any], fingerprint: str, where: str, base_name: str) -> None:
    """An adapter set may only be put on the base it was trained from."""
    expected = manifest["base"]["sha256"]
    if expected != fingerprint:
        raise CheckpointError(
            f"The adapter set {where} was trained on the base {manifest['base'].get('path')} "
            f"(weights sha256 {expected[:12]}...), not on {base_name} (sha256 {fingerprint[:12]}...): "
            "load it onto its own base"
        )
