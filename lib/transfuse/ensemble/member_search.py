"""Ray Tune over the scikit-learn ensemble members: which kinds, parameters and feature views fit this dataset.

One trial = one member configuration: a kind (``MEMBER_KINDS``), its parameters drawn from that kind's space
(``DEFAULT_SPACE``, or ``ensemble.search.space``) and a feature view (one CNN member's embedding, itself drawn,
or the pixels). A trial fits the member K times, exactly as the ensemble fits it for the stacker: the holdout is
split into the same K folds (``transfuse.ensemble.inputs.holdout_folds`` with the first of ``ensemble.seeds``), fold k's
model is fitted on train + the other holdout folds and predicts fold k. Its score is the out-of-fold NLL over the
holdout. The fixed list (``ensemble.members``) is evaluated as trials too, so each (kind, view family) keeps its best
configuration among the fixed one and the drawn ones (with ``ensemble.search.se_rule`` > 0, a drawn one displaces
the fixed one only by beating it by more than that many paired standard errors of the per-row NLL: ``select``).

Who sees what: the trials' shared data hold the train and holdout rows only (no test row is ever put in the object
store for them), each trial records the ids every fold model was fitted on and predicted, and the driver runs
``transfuse.ensemble.stacker.check_no_leakage`` over those records with the test ids before any configuration is chosen.

The experiment lives in ``<run>/ensemble/.search/`` (Tune's state and the trials' fit records: working state). A run
whose inputs match the experiment's fingerprint restores it (``Tuner.restore``): an interrupted search resumes and no
finished trial is fitted again. Every trial is drawn before Tune sees it, from one generator seeded with ``seed``
(``candidates``), and every fit uses ``random_state=seed``: the same seed gives the same trials, scores and choice,
unless ``time_budget_s`` cuts the search short.

Class weights: when the run weights by class (``inputs.class_weighting``), every trial's fold fits weight
their rows as the ensemble's do (``FitTask.class_weighted``) and its score is the class-weighted out-of-fold NLL
(each holdout row's NLL times its class's weight on the holdout labels): the objective the members and the
stacker then fit.

Stage outputs, next to ``ensemble.json``: ``member_search.json`` (a row per trial with its start and end time, the
chosen members, the leakage check, the wall time), ``member_search.csv`` (the rows) and ``member_search.png``
(out-of-fold NLL per kind and view, and the trials' timeline: overlapping bars are trials that ran in parallel).
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from transfuse import metrics as tm
from transfuse import storage
from transfuse.config import Config, EnsembleConfig, MemberConfig, digest
from transfuse.ensemble import ENSEMBLE
from transfuse.ensemble.inputs import (EnsembleInputs, MemberDir, fold_tasks, holdout_folds, oof_predictions,
                                       shared_data, stage_fingerprint)
from transfuse.ensemble.learners import MemberError, build_estimator, data_key, fit_one
from transfuse.ensemble.stacker import FitRecord, check_no_leakage
from transfuse.inference import EnsembleError

log = logging.getLogger(__name__)

SEARCH_DIR = ".search"  # under <run>/ensemble/
EXPERIMENT = "experiment"
RESULTS_JSON, RESULTS_CSV, PLOT = "member_search.json", "member_search.csv", "member_search.png"
METRIC = "oof_nll"

# Short names for the chosen members (file-safe, as MemberConfig requires); "_px" marks the pixel view.
SHORT = {"logistic_regression": "logreg", "svc": "svc", "random_forest": "rf", "hist_gradient_boosting": "hgb",
         "adaboost": "ada", "bagging": "bag"}

# The default search space of every member kind, in config syntax (ensemble.search.space replaces a kind's entry).
# Ranges are wide on purpose: the label budget may leave 100 training rows or 50,000.
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    # inverse L2 strength: 1e-3 (nearly the class prior) to 1e2 (nearly unregularised)
    "logistic_regression": {"C": {"loguniform": [1e-3, 1e2]}, "max_iter": 2000},
    # RBF kernel: gamma in 1/feature-variance units; scikit-learn's "scale" is 1/(D var), 1e-3..1e-1 here
    "svc": {"C": {"loguniform": [1e-1, 1e3]}, "gamma": {"loguniform": [1e-4, 1.0]}},
    "random_forest": {"n_estimators": {"lograndint": [50, 500]}, "max_depth": {"choice": [None, 8, 16]},
                      "max_features": {"choice": ["sqrt", 0.3]}, "min_samples_leaf": {"choice": [1, 2, 4]}},
    "hist_gradient_boosting": {"learning_rate": {"loguniform": [1e-2, 3e-1]}, "max_iter": {"lograndint": [50, 400]},
                               "max_leaf_nodes": {"choice": [7, 15, 31]},
                               "l2_regularization": {"loguniform": [1e-4, 1.0]}},
    "adaboost": {"n_estimators": {"lograndint": [50, 400]}, "learning_rate": {"loguniform": [5e-2, 2.0]},
                 "estimator__max_depth": {"choice": [1, 2, 3]}},
    "bagging": {"n_estimators": {"lograndint": [10, 100]}, "max_samples": {"uniform": [0.5, 1.0]},
                "estimator__max_depth": {"choice": [None, 8]}},
}



# ----------------------------------------------------------------------------------------------------------------
# The search space


def kind_space(ecfg: EnsembleConfig, kind: str) -> dict[str, Any]:
    """``kind``'s space in config syntax: ``ensemble.search.space[kind]`` if given, else ``DEFAULT_SPACE[kind]``."""
    return dict(ecfg.search.space.get(kind, DEFAULT_SPACE[kind]))


