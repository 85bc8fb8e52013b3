"""What fine-tuning does with a batch: its loss (predictions: ``components.inference.predict``)."""

from typing import Dict

import torch

from components.data.task_data import num_batches, TaskData
from components.inference.predict import model_inputs
from components.models.heads import TaskModel


def finetune_loss(model: TaskModel, batch: Dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The task loss of one training batch (mean over its examples, or its labelled tokens)."""
    return model.loss(model(*model_inputs(batch, device)), batch["labels"].to(device))


def steps_per_epoch(task: TaskData, batch_size: int) -> int:
    return num_batches(task.splits["train"], batch_size)
