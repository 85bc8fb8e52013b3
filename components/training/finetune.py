"""What fine-tuning does besides its loop: the loss of a batch, and what a run leaves in its
``output_dir`` (the best model or adapter set, prediction files, ``results.json``).
Predictions themselves: ``components.inference.predict``."""

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from safetensors.torch import load_file

from components.checkpointing.finetuned import load_adapter_set, save_adapter_set, save_task_model
from components.data.task_data import num_batches, TaskData
from components.inference.predict import model_inputs, write_predictions
from components.io import atomic_file
from components.models.heads import TaskModel

log = logging.getLogger(__name__)

# What a finished fine-tuning run leaves in its output_dir (a new run refuses a folder holding any)
OUTPUTS = ("model", "adapter_set", "predictions", "results.json")


def finetune_loss(model: TaskModel, batch: Dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The task loss of one training batch (mean over its examples, or its labelled tokens)."""
    return model.loss(model(*model_inputs(batch, device)), batch["labels"].to(device))


def steps_per_epoch(task: TaskData, batch_size: int) -> int:
    return num_batches(task.splits["train"], batch_size)


def save_best(
    output_dir: Path,
    model: TaskModel,
    tuning: str,
    trained: List[str],
    task: Mapping[str, Any],
    tokenizer,
    base: Optional[Mapping[str, Any]],
) -> Optional[Dict[str, Any]]:
    """Write the best model so far: the whole model (``tuning=full``, under ``model/``) or only
    the ``trained`` tensors as an adapter set on ``base`` (under ``adapter_set/``; returns its
    manifest)."""
    if tuning == "full":
        save_task_model(model, output_dir / "model", dict(task), tokenizer)
        return None
    names = set(trained)
    state = {n: p for n, p in model.state_dict().items() if n in names}
    return save_adapter_set(model, output_dir / "adapter_set", state, dict(task), dict(base))


def load_best(output_dir: Path, model: TaskModel, tuning: str) -> None:
    """Put the best model ``save_best`` wrote back into ``model``."""
    if tuning == "full":
        model.load_state_dict(load_file(str(output_dir / "model" / "model.safetensors")))
    else:
        _, tensors = load_adapter_set(str(output_dir / "adapter_set"))
        model.load_state_dict(tensors, strict=False)


def write_split_predictions(output_dir: Path, split: str, rows: List[Tuple[int, Any]], task_type: str) -> None:
    """``predictions/<split>.tsv``, atomically."""
    with atomic_file(output_dir / "predictions" / f"{split}.tsv", "predictions") as f:
        write_predictions(f, rows, task_type)


def write_results(output_dir: Path, results: Mapping[str, Any]) -> None:
    """``results.json``, atomically: the best validation metrics and where they came from."""
    with atomic_file(output_dir / "results.json", "results") as f:
        f.write(json.dumps(results, indent=2) + "\n")
