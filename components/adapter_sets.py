"""One base, many tasks: load several adapter sets onto one student and predict with each.

    from components.adapter_sets import MultiTaskModel

    model = MultiTaskModel("outputs/tiny/student")              # the base, loaded once
    model.add("sst2", "outputs/sst2/adapter_set")               # checked against the base
    model.add("ner", "outputs/ner/adapter_set")
    model.predict("sst2", ["the result is valid", "an error was raised"])   # -> [1, 0]
    model.predict("ner", [["import", "os", "and", "sys"]])                   # -> [["O", "B-MOD", "O", "B-MOD"]]

An adapter set holds only what its fine-tuning run trained (the per-iteration adapters and the
task head, a few percent of the base) and the SHA-256 of the base weights it was trained on;
adding a set trained on another base is an error. Switching tasks copies that task's adapters
into the one shared encoder, so N tasks cost one base plus N small sets in memory.
"""

from typing import Any, Dict, List, Sequence, Union

import torch

from components.checkpointing.tasks import base_fingerprint, check_base, load_adapter_set, load_encoder
from components.data.tasks import encode_inputs, TaskData
from components.errors import CheckpointError
from components.models.tasks import TaskModel
from components.training.finetune import predict


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
        self.fingerprint = base_fingerprint(self.encoder)
        self.tasks: Dict[str, Dict[str, Any]] = {}

    def add(self, name: str, path: str) -> Dict[str, Any]:
        """Load the adapter set at ``path`` as task ``name``; returns its manifest."""
        manifest, tensors = load_adapter_set(path)
        check_base(manifest, self.fingerprint, str(path), self.base_name)
        head = manifest["head"]
        model = TaskModel(self.encoder, head["task_type"], head["num_labels"], head["dropout"])
        adapters = {k: v for k, v in tensors.items() if k.startswith("encoder.")}
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if unexpected or any(k.startswith("head.") for k in missing):
            raise CheckpointError(f"The adapter set {path} does not fit its base: unexpected {unexpected}, missing {missing}")
        self.tasks[name] = {"manifest": manifest, "model": model.to(self.device).eval(), "adapters": adapters}
        return manifest

    def _model(self, name: str) -> TaskModel:
        """Task ``name``'s model: the shared encoder, with this task's adapters copied in."""
        try:
            task = self.tasks[name]
        except KeyError:
            raise KeyError(f"No adapter set named {name!r}; added: {sorted(self.tasks)}") from None
        with torch.no_grad():
            parameters = dict(task["model"].named_parameters())
            for key, value in task["adapters"].items():
                parameters[key].copy_(value)
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
            splits={"inputs": encode_inputs(inputs, self.tokenizer, model.task_type, task["input"] == "pair", task["max_length"])},
            labelled={"inputs": False},
            sources={"inputs": "MultiTaskModel.predict"},
        )
        rows, _ = predict(model, data.splits["inputs"], data, batch_size, self.tokenizer.pad_token_id, device=self.device)
        return [prediction for _, prediction in rows]
