"""The combiners in transfuse.inference.combine (numpy at inference; scikit-learn and scipy only to fit): softmax and
combine_probs against direct numpy computations; the stacker (logistic and log-linear pool) fitted, chosen by
cross-validated NLL, calibrated by a temperature and round-tripped through plain arrays; greedy selection and
voting; the leakage check on recorded ids; ONNX members; and a fresh interpreter loading a member and a stacker
without scikit-learn. Real data: scikit-learn's digits and small hand-written arrays."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.special import softmax as scipy_softmax

from tests._ensemble_helpers import digits_splits, subset_members
from transfuse import metrics as tm
from transfuse.config import MemberConfig
from transfuse.ensemble.learners import build_estimator, to_onnx_bytes
from transfuse.inference.combine import (EnsembleError, Stacker, average, combine_probs, hard_vote, load_sklearn_member,
                                         softmax, stack_members, stacker_features)
from transfuse.ensemble.stacker import (FitRecord, GreedyEnsemble, LeakageError, check_no_leakage, checked_temperature,
                                        fit_temperature, select_stacker, stacker_candidates, temperature_line)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """OpenMP/BLAS in this process capped at one thread, as in test_ensemble.py (the machine is shared; the fits
    here are small)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def digits():
    """Digits train/holdout/test splits (tests._ensemble_helpers.digits_splits)."""
    return digits_splits()


def _probs(n: int, k: int, seed: int) -> np.ndarray:
    """N x K rows drawn from a flat Dirichlet: probabilities a member could output."""
    return np.random.default_rng(seed).dirichlet(np.ones(k), size=n)


# ----------------------------------------------------------------------------------------------------------------
# Member probabilities and the one combiner


def test_softmax_is_stable():
    p = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(p, [[1.0, 0.0], [0.5, 0.5]])


def test_softmax_is_the_row_wise_formula_in_float64():
    """exp(z) / sum(exp(z)) per row (not per column), returned as float64 for float32 logits; adding a constant
    to a row changes nothing."""
    z = np.random.default_rng(0).normal(scale=3.0, size=(6, 4))
    want = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(softmax(z), want, rtol=1e-12)
    np.testing.assert_allclose(softmax(z + 100.0 * np.arange(6)[:, None]), want, rtol=1e-9)
    got32 = softmax(z.astype(np.float32))
    assert got32.dtype == np.float64
    np.testing.assert_allclose(got32, want, rtol=1e-6)


def test_combine_probs_without_coef_averages_the_named_members_only():
    a, b, c = _probs(5, 3, 0), _probs(5, 3, 1), _probs(5, 3, 2)
    np.testing.assert_allclose(combine_probs({"a": a, "b": b, "c": c}, ["c", "a"]), (a + c) / 2, rtol=1e-12)


@pytest.mark.parametrize("features", ["probs", "log_probs"])
def test_combine_probs_with_coef_is_softmax_of_the_linear_stacker(features):
    """softmax([p_b | p_a] @ coef.T + intercept) with the members side by side in the given order (their logs,
    clipped below at eps, for log_probs), computed here with numpy."""
    k, eps = 3, 0.05
    a, b = _probs(7, k, 0), _probs(7, k, 1)
    a[0] = [1.0, 0.0, 0.0]  # an exact zero, as tree members output: log_probs clips it at eps
    rng = np.random.default_rng(2)
    coef, intercept = rng.normal(size=(k, 2 * k)), rng.normal(size=k)
    x = np.concatenate([b, a], axis=1)
    if features == "log_probs":
        x = np.log(np.maximum(x, eps))
    z = x @ coef.T + intercept
    want = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    members = {"a": a, "b": b}
    np.testing.assert_allclose(stacker_features(members, ["b", "a"], features, eps), x, rtol=1e-12)
    got = combine_probs(members, ["b", "a"], coef=coef, intercept=intercept, features=features, eps=eps)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    with pytest.raises(EnsembleError, match=r"stacker features must be 'log_probs' or 'probs', got 'logits'"):
        stacker_features(members, ["b", "a"], "logits")


