"""Task metrics against values worked out by hand."""

import math

import pytest

from components.errors import ConfigError
from components.inference.task_metrics import (
    compute_metrics,
    DEFAULT_METRIC,
    is_better,
    METRICS,
    resolve_metric,
)


def test_classification_binary():
    # references 1 1 1 0 0 0, predictions 1 1 0 1 0 0: TP 2, FN 1, FP 1, TN 2
    scores = compute_metrics("classification", [1, 1, 0, 1, 0, 0], [1, 1, 1, 0, 0, 0], label_names=["no", "yes"])
    tp, fn, fp, tn = 2, 1, 1, 2
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["f1"] == pytest.approx(2 * precision * recall / (precision + recall))  # 2/3
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert scores["mcc"] == pytest.approx(mcc) == pytest.approx(1 / 3)
    assert set(scores) == set(METRICS["classification"]) and all(type(v) is float for v in scores.values())


def test_classification_accuracy_and_macro_f1():
    scores = compute_metrics("classification", [0, 1, 2, 2], [0, 1, 2, 1], label_names=["a", "b", "c"])
    assert scores["accuracy"] == 3 / 4
    # per class F1: a 1, b (P 1, R 1/2) 2/3, c (P 1/2, R 1) 2/3
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_mcc_of_a_constant_prediction_is_zero():
    assert compute_metrics("classification", [1, 1, 1], [0, 1, 1])["mcc"] == 0.0


def test_regression():
    scores = compute_metrics("regression", [1.0, 3.0, 2.0, 4.0], [1.0, 2.0, 3.0, 4.0])
    # deviations from the mean 2.5: (-1.5, .5, -.5, 1.5) and (-1.5, -.5, .5, 1.5): sum of products 4, squares 5 and 5
    assert scores["pearson"] == pytest.approx(4 / 5)
    assert scores["spearman"] == pytest.approx(1 - 6 * (0 + 1 + 1 + 0) / (4 * (16 - 1)))  # 0.8
    assert scores["mse"] == pytest.approx((0 + 1 + 1 + 0) / 4)
    # ranks are what Spearman sees: a monotone stretch keeps it, not Pearson
    stretched = compute_metrics("regression", [1.0, 9.0, 4.0, 100.0], [1.0, 2.0, 3.0, 4.0])
    assert stretched["spearman"] == pytest.approx(0.8) and stretched["pearson"] != pytest.approx(0.8)


def test_correlation_of_a_constant_is_zero():
    scores = compute_metrics("regression", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert scores["pearson"] == 0.0 and scores["spearman"] == 0.0 and scores["mse"] == pytest.approx(2 / 3)


def test_token_classification_entity_scores():
    references = [["B-MOD", "I-MOD", "O"], ["B-FUNC", "O", "O"]]
    predictions = [["B-MOD", "I-MOD", "O"], ["O", "O", "B-FUNC"]]
    scores = compute_metrics("token_classification", predictions, references)
    # entities: MOD found, FUNC missed and one spurious FUNC: precision 1/2, recall 1/2
    assert scores["precision"] == 0.5 and scores["recall"] == 0.5 and scores["f1"] == 0.5
    assert scores["accuracy"] == pytest.approx(4 / 6)
    names = ["O", "B-MOD", "I-MOD", "B-FUNC"]
    as_ids = compute_metrics("token_classification", [[1, 2, 0], [0, 0, 3]], [[1, 2, 0], [3, 0, 0]], names)
    assert as_ids == scores


def test_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        compute_metrics("classification", [], [])
    with pytest.raises(ValueError, match="2 predictions for 3 references"):
        compute_metrics("regression", [1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="Sentence 0"):
        compute_metrics("token_classification", [["O"]], [["O", "O"]])
    with pytest.raises(ValueError, match="Unknown task type"):
        compute_metrics("ranking", [1], [1])


def test_metric_choice():
    assert resolve_metric("regression", None) == DEFAULT_METRIC["regression"] == "pearson"
    assert resolve_metric("classification", "mcc") == "mcc"
    with pytest.raises(ConfigError, match="did you mean 'pearson'"):
        resolve_metric("regression", "pearsonr")
    assert is_better("mse", 0.5, 0.7) and not is_better("f1", 0.5, 0.7) and is_better("f1", 0.1, None)
