"""Fitting the ensemble's combiners: the stacker's form and regularisation by cross-validated NLL
(``select_stacker``), temperature scaling, Caruana's greedy selection, and the leakage proof.

``Stacker`` itself (its arrays, ``fit`` and ``predict_proba``) is in ``transfuse.inference.combine``: the bundle and
the Serve replicas load and apply it with numpy alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from transfuse import metrics as tm
from transfuse.inference import (EPS, POOL_EPS, STACKER_METHODS, EnsembleError, Stacker, average, row_weights,
                                 softmax, stack_members)
from transfuse.metrics import ece, logits_nll, nll


class LeakageError(EnsembleError):
    """A model that produced a stacker input (or a test prediction) had been fitted on that example."""


def stacker_candidates(method: str, C: float, features: str, grid_C: Sequence[float]) -> list[Stacker]:
    """Unfitted stackers to choose from. ``method="auto"``: the logistic stacker on probs and on log-probs and the
    log-linear pool, each at every C in ``grid_C``; otherwise the one stacker the config names."""
    if method == "auto":
        return ([Stacker([], C=c, features=f, method="logistic") for f in ("probs", "log_probs") for c in grid_C]
                + [Stacker([], C=c, features="log_probs", eps=POOL_EPS, method="log_pool") for c in grid_C])
    if method == "log_pool":
        return [Stacker([], C=C, features="log_probs", eps=POOL_EPS, method="log_pool")]
    if method == "logistic":
        return [Stacker([], C=C, features=features, method="logistic")]
    raise EnsembleError(f"stacker must be 'auto' or one of {STACKER_METHODS}, got {method!r}")


TEMPERATURE_BOUNDS = (0.05, 20.0)  # a temperature outside this range means the logits are not worth calibrating


def fit_temperature(logits: np.ndarray, labels: np.ndarray, weights: Optional[np.ndarray] = None) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising the NLL of softmax(logits / T) on
    out-of-sample logits (each row's NLL weighted by ``weights`` when given: the class-weighted stacker's
    temperature). T > 1 softens an over-confident model, T < 1 sharpens an under-confident one; the argmax
    never changes. The NLL is convex in 1/T, so a bounded scalar search on log T finds the optimum."""
    from scipy.optimize import minimize_scalar  # training side only

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0 or not np.all(np.isfinite(logits)):
        raise EnsembleError(f"temperature scaling needs finite N x K logits and N labels, got logits "
                            f"{logits.shape} and {labels.shape} labels")
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != labels.shape or np.any(weights < 0) or not weights.sum() > 0:
            raise EnsembleError(f"temperature weights must be {len(labels)} non-negative numbers with a positive "
                                f"sum, got shape {weights.shape}")
    lo, hi = np.log(TEMPERATURE_BOUNDS)
    res = minimize_scalar(lambda t: logits_nll(logits / np.exp(t), labels, weights), bounds=(lo, hi),
                          method="bounded", options={"xatol": 1e-5})
    return float(np.exp(res.x))