def test_combine_probs_with_one_coef_row_is_scikit_learns_binary_model():
    """A binary scikit-learn LogisticRegression keeps one row of weights; with it as coef the combiner gives that
    model's own probabilities (p1 = sigmoid(x @ w + b))."""
    from sklearn.linear_model import LogisticRegression

    a = _probs(40, 2, 0)
    y = (a[:, 1] + np.random.default_rng(1).normal(scale=0.2, size=40) > 0.5).astype(np.int64)
    lr = LogisticRegression().fit(a, y)
    assert lr.coef_.shape == (1, 2)
    got = combine_probs({"a": a}, ["a"], coef=lr.coef_, intercept=lr.intercept_)
    np.testing.assert_allclose(got, lr.predict_proba(a), rtol=1e-10)
    p1 = 1.0 / (1.0 + np.exp(-(a @ lr.coef_[0] + lr.intercept_[0])))
    np.testing.assert_allclose(got[:, 1], p1, rtol=1e-12)


def test_member_probabilities_are_stacked_in_order_and_must_be_n_by_k():
    a, b = _probs(4, 3, 0), _probs(4, 3, 1)
    np.testing.assert_array_equal(stack_members({"a": a, "b": b}, ["b", "a"]), np.stack([b, a]))
    with pytest.raises(EnsembleError, match=r"member 'b': probabilities must be N x K like \(4, 3\), got \(3, 3\)"):
        stack_members({"a": a, "b": b[:3]}, ["a", "b"])
    with pytest.raises(EnsembleError, match=r"member 'a': probabilities must be N x K like \(4,\), got \(4,\)"):
        stack_members({"a": a[:, 0], "b": b}, ["a", "b"])


def test_weighted_average_and_its_weights_check():
    a, b = _probs(5, 3, 0), _probs(5, 3, 1)
    got = average({"a": a, "b": b}, ["a", "b"], weights=[3.0, 1.0])
    np.testing.assert_allclose(got, 0.75 * a + 0.25 * b, rtol=1e-12)
    for bad in ([2.0, -1.0], [0.0, 0.0], [1.0]):  # a negative weight, no positive sum, one weight for two
        with pytest.raises(EnsembleError, match=r"weights must be 2 non-negative numbers with a positive sum"):
            average({"a": a, "b": b}, ["a", "b"], weights=bad)


# ----------------------------------------------------------------------------------------------------------------
# The stacker: fitted, chosen, calibrated, saved as plain arrays


def test_log_pool_stacker_weights_members_and_contains_the_best_one(digits):
    """The log-linear pool learns one non-negative weight per member: a member that is pure noise gets the least
    weight, and the pool is at least as good as the best member on the rows it was fitted on (the best member alone,
    weight 1, is one of its solutions)."""
    cnn, _ = subset_members(digits)
    rng = np.random.default_rng(0)
    noise = {s: rng.dirichlet(np.ones(10), size=len(cnn["rows0"][s])) for s in ("holdout", "test")}
    ho = {**{k: v["holdout"] for k, v in cnn.items()}, "noise": noise["holdout"]}
    y = digits["holdout"][1]
    pool = Stacker(list(ho), C=10.0, features="log_probs", eps=1e-4, method="log_pool").fit(ho, y, num_classes=10)
    w = pool.member_weights
    assert set(w) == set(ho) and min(w.values()) >= 0.0
    assert w["noise"] == min(w.values()) and w["noise"] < 0.3 * max(w.values()), w  # in-sample: not exactly 0
    best_nll = min(tm.evaluate(ho[k], y)["nll"] for k in cnn)
    assert tm.evaluate(pool.predict_proba(ho), y)["nll"] <= best_nll
    back = Stacker.from_arrays(json.loads(json.dumps(pool.to_arrays())))  # the server's JSON path
    assert back.method == "log_pool" and back.member_weights == pytest.approx(w)
    np.testing.assert_array_equal(back.predict_proba(ho), pool.predict_proba(ho))
    with pytest.raises(EnsembleError, match=r"log_pool stacker reads log_probs"):
        Stacker(list(ho), method="log_pool").fit(ho, y)
    with pytest.raises(EnsembleError, match=r"stacker method must be one of \('logistic', 'log_pool'\)"):
        Stacker(list(ho), method="mlp").fit(ho, y)


