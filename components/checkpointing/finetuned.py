"""Fine-tuning's models on disk: the encoder a run starts from, the fine-tuned model, and
adapter sets (one base, many tasks).

* ``load_encoder``: a student folder this library wrote (native or ALBERT format) or any Hugging
  Face BERT-family checkpoint (folder or Hub id), without its MLM head, with its tokenizer.
* A fine-tuned model (``tuning=full``): a folder with ``config.json`` (the encoder's family and
  builder arguments, the head, the labels), ``model.safetensors`` and the tokenizer.
* An adapter set (``tuning=adapters`` or ``head``): only the tensors the run trained (adapters
  and head, or the head) in ``adapters.safetensors``, and ``adapter_set.json`` naming the base
  by a SHA-256 of its frozen weights; loading a set onto another base is an error. A set trained
  on a base without adapters that got fresh ones (``components.models.add_adapters``) says so
  in ``base.adds_adapters`` (placement, reduction factor); its base is the one on disk.
"""

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from components.checkpointing.hf_bert import load_hf_encoder, SUPPORTED_MODEL_TYPES
from components.checkpointing.hub import resolve_checkpoint_dir
from components.checkpointing.sizes import check_config_sizes, check_shapes
from components.checkpointing.student import load_student, STUDENT_MODEL_TYPES
from components.checkpointing.tokenizers import load_tokenizer
from components.checkpointing.weights import weight_shapes
from components.errors import CheckpointError
from components.io import atomic_directory
from components.models.families import encoder_family, ENCODERS
from components.models.heads import TaskModel

