"""Class weights for imbalanced labels: the one owner of the rule and the math (numpy only).

Every learner that weights its loss (the CNNs' Keras loss, the scikit-learn members, the stacker and its
temperature) imports these, so they agree on both:

- the rule (``weighting_on``): whether a run weights at all, decided once from the prepared train split's class
  counts (the data manifest's ``counts["train"]``) by ``data.class_weight``: ``balanced`` always, ``none`` never,
  ``auto`` when the largest class has at least ``data.imbalance_ratio`` times the smallest one's images;
- the math (``class_weights``): scikit-learn's "balanced" rule, ``n / (k * n_c)`` per class ``c`` on the labels
  the learner itself fits on (``n`` rows, ``k`` classes present among them). Row weights then average exactly
  1, so a weighted mean loss keeps the unweighted loss's scale (learning rates and L2 strengths mean what they
  meant). A class with no row among those labels gets weight 0: no row carries it.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from transfuse.errors import TransfuseError

MODES = ("auto", "balanced", "none")

CountsOrLabels = Union[Mapping[Any, int], Sequence[int], np.ndarray]


class ClassWeightError(TransfuseError, ValueError):
    """Labels, counts or a class-weight setting that the rule cannot use."""


def class_counts(counts_or_labels: CountsOrLabels, k: int) -> np.ndarray:
    """Rows per class 0..k-1 (int64) from either a mapping {class id (int or its str, the manifest's form): count}
    or a 1-D array of integer labels."""
    if k < 1:
        raise ClassWeightError(f"the number of classes must be >= 1, got {k}")
    if isinstance(counts_or_labels, Mapping):
        out = np.zeros(k, dtype=np.int64)
        for key, c in counts_or_labels.items():
            try:
                i = int(key)
            except (TypeError, ValueError):
                raise ClassWeightError(f"class counts are keyed by class id (0..{k - 1}), got key {key!r}") from None
            if not 0 <= i < k or int(c) < 0:
                raise ClassWeightError(f"class counts: class {key!r} with count {c!r}; allowed: ids 0..{k - 1} "
                                       "with counts >= 0")
            out[i] += int(c)
        return out
    labels = np.asarray(counts_or_labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)
                            and not np.all(labels == np.round(labels))):
        raise ClassWeightError(f"labels must be a 1-D array of class ids, got shape {labels.shape} "
                               f"dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ClassWeightError(f"labels range {labels.min()}..{labels.max()}; allowed: 0..{k - 1} ({k} classes)")
    return np.bincount(labels, minlength=k).astype(np.int64)


def class_weights(counts_or_labels: CountsOrLabels, k: int) -> np.ndarray:
    """Per class 0..k-1: ``n / (k_present * n_c)`` (scikit-learn's ``compute_class_weight("balanced")`` on the
    classes present), 0 for a class without rows. ``counts_or_labels``: a mapping of counts or the labels."""
    counts = class_counts(counts_or_labels, k).astype(np.float64)
    n, present = counts.sum(), counts > 0
    if n == 0:
        raise ClassWeightError("class weights need at least one labelled row, got none")
    out = np.zeros(k, dtype=np.float64)
    out[present] = n / (present.sum() * counts[present])
    return out


def sample_weights(labels: Union[Sequence[int], np.ndarray], k: int) -> np.ndarray:
    """Each row's weight: ``class_weights(labels, k)[label]`` (they average 1 over ``labels``)."""
    labels = np.asarray(labels, dtype=np.int64)
    return class_weights(labels, k)[labels]


def imbalance(counts_or_labels: CountsOrLabels, k: int) -> float:
    """The largest class's rows over the smallest's, among the classes present (1.0: balanced)."""
    counts = class_counts(counts_or_labels, k)
    present = counts[counts > 0]
    if present.size == 0:
        raise ClassWeightError("the imbalance of no rows is undefined: got no labelled row")
    return float(present.max() / present.min())


def weighting_on(data_cfg: Any, train_counts: CountsOrLabels, k: Optional[int] = None) -> bool:
    """Whether a run weights its losses, from ``data_cfg.class_weight`` / ``imbalance_ratio`` and the prepared
    train split's counts (the manifest's ``counts["train"]``, or the train labels). ``k``: the number of classes
    (default: from the counts' largest id)."""
    mode = getattr(data_cfg, "class_weight", None)
    if mode not in MODES:
        raise ClassWeightError(f"data.class_weight must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "balanced"
    ratio = float(getattr(data_cfg, "imbalance_ratio"))
    if not ratio >= 1.0:
        raise ClassWeightError(f"data.imbalance_ratio must be >= 1, got {ratio!r}")
    return imbalance(train_counts, k if k is not None else _num_classes(train_counts)) >= ratio


def _num_classes(counts_or_labels: CountsOrLabels) -> int:
    if isinstance(counts_or_labels, Mapping):
        keys = [int(c) for c in counts_or_labels] if counts_or_labels else [0]
        return max(keys) + 1
    labels = np.asarray(counts_or_labels, dtype=np.int64)
    return int(labels.max()) + 1 if labels.size else 1


def decision(data_cfg: Any, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The run's weighting decision from the data manifest (``class_names``, ``counts["train"]``), as stages record
    it: mode, ratio threshold, the train split's imbalance, whether weighting is on and, when it is, the CNNs'
    per-class weights (on the train split) by class name."""
    names = [str(c) for c in manifest.get("class_names") or []]
    counts = (manifest.get("counts") or {}).get("train")
    if not names or not counts:
        raise ClassWeightError("the data manifest has no class_names or no train counts (counts.train): "
                               "prepare the data again (python -m jobs.prepare)")
    k = len(names)
    on = weighting_on(data_cfg, counts, k)
    out = {"mode": data_cfg.class_weight, "imbalance_ratio": float(data_cfg.imbalance_ratio),
           "train_imbalance": imbalance(counts, k), "on": bool(on),
           "train_counts": dict(zip(names, class_counts(counts, k).tolist()))}
    if on:
        out["weights"] = by_name(class_weights(counts, k), names)
    return out


def by_name(weights: np.ndarray, class_names: Optional[Sequence[str]]) -> dict[str, float]:
    """Per-class weights as {class name: weight} (names default to the class ids)."""
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(len(weights))]
    if len(names) != len(weights):
        raise ClassWeightError(f"{len(weights)} class weights but {len(names)} class names {names}")
    return {n: float(w) for n, w in zip(names, weights)}


__all__ = ["ClassWeightError", "MODES", "by_name", "class_counts", "class_weights", "decision", "imbalance",
           "sample_weights", "weighting_on"]
