"""The ensemble's section of the config: the scikit-learn members, their search space, the stacker."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from transfuse.config.base import Strict


# scikit-learn learners fitted on CNN embeddings (transfuse.ensemble.stage maps each kind to its estimator and checks
# params against the estimator's get_params() before any work starts).
MEMBER_KINDS = ("random_forest", "bagging", "adaboost", "hist_gradient_boosting", "svc", "logistic_regression")


MEMBER_FEATURES = ("embedding", "pixels")


class MemberConfig(Strict):
    """One scikit-learn ensemble member: a unique file-safe name, a kind, estimator keyword arguments, and what it
    reads: the best CNN member's embedding (its penultimate layer) or the image's pixels (scaled to [0, 1] and
    flattened, at ``ensemble.pixel_size``), a second view of the data whose errors differ from the CNNs'."""

    name: str
    kind: str
    params: dict[str, Any] = {}
    features: Literal[MEMBER_FEATURES] = "embedding"  # type: ignore[valid-type]
    # features: embedding only: which CNN member's embedding (its name in tune/members.json); None: the best on val
    embedding_of: Optional[str] = None

    @model_validator(mode="after")
    def _embedding_of_needs_embedding(self) -> "MemberConfig":
        if self.embedding_of is not None and self.features != "embedding":
            raise ValueError(f"member {self.name!r}: embedding_of={self.embedding_of!r} names a CNN member's "
                             f"embedding, but features={self.features!r}; drop one of them")
        return self

    @field_validator("name")
    @classmethod
    def _file_safe_name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "_-" for c in v):
            raise ValueError(f"member name must be non-empty letters, digits, '_' or '-' (it names a file), got {v!r}")
        return v

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str, info: Any) -> str:
        if v not in MEMBER_KINDS:  # the error is located at members.N.kind and names the member
            name = info.data.get("name")
            raise ValueError(f"member {name!r}: unknown kind {v!r}; allowed: {', '.join(MEMBER_KINDS)}")
        return v


# How one hyperparameter of a searched member kind is drawn (Ray Tune's samplers; lograndint/randint: upper bound
# excluded); any other value is a constant: {C: {loguniform: [0.001, 100]}, max_iter: 2000}
MEMBER_SAMPLERS = ("loguniform", "uniform", "lograndint", "randint", "choice")


class MemberSearchConfig(Strict):
    """Ray Tune over the scikit-learn members (transfuse.ensemble.member_search): one trial = one member configuration
    (kind, parameters, feature view) scored by its out-of-fold NLL on the holdout, over the folds the stacker's inputs
    use. The best configurations per (kind, view family) replace ``ensemble.members``; those fixed members are searched
    as trials too, so a searched member is never worse on that score than the fixed one of its kind and view."""

    enabled: bool = False  # false: ensemble.members as given (the fixed list; the way to opt out)
    # kinds searched; the default space of each (member_search.DEFAULT_SPACE) covers every kind in MEMBER_KINDS
    kinds: list[str] = ["logistic_regression", "svc", "random_forest", "hist_gradient_boosting"]
    # view families searched for every kind: embedding (one of the CNN members' embeddings, itself searched) and
    # pixels (ensemble.pixel_size); the best of each family is kept, so the pixel view's diversity survives
    features: list[Literal[MEMBER_FEATURES]] = ["embedding", "pixels"]  # type: ignore[valid-type]
    # per kind: {param: constant or {sampler: [args]}}; replaces that kind's default space as a whole
    space: dict[str, dict[str, Any]] = {}
    num_samples: int = Field(6, ge=1)  # trials per (kind, view family), besides one per fixed member
    per_kind: int = Field(1, ge=1)  # configurations kept per (kind, view family), best out-of-fold NLL first
    # a drawn configuration displaces its family's fixed one only if it beats it by more than this many paired
    # standard errors of the per-row out-of-fold NLL (the one-standard-error rule); 0: the plain lowest score.
    # Off by default: at 1 the default's stack lowered no label draw's test NLL and raised one's, while an overfit
    # choice still beat its fixed member by more than that margin (bench/member_search.py)
    se_rule: float = Field(0.0, ge=0.0)
    max_concurrent: int = Field(4, ge=1)  # trials at once
    cpus_per_trial: float = Field(1.0, gt=0.0)  # Ray CPUs a trial holds; its fits run on one thread
    # seconds; past it Tune starts no new trial (the choice then depends on the machine's speed); None: no limit
    time_budget_s: Optional[float] = Field(None, gt=0.0)

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v: list[str]) -> list[str]:
        bad = [k for k in v if k not in MEMBER_KINDS]
        if bad or not v or len(set(v)) != len(v):
            raise ValueError(f"must be distinct kinds from {', '.join(MEMBER_KINDS)} (at least one), got {v}")
        return v

    @field_validator("features")
    @classmethod
    def _features(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"must be distinct views from {MEMBER_FEATURES} (at least one), got {v}")
        return v

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for kind, params in v.items():
            if kind not in MEMBER_KINDS:
                raise ValueError(f"space: unknown kind {kind!r}; allowed: {', '.join(MEMBER_KINDS)}")
            for name, spec in params.items():
                _check_sampler(f"space.{kind}.{name}", spec)
        return v


