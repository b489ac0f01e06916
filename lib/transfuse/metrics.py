"""Held-out metrics for every model and ensemble: accuracy, NLL, ECE, confusion matrix (numpy only)."""

from __future__ import annotations

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


def row_nll(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each row's negative log-likelihood of its true class (natural log; probabilities floored at 1e-12)."""
    probs, labels = _check(probs, labels)
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], _EPS, 1.0))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (natural log)."""
    return float(np.mean(row_nll(probs, labels)))


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


def evaluate(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"accuracy": accuracy(probs, labels), "nll": nll(probs, labels), "ece": ece(probs, labels),
            "n": int(len(labels))}