def test_stacker_selection_by_cross_validated_nll_on_holdout(digits):
    cnn, _ = subset_members(digits)
    ho = {k: v["holdout"] for k, v in cnn.items()}
    y = digits["holdout"][1]
    cands = stacker_candidates("auto", 1.0, "probs", [0.1, 10.0])
    assert [(c.method, c.features, c.C) for c in cands] == [
        ("logistic", "probs", 0.1), ("logistic", "probs", 10.0), ("logistic", "log_probs", 0.1),
        ("logistic", "log_probs", 10.0), ("log_pool", "log_probs", 0.1), ("log_pool", "log_probs", 10.0)]
    chosen, table, calibration = select_stacker(ho, y, list(cnn), cands, folds=3, ids=digits["holdout"][2],
                                                num_classes=10)
    assert calibration is None and chosen.temperature == 1.0
    assert len(table) == len(cands) and all(np.isfinite(r["cv_nll"]) for r in table)
    best = min(table, key=lambda r: r["cv_nll"])
    assert (chosen.method, chosen.features, chosen.C) == (best["method"], best["features"], best["C"])
    assert set(chosen.fit_ids_) == set(digits["holdout"][2])  # refitted on every holdout row
    # a named stacker is used as given, without cross-validation
    only, table, _ = select_stacker(ho, y, list(cnn), stacker_candidates("log_pool", 3.0, "probs", [1.0]))
    assert table == [] and (only.method, only.features, only.C) == ("log_pool", "log_probs", 3.0)
    y_few = y[:41].copy()
    y_few[y_few == 9] = 0
    y_few[-1] = 9  # class 9 has one row: no 2-fold split can hold it out and fit on it
    with pytest.raises(EnsembleError, match=r"a class has 1 holdout rows"):
        select_stacker({k: v[:41] for k, v in ho.items()}, y_few, list(cnn), cands)


def test_temperature_is_recovered_from_labels_drawn_at_that_temperature(digits):
    """Labels drawn from softmax(z / 2.5) for the logits z of a model on digits: the fitted temperature is 2.5 up
    to sampling noise, and it never changes a prediction."""
    from sklearn.linear_model import LogisticRegression

    x, y, _ = digits["train"]
    z = LogisticRegression(C=10.0, max_iter=2000).fit(x, y).decision_function(np.concatenate([x] * 20))
    rng = np.random.default_rng(0)
    p = scipy_softmax(z / 2.5, axis=1)
    drawn = (p.cumsum(1) > rng.random((len(z), 1))).argmax(1)
    assert fit_temperature(z, drawn) == pytest.approx(2.5, rel=0.05)
    assert fit_temperature(z / 2.5, drawn) == pytest.approx(1.0, rel=0.05)
    with pytest.raises(EnsembleError, match=r"finite N x K logits and N labels"):
        fit_temperature(z[:5], drawn[:4])


def test_the_temperature_check_applies_a_temperature_that_lowers_the_nll_of_rows_it_was_not_fitted_on(digits):
    """Labels drawn at temperature 2.5: a temperature fitted on 4 folds lowers the 5th fold's NLL on the mean, so
    the check applies the one fitted on all rows."""
    from sklearn.linear_model import LogisticRegression

    x, y, _ = digits["train"]
    z = LogisticRegression(C=10.0, max_iter=2000).fit(x, y).decision_function(x)
    p = scipy_softmax(z / 2.5, axis=1)
    drawn = (p.cumsum(1) > np.random.default_rng(0).random((len(z), 1))).argmax(1)
    c = checked_temperature(z, drawn, folds=5, seed=0)
    assert c["applied"] and c["temperature"] == c["fitted_temperature"] == fit_temperature(z, drawn)
    assert c["temperature"] == pytest.approx(2.5, rel=0.2)
    assert c["check"]["folds"] == 5 and c["check"]["nll_gain"] > 0 and c["check"]["nll_gain_se"] > 0
    assert temperature_line(c).startswith(f"temperature {c['temperature']:.3f} applied")


