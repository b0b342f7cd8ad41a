"""The numpy metrics must agree with scikit-learn and scipy, the references GLUE scores use."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from sherl_cache.data.metrics import (
    accuracy,
    compute_metrics,
    f1_binary,
    matthews,
    pearson,
    spearman,
)
from sherl_cache.data.tasks import get_task

sk = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")


def _classes(seed: int, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    # Agree with the labels most of the time so scores are far from zero.
    predictions = np.where(rng.random(n) < 0.7, labels, rng.integers(0, k, n))
    return predictions, labels


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [2, 3, 5])
def test_classification_metrics_match_sklearn(seed: int, k: int) -> None:
    predictions, labels = _classes(seed, 257, k)
    assert accuracy(predictions, labels) == pytest.approx(sk.accuracy_score(labels, predictions))
    assert matthews(predictions, labels) == pytest.approx(
        sk.matthews_corrcoef(labels, predictions), abs=1e-12
    )
    if k == 2:
        assert f1_binary(predictions, labels) == pytest.approx(sk.f1_score(labels, predictions))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
def test_correlations_match_scipy(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.uniform(0, 5, 300)
    predictions = labels + rng.normal(0, 1.5, 300)
    if ties:  # STS-B scores come in steps of 0.2, so ties are the normal case
        labels, predictions = np.round(labels * 5) / 5, np.round(predictions)
    assert pearson(predictions, labels) == pytest.approx(
        stats.pearsonr(predictions, labels)[0], abs=1e-12
    )
    assert spearman(predictions, labels) == pytest.approx(
        stats.spearmanr(predictions, labels)[0], abs=1e-12
    )


def test_spearman_with_heavy_ties() -> None:
    predictions = np.array([1, 1, 1, 2, 2, 3, 3, 3, 3, 0], dtype=float)
    labels = np.array([0, 1, 1, 1, 2, 2, 2, 3, 3, 3], dtype=float)
    assert spearman(predictions, labels) == pytest.approx(stats.spearmanr(predictions, labels)[0])


def test_matthews_with_classes_missing_from_predictions() -> None:
    labels = np.array([0, 1, 2, 2, 1, 0, 2, 1])
    predictions = np.array([0, 1, 1, 1, 1, 0, 1, 0])
    assert matthews(predictions, labels) == pytest.approx(sk.matthews_corrcoef(labels, predictions))


def test_degenerate_cases_give_zero_not_nan() -> None:
    labels = np.array([0, 1, 1, 0, 1])
    constant = np.zeros(5, dtype=np.int64)
    assert matthews(constant, labels) == 0.0 == sk.matthews_corrcoef(labels, constant)
    assert matthews(constant, constant) == 0.0
    assert f1_binary(constant, np.zeros(5, dtype=np.int64)) == 0.0  # no positives anywhere
    assert f1_binary(constant, labels) == 0.0
    scores = np.array([0.5, 1.0, 2.0, 3.0, 4.5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(stats.pearsonr(np.ones(5), scores)[0])  # scipy's answer we replace
    assert pearson(np.ones(5), scores) == 0.0
    assert spearman(np.ones(5), scores) == 0.0
    assert pearson(scores, np.full(5, 2.0)) == 0.0


def test_perfect_and_inverse_scores() -> None:
    scores = np.array([0.0, 1.0, 2.0, 4.0])
    assert pearson(scores, scores) == 1.0
    assert spearman(-scores, scores) == -1.0
    assert matthews(np.array([1, 0, 1]), np.array([0, 1, 0])) == pytest.approx(-1.0)


def test_mismatched_or_empty_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        accuracy(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="no predictions"):
        pearson(np.zeros(0), np.zeros(0))


def test_compute_metrics_returns_exactly_the_task_metrics() -> None:
    predictions, labels = _classes(0, 100, 2)
    logits = np.eye(2)[predictions] * 3.0 - 1.0
    mrpc = get_task("mrpc")
    result = compute_metrics(mrpc, logits, labels)
    assert list(result) == list(mrpc.metrics) == ["accuracy", "f1"]
    assert result == compute_metrics(mrpc, predictions, labels)
    assert result["f1"] == pytest.approx(sk.f1_score(labels, predictions))

    assert list(compute_metrics(get_task("cola"), predictions, labels)) == ["matthews"]

    mnli_pred, mnli_labels = _classes(1, 60, 3)
    mnli = compute_metrics(get_task("mnli"), np.eye(3)[mnli_pred], mnli_labels)
    assert mnli == {"accuracy": pytest.approx(sk.accuracy_score(mnli_labels, mnli_pred))}

    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, 50).astype(np.float32)
    stsb = compute_metrics(get_task("stsb"), (gold + rng.normal(0, 1, 50))[:, None], gold)
    assert list(stsb) == ["pearson", "spearman"]
    assert all(isinstance(v, float) for v in stsb.values())


def test_compute_metrics_rejects_wrong_logit_width_and_fractional_classes() -> None:
    with pytest.raises(ValueError, match="3 logits per row for 2 classes"):
        compute_metrics(get_task("sst2"), np.zeros((4, 3)), np.zeros(4))
    with pytest.raises(ValueError, match="class indices or logits"):
        compute_metrics(get_task("sst2"), np.array([0.2, 0.9]), np.array([0, 1]))
