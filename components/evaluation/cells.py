"""An evaluation as cells: one model on one task (one tuning, learning rate and seed for
fine-tuning), or one model's size and latency. Each cell is named by a digest of everything
that decides its result (the model's files, the task's resolved config, the settings), and
its result is a small JSON file under ``<output_dir>/cells/``: a rerun skips every cell whose
file is there, and a changed model or task gets new cells instead of stale numbers.

Scores of probe and similarity cells are computed here; fine-tuning cells run the fine-tuning
recipe itself (recipes/evaluate.py hands its configs, ``finetune_config``, to
``FinetuneRecipe``).
"""

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
from omegaconf import OmegaConf

from components.config import check_section, config_section, instantiate
from components.data.task_data import load_task_data, task_batches, TaskData
from components.errors import ConfigError, TaskDataError
from components.evaluation.models import features
from components.inference.predict import predict
from components.inference.task_metrics import compute_metrics, resolve_metric
from components.io import atomic_file
from components.training.schema import TaskConfig, TaskDataConfig

CELL_FORMAT = 1  # part of every cell's digest: a change to how cells are computed redoes them
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_name(kind: str, name: str) -> None:
    """Model and task names become folder names and table headers."""
    if not _NAME.match(str(name)):
        raise ConfigError(
            f"{kind} name {name!r}: use letters, digits, '_', '.', '-' (it names folders under output_dir)"
        )


@dataclass
class Cell:
    model: str
    task: str
    kind: str  # finetune | probe | similarity | efficiency
    spec: Dict[str, Any]  # everything that decides the result (digested into the name)
    tuning: Optional[str] = None
    lr: Optional[float] = None
    seed: Optional[int] = None

    @property
    def digest(self) -> str:
        text = json.dumps({"format": CELL_FORMAT, **self.spec}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    @property
    def name(self) -> str:
        if self.kind == "finetune":
            return f"{self.tuning}-lr{self.lr:g}-seed{self.seed}-{self.digest}"
        return f"{self.kind}-{self.digest}"

    def result_path(self, output_dir: Path) -> Path:
        return output_dir / "cells" / self.model / self.task / f"{self.name}.json"

    def run_dir(self, output_dir: Path) -> Path:
        """Where a fine-tuning cell's run writes (its checkpoints let an interrupted cell resume)."""
        return output_dir / "runs" / self.model / self.task / self.name

    def label(self) -> str:
        extra = f" {self.tuning} lr={self.lr:g} seed={self.seed}" if self.kind == "finetune" else ""
        return f"{self.model} / {self.task}{extra}"


def read_result(cell: Cell, output_dir: Path) -> Optional[Dict[str, Any]]:
    path = cell.result_path(output_dir)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:  # a file cut by a crash outside atomic_file cannot happen; a hand edit can
        return None


def write_result(cell: Cell, output_dir: Path, result: Mapping[str, Any]) -> None:
    with atomic_file(cell.result_path(output_dir), "cell result") as f:
        f.write(json.dumps({"cell": cell.label(), "kind": cell.kind, **result}, indent=2) + "\n")


# ------------------------------------------------------------------ task configs
def _plain(node) -> Dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else copy.deepcopy(dict(node))


def task_settings(name: str, spec: Mapping[str, Any], defaults: Mapping[str, Any]) -> Dict[str, Any]:
    """The fine-tuning config a task starts from: ``finetune_defaults`` < its ``config`` file <
    its ``overrides`` (without output_dir and checkpoint_dir, which each cell sets)."""
    merged = OmegaConf.create(_plain(defaults))
    if spec.get("config"):
        path = Path(spec["config"])
        if not path.is_file():
            raise ConfigError(f"tasks.{name}.config: {path} does not exist")
        loaded = OmegaConf.load(path)
        loaded.pop("checkpoint_dir", None)  # each cell's own (output_dir too, set when the cell runs)
        merged = OmegaConf.merge(merged, loaded)
    merged = OmegaConf.merge(merged, _plain(spec.get("overrides") or {}))
    return OmegaConf.to_container(merged, resolve=False)


def finetune_config(settings: Mapping[str, Any], cell: Cell, model_path: str, run_dir: Path, **extra) -> Dict[str, Any]:
    """A fine-tuning cell's config: the task's settings with the cell's model, tuning, seed and
    learning rate, writing into ``run_dir``."""
    cfg = copy.deepcopy(dict(settings))
    cfg.update(output_dir=str(run_dir), checkpoint_dir=model_path, tuning=cell.tuning, seed=cell.seed, **extra)
    cfg.setdefault("optimizer", {})["lr"] = cell.lr
    resolved = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)  # ${output_dir} is the run's
    return resolved


def data_sections(name: str, settings: Mapping[str, Any], output_dir: str) -> Dict[str, Dict[str, Any]]:
    """The checked ``data`` and ``task`` sections of a task, with the config file's
    ``${output_dir}`` (the smoke tasks' files, say) under the evaluation's ``output_dir``."""
    settings = OmegaConf.to_container(OmegaConf.create({**settings, "output_dir": output_dir}), resolve=True)
    if "data" not in settings:
        raise ConfigError(f"tasks.{name}: no data section (give a config file or overrides.data)")
    return {
        "data": check_section(settings["data"], TaskDataConfig, f"tasks.{name}.data"),
        "task": check_section(settings.get("task") or {}, TaskConfig, f"tasks.{name}.task"),
    }