def _domain(spec: Any) -> Any:
    """A config value as a Tune domain (``{loguniform: [a, b]}`` -> ``tune.loguniform(a, b)``); constants as-is."""
    from ray import tune

    if not isinstance(spec, dict):
        return spec
    (sampler, args), = spec.items()
    return tune.choice(list(args)) if sampler == "choice" else getattr(tune, sampler)(*args)


def tune_space(ecfg: EnsembleConfig, kind: str) -> dict[str, Any]:
    """``kind``'s parameters as Tune domains (constants stay constants)."""
    return {name: _domain(spec) for name, spec in kind_space(ecfg, kind).items()}


def _probes(spec: Any) -> list[Any]:
    """Values that bound what a spec can draw: both ends of a range, every choice, the constant."""
    if not isinstance(spec, dict):
        return [spec]
    (sampler, args), = spec.items()
    if sampler == "choice":
        return list(args)
    return [args[0], args[1] - 1] if sampler.endswith("randint") else list(args)


def validate_search(ecfg: EnsembleConfig) -> None:
    """Every searched parameter is a parameter of its kind's estimator, and both ends of its range (every choice)
    pass scikit-learn's own checks: a bad space fails here, before any Ray work. Raises ``MemberError``."""
    s = ecfg.search
    if not s.enabled:
        return
    for kind in s.kinds:
        space = kind_space(ecfg, kind)
        base = {name: _probes(spec)[0] for name, spec in space.items()}
        for name, spec in space.items():
            for value in _probes(spec):
                member = MemberConfig(name=f"search_{SHORT[kind]}", kind=kind, params={**base, name: value})
                try:
                    build_estimator(member, ecfg.seeds[0])
                except MemberError as e:
                    where = "ensemble.search.space" if kind in s.space else "member_search.DEFAULT_SPACE"
                    raise MemberError(f"{where}.{kind}.{name} = {spec!r}: {e}") from None


def trial_count(ecfg: EnsembleConfig) -> int:
    """Trials in one search: one per fixed member, num_samples per searched (kind, view family)."""
    s = ecfg.search
    return len(ecfg.members) + len(s.kinds) * len(s.features) * s.num_samples


