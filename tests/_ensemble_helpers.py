"""Ensemble test helpers: scikit-learn's digits split into train/holdout/test and complementary prob-only members
fitted on them (test_ensemble.py and test_stacking.py share them); CNN member directories in the real formats,
written from real fitted networks (a one-hidden-layer MLP on the prepared digits), so the ensemble stage and the
member search run on them end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transfuse import metrics as tm
from transfuse import storage
from transfuse.config import Config
from transfuse.data import PREPARE
from transfuse.finetune import TUNE


def digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Digits pixels scaled to [0, 1] as the "embeddings", split 50/25/25 into train/holdout/test by a fixed
    permutation; ids are strings as in the data contract."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    ids = np.array([f"digits-{i:04d}" for i in range(len(y))])
    perm = np.random.default_rng(0).permutation(len(y))
    n = len(y)
    parts = {"train": perm[: n // 2], "holdout": perm[n // 2: 3 * n // 4], "test": perm[3 * n // 4:]}
    out = {}
    for split, idx in parts.items():
        idx = idx[np.argsort(ids[idx])]  # sorted by id, like every reader here
        out[split] = (x[idx], y[idx].astype(np.int64), ids[idx])
    return out


def subset_members(digits, row_groups=((0, 1, 2), (3, 4), (5, 6, 7))):
    """Complementary "CNN" members: logistic regressions that each see only some pixel rows of the 8x8 image,
    trained on train only. Returns (probs per member and split, the ids each was fitted on)."""
    from sklearn.linear_model import LogisticRegression

    x_tr, y_tr, ids_tr = digits["train"]
    probs, seen = {}, {}
    for g, rows in enumerate(row_groups):
        cols = np.array([r * 8 + c for r in rows for c in range(8)])
        lr = LogisticRegression(C=0.5, max_iter=500).fit(x_tr[:, cols], y_tr)
        probs[f"rows{g}"] = {s: lr.predict_proba(digits[s][0][:, cols]) for s in ("holdout", "test")}
        seen[f"rows{g}"] = ids_tr
    return probs, seen


def write_rows(path: Path, ids, labels, column: str, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": pa.array([str(i) for i in ids], pa.string()),
                      "label": pa.array(labels, pa.int64()),
                      column: pa.array(list(values.astype(np.float32)), pa.list_(pa.float32()))})
    pq.write_table(table, path)


def write_member_dir(cfg, d: Path, name: str, splits, hidden: int, seed: int) -> float:
    """A real fitted network (a one-hidden-layer MLP on the prepared images): predictions for val/test/holdout,
    penultimate-layer embeddings for every split, metrics.json and a manifest, in the member-dir formats."""
    from sklearn.neural_network import MLPClassifier

    x_tr, y_tr, _ = splits["train"]
    mlp = MLPClassifier((hidden,), max_iter=150, random_state=seed).fit(x_tr, y_tr)
    embed = lambda x: np.maximum(x @ mlp.coefs_[0] + mlp.intercepts_[0], 0.0)  # noqa: E731  (relu hidden layer)
    scores = {}
    for split, (x, y, ids) in splits.items():
        write_rows(d / "embeddings" / f"{split}.parquet", ids, y, "embedding", embed(x))
        if split != "train":
            p = mlp.predict_proba(x)
            write_rows(d / "predictions" / f"{split}.parquet", ids, y, "probs", p)
            scores[split] = tm.evaluate(p, y)
    storage.write_json(str(d / "metrics.json"), {"history": [], **scores})
    storage.write_manifest(str(d), cfg, "finetune", f"fixture-{name}")
    return scores["val"]["accuracy"]


def write_member_run(digits_run: Config, storage_dir: str, run: str) -> tuple[Config, dict]:
    """Two fine-tuned members listed in tune/members.json, trained on the session's prepared digits, in a run of
    their own (with a copy of the prepared data, which pixel members read) so other test modules' tune outputs in
    the shared run cannot interfere. Returns (the run's config, the splits as (pixels / 255, labels, ids))."""
    from transfuse.data import read_split_numpy

    data_dir = PREPARE.dir(digits_run)
    cfg = digits_run.model_copy(update={"storage": str(storage_dir), "run": run})
    shutil.copytree(data_dir, PREPARE.dir(cfg))
    splits = {}
    for split in ("train", "val", "test", "holdout"):
        images, labels, ids = read_split_numpy(data_dir, split)
        splits[split] = (images.reshape(len(images), -1).astype(np.float32) / 255.0, labels, ids)
    tune = Path(TUNE.dir(cfg))
    entries = []
    for name, hidden, seed in (("trial_a", 24, 0), ("trial_b", 16, 1)):
        acc = write_member_dir(cfg, tune / "trials" / name, name, splits, hidden, seed)
        entries.append({"name": name, "dir": f"trials/{name}", "config": {"hidden": hidden}, "val_accuracy": acc})
    storage.write_json(str(tune / "members.json"), {"members": entries})
    return cfg, splits