def test_the_temperature_check_rejects_a_temperature_that_raises_the_nll_of_rows_it_was_not_fitted_on():
    """Two halves that disagree: on one the confident class is right only half the time (fitted alone: T > 1),
    on the other it is always right (T < 1). Fitted on either half, the temperature raises the other half's NLL,
    so the check keeps T = 1 and reports the one fitted on all rows; ``check=False`` applies it."""
    n, k = 40, 3
    z = np.zeros((2 * n, k))
    z[:, 0] = 3.0
    y = np.zeros(2 * n, dtype=np.int64)
    y[:n:2] = 1  # first half: class 0 right on every other row
    halves = [np.arange(n), np.arange(n, 2 * n)]
    splits = [(halves[0], halves[1]), (halves[1], halves[0])]
    assert fit_temperature(z[halves[0]], y[halves[0]]) > 1 > fit_temperature(z[halves[1]], y[halves[1]])
    c = checked_temperature(z, y, splits)
    assert not c["applied"] and c["temperature"] == 1.0 and c["check"]["nll_gain"] < 0
    assert c["fitted_temperature"] == fit_temperature(z, y) != 1.0
    line = temperature_line(c)
    assert line.startswith(f"temperature {c['fitted_temperature']:.3f} fitted") and "not applied" in line
    forced = checked_temperature(z, y, splits, check=False)
    assert forced["applied"] and forced["temperature"] == c["fitted_temperature"]
    assert forced["check"] == {"enabled": False}
    with pytest.raises(EnsembleError, match=r"cannot check a temperature by cross-validation on 5 rows: a class has 1"):
        checked_temperature(z[:5], np.array([0, 0, 1, 1, 2]))


def test_calibrated_stacker_keeps_accuracy_and_lowers_out_of_fold_nll(digits):
    """An over-confident stacker (C large on few holdout rows): the temperature is fitted on its out-of-fold
    logits, lowers their NLL and ECE, is folded into the saved arrays (so a server applies it) and leaves every
    argmax as it was; on test it does not raise the NLL."""
    cnn, _ = subset_members(digits)
    ho = {k: v["holdout"] for k, v in cnn.items()}
    te = {k: v["test"] for k, v in cnn.items()}
    y, y_te = digits["holdout"][1], digits["test"][1]
    cands = stacker_candidates("logistic", 1000.0, "log_probs", [1.0])
    raw, _, none = select_stacker(ho, y, list(cnn), cands, folds=3)
    cal, table, c = select_stacker(ho, y, list(cnn), cands, folds=3, calibrate=True)
    assert none is None and table == []  # one candidate: nothing chosen, cross-validated only to calibrate
    assert c["applied"] and c["check"]["nll_gain"] > 0  # it pays on the left-out folds
    assert c["temperature"] > 1.2 and cal.temperature == c["temperature"]  # over-confident: softened
    oof = c["holdout_oof"]
    assert oof["after"]["nll"] < oof["before"]["nll"] and oof["after"]["ece"] < oof["before"]["ece"], oof
    np.testing.assert_allclose(cal.decision_function(te), raw.decision_function(te) / c["temperature"], rtol=1e-12,
                               atol=1e-12)  # float noise on logits near 0 (seen 1.5e-15)
    np.testing.assert_array_equal(cal.predict(te), raw.predict(te))
    assert tm.nll(cal.predict_proba(te), y_te) <= tm.nll(raw.predict_proba(te), y_te)
    back = Stacker.from_arrays(json.loads(json.dumps(cal.to_arrays())))  # the JSON the bundle and server read
    assert back.temperature == cal.temperature
    np.testing.assert_array_equal(back.predict_proba(te), cal.predict_proba(te))
    np.testing.assert_allclose(back.calibrated(1.0 / back.temperature).predict_proba(te), raw.predict_proba(te),
                               rtol=1e-9, atol=1e-12)
    with pytest.raises(EnsembleError, match=r"temperature must be a positive number"):
        cal.calibrated(0.0)


