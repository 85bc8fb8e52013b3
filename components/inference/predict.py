"""Predictions of a task model on a dataset of encoded rows, as label values, numbers or tags,
with the task's metrics when the rows carry labels; and the prediction files runs write."""

import contextlib
import csv
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from tqdm import tqdm

from components.data.task_data import num_batches, per_word, task_batches, TaskData
from components.inference.task_metrics import compute_metrics
from components.models.heads import TaskModel

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: Dict[str, torch.Tensor], device: torch.device) -> Tuple[torch.Tensor, ...]:
    return tuple(batch[k].to(device) if k in batch else None for k in MODEL_INPUTS)


@torch.no_grad()
def predict(
    model: TaskModel,
    dataset,
    task: TaskData,
    batch_size: int,
    pad_token_id: int,
    pad_to_multiple_of: int = 8,
    device: Union[str, torch.device] = "cpu",
    autocast: Optional[Callable] = None,
    progress: bool = False,
) -> Tuple[List[Tuple[int, Any]], Optional[Dict[str, float]]]:
    """Predictions for every row of ``dataset`` as ``(index, prediction)`` in source order, and
    the task's metrics when the rows have labels.

    A prediction is the label as written in the data (classification), a float (regression),
    or one tag per word (NER; words cut off by truncation get ``"O"``). ``progress`` shows a bar.
    """
    was_training = model.training
    model.eval()
    rows: List[Tuple[int, Any]] = []
    predicted, references = [], []
    batches = task_batches(dataset, batch_size, pad_token_id, pad_to_multiple_of, shuffle=False, seed=0, epoch=0)
    for batch in tqdm(
        batches,
        total=num_batches(dataset, batch_size),
        desc="predict",
        leave=False,
        dynamic_ncols=True,
        disable=not progress,
    ):
        with autocast() if autocast is not None else contextlib.nullcontext():
            out = model.predict(model(*model_inputs(batch, device))).cpu()
        index = batch["index"].tolist()
        if task.task_type == "token_classification":
            tags = [[task.label_names[i] for i in sentence] for sentence in per_word(out, batch["word_starts"])]
            rows += [(i, t + ["O"] * (n - len(t))) for i, t, n in zip(index, tags, batch["num_words"].tolist())]
            predicted += tags
            if "labels" in batch:
                references += [
                    [task.label_names[i] for i in s] for s in per_word(batch["labels"], batch["word_starts"])
                ]
        elif task.task_type == "regression":
            rows += list(zip(index, out.tolist()))
            predicted += out.tolist()
            references += batch["labels"].tolist() if "labels" in batch else []
        else:
            rows += [(i, task.label_values[c]) for i, c in zip(index, out.tolist())]
            predicted += out.tolist()
            references += batch["labels"].tolist() if "labels" in batch else []
    model.train(was_training)
    metrics = compute_metrics(task.task_type, predicted, references, task.label_names) if references else None
    return rows, metrics


def write_predictions(file, rows: List[Tuple[int, Any]], task_type: str) -> None:
    """GLUE's submission layout: a header ``index<TAB>prediction``, then one row per example
    (NER: the tags of the sentence's words, space-separated)."""
    writer = csv.writer(file, delimiter="\t", lineterminator="\n")
    writer.writerow(["index", "prediction"])
    for index, prediction in rows:
        if task_type == "token_classification":
            prediction = " ".join(prediction)
        elif task_type == "regression":
            prediction = f"{prediction:.6g}"
        writer.writerow([index, prediction])