def candidates(ecfg: EnsembleConfig, cnn_names: Sequence[str], best: str, seed: int) -> list[dict[str, Any]]:
    """The trials, in order: the fixed members as given, then ``num_samples`` draws per (kind, view family). A
    drawn trial's embedding view is itself drawn among the CNN members. Every value is drawn here, from one
    generator seeded with ``seed`` and in this order, so the trials are concrete before Tune sees them: the same
    seed gives the same trials whatever Tune's own sampling does. (Handing Tune the domains gave a different set
    on two fresh runs of the default with the same seed: 12 of 51 configurations in common.)"""
    from ray.tune.search.sample import Domain

    rng = np.random.default_rng(seed)
    draw = lambda v: _plain(v.sample(random_state=rng)) if isinstance(v, Domain) else v  # noqa: E731
    out = [{"kind": m.kind, "features": m.features, "params": dict(m.params), "fixed": m.name,
            "view": "pixels" if m.features == "pixels" else (m.embedding_of or best)} for m in ecfg.members]
    s = ecfg.search
    names = list(cnn_names)
    for kind in s.kinds:
        space = tune_space(ecfg, kind)
        for features in s.features:
            for _ in range(s.num_samples):
                view = "pixels" if features == "pixels" else names[int(rng.integers(len(names)))]
                out.append({"kind": kind, "features": features, "params": {k: draw(v) for k, v in space.items()},
                            "fixed": None, "view": view})
    return out


def _plain(v: Any) -> Any:
    """numpy scalars (Tune's samplers return them) as Python values: they go into JSON and config fingerprints."""
    return v.item() if isinstance(v, np.generic) else v


def candidate_member(c: Mapping[str, Any], name: str) -> MemberConfig:
    """A resolved trial config as the member the ensemble fits."""
    return MemberConfig(name=name, kind=c["kind"], params={k: _plain(v) for k, v in c["params"].items()},
                        features=c["features"], embedding_of=None if c["features"] == "pixels" else c["view"])


# ----------------------------------------------------------------------------------------------------------------
# One trial


def trial_fn(config: dict[str, Any], data: Mapping[str, np.ndarray], rows: Mapping[str, np.ndarray],
             folds: Sequence[np.ndarray], num_classes: int, seed: int, embedding_source: str,
             records_dir: str, class_weighted: bool = False) -> None:
    """Fit one configuration on the K folds, write what each fold model saw and its score, report its out-of-fold
    NLL. A trial whose record is already stored for this configuration reports that record's score and fits nothing:
    Tune's saved state can lag a trial that reported just before an interruption, and restoring then reruns it."""
    from ray import tune

    start = time.time()
    trial_id = tune.get_context().get_trial_id()
    path = storage.join(records_dir, f"{trial_id}.json")
    stored = _stored_record(path)
    trial = json.loads(json.dumps(config["trial"], default=_plain))  # as stored: JSON types
    if stored is not None and stored.get("config") == trial and "result" in stored:
        tune.report(stored["result"])
        return
    member = candidate_member(config["trial"], trial_id)
    tasks = fold_tasks(member, seed, folds, rows, num_classes, 1, data_key(member, embedding_source), class_weighted)
    outputs = [fit_one(data, t) for t in tasks]
    holdout = rows["holdout"]
    oof, records = oof_predictions(outputs, member.name, seed, data["ids"][holdout], num_classes)
    y = data["y"][holdout]
    row_nll = tm.row_nll(oof, y)
    if class_weighted:  # each row's NLL times its class's weight (they average 1): the mean is the weighted NLL
        from transfuse.class_weights import sample_weights

        row_nll = row_nll * sample_weights(y, num_classes)
    result = {METRIC: float(row_nll.mean()), "oof_accuracy": tm.accuracy(oof, y), "start": start, "end": time.time(),
              "fit_seconds": float(sum(o.seconds for o in outputs))}
    storage.write_json(path, {"trial_id": trial_id, "config": trial, "result": result,
                              "records": [r.to_dict() for r in records],
                              "row_nll": row_nll.tolist()})  # holdout order: select pairs trials by row
    tune.report(result)