def test_stacker_round_trips_through_plain_arrays(digits, tmp_path):
    cnn, _ = subset_members(digits)
    ho = {k: v["holdout"] for k, v in cnn.items()}
    te = {k: v["test"] for k, v in cnn.items()}
    s = Stacker(list(cnn), C=0.5).fit(ho, digits["holdout"][1], num_classes=10)
    s.save(tmp_path / "stacker.json")
    text = (tmp_path / "stacker.json").read_text()
    back = Stacker.load(tmp_path / "stacker.json")
    np.testing.assert_array_equal(back.predict_proba(te), s.predict_proba(te))
    assert json.loads(text)["members"] == list(cnn)
    with pytest.raises(EnsembleError, match=r"member probabilities missing"):
        back.predict_proba({"rows0": te["rows0"]})


def test_stacker_arrays_round_trip_and_bad_arrays_are_refused():
    """to_arrays -> JSON -> from_arrays keeps every field and array exactly; a file of another format, arrays that
    do not fit together, and an unfitted stacker are refused."""
    k, names = 3, ["a", "b"]
    rng = np.random.default_rng(0)
    s = Stacker(names, C=0.5, features="log_probs", eps=1e-3, coef_=rng.normal(size=(k, 2 * k)),
                intercept_=rng.normal(size=k), classes_=np.arange(k), temperature=1.5)
    d = json.loads(json.dumps(s.to_arrays()))
    assert (d["format"], d["members"], d["classes"]) == ("transfuse.stacker/v1", names, [0, 1, 2])
    back = Stacker.from_arrays(d)
    assert (back.members, back.C, back.features, back.eps, back.method, back.temperature) == (
        names, 0.5, "log_probs", 1e-3, "logistic", 1.5)
    np.testing.assert_array_equal(back.coef_, s.coef_)
    np.testing.assert_array_equal(back.intercept_, s.intercept_)
    np.testing.assert_array_equal(back.classes_, np.arange(k))
    probs = {"a": _probs(5, k, 1), "b": _probs(5, k, 2)}
    probs["a"][0] = [1.0, 0.0, 0.0]  # its zeros are clipped at the stacker's own eps (1e-3) before the log
    z = np.log(np.maximum(np.concatenate([probs["a"], probs["b"]], axis=1), 1e-3)) @ s.coef_.T + s.intercept_
    np.testing.assert_allclose(s.predict_proba(probs), scipy_softmax(z, axis=1), rtol=1e-10)
    np.testing.assert_array_equal(back.predict_proba(probs), s.predict_proba(probs))
    with pytest.raises(EnsembleError, match=r"not a stacker file: format 'other/v1'"):
        Stacker.from_arrays({**d, "format": "other/v1"})
    with pytest.raises(EnsembleError, match=r"stacker arrays do not fit together: coef \(3, 5\)"):
        Stacker.from_arrays({**d, "coef": np.zeros((k, 5)).tolist()})  # 5 columns: not a multiple of 2 members
    with pytest.raises(EnsembleError, match=r"stacker arrays do not fit together: .*intercept \(2,\)"):
        Stacker.from_arrays({**d, "intercept": [0.0, 0.0]})
    with pytest.raises(EnsembleError, match=r"the stacker is not fitted"):
        Stacker(names).to_arrays()


def test_stacker_gives_a_class_absent_from_its_rows_about_zero_probability():
    """Fitted with num_classes=3 on rows of classes 0 and 1 only: scikit-learn fits a binary model (one weight
    row), which the stacker places on class 1 with class 0 at zero; class 2 gets ~0 probability, and classes 0
    and 1 get that binary model's probabilities. One class alone is refused."""
    from sklearn.linear_model import LogisticRegression

    a = _probs(60, 3, 0)
    y = (a[:, 1] > a[:, 0]).astype(np.int64)
    s = Stacker(["a"], C=1.0).fit({"a": a}, y, num_classes=3)
    assert s.coef_.shape == (3, 3) and s.coef_[0].tolist() == [0.0, 0.0, 0.0] and s.intercept_[2] == -1e3
    p = s.predict_proba({"a": a})
    assert p[:, 2].max() < 1e-300
    ref = LogisticRegression(C=1.0, max_iter=2000).fit(a, y)
    np.testing.assert_allclose(p[:, :2], ref.predict_proba(a), rtol=1e-9)
    with pytest.raises(EnsembleError, match=r"the stacker needs at least 2 classes among its 60 rows"):
        Stacker(["a"]).fit({"a": a}, np.zeros(60, np.int64))


