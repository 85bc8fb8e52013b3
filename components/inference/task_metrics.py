"""Scores of a fine-tuned model on a downstream task, computed by the libraries the benchmarks use.

GLUE reports accuracy, F1 and Matthews correlation (scikit-learn) for classification and
Pearson/Spearman correlation (scipy) for STS-B; CoNLL-2003 reports entity-level F1 as
conlleval computes it, which seqeval's default mode reproduces. No formula is written here, so
our numbers match the papers' and the leaderboards'.
"""

import difflib
import math
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import stats
from seqeval import metrics as seqeval_metrics
from sklearn import metrics as sk_metrics

from components.errors import ConfigError

METRICS = {
    "classification": ("accuracy", "f1", "mcc"),
    "regression": ("pearson", "spearman", "mse"),
    "token_classification": ("f1", "precision", "recall", "accuracy"),
}
DEFAULT_METRIC = {"classification": "accuracy", "regression": "pearson", "token_classification": "f1"}
LOWER_IS_BETTER = frozenset({"mse"})  # every other metric is better when higher


def resolve_metric(task_type: str, metric: Optional[str]) -> str:
    """The metric that picks the best checkpoint: ``task.metric``, or the task type's default."""
    if task_type not in METRICS:
        raise ConfigError(f"task.type must be one of {list(METRICS)}, got {task_type!r}")
    if metric is None:
        return DEFAULT_METRIC[task_type]
    if metric not in METRICS[task_type]:
        close = difflib.get_close_matches(str(metric), METRICS[task_type], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"task.metric {metric!r} is not a {task_type} metric: choose one of {list(METRICS[task_type])}{hint}"
        )
    return metric


def is_better(metric: str, new: float, best: Optional[float]) -> bool:
    """Whether ``new`` beats ``best`` (None: nothing yet) on ``metric``."""
    if best is None:
        return True
    return new < best if metric in LOWER_IS_BETTER else new > best


def _correlation(function, predictions: np.ndarray, references: np.ndarray) -> float:
    # A correlation is undefined when either side is constant (or has one point); scipy then
    # warns and returns NaN. We report 0.0, "no linear/rank relation", so that a model that
    # predicts one value everywhere scores like an uninformed one and checkpoint selection
    # keeps comparing numbers.
    if len(predictions) < 2 or np.ptp(predictions) == 0 or np.ptp(references) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        value = float(function(predictions, references)[0])
    return 0.0 if math.isnan(value) else value


def _classification(predictions, references, label_names) -> Dict[str, float]:
    predictions, references = np.asarray(predictions), np.asarray(references)
    num_labels = len(label_names) if label_names is not None else len(set(references) | set(predictions))
    if num_labels <= 2 and set(np.unique(np.concatenate([predictions, references]))) <= {0, 1}:
        f1 = sk_metrics.f1_score(references, predictions, average="binary", pos_label=1, zero_division=0.0)
    else:
        f1 = sk_metrics.f1_score(references, predictions, average="macro", zero_division=0.0)
    return {
        "accuracy": float(sk_metrics.accuracy_score(references, predictions)),
        "f1": float(f1),
        "mcc": float(sk_metrics.matthews_corrcoef(references, predictions)),  # 0.0 when constant
    }


def _regression(predictions, references) -> Dict[str, float]:
    predictions = np.asarray(predictions, dtype=np.float64)
    references = np.asarray(references, dtype=np.float64)
    return {
        "pearson": _correlation(stats.pearsonr, predictions, references),
        "spearman": _correlation(stats.spearmanr, predictions, references),
        "mse": float(sk_metrics.mean_squared_error(references, predictions)),
    }


def _tag_names(sentences, label_names) -> List[List[str]]:
    """Tag lists as names; ids are turned into names with ``label_names``."""
    out = []
    for tags in sentences:
        tags = list(tags)
        if tags and not isinstance(tags[0], str):
            if label_names is None:
                raise ValueError("token_classification metrics got tag ids without label_names to name them")
            tags = [label_names[int(t)] for t in tags]
        out.append(tags)
    return out


def _token_classification(predictions, references, label_names) -> Dict[str, float]:
    predictions, references = _tag_names(predictions, label_names), _tag_names(references, label_names)
    for i, (p, r) in enumerate(zip(predictions, references)):
        if len(p) != len(r):
            raise ValueError(f"Sentence {i}: {len(p)} predicted tags for {len(r)} reference tags")
    # seqeval's default mode is conlleval's: a stray I- tag starts an entity.
    return {
        "f1": float(seqeval_metrics.f1_score(references, predictions, zero_division=0)),
        "precision": float(seqeval_metrics.precision_score(references, predictions, zero_division=0)),
        "recall": float(seqeval_metrics.recall_score(references, predictions, zero_division=0)),
        "accuracy": float(seqeval_metrics.accuracy_score(references, predictions)),
    }


def compute_metrics(
    task_type: str, predictions: Sequence, references: Sequence, label_names: Optional[Sequence[str]] = None
) -> Dict[str, float]:
    """Every metric of ``METRICS`` for ``task_type``, as plain floats.

    Args:
        predictions, references: class ids (classification), numbers (regression), or one list
            of tags per sentence (token_classification; names, or ids with ``label_names``).
        label_names: id -> name. For classification it fixes the number of labels: with two,
            F1 is binary with class id 1 positive (GLUE's MRPC/QQP F1); otherwise macro-averaged.
    """
    if task_type not in METRICS:
        raise ValueError(f"Unknown task type {task_type!r}; known: {list(METRICS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if len(references) == 0:
        raise ValueError(f"No predictions to score for the {task_type} task: the evaluated split is empty")
    if task_type == "classification":
        return _classification(predictions, references, label_names)
    if task_type == "regression":
        return _regression(predictions, references)
    return _token_classification(predictions, references, label_names)
