"""The scikit-learn members: one table of kinds, estimators built and validated in one place, fitted as tasks
(in-process or as Ray tasks sharing one object-store copy of the data), exported to ONNX without pickle.

Fitting runs as one task per (seed, member, fold) behind one interface: ``RayRunner`` puts the embeddings (and
the pixel view, when a member reads it) in the object store once and hands every task the same reference;
``LocalRunner`` runs the same function in-process. Errors raised in a task come back as ``MemberError`` naming
the member.

Class weights (``data.class_weight``, decided once per run: ``transfuse.class_weights``): a task with
``class_weighted`` passes ``sample_weight`` to ``fit``, each row weighted by its class's weight on the task's own
fit labels. Every kind in the table takes ``sample_weight`` (RandomForest, Bagging and AdaBoost on their trees,
HistGradientBoosting, SVC in libsvm's C per row, LogisticRegression in its loss); a kind that did not would be
refused with ``MemberError`` rather than silently fitted unweighted (``check_sample_weight``).

Note: scikit-learn 1.9 deprecates ``SVC(probability=True)`` (removal planned in 1.11, replacement
``CalibratedClassifierCV(SVC(), ensemble=False)``); the ``svc`` kind still uses it and mutes that one warning.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from transfuse.config import MEMBER_KINDS, EnsembleConfig, MemberConfig
from transfuse.inference import EnsembleError

log = logging.getLogger(__name__)

ONNX_INPUT = "embedding"
ONNX_OUTPUT = "probabilities"


class MemberError(EnsembleError):
    """A scikit-learn member's kind or parameters are invalid, or its fit failed."""


# ----------------------------------------------------------------------------------------------------------------
# Member kinds: one table, enforced in one place


def _kind_table() -> dict[str, tuple[type, dict[str, Any]]]:
    """kind -> (estimator class, base parameters). Imported lazily: the serving side never needs scikit-learn."""
    from sklearn.ensemble import (
        AdaBoostClassifier,
        BaggingClassifier,
        HistGradientBoostingClassifier,
        RandomForestClassifier,
    )
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC
    from sklearn.tree import DecisionTreeClassifier

    return {
        "random_forest": (RandomForestClassifier, {}),
        # explicit base tree so nested parameters (estimator__max_depth) can be set from config
        "bagging": (BaggingClassifier, {"estimator": DecisionTreeClassifier()}),
        # decision stumps, as in the seed (base_estimator= was removed in scikit-learn 1.4: it is estimator= now)
        "adaboost": (AdaBoostClassifier, {"estimator": DecisionTreeClassifier(max_depth=1)}),
        "hist_gradient_boosting": (HistGradientBoostingClassifier, {}),
        "svc": (SVC, {"probability": True}),  # Platt-scaled probabilities: members are combined as probabilities
        "logistic_regression": (LogisticRegression, {"max_iter": 1000}),  # lbfgs: multinomial for K > 2
    }


# Parameters the ensemble sets itself; config may not override them.
_RESERVED = {
    "random_state": "it is set from ensemble.seeds (one fit per seed)",
    "n_jobs": "it is set from ensemble.cpus_per_task",
    "estimator": "give the base tree's parameters as estimator__<name> (e.g. estimator__max_depth: 2)",
    "probability": "svc members always use probability=True (members are combined as probabilities)",
    "verbose": "logging is controlled by the job",
    "warm_start": "every fit starts fresh",
}


# Kinds whose n_jobs does something (LogisticRegression's n_jobs has had no effect since scikit-learn 1.8).
_PARALLEL_KINDS = ("random_forest", "bagging")