def test_log_pool_is_a_weighted_sum_of_log_probs_and_reports_its_weights_before_any_temperature():
    """A log-linear pool stored as block-diagonal coef_ (0.7 I | 0.2 I) is softmax(0.7 log p_a + 0.2 log p_b + b);
    calibrating divides coef_ by the temperature, yet member_weights still reports 0.7 and 0.2. A logistic
    stacker has no member weights."""
    k = 3
    coef = np.concatenate([0.7 * np.eye(k), 0.2 * np.eye(k)], axis=1)
    bias = np.array([0.1, -0.2, 0.0])
    pool = Stacker(["a", "b"], features="log_probs", eps=1e-4, method="log_pool", coef_=coef, intercept_=bias,
                   classes_=np.arange(k))
    probs = {"a": _probs(6, k, 0), "b": _probs(6, k, 1)}
    z = 0.7 * np.log(probs["a"]) + 0.2 * np.log(probs["b"]) + bias
    np.testing.assert_allclose(pool.predict_proba(probs), scipy_softmax(z, axis=1), rtol=1e-10)
    assert pool.member_weights == pytest.approx({"a": 0.7, "b": 0.2})
    hot = pool.calibrated(2.0)
    np.testing.assert_allclose(hot.coef_, coef / 2.0)
    assert hot.temperature == 2.0 and hot.member_weights == pytest.approx({"a": 0.7, "b": 0.2})
    assert hot.calibrated(1.5).temperature == 3.0  # temperatures compound
    assert Stacker(["a", "b"], coef_=coef, intercept_=bias).member_weights is None


def test_named_stacker_candidates_and_an_unknown_one():
    (lr,) = stacker_candidates("logistic", 2.0, "probs", [0.1, 10.0])  # a named stacker ignores the grid
    assert (lr.method, lr.features, lr.C) == ("logistic", "probs", 2.0)
    with pytest.raises(EnsembleError, match=r"stacker must be 'auto' or one of \('logistic', 'log_pool'\), got 'mlp'"):
        stacker_candidates("mlp", 1.0, "probs", [1.0])


# ----------------------------------------------------------------------------------------------------------------
# Greedy selection and voting


def test_greedy_selection_with_replacement_and_voting():
    labels = np.array([0, 1, 1, 0])
    good = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    bad = good[:, ::-1].copy()
    g = GreedyEnsemble(["good", "bad"], rounds=5).fit({"good": good, "bad": bad}, labels)
    assert g.weights_.tolist() == [1.0, 0.0]  # picked "good" (with replacement), never "bad"
    np.testing.assert_allclose(g.predict_proba({"good": good, "bad": bad}), good)
    np.testing.assert_allclose(average({"a": good, "b": bad}), 0.5)
    hv = hard_vote({"a": good, "b": good, "c": bad})
    assert (hv.argmax(1) == good.argmax(1)).all() and np.allclose(hv.sum(1), 1.0)
    with pytest.raises(EnsembleError, match=r"member probabilities missing for \['c'\]"):
        average({"a": good}, ["a", "c"])


def test_hard_vote_shares_are_smoothed_vote_counts_with_ties_to_the_higher_mean():
    """Vote shares (votes + 1) / (votes + 1).sum() per row; a tied vote goes to the class with the higher mean
    probability, by far less than one vote."""
    m1 = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]])
    m2 = np.array([[0.6, 0.3, 0.1], [0.1, 0.3, 0.6]])
    m3 = np.array([[0.2, 0.7, 0.1], [0.2, 0.5, 0.3]])
    # row 0: votes (2, 1, 0); row 1: votes (0, 2, 1)
    hv = hard_vote({"m1": m1, "m2": m2, "m3": m3})
    np.testing.assert_allclose(hv, np.array([[3, 2, 1], [1, 3, 2]]) / 6.0, atol=1e-6)
    # two members, row 1: one vote each for classes 1 and 2; mean probability 0.4 vs 0.5 -> class 2
    tie = hard_vote({"m1": m1, "m2": m2})
    np.testing.assert_allclose(tie[1], np.array([1, 2, 2]) / 5.0, atol=1e-6)
    assert tie[1].argmax() == 2


