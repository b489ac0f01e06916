"""Combining member probabilities, and loading saved ensemble parts, with numpy and onnxruntime only.

This is the inference side of the ensemble: the bundle and the Serve replicas import it, so it must not import
scikit-learn, TensorFlow or Ray at module level. Everything a server needs is here:

- ``load_sklearn_member(path)`` -> ``OnnxMember``: callable ``(embeddings N x D) -> probs N x K float32``.
- ``Stacker``: the meta-learner as plain arrays (``from_arrays`` / ``load`` / ``save`` JSON,
  ``predict_proba(member_probs)``): a multinomial logistic regression over member outputs, or a log-linear pool
  (one non-negative weight per member plus a bias per class), both ``softmax(features @ coef.T + intercept)``.
  Its ``fit`` (training side only) imports scikit-learn and SciPy when called.
- ``average`` (soft voting, uniform weights) and ``hard_vote`` (majority of argmax).

Choosing and fitting the combiners (cross-validated stacker choice, temperature, greedy selection, the leakage
proof) is the ensemble stage's: ``transfuse.ensemble.stacker``.

With ``class_weighted`` (``data.class_weight``: see ``transfuse.class_weights``) the stacker's NLL weights each
row by its class's weight, computed on the labels that fit uses.

Member probabilities travel as a mapping ``{member name: N x K array}``; each combiner stores its member order
and picks members by name, so a caller cannot silently feed them in the wrong order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from transfuse.errors import TransfuseError
from transfuse.inference.runtimes import ModelLoadError, onnx_session

# Probabilities are floored at EPS in the NLL that chooses the combiners (greedy selection, the stacker's
# cross-validated NLL: ``transfuse.metrics.nll(..., floor=EPS)``): a member that says 0 for the true class would
# otherwise dominate with an infinite loss.
EPS = 1e-6
# Log-probability stacker features are clipped higher: tree members output exact zeros, and log(1e-6) = -13.8
# outliers make the meta-learner worse (lower test accuracy than at 1e-2).
LOG_FEATURE_EPS = 1e-2
# The log-linear pool has one weight per member, so outliers matter less: a lower clip gives it a lower
# cross-validated NLL than 1e-2 does.
POOL_EPS = 1e-4
STACKER_FORMAT = "transfuse.stacker/v1"
STACKER_METHODS = ("logistic", "log_pool")


class EnsembleError(TransfuseError, ValueError):
    """Ensemble inputs or saved ensemble files are inconsistent."""


# ----------------------------------------------------------------------------------------------------------------
# Member probabilities


def stack_members(member_probs: Mapping[str, np.ndarray], order: Sequence[str]) -> np.ndarray:
    """M x N x K float64 array of the named members, in ``order``; clear errors on missing or misshaped input."""
    missing = [m for m in order if m not in member_probs]
    if missing:
        raise EnsembleError(f"member probabilities missing for {missing}; got {sorted(member_probs)}, "
                            f"expected {list(order)}")
    arrays = [np.asarray(member_probs[m], dtype=np.float64) for m in order]
    shape = arrays[0].shape
    for m, a in zip(order, arrays):
        if a.ndim != 2 or a.shape != shape:
            raise EnsembleError(f"member {m!r}: probabilities must be N x K like {shape}, got {a.shape}")
    return np.stack(arrays)


def average(member_probs: Mapping[str, np.ndarray], order: Optional[Sequence[str]] = None,
            weights: Optional[Sequence[float]] = None) -> np.ndarray:
    """Soft voting: the (weighted) mean of the members' probabilities. Uniform weights = the simple average."""
    order = list(order or member_probs)
    p = stack_members(member_probs, order)
    w = np.ones(len(order)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(order),) or np.any(w < 0) or w.sum() <= 0:
        raise EnsembleError(f"weights must be {len(order)} non-negative numbers with a positive sum, got {weights}")
    return np.tensordot(w / w.sum(), p, axes=1)


def hard_vote(member_probs: Mapping[str, np.ndarray], order: Optional[Sequence[str]] = None) -> np.ndarray:
    """Majority vote of the members' argmax. Returned as vote shares with add-one (Laplace) smoothing so NLL stays
    finite; ties go to the class with the higher mean probability."""
    order = list(order or member_probs)
    p = stack_members(member_probs, order)
    m, n, k = p.shape
    votes = np.zeros((n, k))
    for member in p:
        votes[np.arange(n), member.argmax(1)] += 1.0
    tie_break = 1e-6 * p.mean(0)  # far below one vote
    return (votes + 1.0 + tie_break) / (votes + 1.0 + tie_break).sum(1, keepdims=True)