def _stored_record(path: str) -> dict[str, Any] | None:
    """A trial's stored record, or None where there is none or it is partly written (an interrupted write)."""
    if not storage.exists(path):
        return None
    try:
        return storage.read_json(path)
    except ValueError:
        return None


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


# ----------------------------------------------------------------------------------------------------------------
# The experiment


@dataclass
class SearchResult:
    rows: list[dict[str, Any]]  # one per trial, in trial order
    members: list[MemberConfig]  # what the stacker gets, best per (kind, view family) first
    summary: dict[str, Any]


def search_fingerprint(cfg: Config, cnn_members: Sequence[MemberDir], class_weighted: bool = False) -> str:
    """What the trials depend on: the search section, the fixed members, folds, the seed, the pixel view, the
    class weighting (named only when on: an unweighted search keeps its fingerprint) and the CNN members' files.
    A stored experiment with another fingerprint is discarded, never restored."""
    e = cfg.ensemble
    head = digest({"search": e.search.model_dump(mode="json"), "members": [m.model_dump(mode="json")
                                                                           for m in e.members],
                   "folds": e.folds, "seed": e.seeds[0], "pixel_size": e.pixel_size,
                   **({"class_weighted": True} if class_weighted else {})})
    return stage_fingerprint(cfg, list(cnn_members), head)


def _tuner(cfg: Config, inp: EnsembleInputs, base: str, restore: bool, class_weighted: bool = False) -> Any:
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    e, s = cfg.ensemble, cfg.ensemble.search
    seed = e.seeds[0]
    data, rows = shared_data(inp, ("train", "holdout"))  # no test row: a trial cannot see one
    folds = holdout_folds(inp.labels["holdout"], e.folds, seed)  # the folds the stacker's inputs use
    trainable = tune.with_resources(
        tune.with_parameters(trial_fn, data=data, rows=rows, folds=folds, num_classes=inp.num_classes, seed=seed,
                             embedding_source=inp.embedding_source, records_dir=storage.join(base, "records"),
                             class_weighted=class_weighted),
        {"CPU": s.cpus_per_trial})
    fs, path = storage.resolve(base)
    exp = f"{path}/{EXPERIMENT}"
    if restore and tune.Tuner.can_restore(exp, storage_filesystem=fs):
        log.info("member search: restoring the experiment at %s", exp)
        return tune.Tuner.restore(exp, trainable=trainable, storage_filesystem=fs, resume_errored=True)
    cnn_names = list(inp.cnn_embeddings) or [inp.embedding_source]
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(candidates(e, cnn_names, inp.embedding_source, seed))},
        tune_config=tune.TuneConfig(metric=METRIC, mode="min", num_samples=1,
                                    search_alg=BasicVariantGenerator(max_concurrent=s.max_concurrent),
                                    max_concurrent_trials=s.max_concurrent, time_budget_s=s.time_budget_s,
                                    reuse_actors=True, trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=path, storage_filesystem=fs, verbose=1),
    )


def _row(index: int, result: Any) -> dict[str, Any]:
    c = result.config["trial"]
    m = result.metrics or {}
    trial_id = m.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1]
    ok = result.error is None and METRIC in m
    return {"trial": index, "trial_id": trial_id, "kind": c["kind"], "features": c["features"], "view": c["view"],
            "params": {k: _plain(v) for k, v in c["params"].items()}, "fixed": c["fixed"],
            METRIC: float(m[METRIC]) if ok else None, "oof_accuracy": float(m["oof_accuracy"]) if ok else None,
            "start": m.get("start"), "end": m.get("end"), "fit_seconds": m.get("fit_seconds"),
            "error": None if result.error is None else f"{type(result.error).__name__}: {result.error}"}