def test_greedy_metric_decides_the_pick_and_the_weights_round_trip():
    """One round: by NLL the confident member with one error wins, by accuracy the hesitant one that is always
    right. to_dict / from_dict keep the weights and settings."""
    labels = np.array([0, 1, 1, 0])
    hesitant = np.array([[0.55, 0.45], [0.45, 0.55], [0.45, 0.55], [0.55, 0.45]])  # accuracy 1, NLL 0.598
    sharp = np.array([[0.99, 0.01], [0.01, 0.99], [0.01, 0.99], [0.45, 0.55]])  # accuracy 0.75, NLL 0.207
    members = {"hesitant": hesitant, "sharp": sharp}
    by_nll = GreedyEnsemble(["hesitant", "sharp"], rounds=1).fit(members, labels)
    by_acc = GreedyEnsemble(["hesitant", "sharp"], rounds=1, metric="accuracy").fit(members, labels)
    assert by_nll.weights_.tolist() == [0.0, 1.0] and by_acc.weights_.tolist() == [1.0, 0.0]
    assert by_nll.trace_ == [{"step": 1, "added": "sharp", "score": pytest.approx(
        -(3 * np.log(0.99) + np.log(0.45)) / 4)}]
    d = json.loads(json.dumps(by_acc.to_dict()))
    assert d == {"members": ["hesitant", "sharp"], "weights": [1.0, 0.0], "rounds": 1, "metric": "accuracy"}
    np.testing.assert_array_equal(GreedyEnsemble.from_dict(d).predict_proba(members), hesitant)
    with pytest.raises(EnsembleError, match=r"greedy metric must be 'nll' or 'accuracy', got 'auc'"):
        GreedyEnsemble(["hesitant", "sharp"], metric="auc").fit(members, labels)
    with pytest.raises(EnsembleError, match=r"the greedy ensemble is not fitted"):
        GreedyEnsemble(["hesitant"]).predict_proba(members)


# ----------------------------------------------------------------------------------------------------------------
# Leakage check from recorded ids


def test_leakage_check_catches_in_sample_predictions(digits):
    """Stacking on predictions a model made for its own training examples is refused."""
    _, _, ids_ho = digits["holdout"]
    ids_tr = digits["train"][2]
    good = FitRecord("lr", "lr/fold0", ids_tr, ids_ho)
    check_no_leakage([good], ids_ho, ["lr"])
    leaky = FitRecord("lr", "lr/final", np.concatenate([ids_tr, ids_ho]), ids_ho)
    with pytest.raises(LeakageError, match=r"member 'lr': model lr/final predicted \d+ ids it was fitted on"):
        check_no_leakage([leaky], ids_ho, ["lr"])
    with pytest.raises(LeakageError, match=r"stacker rows have no held-out prediction"):
        check_no_leakage([FitRecord("lr", "lr/fold0", ids_tr, ids_ho[:10])], ids_ho, ["lr"])
    ids_te = digits["test"][2]
    with pytest.raises(LeakageError, match=r"the stacker was fitted on 5 test ids"):
        check_no_leakage([good], ids_ho, ["lr"], test_ids=ids_ho[:5])
    with pytest.raises(LeakageError, match=r"model lr/final used for test predictions was fitted on 5 test ids"):
        check_no_leakage([good], ids_ho, ["lr"], test_ids=ids_te,
                         final_records=[FitRecord("lr", "lr/final", np.concatenate([ids_tr, ids_te[:5]]), ids_te)])