def checked_temperature(logits: np.ndarray, labels: np.ndarray,
                        splits: Optional[Sequence[tuple[np.ndarray, np.ndarray]]] = None, *, folds: int = 5,
                        seed: int = 0, check: bool = True, class_weighted: bool = False) -> dict[str, Any]:
    """``fit_temperature`` on all rows, and whether it pays on rows it was not fitted on: for each (fit, score)
    split (``splits``, else stratified ``folds``-fold from ``seed``), a temperature fitted on the fit rows changes
    the score rows' NLL by some gain; the mean gain over the splits, and its standard error, is the check. With
    ``check`` the temperature is applied only when that mean gain is positive; a rejected one is reported and
    ``temperature`` is 1: on a small holdout a temperature fitted to all of it can raise the NLL of rows it has not
    seen.

    ``class_weighted``: every NLL here is class-weighted: each fit by the class weights of the labels it fits on,
    each fold's score by the weights of all the rows' labels (the objective the full fit minimises)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    k = logits.shape[1] if logits.ndim == 2 else 0
    w_all = row_weights(labels, k, class_weighted)
    t = fit_temperature(logits, labels, w_all)
    if not check:
        return {"temperature": t, "fitted_temperature": t, "applied": True, "check": {"enabled": False},
                "class_weighted": bool(class_weighted)}
    if splits is None:
        splits = _cv_splits(labels, folds, seed, "cannot check a temperature by cross-validation on {n} rows: a "
                                                 "class has {smallest} of them; need >= 2 per class")
    gains = []
    for fit_rows, score_rows in splits:
        t_fit = fit_temperature(logits[fit_rows], labels[fit_rows], row_weights(labels[fit_rows], k, class_weighted))
        w = None if w_all is None else w_all[score_rows]
        gains.append(logits_nll(logits[score_rows], labels[score_rows], w)
                     - logits_nll(logits[score_rows] / t_fit, labels[score_rows], w))
    gain = float(np.mean(gains))
    se = float(np.std(gains, ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else float("nan")
    applied = gain > 0
    return {"temperature": t if applied else 1.0, "fitted_temperature": t, "applied": bool(applied),
            "check": {"enabled": True, "folds": len(gains), "nll_gain": gain, "nll_gain_se": se},
            "class_weighted": bool(class_weighted)}


def temperature_line(c: Mapping[str, Any]) -> str:
    """One line for a ``checked_temperature`` answer, for consoles and reports."""
    chk = c.get("check") or {}
    if c.get("applied", True):
        return f"temperature {c['temperature']:.3f} applied (fitted on {c.get('fitted_on', 'holdout')})"
    return (f"temperature {c['fitted_temperature']:.3f} fitted on {c.get('fitted_on', 'holdout')}, not applied: "
            f"fitted on {chk.get('folds')} - 1 folds it changed the left-out fold's NLL by "
            f"{-chk.get('nll_gain', float('nan')):+.4f} on the mean")


_STACKER_CV_REFUSAL = ("cannot cross-validate the stacker: a class has {smallest} holdout rows; need >= 2 per class, "
                       "or set ensemble.stacker to 'logistic' or 'log_pool' and ensemble.temperature_scaling to false")


def _cv_splits(labels: np.ndarray, folds: int, seed: int, refusal: str = _STACKER_CV_REFUSAL,
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified ``folds``-fold splits (fewer when the smallest class has fewer rows); ``refusal`` (formatted
    with ``n`` rows and the ``smallest`` class's count) is the error when a class has a single row."""
    from sklearn.model_selection import StratifiedKFold  # training side only

    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min())
    n_splits = min(folds, smallest)
    if n_splits < 2:
        raise EnsembleError(refusal.format(n=len(labels), smallest=smallest))
    return list(StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(labels, labels))


