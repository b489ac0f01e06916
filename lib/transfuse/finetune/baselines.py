"""The simplest baseline on the same labels as the CNNs: a logistic regression on the pixels.

A CNN member learns from the label budget's train split and chooses its epoch (and Tune its trial) on val; the
baseline does the same: fitted on train for each C of a small grid, the C with the lowest val NLL kept, scored
on test. (The ensemble's pixel member is another model: it fits on train + holdout folds, 100 more labels on the
default, so it is not the baseline a transfer claim is held to.) ``bench/transfer.py`` uses the same fit for its
frozen-features row.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

C_GRID = (0.01, 0.1, 1.0, 10.0)  # inverse L2 strengths tried, on standardized features
# under <storage>/<run>/: the scratch stage's comparison (transfer, scratch, this baseline); the report reads it
TRANSFER_FILE = "transfer_vs_scratch.json"


def logreg_on_val(x: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray],
                  class_weighted: bool = False) -> dict[str, Any]:
    """StandardScaler + logistic regression fitted on ``x["train"]`` for each C in ``C_GRID``; the C with the
    lowest NLL on ``x["val"]`` is kept and its test metrics returned (accuracy, NLL, ECE, n, balanced accuracy,
    macro F1, recall per class) with ``C``. ``class_weighted`` (the run's ``transfuse.class_weights`` decision):
    the fit weights its rows by the train labels' class weights, as the CNNs' loss does; the val NLL that picks C
    stays unweighted, as the CNNs' early stopping."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from transfuse.metrics import evaluate

    fit_kw: dict[str, Any] = {}
    if class_weighted:
        from transfuse.class_weights import sample_weights

        # (the weights depend only on the classes present in train: any k above its largest label gives them)
        fit_kw["logisticregression__sample_weight"] = sample_weights(y["train"], int(np.max(y["train"])) + 1)
    best = None
    for c in C_GRID:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
        model.fit(x["train"], y["train"], **fit_kw)
        val = evaluate(model.predict_proba(x["val"]), y["val"])
        if best is None or val["nll"] < best[0]:
            best = (val["nll"], c, model)
    _, c, model = best
    return {**evaluate(model.predict_proba(x["test"]), y["test"]), "C": c}


def budget_splits(data_dir: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(images, labels) of the prepared train, val and test splits: what a same-labels baseline reads."""
    from transfuse.data import read_split_numpy

    splits = {s: read_split_numpy(data_dir, s) for s in ("train", "val", "test")}
    return {s: v[0] for s, v in splits.items()}, {s: v[1] for s, v in splits.items()}


def pixels_logreg(images: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                  class_weighted: bool = False) -> dict[str, Any]:
    """``logreg_on_val`` on the images' pixels (``inference.preprocessing.pixel_features``), split by split."""
    from transfuse.inference import pixel_features

    return logreg_on_val({s: pixel_features(v) for s, v in images.items()}, labels, class_weighted)