def _check_sampler(where: str, spec: Any) -> None:
    """A searched value: a constant, or exactly one sampler with valid arguments."""
    if not isinstance(spec, dict):
        return
    if len(spec) != 1 or next(iter(spec)) not in MEMBER_SAMPLERS:
        raise ValueError(f"{where}: a sampled value is one of {{{', '.join(MEMBER_SAMPLERS)}}} with its arguments "
                         f"(e.g. {{loguniform: [0.001, 100]}}), got {spec!r}")
    (sampler, args), = spec.items()
    if sampler == "choice":
        if not isinstance(args, list) or not args:
            raise ValueError(f"{where}: choice needs a non-empty list of values, got {args!r}")
        return
    ok = isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)
    if not ok or not args[0] < args[1] or (sampler.startswith("log") and args[0] <= 0):
        raise ValueError(f"{where}: {sampler} needs [low, high] with low < high"
                         f"{' and low > 0' if sampler.startswith('log') else ''}, got {args!r}")
    if sampler.endswith("randint") and not all(isinstance(a, int) for a in args):
        raise ValueError(f"{where}: {sampler} needs integer bounds, got {args!r}")


class EnsembleConfig(Strict):
    members: list[MemberConfig] = [
        MemberConfig(name="rf", kind="random_forest", params={"n_estimators": 200}),
        MemberConfig(name="ada", kind="adaboost", params={"n_estimators": 100}),
        MemberConfig(name="svc", kind="svc", params={"C": 1.0}),
        MemberConfig(name="logreg", kind="logistic_regression", params={"C": 1.0, "max_iter": 1000}),
        # the pixel view: errors unlike the embedding members', so the stack gains more from it than its own
        # accuracy suggests (docs/RESULTS.md). C=0.1: many unscaled [0, 1] inputs (784 for 28 x 28)
        MemberConfig(name="px_logreg", kind="logistic_regression", params={"C": 0.1, "max_iter": 2000},
                     features="pixels"),
    ]
    # pixels members read images resized to pixel_size x pixel_size (None: as prepared), in [0, 1], flattened:
    # one pixel view for every such member, computed by transfuse.inference.preprocessing.pixel_features here and in
    # serving
    pixel_size: Optional[int] = Field(None, ge=2, le=512)
    folds: int = Field(5, ge=2)  # K: out-of-fold predictions on the holdout split for the stacker
    # the meta-learner: "auto" picks, by K-fold cross-validated NLL on the holdout, among the logistic stacker on
    # probs and on log-probs and the log-linear pool, each at every C in stacker_grid_C; or name one (then
    # stacker_C and stacker_features are used as given)
    stacker: Literal["auto", "logistic", "log_pool"] = "auto"
    stacker_grid_C: list[float] = Field([0.1, 1.0, 10.0], min_length=1)
    stacker_C: float = Field(1.0, gt=0.0)  # inverse L2 strength of the meta-learner
    # member outputs fed to the meta-learner: probabilities (as scikit-learn's StackingClassifier and AutoGluon) or
    # their logs clipped at 1e-2; probs: the more accurate on digits pixels, though log_probs had the lower NLL
    stacker_features: Literal["log_probs", "probs"] = "probs"
    # temperature scaling (Guo et al. 2017): one scalar fitted by NLL on the chosen stacker's out-of-fold holdout
    # logits and folded into the saved, compressed and served stacker (accuracy unchanged)
    temperature_scaling: bool = True
    # ...applied only where a temperature fitted on K-1 folds of those logits lowers the NLL of the K-th on the
    # mean over folds (false: applied as fitted)
    temperature_check: bool = True
    greedy_rounds: int = Field(25, ge=1)  # Caruana et al. 2004: selection steps, with replacement
    greedy_metric: Literal["nll", "accuracy"] = "nll"  # what greedy selection minimises/maximises on holdout
    seeds: list[int] = Field([0, 1, 2], min_length=1)  # seed range reported; the first seed's fit is saved
    parallel: Literal["ray", "local"] = "ray"  # ray: one Ray task per (member, fold); local: sequential
    cpus_per_task: float = Field(1.0, gt=0.0)  # Ray CPUs per fitting task
    onnx_threads: int = Field(1, ge=1)  # onnxruntime intra-op threads when reloading members
    search: MemberSearchConfig = MemberSearchConfig()  # Ray Tune over the members (off: the fixed list above)

    @field_validator("stacker_grid_C")
    @classmethod
    def _positive_grid(cls, v: list[float]) -> list[float]:
        if any(c <= 0 for c in v):
            raise ValueError(f"every C must be > 0, got {v}")
        return v

    @field_validator("members")
    @classmethod
    def _unique_names(cls, v: list[MemberConfig]) -> list[MemberConfig]:
        names = [m.name for m in v]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names}")
        return v