def row_weights(labels: np.ndarray, k: int, on: bool) -> Optional[np.ndarray]:
    """Class-balanced row weights of ``labels`` (``transfuse.class_weights``; they average 1) when ``on``."""
    if not on:
        return None
    from transfuse.class_weights import sample_weights

    return sample_weights(labels, k)



# ----------------------------------------------------------------------------------------------------------------
# Stacker: multinomial logistic regression over member outputs, stored as plain arrays


def stacker_features(member_probs: Mapping[str, np.ndarray], order: Sequence[str], kind: str,
                     eps: float = LOG_FEATURE_EPS) -> np.ndarray:
    """N x (M*K) meta-features: each member's probabilities (or their logs, clipped at ``eps``), members side by
    side in ``order``."""
    p = stack_members(member_probs, order)
    if kind == "log_probs":
        p = np.log(np.clip(p, eps, 1.0))
    elif kind != "probs":
        raise EnsembleError(f"stacker features must be 'log_probs' or 'probs', got {kind!r}")
    return np.concatenate(list(p), axis=1)


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of N x K logits, in float64."""
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def combine_probs(member_probs: Mapping[str, np.ndarray], order: Sequence[str], *,
                  coef: Optional[np.ndarray] = None, intercept: Optional[np.ndarray] = None,
                  features: str = "probs", eps: float = LOG_FEATURE_EPS) -> np.ndarray:
    """The one combiner every reader uses (fitting, compression, benchmarks, the served bundle): N x K float64.

    Without ``coef`` the uniform average of the members in ``order``; with it the stacker,
    ``softmax(stacker_features @ coef.T + intercept)``, where a 1 x F ``coef`` (a binary scikit-learn
    LogisticRegression) is a sigmoid over class 1."""
    if coef is None:
        return average(member_probs, order)
    z = stacker_features(member_probs, order, features, eps) @ np.asarray(coef).T + np.asarray(intercept)
    if z.shape[1] == 1:
        p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
        return np.stack([1.0 - p1, p1], axis=1)
    return softmax(z)


@dataclass
class Stacker:
    """Meta-learner over member outputs. Estimator-style: ``fit`` learns ``coef_`` (K x M*K) and ``intercept_`` (K);
    prediction is numpy-only so a server loads it from JSON without scikit-learn.

    ``method="logistic"``: multinomial logistic regression on the concatenated member outputs (M*K*K weights).
    ``method="log_pool"``: a log-linear opinion pool, ``softmax(sum_m w_m log p_m + b)`` with ``w_m >= 0``: M weights
    and K biases, so it cannot overfit a small holdout the way M*K*K weights can, and it contains the best single
    member (one weight 1, the rest 0) as a special case. Stored in the same ``coef_`` layout (block-diagonal)."""

    members: list[str]
    C: float = 1.0  # inverse L2 strength (scikit-learn's LogisticRegression C; the same scale for log_pool)
    features: str = "probs"  # "probs" as scikit-learn's StackingClassifier and AutoGluon, or "log_probs"
    eps: float = LOG_FEATURE_EPS  # clip before log, for "log_probs"
    method: str = "logistic"
    coef_: Optional[np.ndarray] = None
    intercept_: Optional[np.ndarray] = None
    classes_: Optional[np.ndarray] = None
    # temperature scaling, already folded in: coef_ and intercept_ are the fitted ones divided by it
    temperature: float = 1.0
    # fit by class-weighted NLL (``transfuse.class_weights``, on the labels each fit gets); a training setting,
    # not stored with the arrays (prediction does not depend on it)
    class_weighted: bool = False
    fit_ids_: Optional[np.ndarray] = field(default=None, repr=False)

    def fit(self, member_probs: Mapping[str, np.ndarray], labels: np.ndarray,
            ids: Optional[np.ndarray] = None, num_classes: Optional[int] = None) -> "Stacker":
        """Fit on held-out member predictions (never on predictions for examples a member trained on); with
        ``class_weighted`` each row's loss is weighted by its class's weight on ``labels``."""
        if self.method not in STACKER_METHODS:
            raise EnsembleError(f"stacker method must be one of {STACKER_METHODS}, got {self.method!r}")
        labels = np.asarray(labels, dtype=np.int64)
        k = num_classes or int(next(iter(member_probs.values())).shape[1])
        present = np.unique(labels)
        if len(present) < 2:
            raise EnsembleError(f"the stacker needs at least 2 classes among its {len(labels)} rows, got {present}")
        if labels.max() >= k:
            raise EnsembleError(f"stacker labels go up to {labels.max()} but the members predict {k} classes")
        weights = row_weights(labels, k, self.class_weighted)
        if self.method == "log_pool":
            self._fit_log_pool(member_probs, labels, k, weights)
            self.fit_ids_ = None if ids is None else np.asarray(ids)
            return self
        from sklearn.linear_model import LogisticRegression  # training side only

        x = stacker_features(member_probs, self.members, self.features, self.eps)
        # lbfgs fits the multinomial (softmax) model for more than two classes.
        lr = LogisticRegression(C=self.C, max_iter=2000).fit(x, labels, sample_weight=weights)
        coef = np.zeros((k, x.shape[1]))
        intercept = np.full(k, -1e3)  # a class absent from the holdout gets ~zero probability
        if len(lr.classes_) == 2 and k >= 2:  # binary: scikit-learn keeps one row for the positive class
            coef[lr.classes_[1]], intercept[lr.classes_[1]] = lr.coef_[0], lr.intercept_[0]
            coef[lr.classes_[0]], intercept[lr.classes_[0]] = 0.0, 0.0
        else:
            coef[lr.classes_], intercept[lr.classes_] = lr.coef_, lr.intercept_
        self.coef_, self.intercept_, self.classes_ = coef, intercept, np.arange(k)
        self.fit_ids_ = None if ids is None else np.asarray(ids)
        return self

    def _fit_log_pool(self, member_probs: Mapping[str, np.ndarray], labels: np.ndarray, k: int,
                      weights: Optional[np.ndarray] = None) -> None:
        """Minimise mean NLL + ||w||^2 / (2 C N) over w >= 0 (one per member) and b (one per class) with L-BFGS-B;
        the penalty is scikit-learn's LogisticRegression objective divided by C N, so C means the same thing.
        ``weights``: each row's NLL weighted (class weights average 1, so the penalty keeps its scale; scikit-learn
        weights its per-row losses the same way)."""
        from scipy.optimize import minimize  # training side only

        if self.features != "log_probs":
            raise EnsembleError(f"a log_pool stacker reads log_probs, got features={self.features!r}")
        logp = np.log(np.clip(stack_members(member_probs, self.members), self.eps, 1.0))  # M x N x K
        m, n, _ = logp.shape
        if logp.shape[2] != k:
            raise EnsembleError(f"member probabilities have {logp.shape[2]} classes, expected {k}")
        rows = np.arange(n)
        penalty = 1.0 / (2.0 * self.C * n)
        row_w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)

        def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w, b = theta[:m], theta[m:]
            z = np.tensordot(w, logp, axes=1) + b
            z = z - z.max(1, keepdims=True)
            logq = z - np.log(np.exp(z).sum(1, keepdims=True))
            g = np.exp(logq)
            g[rows, labels] -= 1.0
            g *= (row_w / n)[:, None]
            loss = -float(row_w @ logq[rows, labels]) / n + penalty * float(w @ w)
            return loss, np.concatenate([np.einsum("nk,mnk->m", g, logp) + 2.0 * penalty * w, g.sum(0)])

        start = np.concatenate([np.full(m, 1.0 / m), np.zeros(k)])  # the geometric mean of the members
        res = minimize(loss_and_grad, start, jac=True, method="L-BFGS-B",
                       bounds=[(0.0, None)] * m + [(None, None)] * k)
        if not np.all(np.isfinite(res.x)):
            raise EnsembleError(f"the log_pool stacker did not converge: {res.message}")
        w, b = res.x[:m], res.x[m:]
        coef = np.zeros((k, m * k))
        for j in range(m):
            coef[:, j * k:(j + 1) * k] = w[j] * np.eye(k)
        self.coef_, self.intercept_, self.classes_ = coef, b, np.arange(k)

    def calibrated(self, temperature: float) -> "Stacker":
        """This stacker with its logits divided by ``temperature`` (on top of any earlier one): argmax, and so
        accuracy, unchanged."""
        if self.coef_ is None:
            raise EnsembleError("the stacker is not fitted")
        if not (np.isfinite(temperature) and temperature > 0):
            raise EnsembleError(f"temperature must be a positive number, got {temperature!r}")
        return replace(self, coef_=self.coef_ / temperature, intercept_=self.intercept_ / temperature,
                       temperature=self.temperature * float(temperature))

    @property
    def member_weights(self) -> Optional[dict[str, float]]:
        """log_pool: each member's fitted weight (readable in reports; before any temperature); None for the
        logistic stacker."""
        if self.method != "log_pool" or self.coef_ is None:
            return None
        k = self.coef_.shape[0]
        return {mem: float(self.coef_[0, j * k] * self.temperature) for j, mem in enumerate(self.members)}

    def decision_function(self, member_probs: Mapping[str, np.ndarray]) -> np.ndarray:
        if self.coef_ is None:
            raise EnsembleError("the stacker is not fitted")
        return stacker_features(member_probs, self.members, self.features, self.eps) @ self.coef_.T + self.intercept_

    def predict_proba(self, member_probs: Mapping[str, np.ndarray]) -> np.ndarray:
        if self.coef_ is None:
            raise EnsembleError("the stacker is not fitted")
        return combine_probs(member_probs, self.members, coef=self.coef_, intercept=self.intercept_,
                             features=self.features, eps=self.eps)

    def predict(self, member_probs: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.predict_proba(member_probs).argmax(1)

    # -- plain-array persistence (JSON; floats round-trip exactly) --
    def to_arrays(self) -> dict[str, Any]:
        if self.coef_ is None:
            raise EnsembleError("the stacker is not fitted")
        return {"format": STACKER_FORMAT, "members": list(self.members), "features": self.features,
                "eps": self.eps, "C": self.C, "method": self.method, "coef": self.coef_.tolist(),
                "intercept": self.intercept_.tolist(), "temperature": self.temperature,
                "classes": [int(c) for c in self.classes_]}

    @classmethod
    def from_arrays(cls, d: Mapping[str, Any]) -> "Stacker":
        if d.get("format") != STACKER_FORMAT:
            raise EnsembleError(f"not a stacker file: format {d.get('format')!r}, expected {STACKER_FORMAT!r}")
        coef = np.asarray(d["coef"], dtype=np.float64)
        intercept = np.asarray(d["intercept"], dtype=np.float64)
        classes = np.asarray(d["classes"], dtype=np.int64)
        members = [str(m) for m in d["members"]]
        k = len(classes)
        if coef.ndim != 2 or coef.shape[0] != k or coef.shape[1] % max(len(members), 1) or intercept.shape != (k,):
            raise EnsembleError(f"stacker arrays do not fit together: coef {coef.shape}, intercept "
                                f"{intercept.shape}, {k} classes, {len(members)} members")
        return cls(members=members, C=float(d.get("C", 1.0)), features=str(d["features"]), eps=float(d["eps"]),
                   method=str(d.get("method", "logistic")), coef_=coef, intercept_=intercept, classes_=classes,
                   temperature=float(d.get("temperature", 1.0)))

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps(self.to_arrays()))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Stacker":
        return cls.from_arrays(json.loads(Path(path).read_text()))


def stack_predict(stacker: Stacker, member_probs: Mapping[str, np.ndarray]) -> np.ndarray:
    """N x K float32 probabilities of the stacked ensemble (a convenience for servers)."""
    return stacker.predict_proba(member_probs).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# scikit-learn members saved as ONNX, run with onnxruntime


class OnnxMember:
    """A scikit-learn member exported by skl2onnx (zipmap off): embeddings N x D float32 -> probabilities N x K.
    Its session is ``transfuse.inference.runtimes.onnx_session``'s, like every ONNX graph transfuse runs."""

    def __init__(self, path: Union[str, Path, bytes], num_threads: int = 1, output: str = "probabilities"):
        shown = path if not isinstance(path, bytes) else "<bytes>"
        try:
            self.session = onnx_session(path, num_threads, f"ONNX member {shown}")
        except ModelLoadError as e:
            raise EnsembleError(f"cannot load ONNX member {shown}: {e.reason}") from e.reason
        inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        if len(inputs) != 1 or output not in outputs:
            raise EnsembleError(f"ONNX member must have one input and an output {output!r}; got inputs "
                                f"{[i.name for i in inputs]}, outputs {outputs}")
        self.input_name = inputs[0].name
        self.input_dim = inputs[0].shape[1] if len(inputs[0].shape) == 2 else None
        self.output = output

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or (isinstance(self.input_dim, int) and x.shape[1] != self.input_dim):
            raise EnsembleError(f"embeddings must be N x {self.input_dim}, got {x.shape}")
        return self.session.run([self.output], {self.input_name: x})[0]

    predict_proba = __call__


def load_sklearn_member(path: Union[str, Path, bytes], num_threads: int = 1) -> OnnxMember:
    """Load one saved scikit-learn member: ``load_sklearn_member(p)(embeddings) -> N x K float32``."""
    return OnnxMember(path, num_threads=num_threads)