FINETUNED_MODEL_TYPE = "finetuned_encoder"
ADAPTER_SET_FILE, ADAPTER_WEIGHTS_FILE = "adapter_set.json", "adapters.safetensors"
FORMAT_VERSION = 1
# 2: the base fingerprint covers the base's own adapters wherever the set does not replace them
# 3: base.adds_adapters: the set puts fresh adapters onto an adapter-free base (older sets never do)
ADAPTER_SET_VERSION = 3
FINGERPRINT_COVERS_BASE_ADAPTERS = 2  # the first version whose head-only sets may run on a base's adapters


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
    """(model, task description) from a folder written by ``save_task_model``.

    Folders may come from strangers: as in ``load_student``,
    the encoder's builder arguments (``encoder.config``) are checked against the weights' header
    (``check_config_sizes``) and the model is laid out on
    the meta device and compared name by name and shape by shape before anything is allocated;
    every refusal names ``config.json`` and the key."""
    folder = Path(path)
    config_file, weights = folder / "config.json", folder / "model.safetensors"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"No fine-tuned model at {folder}: {e}") from e
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != FINETUNED_MODEL_TYPE:
        raise CheckpointError(f"{config_file}: not a fine-tuned model (model_type {model_type!r})")
    encoder, head = config.get("encoder"), config.get("head")
    family = encoder.get("family") if isinstance(encoder, dict) else None
    if family not in ENCODERS:
        raise CheckpointError(f"{config_file}: encoder.family must be one of {sorted(ENCODERS)}, got {family!r}")
    kwargs = encoder.get("config")
    if not isinstance(kwargs, dict):
        raise CheckpointError(
            f"{config_file}: encoder.config must hold the encoder's builder arguments, got {kwargs!r}"
        )
    if not isinstance(head, dict) or not {"task_type", "num_labels", "dropout"} <= head.keys():
        raise CheckpointError(f"{config_file}: head must hold task_type, num_labels and dropout, got {head!r}")
    num_labels = head["num_labels"]
    check_label_count(config_file, num_labels, (config.get("task") or {}).get("label_names"))
    if not weights.is_file():
        raise CheckpointError(f"No weights for the fine-tuned model at {folder}: {weights} does not exist")
    # the one check of every loader, against the header: nothing is read or built before it
    shapes = weight_shapes(folder)
    check_config_sizes(config_file, kwargs, shapes, weights, family="encoder.config")
    check_head_size(config_file, num_labels, shapes, weights)
    try:
        with torch.device("meta"):  # the layout, to compare with the weights before allocating
            layout = TaskModel(ENCODERS[family](**kwargs), head["task_type"], num_labels, head["dropout"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(
            f"{config_file}: cannot build a {family} with a {head['task_type']!r} head from it: {e}"
        ) from e
    expected = {k: tuple(v.shape) for k, v in layout.state_dict().items()}
    missing, unexpected = [k for k in expected if k not in shapes], [k for k in shapes if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match {config_file}: missing {_few(missing)}, unexpected {_few(unexpected)}"
        )
    check_shapes(expected, shapes, str(folder), config_file, weights, kwargs, family="encoder.config")
    model = TaskModel(ENCODERS[family](**kwargs), head["task_type"], num_labels, head["dropout"])
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as e:
        raise CheckpointError(f"{weights} does not fit {config_file}: {e}") from e
    return model.eval(), config.get("task")


MAX_LABELS = 10**6  # beyond this a head is a mistake or an attack (its label names alone take GBs)


def check_label_count(config_file: Any, num_labels: Any, label_names: Optional[list]) -> None:
    """A fine-tuned model's ``head.num_labels`` is a whole number up to ``MAX_LABELS`` and, when
    the config names its labels (``task.label_names``), their count."""
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or not 1 <= num_labels <= MAX_LABELS:
        raise CheckpointError(
            f"{config_file}: head.num_labels must be a whole number from 1 to {MAX_LABELS}, got {num_labels!r}"
        )
    if isinstance(label_names, list) and len(label_names) != num_labels:
        raise CheckpointError(
            f"{config_file} says head.num_labels={num_labels} but task.label_names holds {len(label_names)} names"
        )


def check_head_size(config_file: Any, num_labels: Any, shapes: Mapping[str, Tuple[int, ...]], weights: Any) -> None:
    """A fine-tuned model's ``head.num_labels`` against its classifier in the weights' header (the
    head's part of the check; the encoder's is ``check_config_sizes``)."""
    classifier = shapes.get("head.classifier.weight")
    if classifier is not None and (len(classifier) != 2 or classifier[0] != num_labels):
        raise CheckpointError(
            f"{config_file} says head.num_labels={num_labels} but {weights} holds head.classifier.weight "
            f"with shape {classifier}"
        )


def _few(names: list, shown: int = 8) -> str:
    return f"{names[:shown]}{'...' if len(names) > shown else ''}"


# ------------------------------------------------------------------ adapter sets
def save_adapter_set(
    model: TaskModel, folder: Path, trained: Dict[str, torch.Tensor], task: Dict[str, Any], base: Dict[str, Any]
) -> Dict[str, Any]:
    """Write the ``trained`` tensors (``encoder.adapters.*``, ``head.*``) and a manifest naming the
    base (``base["sha256"]``: ``base_fingerprint`` of the base, less the adapter tensors the
    set holds; ``base["adds_adapters"]``: ``{"placement", "reduction_factor"}`` of the fresh
    adapters the run put onto an adapter-free base, else absent); returns the manifest."""
    state = {k: v.detach().cpu().contiguous() for k, v in trained.items()}
    added = base.get("adds_adapters") is not None  # then the base on disk holds no adapters
    base_state = {
        k: v
        for k, v in model.encoder.state_dict().items()
        if not k.startswith("mlm_head.") and not (added and k.startswith("adapters."))
    }
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
        raise CheckpointError(
            f"No adapter set at {folder}: {folder / ADAPTER_SET_FILE} is missing or unreadable ({e})"
        ) from e
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


def added_adapters(manifest: Mapping[str, Any], where: Any) -> Optional[Dict[str, Any]]:
    """``{"placement", "reduction_factor"}`` of the fresh adapters an adapter set puts onto its
    adapter-free base (``base.adds_adapters``), or ``None``; checked, as manifests may come from strangers."""
    added = (manifest.get("base") or {}).get("adds_adapters")
    if added is None:
        return None
    if not isinstance(added, dict) or set(added) != {"placement", "reduction_factor"}:
        raise CheckpointError(f"{where}: base.adds_adapters must hold placement and reduction_factor, got {added!r}")
    return dict(added)
