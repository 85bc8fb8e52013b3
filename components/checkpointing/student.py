"""Export a student to a Hugging Face-style folder, and load one back.

* An adapter-free student with an ALBERT-shaped MLM head is written as an ALBERT checkpoint
  (``config.json`` + ``model.safetensors`` + tokenizer) that ``AlbertForMaskedLM.from_pretrained``
  loads and that reproduces our logits.
* Any other student (adapters, a MiniALBERT-style wide head) is written in our own format:
  ``config.json`` with ``model_type: recursive_encoder`` and the builder arguments, our weight
  names in ``model.safetensors``, and the tokenizer. ``load_student`` rebuilds it exactly.

``load_student`` also reads plain ALBERT checkpoints with one shared layer, so a published
ALBERT can start a distillation run.
"""

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from components.checkpointing.albert import (
    albert_config_kwargs,
    albert_to_native,
    native_to_albert,
    recursive_kwargs_from_albert,
)
from components.checkpointing.hf_bert import CheckpointError
from components.checkpointing.io import atomic_directory
from components.models.recursive import RecursiveEncoder

NATIVE_MODEL_TYPE = "recursive_encoder"
FORMAT_VERSION = 1
# config.json key for what this library records about how a student was made (training
# metadata: transformers keeps unknown config keys, so ALBERT exports carry it too)
METADATA_KEY = "recursive_distill"


def is_albert_compatible(model: RecursiveEncoder) -> bool:
    c = model.config
    return c["adapter_placement"] is None and c["mlm_head"] and c["mlm_head_size"] == c["embedding_size"]


def _native_state(model: RecursiveEncoder) -> dict:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config["tie_word_embeddings"]:
        state.pop("mlm_head.decoder.weight", None)  # safetensors refuses shared tensors
    return state


def save_student(
    model: RecursiveEncoder, folder: Path, tokenizer=None, format: str = "auto", metadata: Optional[dict] = None
) -> str:
    """Write ``model`` (and ``tokenizer``) to ``folder`` atomically; returns the format used.

    Args:
        format: ``"albert"``, ``"native"``, or ``"auto"`` (ALBERT whenever the student is one).
        metadata: how the student was made (e.g. ``{"quantization_aware": {...}}``), saved in
            ``config.json`` under ``"recursive_distill"``; see :func:`student_metadata`.
    """
    if format == "auto":
        format = "albert" if is_albert_compatible(model) else "native"
    if format == "albert" and not is_albert_compatible(model):
        raise ValueError(
            "Only an adapter-free student whose MLM head is E-wide is an ALBERT model; "
            "export this one with format='native'"
        )
    if format not in ("albert", "native"):
        raise ValueError(f"Unknown student format {format!r}; use 'albert', 'native' or 'auto'")
    state = _native_state(model)
    with atomic_directory(Path(folder), "student") as tmp:
        if format == "albert":
            from transformers import AlbertConfig

            extra = {METADATA_KEY: metadata} if metadata else {}
            AlbertConfig(**albert_config_kwargs(model.config), **extra).save_pretrained(str(tmp))
            save_file(native_to_albert(state, model.config), str(tmp / "model.safetensors"), {"format": "pt"})
        else:
            config = {
                "model_type": NATIVE_MODEL_TYPE,
                # the transformers class that loads it (components.checkpointing.auto)
                "architectures": ["RecursiveEncoderForMaskedLM" if model.mlm_head is not None else "RecursiveEncoderModel"],
                "format_version": FORMAT_VERSION,
                "recursive_encoder": model.config,
            }
            if metadata:
                config[METADATA_KEY] = metadata
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            save_file(state, str(tmp / "model.safetensors"), {"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return format


def student_metadata(path: str) -> dict:
    """What :func:`save_student` recorded about how the student in ``path`` was made."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get(METADATA_KEY) or {}
    except (OSError, ValueError):
        return {}


def load_student(path: str, **overrides) -> RecursiveEncoder:
    """Rebuild a student from a folder written by :func:`save_student`, or from an ALBERT
    checkpoint with one shared layer. ``overrides`` change builder arguments that do not
    touch the saved weights' shapes: dropout, say, or ``adapter_placement`` to add fresh
    adapters to an adapter-free student."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"No student at {folder}: {config_file} does not exist")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from e
    model_type = config.get("model_type")
    if model_type not in (NATIVE_MODEL_TYPE, "albert"):
        raise CheckpointError(
            f"{config_file}: model_type {model_type!r} is not a student "
            f"(expected {NATIVE_MODEL_TYPE!r} or 'albert')"
        )
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"No weights for the student at {folder}: {weights} does not exist")
    try:
        state = load_file(str(weights))
    except Exception as e:
        raise CheckpointError(f"Could not read {weights}: {e}") from e
    if model_type == NATIVE_MODEL_TYPE:
        kwargs = config["recursive_encoder"]
        if state and all(k.startswith("encoder.") for k in state):  # saved by transformers' save_pretrained
            state = {k[len("encoder."):]: v for k, v in state.items()}
    else:
        kwargs = recursive_kwargs_from_albert(config)
        state = albert_to_native(state, kwargs)
        if kwargs["embedding_size"] == kwargs["hidden_size"]:
            eye = torch.eye(kwargs["hidden_size"])
            if not torch.allclose(state.pop("projector.weight"), eye) or state.pop("projector.bias").any():
                raise CheckpointError(
                    f"{folder}: an ALBERT with E == H and a non-identity embedding projection "
                    "is not a recursive student"
                )
    model = RecursiveEncoder(**{**kwargs, **overrides})
    if not model.config["mlm_head"]:  # left out on purpose (fine-tuning does not use it)
        state = {k: v for k, v in state.items() if not k.startswith("mlm_head.")}
    if kwargs.get("tie_word_embeddings") and model.config["mlm_head"]:
        state.pop("mlm_head.decoder.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if kwargs.get("tie_word_embeddings"):
        missing = [k for k in missing if k != "mlm_head.decoder.weight"]
    if kwargs.get("adapter_placement") is None:
        # adapters added to an adapter-free student (overrides) keep their initialisation
        missing = [k for k in missing if not k.startswith("adapters.")]
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match its config: missing {missing}, unexpected {unexpected}")
    return model