def build_estimator(member: MemberConfig, seed: int = 0, n_jobs: int = 1) -> Any:
    """The unfitted scikit-learn estimator for ``member``; a bad kind or parameter raises ``MemberError`` naming the
    member, the parameter and what is allowed. scikit-learn's own value checks run here too (``_validate_params``)
    so a bad value fails before any Ray work, and again at fit time."""
    table = _kind_table()
    if member.kind not in table:
        raise MemberError(f"member {member.name!r}: unknown kind {member.kind!r}; allowed: {', '.join(MEMBER_KINDS)}")
    cls, base = table[member.kind]
    from sklearn.base import clone

    est = cls(**{k: (clone(v) if hasattr(v, "get_params") else v) for k, v in base.items()})
    defaults = est.get_params(deep=True)
    where = f"member {member.name!r} ({member.kind}, {cls.__name__})"
    for key in member.params:
        if key in _RESERVED:
            raise MemberError(f"{where}: parameter {key!r} cannot be set in config: {_RESERVED[key]}")
        if key not in defaults:
            top = sorted(k for k in defaults if "__" not in k and k not in _RESERVED)
            nested = sorted(k for k in defaults if "__" in k)
            allowed = ", ".join(top) + (f"; nested: {', '.join(nested)}" if nested else "")
            raise MemberError(f"{where}: unknown parameter {key!r}; allowed: {allowed}")
    engine = {"random_state": seed} if "random_state" in defaults else {}
    if member.kind in _PARALLEL_KINDS:
        engine["n_jobs"] = n_jobs
    est.set_params(**engine, **member.params)
    for target in (est, getattr(est, "estimator", None)):
        validate = getattr(target, "_validate_params", None)  # scikit-learn >= 1.2: its parameter-constraint table
        if validate is not None:
            try:
                validate()
            except (ValueError, TypeError) as e:
                raise MemberError(f"{where}: {e}") from None
    return est


def validate_members(ecfg: EnsembleConfig, class_weighted: bool = False) -> None:
    """Check every configured member before any work starts (with ``class_weighted``: that its kind takes
    ``sample_weight``)."""
    for m in ecfg.members:
        est = build_estimator(m, ecfg.seeds[0])
        if class_weighted:
            check_sample_weight(est, m)


def check_sample_weight(est: Any, member: MemberConfig) -> None:
    """``MemberError`` unless ``est.fit`` takes ``sample_weight`` (the class-weighted fit needs it)."""
    from sklearn.utils.validation import has_fit_parameter

    if not has_fit_parameter(est, "sample_weight"):
        raise MemberError(f"member {member.name!r} ({member.kind}, {type(est).__name__}): its fit takes no "
                          f"sample_weight, so it cannot be class-weighted; set data.class_weight to 'none' or "
                          f"use another kind")


# ----------------------------------------------------------------------------------------------------------------
# Fitting tasks and the local/Ray runner pair


@dataclass
class FitTask:
    """Fit one member on rows ``fit_idx`` of the shared data, then predict the named row sets."""

    member: MemberConfig
    seed: int
    fold: Optional[int]  # None: the final model, fitted on every fit row
    fit_idx: np.ndarray
    predict: dict[str, np.ndarray]  # name -> row indices
    num_classes: int
    n_jobs: int = 1
    keep_estimator: bool = False
    data_key: Optional[str] = None  # the shared data's array the member reads (``data_key``); None: by features
    class_weighted: bool = False  # sample_weight = class weights of y[fit_idx] (transfuse.class_weights)


@dataclass
class FitOutput:
    member: str
    seed: int
    fold: Optional[int]
    fit_ids: np.ndarray  # the ids the estimator was actually fitted on (recorded inside the task)
    predictions: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (ids, N x K probabilities)
    estimator: Any = None
    data_object_id: Optional[str] = None  # the object-store id the task read its data from (Ray only)
    seconds: float = 0.0


def _aligned_proba(est: Any, x: np.ndarray, num_classes: int) -> np.ndarray:
    """predict_proba with one column per class 0..K-1 (a fold may lack a class: its column is 0)."""
    p = est.predict_proba(x)
    out = np.zeros((len(x), num_classes), dtype=np.float64)
    out[:, np.asarray(est.classes_, dtype=np.int64)] = p
    return out


_DATA_KEY = {"embedding": "x", "pixels": "pixels"}  # member features -> the shared data's array


