"""Held-out metrics for every model and ensemble: accuracy, NLL, ECE, confusion matrix, and the metrics that an
imbalanced test split needs beside accuracy: balanced accuracy, macro F1 and recall per class (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence

import numpy as np

_EPS = 1e-12


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probs must be N x classes matching {len(labels)} labels, got shape {probs.shape}")
    return probs, labels


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    probs, labels = _check(probs, labels)
    return float(np.mean(probs.argmax(1) == labels))


def row_nll(probs: np.ndarray, labels: np.ndarray, floor: float = _EPS) -> np.ndarray:
    """Each row's negative log-likelihood of its true class (natural log; probabilities floored at ``floor``)."""
    probs, labels = _check(probs, labels)
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], floor, 1.0))


def _mean(rows: np.ndarray, weights: Optional[np.ndarray]) -> float:
    """The mean of per-row losses, or their ``weights``-weighted mean when given."""
    return float(np.mean(rows) if weights is None else np.sum(weights * rows) / np.sum(weights))


def nll(probs: np.ndarray, labels: np.ndarray, weights: Optional[np.ndarray] = None, floor: float = _EPS) -> float:
    """Mean negative log-likelihood of the true class (natural log; probabilities floored at ``floor``), each row
    weighted by ``weights`` when given (a weighted mean). The one NLL of probabilities: the ensemble's combiners
    call it with their own floor (``transfuse.inference.combine.EPS``)."""
    return _mean(row_nll(probs, labels, floor), weights)


def logits_nll(logits: np.ndarray, labels: np.ndarray, weights: Optional[np.ndarray] = None) -> float:
    """Mean NLL of ``softmax(logits)``, computed from the logits (log-sum-exp, no floor), each row weighted by
    ``weights`` when given: what temperature scaling minimises."""
    logits, labels = _check(logits, labels)
    z = logits - logits.max(1, keepdims=True)
    logq = z - np.log(np.exp(z).sum(1, keepdims=True))
    return _mean(-logq[np.arange(len(labels)), labels], weights)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, list[float]]:
    """Per confidence bin: mean confidence, accuracy and count (for ECE and the reliability diagram)."""
    probs, labels = _check(probs, labels)
    conf = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=conf, minlength=bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=bins)
    safe = np.maximum(count, 1)
    return {"edges": edges.tolist(), "confidence": (conf_sum / safe).tolist(),
            "accuracy": (acc_sum / safe).tolist(), "count": count.tolist()}


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins."""
    r = reliability(probs, labels, bins)
    count = np.array(r["count"])
    gap = np.abs(np.array(r["confidence"]) - np.array(r["accuracy"]))
    return float(np.sum(count * gap) / max(count.sum(), 1))


def confusion(probs: np.ndarray, labels: np.ndarray) -> list[list[int]]:
    probs, labels = _check(probs, labels)
    k = probs.shape[1]
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (labels, probs.argmax(1)), 1)
    return m.tolist()


def _counts(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: true positives, rows of the class (support) and rows predicted as it."""
    m = np.asarray(confusion(probs, labels), dtype=np.float64)
    return np.diag(m), m.sum(1), m.sum(0)


def recall_per_class(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Recall of each class 0..K-1 (NaN for a class with no row among ``labels``)."""
    hit, support, _ = _counts(probs, labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, hit / np.maximum(support, 1), np.nan)


def balanced_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean recall over the classes present in ``labels`` (scikit-learn's ``balanced_accuracy_score``): each
    class counts alike however many rows it has, so always predicting the majority class scores 1/K."""
    r = recall_per_class(probs, labels)
    return float(np.nanmean(r)) if np.any(~np.isnan(r)) else float("nan")


def macro_f1(probs: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean F1 = 2 TP / (2 TP + FP + FN) over the classes present in ``labels`` or in the predictions
    (scikit-learn's ``f1_score(average="macro")``; a class predicted but never right scores 0)."""
    hit, support, predicted = _counts(probs, labels)
    seen = (support + predicted) > 0
    if not seen.any():
        return float("nan")
    return float(np.mean(2.0 * hit[seen] / (support[seen] + predicted[seen])))


def evaluate(probs: np.ndarray, labels: np.ndarray, class_names: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Accuracy, NLL, ECE and n (the keys every stage reads), plus balanced accuracy, macro F1 and
    ``per_class_recall`` {class name (default: the class id as text): recall, None for a class absent from
    ``labels``: JSON has no NaN}."""
    probs, labels = _check(probs, labels)
    k = probs.shape[1]
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names {names} for probabilities over {k} classes")
    recall = recall_per_class(probs, labels)
    return {"accuracy": accuracy(probs, labels), "nll": nll(probs, labels), "ece": ece(probs, labels),
            "n": int(len(labels)), "balanced_accuracy": balanced_accuracy(probs, labels),
            "macro_f1": macro_f1(probs, labels),
            "per_class_recall": {n: (None if np.isnan(r) else float(r)) for n, r in zip(names, recall)}}


@dataclass(frozen=True)
class SplitMetrics:
    """One split's ``evaluate``, typed, as every stage writes it into its ``metrics.json`` (balanced accuracy,
    macro F1 and recall per class are None in files written before they were recorded)."""

    accuracy: float
    nll: float
    ece: float
    n: int
    balanced_accuracy: Optional[float] = None
    macro_f1: Optional[float] = None
    per_class_recall: Optional[dict[str, Optional[float]]] = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SplitMetrics":
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})