def test_leakage_check_summary_double_predictions_and_ids_as_strings():
    """A clean record set returns its summary; a stacker row predicted by two fold models is refused; ids are
    compared as strings (7 and "7" are one example); records survive their JSON form (fit_records.json)."""
    ids = np.array([f"r{i}" for i in range(6)])
    tr, ho, te = ids[:2], ids[2:4], ids[4:]
    folds = [FitRecord("rf", "rf/fold0", np.r_[tr, ho[1:]], ho[:1]),
             FitRecord("rf", "rf/fold1", np.r_[tr, ho[:1]], ho[1:])]
    cnn = [FitRecord("cnn", "cnn:trial_1", tr, ho)]
    final = [FitRecord("rf", "rf/final", np.r_[tr, ho], te)]
    summary = check_no_leakage(folds + cnn, ho, ["rf", "cnn"], test_ids=te, final_records=final)
    assert summary == {"stacker_rows": 2, "members": ["rf", "cnn"], "models_checked": 4, "leaks": 0}
    with pytest.raises(LeakageError, match=r"member 'rf': id r2 predicted by both rf/fold0 and rf/fold2"):
        check_no_leakage(folds + cnn + [FitRecord("rf", "rf/fold2", tr, ho[:1])], ho, ["rf", "cnn"])
    with pytest.raises(LeakageError, match=r"member 'm': model m/final predicted 1 ids it was fitted on"):
        check_no_leakage([FitRecord("m", "m/final", np.array([7, 8]), np.array(["7"]))], np.array(["7"]), ["m"])
    # integer stacker rows are covered by one member's string ids and another's integer ids
    mixed = [FitRecord("m", "m/fold0", np.array(["1"]), np.array(["7"])),
             FitRecord("n", "n/fold0", np.array([1]), np.array([7]))]
    assert check_no_leakage(mixed, np.array([7]), ["m", "n"])["stacker_rows"] == 1
    back = [FitRecord.from_dict(json.loads(json.dumps(r.to_dict()))) for r in folds + cnn]
    assert [(r.member, r.model, r.fit_ids.tolist(), r.predicted_ids.tolist()) for r in back] == [
        (r.member, r.model, r.fit_ids.tolist(), r.predicted_ids.tolist()) for r in folds + cnn]
    assert check_no_leakage(back, ho, ["rf", "cnn"])["models_checked"] == 3


# ----------------------------------------------------------------------------------------------------------------
# ONNX members, and loading without scikit-learn


def test_onnx_member_checks_its_input_width_and_refuses_bad_bytes(digits):
    x, y, _ = digits["train"]
    est = build_estimator(MemberConfig(name="lr", kind="logistic_regression", params={"max_iter": 300}), 0).fit(x, y)
    member = load_sklearn_member(to_onnx_bytes(est, x.shape[1], "lr"))
    assert member.input_dim == 64
    got = member(x[:5].astype(np.float64))  # cast to float32 for onnxruntime
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, est.predict_proba(x[:5]), atol=1e-4)
    with pytest.raises(EnsembleError, match=r"embeddings must be N x 64, got \(5, 63\)"):
        member(x[:5, :63])
    with pytest.raises(EnsembleError, match=r"cannot load ONNX member <bytes>"):
        load_sklearn_member(b"not an onnx model")


def test_loading_needs_only_numpy_and_onnxruntime(digits, tmp_path):
    """A fresh interpreter loads an ONNX member and a stacker without importing scikit-learn."""
    x, y, _ = digits["train"]
    est = build_estimator(MemberConfig(name="lr", kind="logistic_regression", params={}), 0).fit(x, y)
    (tmp_path / "lr.onnx").write_bytes(to_onnx_bytes(est, x.shape[1], "lr"))
    Stacker(["lr"]).fit({"lr": est.predict_proba(x)}, y, num_classes=10).save(tmp_path / "stacker.json")
    np.save(tmp_path / "x.npy", digits["test"][0])
    np.save(tmp_path / "want.npy", est.predict_proba(digits["test"][0]))
    code = (
        "import sys, numpy as np\n"
        "from transfuse.inference.combine import load_sklearn_member, Stacker, stack_predict\n"
        f"d = {str(tmp_path)!r}\n"
        "m = load_sklearn_member(d + '/lr.onnx')\n"
        "p = m(np.load(d + '/x.npy'))\n"
        "assert np.abs(p - np.load(d + '/want.npy')).max() < 1e-4\n"
        "s = stack_predict(Stacker.load(d + '/stacker.json'), {'lr': p})\n"
        "assert s.shape == p.shape\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('sklearn', 'tensorflow', 'ray', 'skl2onnx')]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
