"""GLUE metrics in plain numpy, so scoring needs neither scikit-learn nor scipy at run time.

Each function agrees with its scikit-learn / scipy counterpart (the tests check this) except in
degenerate cases, where we return 0.0 instead of NaN: the best epoch is chosen by comparing
scores, and a NaN would silently lose every comparison (or win, depending on the code doing
it). A predictor with no variance has no measurable association with the labels, so 0.0 —
"no better than chance" for Matthews and the correlations — is the honest value.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..data.tasks import Problem, TaskSpec

__all__ = ["accuracy", "compute_metrics", "f1_binary", "matthews", "pearson", "spearman"]


def _pair(predictions: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions for {y.size} labels")
    if p.size == 0:
        raise ValueError("no predictions to score")
    return p, y


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of exact matches."""
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y))


def f1_binary(predictions: np.ndarray, labels: np.ndarray) -> float:
    """F1 of class 1 (GLUE's positive class); 0.0 when there are no true or predicted positives."""
    p, y = _pair(predictions, labels)
    tp = int(np.sum((p == 1) & (y == 1)))
    fp = int(np.sum((p == 1) & (y != 1)))
    fn = int(np.sum((p != 1) & (y == 1)))
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation for any number of classes (Gorodkin's R_K); 0.0 if either side is
    constant, as scikit-learn does."""
    p, y = _pair(predictions, labels)
    classes, inverse = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = classes.size
    yi, pi = inverse[: y.size], inverse[y.size :]
    confusion = np.bincount(yi * k + pi, minlength=k * k).reshape(k, k).astype(np.float64)
    t_sum, p_sum = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, n = np.trace(confusion), confusion.sum()
    cov_yp = correct * n - t_sum @ p_sum
    cov_pp = n * n - p_sum @ p_sum
    cov_yy = n * n - t_sum @ t_sum
    if cov_pp == 0 or cov_yy == 0:
        return 0.0
    return float(cov_yp / np.sqrt(cov_pp * cov_yy))


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson's r; 0.0 when either side is constant or non-finite (scipy would give NaN)."""
    p, y = _pair(predictions, labels)
    p = p.astype(np.float64) - p.mean(dtype=np.float64)
    y = y.astype(np.float64) - y.mean(dtype=np.float64)
    denom = np.sqrt((p @ p) * (y @ y))
    if denom == 0 or not np.isfinite(denom):
        return 0.0
    return float(np.clip((p @ y) / denom, -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties sharing their mean rank, as ``scipy.stats.rankdata`` does."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Each run of equal values gets the mean of the positions it spans.
    starts = np.flatnonzero(np.concatenate([[True], xs[1:] != xs[:-1]]))
    ends = np.concatenate([starts[1:], [xs.size]])
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman's rho: Pearson's r of average ranks; 0.0 when either side is constant."""
    p, y = _pair(predictions, labels)
    return pearson(_average_ranks(p), _average_ranks(y))


_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(
    task: TaskSpec, predictions: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """Score predictions with the task's GLUE metrics, returning exactly ``task.metrics``.

    Classification accepts class indices or (N, C) logits/probabilities (argmax is taken), so
    callers can pass the head's raw output; regression accepts (N,) or (N, 1) values.
    """
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if task.problem is Problem.CLASSIFICATION:
        if predictions.ndim == 2:
            if predictions.shape[1] != task.num_labels:
                raise ValueError(
                    f"{predictions.shape[1]} logits per row for {task.num_labels} classes"
                )
            predictions = predictions.argmax(axis=1)
        elif np.issubdtype(predictions.dtype, np.floating) and not np.all(
            predictions == np.round(predictions)
        ):
            raise ValueError("classification predictions must be class indices or logits")
        predictions = predictions.astype(np.int64)
        labels = labels.astype(np.int64)
    else:
        if predictions.ndim == 2 and predictions.shape[1] == 1:
            predictions = predictions[:, 0]
        predictions = predictions.astype(np.float64)
        labels = labels.astype(np.float64)
    return {name: _METRICS[name](predictions, labels) for name in task.metrics}
