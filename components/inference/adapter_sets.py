"""One base, many tasks: load several adapter sets onto one student and predict with each.

    from components.inference import MultiTaskModel

    model = MultiTaskModel("outputs/tiny/student")              # the base, loaded once
    model.add("sst2", "outputs/sst2/adapter_set")               # checked against the base
    model.add("ner", "outputs/ner/adapter_set")
    model.predict("sst2", ["the result is valid", "an error was raised"])   # -> [1, 0]
    model.predict("ner", [["import", "os", "and", "sys"]])                   # -> [["O", "B-MOD", "O", "B-MOD"]]

An adapter set holds only what its fine-tuning run trained (the per-iteration adapters and the
task head, or the head alone: a few percent of the base) and the SHA-256 of every base weight it
depends on; adding a set trained on another base is an error, and so is a set holding anything
but adapter and head tensors. Every task runs with exactly what it was trained with: its own
adapters where the set has them, the base's own everywhere else (a head-only set runs on the
base's adapters, restored exactly). Switching tasks copies adapter tensors into the one shared
encoder, so N tasks cost one base plus N small sets in memory.
"""

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from components.checkpointing.finetuned import (
    ADAPTER_SET_VERSION,
    ADAPTER_WEIGHTS_FILE,
    base_fingerprint,
    check_base,
    load_adapter_set,
    load_encoder,
)
from components.data.task_data import encode_inputs, TaskData
from components.errors import CheckpointError
from components.inference.predict import predict
from components.models.heads import TaskModel


class MultiTaskModel:
    """A base encoder with any number of adapter sets.

    Args:
        base: the student folder the sets were trained from (or a Hub id / folder of a BERT
            checkpoint, for head-only sets).
        device: where to run.
    """

    def __init__(self, base: str, device: Union[str, torch.device] = "cpu"):
        self.device = torch.device(device)
        self.base_name = str(base)
        self.encoder, self.tokenizer = load_encoder(self.base_name)
        self.encoder.to(self.device).eval()
        # the base's own adapters, restored for every task (or iteration) a set has none for
        self.base_adapters = {
            f"encoder.{k}": v.detach().clone()
            for k, v in self.encoder.state_dict().items()
            if k.startswith("adapters.")
        }
        self.tasks: Dict[str, Dict[str, Any]] = {}
        self._active: Optional[str] = None  # the task whose adapters the encoder holds

    def add(self, name: str, path: str) -> Dict[str, Any]:
        """Load the adapter set at ``path`` as task ``name``; returns its manifest."""
        manifest, tensors = load_adapter_set(path)
        where = Path(path) / ADAPTER_WEIGHTS_FILE
        head = manifest["head"]
        model = TaskModel(self.encoder, head["task_type"], head["num_labels"], head["dropout"])
        head_state = {f"head.{k}": v for k, v in model.head.state_dict().items()}
        allowed = {**self.base_adapters, **head_state}
        for key, tensor in tensors.items():
            if key not in allowed:
                raise CheckpointError(
                    f"{where} holds {key}: an adapter set may hold only adapter tensors of its base "
                    f"(encoder.adapters.*; {self.base_name} has {len(self.base_adapters)}) and head tensors (head.*)"
                )
            if tensor.shape != allowed[key].shape:
                raise CheckpointError(
                    f"{where}: {key} has shape {tuple(tensor.shape)}, the base needs {tuple(allowed[key].shape)}"
                )
        missing = sorted(set(head_state) - set(tensors))
        if missing:
            raise CheckpointError(f"{where} lacks the head tensors {missing}")
        adapters = {k: v for k, v in tensors.items() if k in self.base_adapters}
        if manifest.get("format_version", 1) < ADAPTER_SET_VERSION and len(adapters) < len(self.base_adapters):
            raise CheckpointError(
                f"The adapter set {path} was written by an earlier version whose base fingerprint left out the base's "
                "adapters, which this set runs on: fine-tune it again"
            )
        base_state = {**self.encoder.state_dict(), **{k[len("encoder.") :]: v for k, v in self.base_adapters.items()}}
        fingerprint = base_fingerprint(base_state, replaced=[k[len("encoder.") :] for k in adapters])
        check_base(manifest, fingerprint, str(path), self.base_name)
        model.head.load_state_dict({k[len("head.") :]: tensors[k] for k in head_state})
        self.tasks[name] = {
            "manifest": manifest,
            "model": model.to(self.device).eval(),
            # every adapter tensor the encoder holds: the set's own, else the base's
            "adapters": {k: adapters.get(k, v) for k, v in self.base_adapters.items()},
        }
        if self._active == name:  # a task replaced under the same name
            self._active = None
        return manifest

    def _model(self, name: str) -> TaskModel:
        """Task ``name``'s model: the shared encoder, holding this task's adapters."""
        try:
            task = self.tasks[name]
        except KeyError:
            raise KeyError(f"No adapter set named {name!r}; added: {sorted(self.tasks)}") from None
        if self._active != name:
            with torch.no_grad():
                parameters = dict(self.encoder.named_parameters(prefix="encoder"))
                for key, value in task["adapters"].items():
                    parameters[key].copy_(value)
            self._active = name
        return task["model"]

    @torch.no_grad()
    def predict(self, name: str, inputs: Sequence, batch_size: int = 32) -> List[Any]:
        """Predictions of task ``name``: for sentence tasks ``inputs`` are strings or
        ``(sentence, sentence)`` pairs and each prediction a label as written in the training
        data (or a float for regression); for token tasks ``inputs`` are word lists and each
        prediction one tag per word."""
        model = self._model(name)
        task = self.tasks[name]["manifest"]["task"]
        data = TaskData(
            task_type=model.task_type,
            label_names=task["label_names"],
            label_values=task["label_values"],
            splits={
                "inputs": encode_inputs(
                    inputs, self.tokenizer, model.task_type, task["input"] == "pair", task["max_length"]
                )
            },
            labelled={"inputs": False},
            sources={"inputs": "MultiTaskModel.predict"},
        )
        rows, _ = predict(
            model, data.splits["inputs"], data, batch_size, self.tokenizer.pad_token_id, device=self.device
        )
        return [prediction for _, prediction in rows]