def data_key(member: MemberConfig, embedding_source: Optional[str]) -> str:
    """The shared data's array ``member`` reads: the pixels, the best CNN's embedding (``x``) or another CNN
    member's (``emb:<name>``)."""
    if member.features == "embedding" and member.embedding_of not in (None, embedding_source):
        return f"emb:{member.embedding_of}"
    return _DATA_KEY[member.features]


def fit_one(data: Mapping[str, np.ndarray], task: FitTask, data_object_id: Optional[str] = None) -> FitOutput:
    """Fit and predict one (member, seed, fold). Runs in-process or inside a Ray task."""
    t0 = time.perf_counter()
    est = build_estimator(task.member, task.seed, task.n_jobs)
    x, y, ids = data[task.data_key or _DATA_KEY[task.member.features]], data["y"], data["ids"]
    fit_idx = np.asarray(task.fit_idx)
    fit_kw: dict[str, Any] = {}
    if task.class_weighted:
        from transfuse.class_weights import sample_weights

        check_sample_weight(est, task.member)
        fit_kw["sample_weight"] = sample_weights(y[fit_idx], task.num_classes)  # on this fit's own labels
    model = f"{task.member.name}/seed{task.seed}/" + ("final" if task.fold is None else f"fold{task.fold}")
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    try:
        # OpenMP/BLAS threads capped at the task's CPUs: HistGradientBoosting's OpenMP barriers spin for minutes
        # when its default (one thread per core) meets other busy processes on the same cores.
        with warnings.catch_warnings(), threadpool_limits(limits=task.n_jobs):
            warnings.simplefilter("ignore", category=UserWarning)  # e.g. convergence chatter on tiny folds
            # scikit-learn 1.9 deprecates SVC(probability=True) (removal planned for 1.11); the issue asks for it
            # and skl2onnx converts it. Said once in the module docstring instead of once per task.
            warnings.filterwarnings("ignore", message="The `probability` parameter was deprecated",
                                    category=FutureWarning)
            est.fit(x[fit_idx], y[fit_idx], **fit_kw)
        preds = {name: (ids[idx], _aligned_proba(est, x[idx], task.num_classes)) for name, idx in task.predict.items()}
    except (ValueError, TypeError) as e:
        raise MemberError(f"member {task.member.name!r} ({task.member.kind}) failed to fit {model}: {e}") from None
    return FitOutput(task.member.name, task.seed, task.fold, ids[fit_idx].copy(), preds,
                     est if task.keep_estimator else None, data_object_id, time.perf_counter() - t0)


Progress = Callable[[int, int], None]  # (tasks done, tasks in all), called as tasks finish


class LocalRunner:
    """Sequential, in-process: the no-Ray path with the same interface as ``RayRunner``."""

    name = "local"

    def run(self, data: Mapping[str, np.ndarray], tasks: Sequence[FitTask],
            progress: Optional[Progress] = None) -> list[FitOutput]:
        out = []
        for t in tasks:
            out.append(fit_one(data, t))
            if progress:
                progress(len(out), len(tasks))
        return out


def _fit_remote(holder: list, task: FitTask) -> FitOutput:
    """Ray task body: the data reference arrives nested, so this task reads the one shared object (zero-copy for
    numpy arrays) and can report which object it read."""
    import ray

    ref = holder[0]
    return fit_one(ray.get(ref), task, data_object_id=ref.hex())