def finetune_lrs(name: str, spec: Mapping[str, Any], settings: Mapping[str, Any]) -> List[float]:
    if spec.get("lrs"):
        return [float(lr) for lr in spec["lrs"]]
    lr = (settings.get("optimizer") or {}).get("lr")
    if lr is None:
        raise ConfigError(f"tasks.{name}: no learning rate: set tasks.{name}.lrs or optimizer.lr in its config")
    return [float(lr)]


# ------------------------------------------------------------------ probe and similarity
def load_sections(sections: Mapping[str, Any], model, text_column: Optional[str] = None) -> TaskData:
    """The task's splits tokenised by ``model``'s tokenizer, at most to its positions
    (``text_column``: read that column as a single sentence, for similarity)."""
    data, task = dict(sections["data"]), dict(sections["task"])
    data["max_length"] = min(data["max_length"], model.max_length)
    if isinstance(data["source"], dict) and "_component_" in data["source"]:
        with config_section("data.source"):
            data["source"] = instantiate(data["source"])
    if text_column is not None:
        data.update(text_column=text_column, text_pair_column=None)
        task.update(input="single")
    return load_task_data(data, task, model.tokenizer)


def _split_features(model, task: TaskData, split: str, batch_size: int, pad_token_id: int):
    if split not in task.splits:
        raise TaskDataError(f"split {split!r} is not in the task's data (it has {sorted(task.splits)})")
    if not task.labelled[split]:
        raise TaskDataError(f"split {split!r} ({task.sources[split]}) has no labels to score against")
    rows = task.splits[split]
    batches = task_batches(rows, batch_size, pad_token_id, 8, shuffle=False, seed=0, epoch=0)
    return features(model, batches), np.asarray(rows["labels"])


def probe_scores(
    model, sections, split: str, c: float, batch_size: int, max_train_rows: Optional[int], seed: int = 0
) -> Dict[str, float]:
    """Fit a linear model on the train split's frozen features and score ``split`` with the
    task's metrics: logistic regression (classification) or ridge regression, after standardising
    each feature on the train split."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    task = load_sections(sections, model)
    if task.task_type == "token_classification":
        raise ConfigError("a probe scores sentence tasks (classification or regression), not token_classification")
    pad = model.tokenizer.pad_token_id
    train = task.splits["train"]
    if max_train_rows is not None and len(train) > max_train_rows:
        task.splits["train"] = train.select(range(max_train_rows))
    x_train, y_train = _split_features(model, task, "train", batch_size, pad)
    x_eval, y_eval = _split_features(model, task, split, batch_size, pad)
    if task.task_type == "classification":
        head = LogisticRegression(C=c, max_iter=5000, random_state=seed)
    else:
        head = Ridge(alpha=1.0 / c)
    probe = make_pipeline(StandardScaler(), head).fit(x_train, y_train)
    return compute_metrics(task.task_type, probe.predict(x_eval).tolist(), y_eval.tolist(), task.label_names)


def predict_scores(model, sections, split: str, batch_size: int) -> Dict[str, float]:
    """A fine-tuned model's own predictions on ``split`` of its task, scored with the task's
    metrics; its labels must be the task's, in the same order."""
    task = load_sections(sections, model)
    own, theirs = model.task.get("label_values"), task.label_values
    if own is not None and theirs is not None and [str(v) for v in own] != [str(v) for v in theirs]:
        raise ConfigError(
            f"{model.path} was fine-tuned for the labels {own}, but this task's data has {theirs}: "
            "it cannot be scored on this task"
        )
    if split not in task.splits or not task.labelled[split]:
        raise TaskDataError(f"split {split!r} is not a labelled split of the task's data ({sorted(task.splits)})")
    _, metrics = predict(
        model.task_model, task.splits[split], task, batch_size, model.tokenizer.pad_token_id, 8, model.device
    )
    return metrics


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity (0 where a row is all zeros)."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, (a * b).sum(1) / np.where(norms > 0, norms, 1), 0.0)


def similarity_scores(model, sections, split: str, batch_size: int) -> Dict[str, float]:
    """Zero-shot: the cosine of the two sentences' mean-pooled embeddings against the gold
    scores (Pearson and Spearman correlation, as STS benchmarks report)."""
    data, task = sections["data"], sections["task"]
    if task["input"] != "pair" or not data.get("text_pair_column"):
        raise ConfigError("a similarity task needs sentence pairs: task.input=pair and data.text_pair_column")
    if task["type"] == "token_classification":
        raise ConfigError("a similarity task scores sentence pairs, not token_classification")
    pad = model.tokenizer.pad_token_id
    first = load_sections(sections, model, data["text_column"])
    second = load_sections(sections, model, data["text_pair_column"])
    a, gold = _split_features(model, first, split, batch_size, pad)
    b, _ = _split_features(model, second, split, batch_size, pad)
    # class ids of a binary pair task (paraphrase or not) serve as scores too
    return compute_metrics("regression", cosine(a, b).tolist(), gold.astype(np.float64).tolist())


def reported_metrics(kind: str, metric, task_type: str) -> tuple:
    """The metrics a task's column shows (one, or several as GLUE reports them)."""
    if isinstance(metric, (list, tuple)):
        return tuple(m for one in metric for m in reported_metrics(kind, one, task_type))
    if kind == "similarity":
        return (resolve_metric("regression", metric or "spearman"),)
    if kind == "probe" and metric is None:
        return ("accuracy" if task_type == "classification" else "pearson",)
    return (resolve_metric(task_type, metric),)