def _oof_logits(cand: Stacker, member_probs: Mapping[str, np.ndarray], labels: np.ndarray, order: Sequence[str],
                splits: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> np.ndarray:
    oof = np.zeros((len(labels), k))
    for fit_rows, score_rows in splits:
        part = replace(cand, members=list(order))
        part.fit({m: member_probs[m][fit_rows] for m in order}, labels[fit_rows], num_classes=k)
        oof[score_rows] = part.decision_function({m: member_probs[m][score_rows] for m in order})
    return oof


def select_stacker(member_probs: Mapping[str, np.ndarray], labels: np.ndarray, order: Sequence[str],
                   candidates: Sequence[Stacker], folds: int = 5, seed: int = 0,
                   ids: Optional[np.ndarray] = None, num_classes: Optional[int] = None, calibrate: bool = False,
                   check_temperature: bool = True, class_weighted: bool = False,
                   ) -> tuple[Stacker, list[dict[str, Any]], Optional[dict[str, Any]]]:
    """Score each candidate by stratified K-fold cross-validated NLL on the rows given (the holdout: the only
    rows whose member predictions are out-of-sample), refit the best on all of them. With one candidate there is
    nothing to choose and, unless ``calibrate``, no cross-validation runs.

    ``calibrate``: fit a temperature on the chosen candidate's out-of-fold logits (each holdout row scored by a
    stacker that did not learn from it) and fold it into the refitted stacker; with ``check_temperature`` only
    where ``checked_temperature``'s check over the same folds says it pays. Returns (stacker, table,
    calibration), calibration None without ``calibrate``, else ``checked_temperature``'s answer and the
    out-of-fold NLL and ECE before and after the applied temperature.

    ``class_weighted`` (the run's one decision, ``transfuse.class_weights``): every candidate is fitted by
    class-weighted NLL, the candidates are compared by class-weighted cross-validated NLL (``cv_nll``; the same
    objective they fit) and the temperature is fitted and checked by it; ``cv_accuracy`` and the before/after
    record stay unweighted."""
    labels = np.asarray(labels, dtype=np.int64)
    k = num_classes or int(next(iter(member_probs.values())).shape[1])
    candidates = [replace(c, class_weighted=bool(class_weighted)) for c in candidates]
    w_all = row_weights(labels, k, class_weighted)
    table: list[dict[str, Any]] = []
    oofs: list[np.ndarray] = []
    best_i = 0
    if len(candidates) > 1 or calibrate:
        splits = _cv_splits(labels, folds, seed)
        for cand in candidates:
            oofs.append(_oof_logits(cand, member_probs, labels, order, splits, k))
            p = softmax(oofs[-1])
            table.append({"method": cand.method, "features": cand.features, "C": cand.C,
                          "cv_nll": nll(p, labels, w_all, floor=EPS), "cv_accuracy": tm.accuracy(p, labels)})
        best_i = min(range(len(table)), key=lambda i: table[i]["cv_nll"])
    if len(candidates) == 1:
        table = []  # nothing was chosen
    stacker = replace(candidates[best_i], members=list(order)).fit(member_probs, labels, ids=ids, num_classes=k)
    if not calibrate:
        return stacker, table, None
    oof = oofs[best_i]
    calibration = checked_temperature(oof, labels, splits, check=check_temperature, class_weighted=class_weighted)
    t = calibration["temperature"]
    before, after = softmax(oof), softmax(oof / t)
    calibration.update(fitted_on=f"holdout, out-of-fold stacker logits ({len(splits)} folds)",
                       holdout_oof={"before": {"nll": nll(before, labels, floor=EPS), "ece": ece(before, labels)},
                                    "after": {"nll": nll(after, labels, floor=EPS), "ece": ece(after, labels)}})
    return stacker.calibrated(t), table, calibration



# ----------------------------------------------------------------------------------------------------------------
# Greedy ensemble selection (Caruana, Niculescu-Mizil, Crew, Ksikes, ICML 2004)


@dataclass
class GreedyEnsemble:
    """Forward selection with replacement: start empty, repeatedly add the member whose addition most improves the
    selection metric of the averaged ensemble on held-out data; keep the best prefix. Weights = pick counts."""

    members: list[str]
    rounds: int = 25
    metric: str = "nll"  # "nll" (minimised) or "accuracy" (maximised; ties broken by NLL)
    weights_: Optional[np.ndarray] = None
    trace_: list[dict[str, Any]] = field(default_factory=list, repr=False)
    fit_ids_: Optional[np.ndarray] = field(default=None, repr=False)

    def _score(self, probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
        """Lower is better: (primary, tie-break)."""
        loss = nll(probs, labels, floor=EPS)
        if self.metric == "nll":
            return loss, 0.0
        if self.metric == "accuracy":
            return -tm.accuracy(probs, labels), loss
        raise EnsembleError(f"greedy metric must be 'nll' or 'accuracy', got {self.metric!r}")

    def fit(self, member_probs: Mapping[str, np.ndarray], labels: np.ndarray,
            ids: Optional[np.ndarray] = None) -> "GreedyEnsemble":
        p = stack_members(member_probs, self.members)
        labels = np.asarray(labels, dtype=np.int64)
        counts = np.zeros(len(self.members))
        total = np.zeros_like(p[0])
        best_score, best_counts = (np.inf, np.inf), None
        self.trace_ = []
        for step in range(1, self.rounds + 1):
            scores = [self._score((total + p[j]) / step, labels) for j in range(len(self.members))]
            j = min(range(len(scores)), key=lambda i: scores[i])  # first best on ties: deterministic
            counts[j] += 1
            total += p[j]
            self.trace_.append({"step": step, "added": self.members[j], "score": scores[j][0]})
            if scores[j] < best_score:
                best_score, best_counts = scores[j], counts.copy()
        self.weights_ = best_counts / best_counts.sum()
        self.fit_ids_ = None if ids is None else np.asarray(ids)
        return self

    def predict_proba(self, member_probs: Mapping[str, np.ndarray]) -> np.ndarray:
        if self.weights_ is None:
            raise EnsembleError("the greedy ensemble is not fitted")
        return average(member_probs, self.members, self.weights_)

    def to_dict(self) -> dict[str, Any]:
        return {"members": list(self.members), "weights": [float(w) for w in self.weights_],
                "rounds": self.rounds, "metric": self.metric}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GreedyEnsemble":
        return cls(members=list(d["members"]), rounds=int(d["rounds"]), metric=str(d["metric"]),
                   weights_=np.asarray(d["weights"], dtype=np.float64))


# ----------------------------------------------------------------------------------------------------------------
# Leakage check from recorded ids


@dataclass
class FitRecord:
    """One fitted model: which example ids it was fitted on, and which ids it then predicted for the stacker."""

    member: str
    model: str  # e.g. "rf/fold2", "rf/final", "cnn:trial_1"
    fit_ids: np.ndarray
    predicted_ids: np.ndarray  # ids whose predictions from this model were used downstream

    def to_dict(self) -> dict[str, Any]:
        return {"member": self.member, "model": self.model, "fit_ids": [str(i) for i in self.fit_ids],
                "predicted_ids": [str(i) for i in self.predicted_ids]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FitRecord":
        return cls(d["member"], d["model"], np.asarray(d["fit_ids"]), np.asarray(d["predicted_ids"]))


def check_no_leakage(records: Iterable[FitRecord], stacker_ids: np.ndarray, members: Sequence[str],
                     test_ids: Optional[np.ndarray] = None,
                     final_records: Iterable[FitRecord] = ()) -> dict[str, Any]:
    """Raise ``LeakageError`` unless (1) every stacker row has exactly one prediction from each member, (2) the model
    that made it never saw that id, (3) the stacker's rows are not test ids, and (4) no model used for test
    predictions (``final_records``) saw a test id. Returns a summary for the metrics file."""
    stacker = set(map(str, stacker_ids))
    by_member: dict[str, list[FitRecord]] = {m: [] for m in members}
    for r in records:
        by_member.setdefault(r.member, []).append(r)
    for m in members:
        covered: dict[str, str] = {}
        for r in by_member[m]:
            pred = set(map(str, r.predicted_ids))
            leaked = pred & set(map(str, r.fit_ids))
            if leaked:
                raise LeakageError(f"member {m!r}: model {r.model} predicted {len(leaked)} ids it was fitted on, "
                                   f"e.g. {sorted(leaked)[:3]}")
            for i in pred & stacker:
                if i in covered:
                    raise LeakageError(f"member {m!r}: id {i} predicted by both {covered[i]} and {r.model}")
                covered[i] = r.model
        uncovered = stacker - set(covered)
        if uncovered:
            raise LeakageError(f"member {m!r}: {len(uncovered)} stacker rows have no held-out prediction, "
                               f"e.g. {sorted(uncovered)[:3]}")
    test = set(map(str, test_ids)) if test_ids is not None else set()
    if stacker & test:
        raise LeakageError(f"the stacker was fitted on {len(stacker & test)} test ids")
    finals = list(final_records)
    for r in finals:
        seen = set(map(str, r.fit_ids)) & test
        if seen:
            raise LeakageError(f"member {r.member!r}: model {r.model} used for test predictions was fitted on "
                               f"{len(seen)} test ids, e.g. {sorted(seen)[:3]}")
    return {"stacker_rows": len(stacker), "members": list(members),
            "models_checked": sum(len(v) for v in by_member.values()) + len(finals), "leaks": 0}