class RayRunner:
    """One Ray task per fit. The data go into the object store once (``ray.put``); every task gets that ref."""

    name = "ray"

    def __init__(self, num_cpus: float = 1.0):
        self.num_cpus = num_cpus

    def run(self, data: Mapping[str, np.ndarray], tasks: Sequence[FitTask],
            progress: Optional[Progress] = None) -> list[FitOutput]:
        import ray

        if not ray.is_initialized():
            raise EnsembleError("RayRunner needs a connected Ray cluster (transfuse.environment.init_ray), "
                                "or use ensemble.parallel=local")
        ref = ray.put(dict(data))
        remote = ray.remote(_fit_remote).options(num_cpus=self.num_cpus, max_retries=1,
                                                 retry_exceptions=False)
        futures = [remote.remote([ref], t) for t in tasks]
        try:
            pending = list(futures)
            while pending:  # as tasks finish: a failed one raises here, at once
                ready, pending = ray.wait(pending, num_returns=1)
                ray.get(ready)
                if progress:
                    progress(len(futures) - len(pending), len(futures))
            return ray.get(futures)
        except ray.exceptions.RayTaskError as e:
            for f in futures:
                ray.cancel(f)
            cause = getattr(e, "cause", None)
            if isinstance(cause, EnsembleError):
                raise cause from None
            raise


def make_runner(ecfg: EnsembleConfig) -> LocalRunner | RayRunner:
    return RayRunner(ecfg.cpus_per_task) if ecfg.parallel == "ray" else LocalRunner()


# ----------------------------------------------------------------------------------------------------------------
# ONNX export (no pickle in anything a server loads)


@functools.lru_cache(maxsize=1)
def _patch_skl2onnx_hist_gradient_boosting() -> None:
    """skl2onnx 1.20 passes a Python bool for a leaf's missing-value flag in HistGradientBoosting trees, which
    onnx >= 1.23's make_attribute refuses in an int list ("Expected an int, got a boolean"). Cast it to int."""
    import skl2onnx.common.tree_ensemble as te

    original = te.add_node
    if getattr(original, "_transfuse_int_cast", False):
        return

    @functools.wraps(original)
    def add_node(*args: Any, nodes_missing_value_tracks_true: Any = 0, **kwargs: Any) -> Any:
        return original(*args, nodes_missing_value_tracks_true=int(nodes_missing_value_tracks_true), **kwargs)

    add_node._transfuse_int_cast = True  # type: ignore[attr-defined]
    te.add_node = add_node


def float32_exact_thresholds(estimator: Any) -> None:
    """Make a HistGradientBoosting model's split thresholds float32 values, in place, without changing a single
    prediction on float32 inputs (every member input is float32).

    scikit-learn compares the inputs with float64 thresholds; ONNX's TreeEnsemble stores float32 ones, and
    skl2onnx rounds each to the nearest float32, which can land on the other side of an input: searched
    ``hist_gradient_boosting`` members on Fashion-MNIST pixels (150 train rows, 287 iterations) moved 20 of
    2,000 test rows by up to 0.157 in probability, and the ensemble stage's reload check failed. Each threshold
    becomes the largest float32 not above it: for a float32 ``x``, ``x <= t`` exactly when ``x <= floor32(t)``."""
    for predictors in getattr(estimator, "_predictors", None) or []:
        for predictor in predictors:
            nodes = predictor.nodes.copy()  # read-only when the model came back from a Ray task
            t = nodes["num_threshold"]
            f = t.astype(np.float32)
            up = f.astype(np.float64) > t
            f[up] = np.nextafter(f[up], np.float32(-np.inf))
            nodes["num_threshold"] = f.astype(np.float64)
            predictor.nodes = nodes


def to_onnx_bytes(estimator: Any, dim: int, name: str = "member") -> bytes:
    """A fitted classifier as an ONNX model: input ``embedding`` (N x dim float32), outputs ``label`` and
    ``probabilities`` (N x K float32; zipmap off so it is a plain tensor). A HistGradientBoosting ``estimator``
    gets float32 thresholds in place first (``float32_exact_thresholds``: its predictions do not move)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    _patch_skl2onnx_hist_gradient_boosting()
    float32_exact_thresholds(estimator)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = convert_sklearn(estimator, name=name, initial_types=[(ONNX_INPUT, FloatTensorType([None, dim]))],
                                    options={id(estimator): {"zipmap": False}})
    except Exception as e:  # skl2onnx raises many types; name the member
        raise MemberError(f"member {name!r}: ONNX export of {type(estimator).__name__} failed: {e}") from e
    return model.SerializeToString()
