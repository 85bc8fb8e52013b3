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

A base without adapters (an adapter-free student, a BERT checkpoint) takes sets whose run added
fresh adapters to it (``base.adds_adapters`` in the manifest): the first such set adds the same
identity adapters to the shared encoder, which every task without adapters of its own runs on
unchanged (a head-only set computes exactly what it did on the bare base); a set adding other
adapters (another placement or reduction factor) is refused.
"""

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from components.checkpointing.finetuned import (
    ADAPTER_SET_FILE,
    ADAPTER_SET_VERSION,
    ADAPTER_WEIGHTS_FILE,
    added_adapters,
    base_fingerprint,
    check_base,
    FINGERPRINT_COVERS_BASE_ADAPTERS,
    load_adapter_set,
    load_encoder,
)
from components.data.task_data import encode_inputs, TaskData
from components.errors import CheckpointError
from components.inference.predict import predict
from components.models.adapters import add_adapters, fresh_adapter_layers
from components.models.heads import TaskModel


class MultiTaskModel:
    """A base encoder with any number of adapter sets.

    Args:
        base: the student folder the sets were trained from (or a Hub id / folder of a BERT
            checkpoint), as it is on disk: without the adapters its sets may add.
        device: where to run.
    """

    def __init__(self, base: str, device: Union[str, torch.device] = "cpu"):
        self.device = torch.device(device)
        self.base_name = str(base)
        self.encoder, self.tokenizer = load_encoder(self.base_name)
        self.encoder.to(self.device).eval()
        # the base's adapters, restored for every task (or iteration) a set has none for: its own,
        # or the identity ones a set added to an adapter-free base (self.added)
        self.base_adapters = {
            f"encoder.{k}": v.detach().clone()
            for k, v in self.encoder.state_dict().items()
            if k.startswith("adapters.")
        }
        self.own_adapters = len(self.base_adapters)  # how many of them the base on disk holds
        self.added: Optional[Dict[str, Any]] = None  # the fresh adapters added: placement, reduction_factor, set
        self.tasks: Dict[str, Dict[str, Any]] = {}
        self._active: Optional[str] = None  # the task whose adapters the encoder holds

    def add(self, name: str, path: str) -> Dict[str, Any]:
        """Load the adapter set at ``path`` as task ``name``; returns its manifest."""
        manifest, tensors = load_adapter_set(path)
        where = Path(path) / ADAPTER_WEIGHTS_FILE
        version = manifest.get("format_version", 1)
        if not isinstance(version, int) or version > ADAPTER_SET_VERSION:
            raise CheckpointError(
                f"{Path(path) / ADAPTER_SET_FILE}: format_version {version!r} is newer than this version reads "
                f"({ADAPTER_SET_VERSION}): load it with the version that wrote it"
            )
        adds = self._check_added(manifest, path)
        head = manifest["head"]
        model = TaskModel(self.encoder, head["task_type"], head["num_labels"], head["dropout"])
        head_state = {f"head.{k}": tuple(v.shape) for k, v in model.head.state_dict().items()}
        # the adapters a set may hold: the base's own, or the fresh ones of a set that adds them
        same_kind = (adds is None) == (self.added is None)
        adapter_shapes = {k: tuple(v.shape) for k, v in self.base_adapters.items()} if same_kind else {}
        if adds is not None and self.added is None:  # the layout of what this set adds
            try:
                with torch.device("meta"):
                    layout = fresh_adapter_layers(self.encoder, adds["placement"], adds["reduction_factor"])
            except ValueError as e:
                raise CheckpointError(f"The adapter set {path} adds adapters {self.base_name} cannot take: {e}") from e
            adapter_shapes = {f"encoder.adapters.{k}": tuple(v.shape) for k, v in layout.state_dict().items()}
        allowed = {**adapter_shapes, **head_state}
        for key, tensor in tensors.items():
            if key not in allowed:
                raise CheckpointError(
                    f"{where} holds {key}: an adapter set may hold only adapter tensors of its base "
                    f"(encoder.adapters.*; {self.base_name} has {self.own_adapters}"
                    + (f", and {len(adapter_shapes)} fresh ones added" if adds is not None else "")
                    + ") and head tensors (head.*)"
                )
            if tuple(tensor.shape) != allowed[key]:
                raise CheckpointError(f"{where}: {key} has shape {tuple(tensor.shape)}, the base needs {allowed[key]}")
        missing = sorted(set(head_state) - set(tensors))
        if missing:
            raise CheckpointError(f"{where} lacks the head tensors {missing}")
        adapters = {k: v for k, v in tensors.items() if k in adapter_shapes}
        if adds is not None and len(adapters) < len(adapter_shapes):
            raise CheckpointError(
                f"{where} lacks {len(adapter_shapes) - len(adapters)} of the fresh adapter tensors its run added "
                f"(base.adds_adapters), e.g. {sorted(set(adapter_shapes) - set(adapters))[0]}"
            )
        if version < FINGERPRINT_COVERS_BASE_ADAPTERS and len(adapters) < self.own_adapters:
            raise CheckpointError(
                f"The adapter set {path} was written by an earlier version whose base fingerprint left out the base's "
                "adapters, which this set runs on: fine-tune it again"
            )
        # the base as it is on disk: none of the fresh adapters, or its own as loaded (the encoder
        # may hold another task's)
        if self.added is not None:
            base_state = {k: v for k, v in self.encoder.state_dict().items() if not k.startswith("adapters.")}
        else:
            base_state = {
                **self.encoder.state_dict(),
                **{k[len("encoder.") :]: v for k, v in self.base_adapters.items()},
            }
        fingerprint = base_fingerprint(base_state, replaced=[k[len("encoder.") :] for k in adapters])
        check_base(manifest, fingerprint, str(path), self.base_name)
        model.head.load_state_dict({k[len("head.") :]: tensors[k] for k in head_state})
        if adds is not None and self.added is None:
            self._add_fresh(adds, path)
        self.tasks[name] = {
            "manifest": manifest,
            "model": model.to(self.device).eval(),
            "adapters": adapters,  # the set's own adapter tensors; the base's everywhere else
        }
        if self._active == name:  # a task replaced under the same name
            self._active = None
        return manifest

    def _check_added(self, manifest: Dict[str, Any], path: str) -> Optional[Dict[str, Any]]:
        """The fresh adapters the set at ``path`` adds (or ``None``), if this base can take them:
        it has no adapters of its own, and any set added before added the same."""
        adds = added_adapters(manifest, Path(path) / ADAPTER_SET_FILE)
        if adds is None:
            return None
        what = f"{adds['placement']} adapters (reduction factor {adds['reduction_factor']})"
        if self.own_adapters:
            raise CheckpointError(
                f"The adapter set {path} adds fresh {what} to an adapter-free base, but {self.base_name} has "
                "adapters of its own: load it onto the base it was trained on"
            )
        if self.added is not None and {k: self.added[k] for k in adds} != adds:
            raise CheckpointError(
                f"The adapter set {path} adds {what} to {self.base_name}, but the set {self.added['set']} added "
                f"{self.added['placement']} adapters (reduction factor {self.added['reduction_factor']}): sets that "
                "add adapters to one base must add the same ones (use one MultiTaskModel for each kind)"
            )
        return adds

    def _add_fresh(self, adds: Dict[str, Any], path: str) -> None:
        """Add the fresh adapters of ``adds`` to the shared encoder: identities, so every task
        without adapters of its own runs exactly as on the bare base."""
        add_adapters(self.encoder, adds["placement"], adds["reduction_factor"])  # checked by add()
        self.encoder.eval()
        self.base_adapters = {
            f"encoder.adapters.{k}": v.detach().clone() for k, v in self.encoder.adapters.state_dict().items()
        }
        self.added = {**adds, "set": str(path)}
        self._active = None  # the encoder holds no task's adapters yet

    def task_model(self, name: str) -> TaskModel:
        """Task ``name``'s model: the shared encoder, holding this task's adapters (until another
        task is used)."""
        return self._model(name)

    def _model(self, name: str) -> TaskModel:
        """Task ``name``'s model: the shared encoder, holding this task's adapters."""
        try:
            task = self.tasks[name]
        except KeyError:
            raise KeyError(f"No adapter set named {name!r}; added: {sorted(self.tasks)}") from None
        if self._active != name:
            with torch.no_grad():
                parameters = dict(self.encoder.named_parameters(prefix="encoder"))
                for key, value in self.base_adapters.items():
                    parameters[key].copy_(task["adapters"].get(key, value))
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
