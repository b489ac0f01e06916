"""One label budget: every model learns from B labelled images per class; the test split stays apart."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from transfuse.config import ConfigError, DataConfig, load_config
from transfuse.data.stage import assign_splits, label_budget
from transfuse.data.sources import DataError, read_idx

TEN = [str(i) for i in range(10)]  # Fashion-MNIST's class list, by id


@pytest.fixture(scope="module")
def fashion_labels(fashion_dir):
    """Fashion-MNIST's labels and ids as the source names them (train then t10k)."""
    train = read_idx(str(fashion_dir / "train-labels-idx1-ubyte.gz")).astype(np.int64)
    test = read_idx(str(fashion_dir / "t10k-labels-idx1-ubyte.gz")).astype(np.int64)
    ids = np.array([f"fashion_mnist/train/{i:05d}" for i in range(len(train))]
                   + [f"fashion_mnist/test/{i:05d}" for i in range(len(test))], dtype=object)
    return np.concatenate([train, test]), ids


def _budget_cfg(**kw) -> DataConfig:
    return DataConfig(source="fashion_mnist", classes=[1, 3, 5], labelled_per_class=50, test_per_class=40,
                      test_from_source=True, **kw)


def test_budget_splits_come_from_the_training_set_and_test_from_its_own(fashion_labels):
    labels, ids = fashion_labels
    cfg = _budget_cfg()
    out, excluded = assign_splits(labels, ids, cfg, seed=0, class_names=TEN, test_prefix="fashion_mnist/test/")
    by_split = {s: [i for i, (sp, _) in out.items() if sp == s] for s in ("train", "val", "holdout", "test")}
    per_class = {s: Counter(out[i][1] for i in v) for s, v in by_split.items()}
    assert per_class["val"] == {0: 10, 1: 10, 2: 10} and per_class["holdout"] == {0: 20, 1: 20, 2: 20}
    assert per_class["train"] == {0: 20, 1: 20, 2: 20} and per_class["test"] == {0: 40, 1: 40, 2: 40}
    assert all(i.startswith("fashion_mnist/test/") for i in by_split["test"])
    assert not any(i.startswith("fashion_mnist/test/") for s in ("train", "val", "holdout") for i in by_split[s])
    assert excluded["unlabelled"] == 3 * (6000 - 50) and excluded["test_cap"] == 3 * (1000 - 40)
    # relabelled in the order of data.classes, and each id keeps its source class
    source_class = dict(zip(ids, labels))
    assert all(source_class[i] == [1, 3, 5][lab] for i, (_, lab) in out.items())
    counts = {s: {str(k): v for k, v in c.items()} for s, c in per_class.items()}
    rec = label_budget(cfg, counts)
    assert rec["per_class"] == 50 and rec["total"] == 150 and rec["train"] == 60 and rec["test"] == 120
    assert rec["test_from"] == "the source's own test set"


def test_another_seed_draws_other_labels_on_the_same_test_split(fashion_labels):
    labels, ids = fashion_labels
    a, _ = assign_splits(labels, ids, _budget_cfg(), 0, TEN, "fashion_mnist/test/")
    b, _ = assign_splits(labels, ids, _budget_cfg(), 1, TEN, "fashion_mnist/test/")
    again, _ = assign_splits(labels, ids, _budget_cfg(), 0, TEN, "fashion_mnist/test/")
    assert a == again  # the same seed, the same draw
    test = lambda o: {i for i, (s, _) in o.items() if s == "test"}  # noqa: E731
    labelled = lambda o: {i for i, (s, _) in o.items() if s != "test"}  # noqa: E731
    assert test(a) == test(b)
    assert len(labelled(a) & labelled(b)) < 0.2 * len(labelled(a))


def test_budget_from_one_pool_without_a_source_test_set():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 100)
    ids = np.array([f"x/{i:04d}" for i in rng.permutation(300)], dtype=object)
    cfg = DataConfig(source="digits", labelled_per_class=20, test_per_class=30)
    out, excluded = assign_splits(labels, ids, cfg, 0, ["0", "1", "2"])
    assert Counter(s for s, _ in out.values()) == {"test": 90, "train": 24, "holdout": 24, "val": 12}
    assert excluded["unlabelled"] == 3 * 50
    with pytest.raises(DataError, match=r"class 0: test_per_class 30 and labelled_per_class 90 need that many"):
        assign_splits(labels, ids, cfg.model_copy(update={"labelled_per_class": 90}), 0, ["0", "1", "2"])
    with pytest.raises(DataError, match=r"the digits source has no test set of its own"):
        assign_splits(labels, ids, cfg.model_copy(update={"test_from_source": True}), 0, ["0", "1", "2"])


@pytest.mark.parametrize("overrides, pattern", [
    (["data.labelled_per_class=50", "data.train_per_class=20", "data.test_per_class=10"],
     r"labelled_per_class \(the label budget\) replaces train_per_class"),
    (["data.labelled_per_class=50"], r"labelled_per_class needs test_per_class"),
    (["data.test_per_class=10"], r"test_per_class and unlabelled_per_class need labelled_per_class"),
    (["data.test_from_source=true"], r"split.test is 0.2 but the test set is separate \(test_path or "
                                     r"test_from_source\): set split.test=0"),
    (["data.unlabelled_per_class=10"], r"unlabelled_per_class need labelled_per_class \(the label budget\)"),
    (["data.labelled_per_class=50", "data.test_per_class=10", "data.budget_split.val=0.5",
      "data.budget_split.holdout=0.45"], r"val \+ holdout must be < 0.9 of the budget"),
    (["data.labelled_per_class=2", "data.test_per_class=10"], r"data.labelled_per_class = 2"),
])
def test_bad_budget_configs_name_the_fix(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_pixel_baseline_learns_from_train_and_chooses_c_on_val():
    """baselines.logreg_on_val: fitted on train only, the C of the grid with the lowest val NLL kept (checked
    against every C refitted here), scored on test."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from transfuse.finetune import baselines
    from transfuse.metrics import evaluate

    d = load_digits()
    x, y = d.data.astype(np.float32), d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(x))
    parts = {"train": idx[:100], "val": idx[100:200], "test": idx[200:700]}
    xs, ys = {s: x[i] for s, i in parts.items()}, {s: y[i] for s, i in parts.items()}
    got = baselines.logreg_on_val(xs, ys)
    val_nll = {c: evaluate(make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
                           .fit(xs["train"], ys["train"]).predict_proba(xs["val"]), ys["val"])["nll"]
               for c in baselines.C_GRID}
    assert got["C"] == min(val_nll, key=val_nll.get) and got["n"] == 500
    assert 0.7 < got["accuracy"] <= 1.0  # 100 labels of 8 x 8 digits: well above chance (0.1)
    xs["train"] = xs["train"][:, ::-1]  # the model fitted on train is the one scored: scrambled train, worse test
    assert baselines.logreg_on_val(xs, ys)["accuracy"] < got["accuracy"] - 0.3
