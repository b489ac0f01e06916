"""Class weights for imbalanced labels (transfuse.class_weights) and the learners that use them.

The math against scikit-learn's ``compute_class_weight("balanced")`` and the on/off rule as a table (auto just
below, at and above its ratio); weighted fits that are exactly the unweighted fits on rows repeated in proportion
to their weights (the stacker's two methods and its temperature); and on scikit-learn's digits made 8x imbalanced
(two minority classes with 8 training images against 64), over three draws: class weights raise the minority
classes' recall of a scikit-learn member (``learners.fit_one``) and of the stacker, on every draw, and the
ensemble records what it weighted.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from transfuse import metrics as tm
from transfuse.class_weights import (ClassWeightError, by_name, class_counts, class_weights, decision, imbalance,
                                     sample_weights, weighting_on)
from transfuse.config import DataConfig, EnsembleConfig, MemberConfig
from transfuse.ensemble.learners import FitTask, LocalRunner, MemberError, build_estimator, check_sample_weight, fit_one
from transfuse.inference.combine import Stacker
from transfuse.ensemble.stacker import fit_temperature

MINORITY = (3, 8)  # the digits that get 8 training images (and 4 holdout) where the others get 64 (and 32)
SEEDS = (0, 1, 2)  # three draws of the imbalanced subset


# ----------------------------------------------------------------------------------------------------------------
# The math and the rule


@pytest.mark.parametrize("labels,k", [([0, 0, 0, 1], 2), ([2, 2, 1, 0, 0, 0, 0, 0], 3), (list(range(10)) * 3, 10),
                                      ([1, 1, 3, 3, 3, 3], 4)])
def test_weights_are_scikit_learns_balanced_rule(labels, k):
    """n / (k_present * n_c) for the classes present (compute_class_weight's "balanced"), 0 for absent ones; the
    row weights average exactly 1; counts in the manifest's form give the same weights as the labels."""
    from sklearn.utils.class_weight import compute_class_weight

    y = np.asarray(labels)
    present = np.unique(y)
    w = class_weights(y, k)
    np.testing.assert_allclose(w[present], compute_class_weight("balanced", classes=present, y=y), rtol=1e-12)
    assert np.all(w[np.setdiff1d(np.arange(k), present)] == 0)
    assert sample_weights(y, k).mean() == pytest.approx(1.0, abs=1e-12)
    counts = {str(c): int((y == c).sum()) for c in present}
    np.testing.assert_array_equal(class_weights(counts, k), w)
    np.testing.assert_array_equal(class_counts(counts, k), np.bincount(y, minlength=k))


def test_weights_by_hand_and_by_name():
    """90 and 10 rows: 100 / (2 * 90) and 100 / (2 * 10)."""
    w = class_weights({"0": 90, "1": 10}, 2)
    np.testing.assert_allclose(w, [100 / 180, 100 / 20], rtol=1e-15)
    assert by_name(w, ["cat", "dog"]) == {"cat": pytest.approx(5 / 9), "dog": pytest.approx(5.0)}
    assert imbalance({"0": 90, "1": 10}, 2) == pytest.approx(9.0)
    assert imbalance({"0": 7, "1": 7, "2": 0}, 3) == 1.0  # a class without rows is not the smallest


@pytest.mark.parametrize("bad,k,pattern", [
    ([0, 3], 3, r"labels range 0..3; allowed: 0..2 \(3 classes\)"),
    ([-1, 0], 2, r"labels range -1..0"),
    (np.zeros((2, 2), dtype=int), 2, r"1-D array of class ids, got shape \(2, 2\)"),
    ([0.5, 1.0], 2, r"1-D array of class ids"),
    ({"cat": 3}, 2, r"keyed by class id \(0..1\), got key 'cat'"),
    ({"5": 3}, 2, r"class '5' with count 3; allowed: ids 0..1"),
    ([], 2, r"at least one labelled row"),
    ([0], 0, r"number of classes must be >= 1, got 0"),
])
def test_bad_labels_or_counts_are_refused_by_name(bad, k, pattern):
    with pytest.raises(ClassWeightError, match=pattern):
        class_weights(bad, k)


# (mode, imbalance_ratio, train counts) -> weighting on?
RULE = [
    ("auto", 2.0, {"0": 50, "1": 50, "2": 50}, False),  # balanced
    ("auto", 2.0, {"0": 99, "1": 50}, False),  # 1.98: just below the ratio
    ("auto", 2.0, {"0": 100, "1": 50}, True),  # exactly the ratio: "at least"
    ("auto", 2.0, {"0": 101, "1": 50, "2": 80}, True),  # 2.02: just above
    ("auto", 8.0, {"0": 64, "1": 8}, True),
    ("auto", 8.0, {"0": 63, "1": 8}, False),
    ("auto", 1.0, {"0": 5, "1": 5}, True),  # ratio 1: every split counts as imbalanced
    ("auto", 2.0, {"0": 30, "1": 0, "2": 20}, False),  # a class absent from train is not "the smallest"
    ("balanced", 2.0, {"0": 50, "1": 50}, True),  # always
    ("balanced", 2.0, {"0": 1000, "1": 1}, True),
    ("none", 2.0, {"0": 1000, "1": 1}, False),  # never
    ("none", 1.0, {"0": 5, "1": 5}, False),
]


@pytest.mark.parametrize("mode,ratio,counts,on", RULE)
def test_the_rule_decides_from_the_train_counts(mode, ratio, counts, on):
    cfg = DataConfig(class_weight=mode, imbalance_ratio=ratio)
    assert weighting_on(cfg, counts, 3) is on
    labels = np.repeat([int(c) for c in counts], [counts[c] for c in counts])
    assert weighting_on(cfg, labels, 3) is on  # the labels themselves decide alike


def test_the_decision_as_stages_record_it():
    manifest = {"class_names": ["cat", "dog", "emu"], "counts": {"train": {"0": 80, "1": 10, "2": 30},
                                                                 "test": {"0": 5, "1": 5, "2": 5}}}
    d = decision(DataConfig(), manifest)  # auto, ratio 2
    assert d == {"mode": "auto", "imbalance_ratio": 2.0, "train_imbalance": 8.0, "on": True,
                 "train_counts": {"cat": 80, "dog": 10, "emu": 30},
                 "weights": {"cat": pytest.approx(120 / 240), "dog": pytest.approx(4.0), "emu": pytest.approx(4 / 3)}}
    off = decision(DataConfig(class_weight="none"), manifest)
    assert off["on"] is False and "weights" not in off
    with pytest.raises(ClassWeightError, match=r"no class_names or no train counts \(counts.train\)"):
        decision(DataConfig(), {"class_names": ["a", "b"], "counts": {}})
    with pytest.raises(ClassWeightError, match=r"data.class_weight must be one of \('auto', 'balanced', 'none'\), "
                                               r"got 'sometimes'"):
        weighting_on(SimpleNamespace(class_weight="sometimes", imbalance_ratio=2.0), {"0": 1, "1": 2})


# ----------------------------------------------------------------------------------------------------------------
# Weighted fits = unweighted fits on repeated rows


def _repeat_case(seed: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, float]:
    """Three classes with 6, 2 and 4 rows: class weights 2/3, 2 and 1, i.e. rows repeated 2, 6 and 3 times (3x the
    weights). Returns (member probabilities, labels, each row's repeat count, that factor)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat([0, 1, 2], [6, 2, 4]))
    probs = {}
    for m in ("a", "b"):
        p = rng.dirichlet(np.ones(3), size=len(labels))
        p[np.arange(len(labels)), labels] += rng.uniform(0.0, 1.0, len(labels))
        probs[m] = p / p.sum(1, keepdims=True)
    reps = (3 * sample_weights(labels, 3)).round().astype(int)
    np.testing.assert_allclose(reps, 3 * sample_weights(labels, 3), atol=1e-12)
    return probs, labels, reps, 3.0


@pytest.mark.parametrize("method,features,eps", [("logistic", "probs", 1e-2), ("logistic", "log_probs", 1e-2),
                                                 ("log_pool", "log_probs", 1e-4)])
def test_weighted_stacker_is_the_fit_on_rows_repeated_by_their_weights(method, features, eps):
    """Mean weighted NLL + ||w||^2 / (2 C n) with weights that average 1 is the mean NLL over rows repeated c times
    their weight + ||w||^2 / (2 C' n c) with C' = C / c: both stackers give the same coefficients (the log pool's
    custom loss and gradient included)."""
    probs, labels, reps, c = _repeat_case(0)
    weighted = Stacker(["a", "b"], C=1.0, features=features, eps=eps, method=method, class_weighted=True)
    weighted.fit(probs, labels, num_classes=3)
    repeated = Stacker(["a", "b"], C=1.0 / c, features=features, eps=eps, method=method)
    repeated.fit({m: np.repeat(p, reps, axis=0) for m, p in probs.items()}, np.repeat(labels, reps), num_classes=3)
    np.testing.assert_allclose(weighted.coef_, repeated.coef_, atol=2e-4)
    np.testing.assert_allclose(weighted.intercept_, repeated.intercept_, atol=2e-4)
    plain = Stacker(["a", "b"], C=1.0, features=features, eps=eps, method=method).fit(probs, labels, num_classes=3)
    assert np.abs(plain.coef_ - weighted.coef_).max() > 1e-2  # the weights do change this fit


def test_weighted_temperature_is_the_fit_on_repeated_rows():
    rng = np.random.default_rng(3)
    labels = rng.permutation(np.repeat([0, 1, 2], [6, 2, 4]))
    logits = rng.normal(0, 2, (len(labels), 3))
    logits[np.arange(len(labels)), labels] += 1.5
    w = sample_weights(labels, 3)
    reps = (3 * w).round().astype(int)
    t_w = fit_temperature(logits, labels, w)
    assert t_w == pytest.approx(fit_temperature(np.repeat(logits, reps, axis=0), np.repeat(labels, reps)), rel=1e-4)
    assert abs(t_w - fit_temperature(logits, labels)) > 1e-2


# ----------------------------------------------------------------------------------------------------------------
# Imbalanced digits: minority recall with and without class weights


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


def imbalanced_draw(digits, seed: int) -> dict[str, np.ndarray]:
    """Row indices per split: a balanced test split (60 per digit), and train / holdout 8x imbalanced (64 / 32 per
    digit, 8 / 4 for the MINORITY digits), drawn with ``seed``."""
    _, y = digits
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {"train": [], "holdout": [], "test": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_tr, n_ho = (8, 4) if c in MINORITY else (64, 32)
        parts["test"] += idx[:60].tolist()
        parts["train"] += idx[60:60 + n_tr].tolist()
        parts["holdout"] += idx[60 + n_tr:60 + n_tr + n_ho].tolist()
    return {s: np.sort(np.asarray(v)) for s, v in parts.items()}


def minority_recall(probs: np.ndarray, labels: np.ndarray) -> float:
    """Recall over the MINORITY digits' test rows."""
    rows = np.isin(labels, MINORITY)
    return float(np.mean(probs.argmax(1)[rows] == labels[rows]))


def test_the_draw_is_8x_imbalanced_and_auto_weights_it(digits):
    split = imbalanced_draw(digits, 0)
    counts = np.bincount(digits[1][split["train"]], minlength=10)
    assert imbalance(digits[1][split["train"]], 10) == 8.0 and counts[list(MINORITY)].tolist() == [8, 8]
    assert weighting_on(DataConfig(), digits[1][split["train"]], 10)


@pytest.mark.parametrize("kind,params", [("logistic_regression", {"C": 1.0, "max_iter": 1000}),
                                         ("random_forest", {"n_estimators": 50})])
def test_class_weights_raise_a_members_minority_recall(digits, kind, params):
    """``fit_one`` with and without ``class_weighted`` on each draw's train rows: weighted recall of the minority
    digits is higher on every draw (measured, logistic regression: 0.83/0.78/0.72 vs 0.58/0.53/0.51; random
    forest: 0.56/0.50/0.50 vs 0.34/0.24/0.37)."""
    x, y = digits
    member = MemberConfig(name="m", kind=kind, params=params)
    got: dict[bool, list[float]] = {False: [], True: []}
    for seed in SEEDS:
        split = imbalanced_draw(digits, seed)
        rows = np.concatenate([split["train"], split["test"]])
        data = {"x": x[rows], "y": y[rows], "ids": rows.astype(str)}
        fit_idx, test_idx = np.arange(len(split["train"])), np.arange(len(split["train"]), len(rows))
        for weighted in (False, True):
            out = fit_one(data, FitTask(member, seed, None, fit_idx, {"test": test_idx}, 10,
                                        class_weighted=weighted))
            got[weighted].append(minority_recall(out.predictions["test"][1], y[split["test"]]))
    assert np.mean(got[True]) > np.mean(got[False]) + 0.1, got
    assert all(w > u for w, u in zip(got[True], got[False])), got


def _member_probs(digits, split: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Two unweighted members fitted on train, each reading half of the 8x8 image (top rows, bottom rows): their
    holdout and test probabilities."""
    from sklearn.linear_model import LogisticRegression

    x, y = digits
    out = {}
    for name, image_rows in (("top", range(0, 4)), ("bottom", range(4, 8))):
        cols = np.array([r * 8 + c for r in image_rows for c in range(8)])
        lr = LogisticRegression(C=1.0, max_iter=1000).fit(x[split["train"]][:, cols], y[split["train"]])
        out[name] = {s: lr.predict_proba(x[split[s]][:, cols]) for s in ("holdout", "test")}
    return out


@pytest.mark.parametrize("method,features,eps", [("logistic", "probs", 1e-2), ("logistic", "log_probs", 1e-2),
                                                 ("log_pool", "log_probs", 1e-4)])
def test_class_weights_raise_the_stackers_minority_recall(digits, method, features, eps):
    """The stacker fitted on each draw's 8x imbalanced holdout with and without ``class_weighted``: weighted
    minority recall is higher on every draw (measured, log pool: 0.83/0.82/0.80 vs 0.73/0.63/0.68; logistic on
    log-probabilities 0.78/0.62/0.71 vs 0.69/0.54/0.64)."""
    _, y = digits
    got: dict[bool, list[float]] = {False: [], True: []}
    for seed in SEEDS:
        split = imbalanced_draw(digits, seed)
        probs = _member_probs(digits, split)
        for weighted in (False, True):
            st = Stacker(["top", "bottom"], C=1.0, features=features, eps=eps, method=method,
                         class_weighted=weighted)
            st.fit({m: p["holdout"] for m, p in probs.items()}, y[split["holdout"]], num_classes=10)
            got[weighted].append(minority_recall(st.predict_proba({m: p["test"] for m, p in probs.items()}),
                                                 y[split["test"]]))
    assert np.mean(got[True]) > np.mean(got[False]) + 0.05, got
    assert all(w > u for w, u in zip(got[True], got[False])), got


def test_fit_ensemble_weights_its_members_and_stacker_and_records_it(digits):
    """The ensemble fit on one imbalanced draw (CNN members stood in for by the two half-image models), weighted
    and not: the stacker says it was weighted, the report holds each learner's weights by class name, every model's
    test metrics carry balanced accuracy, macro F1 and recall per class name, and the stack's minority recall
    rises."""
    from transfuse.ensemble.stage import fit_ensemble, fit_report
    from transfuse.ensemble.inputs import EnsembleInputs

    x, y = digits
    split = imbalanced_draw(digits, 0)
    names = [f"digit_{c}" for c in range(10)]
    probs = _member_probs(digits, split)
    inp = EnsembleInputs(ids={s: v.astype(str) for s, v in split.items()}, labels={s: y[v] for s, v in split.items()},
                         embeddings={s: x[v] for s, v in split.items()}, num_classes=10, cnn_probs=probs,
                         cnn_fit_ids={m: split["train"].astype(str) for m in probs}, class_names=names)
    ecfg = EnsembleConfig(members=[MemberConfig(name="logreg", kind="logistic_regression",
                                                params={"C": 1.0, "max_iter": 1000})],
                          folds=3, seeds=[0], parallel="local", stacker="log_pool")
    fits = {w: fit_ensemble(inp, ecfg, LocalRunner(), class_weighted=w) for w in (False, True)}
    assert [fits[w].first.stacker.class_weighted for w in (False, True)] == [False, True]
    report = fit_report(fits[True], inp)
    cw = report["class_weight"]
    assert cw["on"] and list(cw["stacker"]) == names and list(cw["sklearn_final"]) == names
    assert cw["stacker"]["digit_3"] == pytest.approx(len(split["holdout"]) / (10 * 4))
    assert fit_report(fits[False], inp)["class_weight"] == {"on": False}
    stack = report["test"]["0"]["stack"]
    test_probs = fits[True].first.combined_test["stack"]
    assert stack["balanced_accuracy"] == pytest.approx(tm.balanced_accuracy(test_probs, y[split["test"]]))
    assert list(stack["per_class_recall"]) == names and "macro_f1" in report["summary"]["stack"]
    recall = {w: minority_recall(f.first.combined_test["stack"], y[split["test"]]) for w, f in fits.items()}
    assert recall[True] > recall[False], recall
    member = {w: minority_recall(f.first.test_probs["logreg"], y[split["test"]]) for w, f in fits.items()}
    assert member[True] > member[False], member


def test_every_member_kind_takes_sample_weight_and_others_are_refused(digits):
    """Every kind in the table fits class-weighted; an estimator whose fit takes no sample_weight (k-nearest
    neighbours, not a member kind) is refused by name rather than fitted unweighted."""
    from sklearn.neighbors import KNeighborsClassifier

    from transfuse.config import MEMBER_KINDS

    x, y = digits
    data = {"x": x[:300], "y": y[:300], "ids": np.arange(300).astype(str)}
    small = {"random_forest": {"n_estimators": 5}, "bagging": {"n_estimators": 3}, "adaboost": {"n_estimators": 5},
             "hist_gradient_boosting": {"max_iter": 5}, "svc": {}, "logistic_regression": {"max_iter": 200}}
    for kind in MEMBER_KINDS:
        member = MemberConfig(name=f"m_{kind}", kind=kind, params=small[kind])
        check_sample_weight(build_estimator(member), member)
        out = fit_one(data, FitTask(member, 0, None, np.arange(200), {"rest": np.arange(200, 300)}, 10,
                                    class_weighted=True))
        assert out.predictions["rest"][1].shape == (100, 10)
    knn = MemberConfig(name="knn", kind="logistic_regression")
    with pytest.raises(MemberError, match=r"member 'knn' \(logistic_regression, KNeighborsClassifier\): its fit "
                                          r"takes no sample_weight"):
        check_sample_weight(KNeighborsClassifier(), knn)