def max_overlap(rows: Sequence[Mapping[str, Any]]) -> int:
    """The most trials that were running at one moment (from their recorded start and end times)."""
    events = sorted([(r["start"], 1) for r in rows if r["start"] is not None]
                    + [(r["end"], -1) for r in rows if r["end"] is not None], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:  # an end sorts before a start at the same instant: touching bars do not overlap
        running += step
        peak = max(peak, running)
    return peak


def paired_gain(row_nll: Mapping[str, np.ndarray], trial_id: str, baseline_id: str) -> tuple[float, float]:
    """Mean and standard error of the per-row out-of-fold NLL difference (trial minus baseline) over the holdout
    rows both predicted: negative means the trial is better."""
    d = np.asarray(row_nll[trial_id], float) - np.asarray(row_nll[baseline_id], float)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.inf


def fixed_anchor(family: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """A (kind, view family)'s best-scored fixed trial, the earlier on ties (None: the family has none scored)."""
    return min((r for r in family if r["fixed"] and r[METRIC] is not None), key=lambda r: (r[METRIC], r["trial"]),
               default=None)


def select(rows: Sequence[Mapping[str, Any]], per_kind: int, row_nll: Mapping[str, np.ndarray] | None = None,
           se_rule: float = 0.0) -> list[tuple[str, Mapping[str, Any]]]:
    """Best ``per_kind`` trials by out-of-fold NLL in each (kind, view family), in trial order on ties, named by
    kind (``logreg``, ``svc_px``, ``rf_2``...). A configuration drawn twice is kept once.

    With ``se_rule`` > 0 and the trials' per-row NLL, a family's fixed configuration (its best-scored fixed trial)
    is displaced only by trials that beat it by more than ``se_rule`` paired standard errors (``paired_gain``):
    picking the lowest of many noisy scores on a small holdout favours a lucky draw, so the fixed member keeps its
    place unless the evidence against it is clear. A family without a fixed trial keeps its plain best. (On the
    default it did not pay: draw 0's pixel logistic regression, 0.14 out of fold against the fixed one's 0.28 and
    0.41 against 0.32 on test, beat it by 2.5 SE; the rule cost draw 2 0.022 of test NLL.)"""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        if r[METRIC] is not None and math.isfinite(r[METRIC]):
            groups.setdefault((r["kind"], r["features"]), []).append(r)
    chosen = []
    for (kind, features), group in groups.items():
        ranked = sorted(group, key=lambda r: (r[METRIC], r["trial"]))
        anchor = fixed_anchor(group)
        if se_rule > 0 and row_nll is not None and anchor is not None:
            def beats(r: Mapping[str, Any]) -> bool:
                mean, se = paired_gain(row_nll, r["trial_id"], anchor["trial_id"])
                return mean + se_rule * se < 0
            winners = [r for r in ranked if r is not anchor and beats(r)]
            ranked = winners + [anchor] + [r for r in ranked if r is not anchor and r not in winners]
        seen: set[str] = set()
        for r in ranked:
            key = json.dumps([r["view"], r["params"]], sort_keys=True, default=str)
            if key in seen or len(seen) >= per_kind:
                continue
            seen.add(key)
            name = SHORT[kind] + ("_px" if features == "pixels" else "") + (f"_{len(seen)}" if len(seen) > 1 else "")
            chosen.append((name, r))
    return sorted(chosen, key=lambda c: (c[1][METRIC], c[1]["trial"]))


def read_records(base: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every scored trial's stored record (its fold models' fit records and per-row NLL), by trial id."""
    return {r["trial_id"]: storage.read_json(storage.join(base, "records", f"{r['trial_id']}.json"))
            for r in rows if r[METRIC] is not None}


def check_trials(records: Mapping[str, Mapping[str, Any]], inp: EnsembleInputs) -> dict[str, Any]:
    """``check_no_leakage`` over every scored trial's recorded fold models: each predicted only holdout rows it was
    not fitted on, together they cover the holdout, and none was fitted on a test id (checked like a model used
    for test predictions)."""
    fits = [FitRecord.from_dict(x) for d in records.values() for x in d["records"]]
    ho, te = (np.asarray(inp.ids[s]).astype(str) for s in ("holdout", "test"))
    return check_no_leakage(fits, ho, list(records), test_ids=te, final_records=fits)


def run_member_search(cfg: Config, inp: EnsembleInputs, cnn_members: Sequence[MemberDir], *,
                      force: bool = False, class_weighted: bool = False) -> SearchResult:
    """Run (or restore and finish) the member search; return the trials and the members chosen for the stacker.
    ``class_weighted``: the run's decision (``inputs.class_weighting``): fits and scores weighted by class."""
    e = cfg.ensemble
    validate_search(e)
    base = storage.join(ENSEMBLE.dir(cfg), SEARCH_DIR)
    fp = search_fingerprint(cfg, cnn_members, class_weighted)
    stamp = storage.join(base, "fingerprint.json")
    same = storage.exists(stamp) and storage.read_json(stamp).get("fingerprint") == fp
    if not same or force:
        storage.clear_dir(base)
        storage.write_json(stamp, {"fingerprint": fp})
    t0 = time.time()
    grid = _tuner(cfg, inp, base, restore=same and not force, class_weighted=class_weighted).fit()
    seconds = time.time() - t0
    by_id = {r.path.rstrip("/").rsplit("/", 1)[-1]: r for r in grid}
    results = [by_id[k] for k in sorted(by_id, key=lambda t: int(t.rsplit("_", 1)[-1]))]  # trial order
    rows = [_row(i, r) for i, r in enumerate(results)]
    scored = [r for r in rows if r[METRIC] is not None]
    unfinished = len(rows) - len(scored) - sum(bool(r["error"]) for r in rows) + trial_count(e) - len(rows)
    budget_hit = e.search.time_budget_s is not None and seconds >= e.search.time_budget_s
    if unfinished and not budget_hit:  # Tune returns, rather than raises, when interrupted (SIGINT)
        raise EnsembleError(f"member search interrupted: {unfinished} of {trial_count(e)} trials unfinished; "
                                f"its state is in {base}: run the ensemble stage again to resume it")
    if not scored:
        errors = [r["error"] for r in rows if r["error"]]
        raise EnsembleError(f"member search: none of its {len(rows)} trials was scored; errors: {errors[:3]}")
    records = read_records(base, rows)
    leakage = check_trials(records, inp)
    row_nll = {t: np.asarray(d["row_nll"]) for t, d in records.items()}
    chosen = select(rows, e.search.per_kind, row_nll, e.search.se_rule)
    members = [candidate_member(r, name) for name, r in chosen]
    starts = [r["start"] for r in scored]
    ends = [r["end"] for r in scored]
    summary = {
        "trials": len(rows), "scored": len(scored), "errored": sum(bool(r["error"]) for r in rows),
        "seed": e.seeds[0], "folds": e.folds, "max_concurrent": e.search.max_concurrent,
        "cpus_per_trial": e.search.cpus_per_trial, "max_overlap": max_overlap(scored),
        "seconds": round(seconds, 1), "time_budget_hit": budget_hit, "trials_span_s": round(max(ends) - min(starts), 1),
        "trial_seconds_sum": round(sum(b - a for a, b in zip(starts, ends)), 1),
        "se_rule": e.search.se_rule, "class_weighted": bool(class_weighted),
        "chosen": [{"name": name, "trial_id": r["trial_id"], "kind": r["kind"], "features": r["features"],
                    "view": r["view"], "params": r["params"], "fixed": r["fixed"], METRIC: r[METRIC],
                    "oof_accuracy": r["oof_accuracy"], "vs_fixed": _vs_fixed(rows, r, row_nll)}
                   for name, r in chosen],
        "leakage_check": leakage, "fingerprint": fp,
    }
    log.info("member search: %d trials (%d scored) in %.1fs, at most %d at once; chosen %s", len(rows),
             len(scored), seconds, summary["max_overlap"], [m.name for m in members])
    return SearchResult(rows, members, summary)


def _vs_fixed(rows: Sequence[Mapping[str, Any]], r: Mapping[str, Any],
              row_nll: Mapping[str, np.ndarray]) -> dict[str, Any] | None:
    """How a chosen drawn trial compares with its family's best fixed trial (None: it is fixed, or none exists)."""
    anchor = fixed_anchor([f for f in rows if (f["kind"], f["features"]) == (r["kind"], r["features"])])
    if r["fixed"] or anchor is None:
        return None
    mean, se = paired_gain(row_nll, r["trial_id"], anchor["trial_id"])
    return {"fixed": anchor["fixed"], "mean_nll_difference": round(mean, 5), "se": round(se, 5)}


# ----------------------------------------------------------------------------------------------------------------
# Outputs


def write_results(out_dir: str, result: SearchResult) -> None:
    """member_search.json / .csv / .png under the ensemble stage's folder."""
    import pandas as pd

    storage.write_json(storage.join(out_dir, RESULTS_JSON), {"summary": result.summary, "trials": result.rows})
    table = pd.DataFrame([{**r, "params": json.dumps(r["params"], sort_keys=True)} for r in result.rows])
    storage.write_bytes(storage.join(out_dir, RESULTS_CSV), table.to_csv(index=False).encode())
    storage.write_bytes(storage.join(out_dir, PLOT), plot(result))


def plot(result: SearchResult) -> bytes:
    """PNG: out-of-fold NLL of every trial per (kind, view family), the chosen ones ringed and the fixed ones as
    squares; beside it each trial's start-to-end bar (bars that overlap ran in parallel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r[METRIC] is not None]
    groups = sorted({(r["kind"], r["features"]) for r in rows})
    label = {g: SHORT[g[0]] + ("_px" if g[1] == "pixels" else "") for g in groups}
    color = {k: plt.cm.tab10(i % 10) for i, k in enumerate(sorted({g[0] for g in groups}))}
    chosen = {c["trial_id"] for c in result.summary["chosen"]}
    fig, (ax, tl) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1.2, 1]})
    for x, g in enumerate(groups):
        for r in (r for r in rows if (r["kind"], r["features"]) == g):
            jitter = ((r["trial"] * 37) % 100 - 50) / 250.0  # spread a group's points, the same every time
            ax.scatter(x + jitter, r[METRIC], color=color[g[0]], marker="s" if r["fixed"] else "o", alpha=0.8, s=22)
            if r["trial_id"] in chosen:
                ax.scatter(x + jitter, r[METRIC], facecolors="none", edgecolors="black", s=90, lw=1.2)
    ax.set_xticks(range(len(groups)), [label[g] for g in groups], rotation=30, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("out-of-fold NLL on holdout (log)")
    ax.set_title("Member search (square: fixed list, ring: chosen)", fontsize=9)
    t0 = min(r["start"] for r in rows)
    for i, r in enumerate(sorted(rows, key=lambda r: r["start"])):
        tl.barh(i, r["end"] - r["start"], left=r["start"] - t0, color=color[r["kind"]], height=0.8)
    tl.set_xlabel("seconds since the first trial started")
    tl.set_ylabel("trial (by start)")
    tl.set_title(f"Trials in time: at most {result.summary['max_overlap']} at once", fontsize=9)
    for k, c in color.items():
        tl.barh([], [], color=c, label=SHORT[k])
    tl.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


__all__ = ["DEFAULT_SPACE", "SearchResult", "candidates", "fixed_anchor", "kind_space",
           "max_overlap", "paired_gain", "run_member_search", "select", "trial_count", "tune_space",
           "validate_search", "write_results"]
