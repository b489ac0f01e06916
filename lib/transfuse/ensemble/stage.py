"""Ensembles of fine-tuned CNNs and scikit-learn learners on their embeddings: fitted on Ray, stacked without
leakage, judged on the test split, saved without pickle.

Who sees what (the leakage rule, checked from recorded ids by ``transfuse.ensemble.stacker.check_no_leakage``):

- CNN members were trained on ``train`` (``val`` drove early stopping and the Tune selection). Their ``holdout``
  and ``test`` predictions are therefore on unseen examples.
- scikit-learn members are fitted on the embeddings of one CNN member (the best on val), or on the images'
  pixels (``features: pixels``: a second view whose errors differ from the CNNs'), on ``train`` plus
  ``holdout``. Their holdout predictions for the stacker are out-of-fold: the holdout ids are split into K folds,
  and fold k's model is fitted on train + the other K-1 holdout folds, then predicts fold k. The member used at
  test time (and saved) is refitted on all of train + holdout, as scikit-learn's StackingClassifier does. So every
  holdout row the stacker sees was predicted by models that never saw it, and no model ever sees a test id.
- The meta-learners (stacker, greedy selection) are fitted on the holdout rows only. ``val`` is not used here: it
  already picked the CNN members, so scores on it are optimistic.

Class weights (``data.class_weight``): the run decides once, from the prepared train split's counts
(``transfuse.ensemble.inputs.class_weighting``), and when it weights, every scikit-learn fit here and in the member
search weights its rows by the class weights of its own fit labels, and the stacker (its fit, the candidates' CV score
and the temperature) weights the holdout rows by theirs. Greedy selection and the test metrics stay unweighted;
balanced accuracy, macro F1 and recall per class are reported beside accuracy for every model.

The members themselves (kinds, fitting tasks on Ray or in-process, ONNX export) are ``transfuse.ensemble.learners``;
what the stage reads (the CNN members' outputs, the pixels) and the K-fold protocol are ``transfuse.ensemble.inputs``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

from transfuse import metrics as tm
from transfuse import storage
from transfuse.config import Config, EnsembleConfig
from transfuse.ensemble import COMBINERS, DESCRIPTION_FILE, ENSEMBLE, PROGRESS_FILE, member_search
from transfuse.ensemble.inputs import (EnsembleInputs, MemberDir, class_weighting, find_cnn_members, fold_tasks,
                                       holdout_folds, load_inputs, member_inputs, oof_predictions, shared_data,
                                       stage_fingerprint)
from transfuse.ensemble.learners import (ONNX_INPUT, ONNX_OUTPUT, FitOutput, FitTask, Progress, data_key, make_runner,
                                         to_onnx_bytes, validate_members)
from transfuse.ensemble.stacker import (FitRecord, GreedyEnsemble, check_no_leakage, select_stacker,
                                        stacker_candidates, temperature_line)
from transfuse.finetune import write_member_split
from transfuse.inference import EnsembleError, Stacker, average, hard_vote, load_sklearn_member

log = logging.getLogger(__name__)

ENSEMBLE_FORMAT = "transfuse.ensemble/v1"


# ----------------------------------------------------------------------------------------------------------------
# One seed's fit, several seeds


def plan_tasks(inp: EnsembleInputs, ecfg: EnsembleConfig, rows: dict[str, np.ndarray],
               class_weighted: bool = False) -> list[FitTask]:
    """Per seed and member: K out-of-fold fits over the holdout (each also fits on all of train) + one final fit;
    ``class_weighted``: every fit weights its rows by its own fit labels' class weights."""
    n_jobs = max(1, int(ecfg.cpus_per_task))
    tasks = []
    for seed in ecfg.seeds:
        folds = holdout_folds(inp.labels["holdout"], ecfg.folds, seed)
        for m in ecfg.members:
            key = data_key(m, inp.embedding_source)
            tasks += fold_tasks(m, seed, folds, rows, inp.num_classes, n_jobs, key, class_weighted)
            tasks.append(FitTask(m, seed, None, np.concatenate([rows["train"], rows["holdout"]]),
                                 {"test": rows["test"]}, inp.num_classes, n_jobs, keep_estimator=True, data_key=key,
                                 class_weighted=class_weighted))
    return tasks


@dataclass
class SeedFit:
    """One seed's ensemble: member probabilities on holdout (out-of-fold) and test, combiners, metrics, records."""

    seed: int
    member_order: list[str]
    cnn_members: list[str]
    estimators: dict[str, Any]  # sklearn member -> final fitted estimator
    holdout_probs: dict[str, np.ndarray]
    test_probs: dict[str, np.ndarray]
    stacker: Stacker
    greedy: GreedyEnsemble
    records: list[FitRecord]  # models whose predictions fed the meta-learners
    final_records: list[FitRecord]  # models whose predictions were scored on test
    metrics: dict[str, dict[str, float]]
    combined_test: dict[str, np.ndarray]
    leakage: dict[str, Any]
    stacker_selection: list[dict[str, Any]] = field(default_factory=list)  # candidates' CV scores on holdout
    # temperature scaling: the temperature and the out-of-fold holdout and test NLL / ECE before and after it
    calibration: Optional[dict[str, Any]] = None


def _assemble_seed(inp: EnsembleInputs, ecfg: EnsembleConfig, seed: int, outputs: list[FitOutput],
                   class_weighted: bool = False) -> SeedFit:
    ho_ids, te_ids = np.asarray(inp.ids["holdout"]).astype(str), np.asarray(inp.ids["test"]).astype(str)
    cnn = list(inp.cnn_probs)
    sk = [m.name for m in ecfg.members]
    clash = set(cnn) & set(sk)
    if clash:
        raise EnsembleError(f"scikit-learn member names {sorted(clash)} clash with CNN member names; rename them")
    order = cnn + sk
    holdout = {m: np.asarray(inp.cnn_probs[m]["holdout"], dtype=np.float64) for m in cnn}
    test = {m: np.asarray(inp.cnn_probs[m]["test"], dtype=np.float64) for m in cnn}
    records = [FitRecord(m, f"cnn:{m}", np.asarray(inp.cnn_fit_ids[m]).astype(str), ho_ids) for m in cnn]
    finals = [FitRecord(m, f"cnn:{m}", np.asarray(inp.cnn_fit_ids[m]).astype(str), te_ids) for m in cnn]
    estimators = {}
    for name in sk:
        oof, fold_records = oof_predictions(outputs, name, seed, ho_ids, inp.num_classes)
        records += fold_records
        (final,) = [o for o in outputs if o.member == name and o.seed == seed and o.fold is None]
        pids, probs = final.predictions["test"]
        if not np.array_equal(pids, te_ids):
            raise EnsembleError(f"member {name!r}: test predictions are not in test-id order")
        holdout[name], test[name] = oof, probs
        estimators[name] = final.estimator
        finals.append(FitRecord(name, f"{name}/seed{seed}/final", final.fit_ids, pids))
    leakage = check_no_leakage(records, ho_ids, order, test_ids=te_ids, final_records=finals)

    y_ho, y_te = inp.labels["holdout"], inp.labels["test"]
    stacker, selection, calibration = select_stacker(
        holdout, y_ho, order, stacker_candidates(ecfg.stacker, ecfg.stacker_C, ecfg.stacker_features,
                                                 ecfg.stacker_grid_C),
        folds=ecfg.folds, seed=seed, ids=ho_ids, num_classes=inp.num_classes, calibrate=ecfg.temperature_scaling,
        check_temperature=ecfg.temperature_check, class_weighted=class_weighted)
    greedy = GreedyEnsemble(order, rounds=ecfg.greedy_rounds, metric=ecfg.greedy_metric).fit(holdout, y_ho, ho_ids)
    combined = {"average": average(test, order), "hard_vote": hard_vote(test, order),
                "greedy": greedy.predict_proba(test), "stack": stacker.predict_proba(test)}
    names = inp.class_names
    scores = {m: tm.evaluate(test[m], y_te, names) for m in order}
    scores.update({c: tm.evaluate(p, y_te, names) for c, p in combined.items()})
    if calibration is not None:
        uncalibrated = stacker.calibrated(1.0 / stacker.temperature).predict_proba(test)
        if calibration["applied"]:
            combined["stack_uncalibrated"] = uncalibrated  # saved for the report, not a servable combiner
        calibration["test"] = {"before": tm.evaluate(uncalibrated, y_te, names), "after": scores["stack"]}
        if not calibration["applied"]:  # what the rejected temperature would have done on test, for the record
            calibration["test"]["rejected"] = tm.evaluate(
                stacker.calibrated(calibration["fitted_temperature"]).predict_proba(test), y_te, names)
    return SeedFit(seed, order, cnn, estimators, holdout, test, stacker, greedy, records, finals, scores, combined,
                   leakage, selection, calibration)


SUMMARY_METRICS = ("accuracy", "nll", "ece", "balanced_accuracy", "macro_f1")  # summarised over seeds


@dataclass
class EnsembleFit:
    seeds: list[SeedFit]
    runner: str
    fit_seconds: float
    task_seconds: float  # sum over tasks: with fit_seconds, how much the parallel run overlapped
    data_object_ids: list[Optional[str]]
    class_weighted: bool = False  # every sklearn fit and the stacker weighted by class (transfuse.class_weights)

    @property
    def first(self) -> SeedFit:
        return self.seeds[0]

    def summary(self) -> dict[str, Any]:
        """Per model and metric over seeds: mean, min, max and the values (the seed range)."""
        out: dict[str, Any] = {}
        for model in self.first.metrics:
            out[model] = {}
            for metric in SUMMARY_METRICS:
                v = [s.metrics[model][metric] for s in self.seeds]
                out[model][metric] = {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v)),
                                      "values": v}
        return out


def fit_ensemble(inp: EnsembleInputs, ecfg: EnsembleConfig, runner: Any = None,
                 progress: Optional[Progress] = None, *, class_weighted: bool = False) -> EnsembleFit:
    """Fit every sklearn member for every seed (all tasks at once), then the combiners; score everything on test.
    ``progress(done, total)`` is called as member tasks finish. ``class_weighted``: the run's decision
    (``transfuse.ensemble.inputs.class_weighting``): the members' fits and the stacker weight their rows by class."""
    inp.check()
    validate_members(ecfg, class_weighted)
    wants = [m.name for m in ecfg.members if m.features == "pixels"]
    if wants and not inp.pixels:
        raise EnsembleError(f"members {wants} read pixels, but the ensemble inputs carry no pixel features")
    runner = runner or make_runner(ecfg)
    data, rows = shared_data(inp)
    tasks = plan_tasks(inp, ecfg, rows, class_weighted)
    t0 = time.perf_counter()
    outputs = runner.run(data, tasks, progress) if tasks else []
    wall = time.perf_counter() - t0
    log.info("fitted %d member tasks with the %s runner in %.1fs", len(tasks), runner.name, wall)
    seeds = [_assemble_seed(inp, ecfg, s, outputs, class_weighted) for s in ecfg.seeds]
    return EnsembleFit(seeds, runner.name, wall, float(sum(o.seconds for o in outputs)),
                       [o.data_object_id for o in outputs], class_weighted)


# ----------------------------------------------------------------------------------------------------------------
# The stage: fit, save, verify


def save_ensemble(out_dir: str, fit: EnsembleFit, inp: EnsembleInputs, members: list[MemberDir],
                  ecfg: EnsembleConfig) -> dict[str, Any]:
    """Write members/*.onnx, stacker.json, greedy.json, fit_records.json and ensemble.json for the first seed."""
    s = fit.first
    sk_entries = []
    for m in ecfg.members:
        rel = f"members/{m.name}.onnx"
        dim = int(member_inputs(inp, m.features, "train", m.embedding_of).shape[1])
        storage.write_bytes(storage.join(out_dir, rel), to_onnx_bytes(s.estimators[m.name], dim, m.name))
        src = ({"embedding_source": m.embedding_of or inp.embedding_source, "embedding_dim": dim}
               if m.features == "embedding" else {"pixel_size": ecfg.pixel_size, "pixels_dim": dim})
        sk_entries.append({"name": m.name, "kind": m.kind, "params": m.params, "file": rel, "features": m.features,
                           "estimator": type(s.estimators[m.name]).__name__, **src,
                           "input": ONNX_INPUT, "output": ONNX_OUTPUT})
    storage.write_bytes(storage.join(out_dir, "stacker.json"), json.dumps(s.stacker.to_arrays()).encode())
    # the stack's test probabilities (the report's reliability diagram), and before temperature scaling
    for split, key in (("test", "stack"), ("test_uncalibrated", "stack_uncalibrated")):
        if key in s.combined_test:
            write_member_split(out_dir, "predictions", split, inp.ids["test"], inp.labels["test"],
                               s.combined_test[key])
    storage.write_json(storage.join(out_dir, "greedy.json"), s.greedy.to_dict())
    storage.write_json(storage.join(out_dir, "fit_records.json"), {
        "seed": s.seed, "stacker_fit_ids": [str(i) for i in s.stacker.fit_ids_],
        "records": [r.to_dict() for r in s.records], "final_records": [r.to_dict() for r in s.final_records]})
    desc = {
        "format": ENSEMBLE_FORMAT, "seed": s.seed, "num_classes": inp.num_classes, "class_names": inp.class_names,
        "member_order": s.member_order,
        "cnn_members": [{"name": m.name, "dir": m.dir} for m in members],
        "embedding_source": {"name": inp.embedding_source,
                             "dir": next(m.dir for m in members if m.name == inp.embedding_source)},
        "sklearn_members": sk_entries,
        "stacker": {"file": "stacker.json", "method": s.stacker.method, "features": s.stacker.features,
                    "C": s.stacker.C, "member_weights": s.stacker.member_weights,
                    "temperature": s.stacker.temperature, "class_weighted": s.stacker.class_weighted,
                    "fitted_on": "holdout (out-of-fold for sklearn members)", "selection": s.stacker_selection},
        "greedy": {"file": "greedy.json", **s.greedy.to_dict()},
        "combiners": list(COMBINERS), "default_combiner": "stack",
    }
    storage.write_json(storage.join(out_dir, DESCRIPTION_FILE), desc)
    return desc


# ---------------------------------------------------------------------- ensemble.json (this module owns it)


@dataclass(frozen=True)
class SavedSklearnMember:
    """One scikit-learn member as ``ensemble.json`` lists it: its ONNX file (relative to the ensemble stage) and
    what it reads (``embedding``: the named CNN member's embedding; ``pixels``: the images at ``pixel_size``)."""

    name: str
    file: str
    features: str
    embedding_source: Optional[str]
    pixel_size: Optional[int]
    output: str = ONNX_OUTPUT


def read_description(out_dir: str, missing_ok: bool = False) -> Optional[dict[str, Any]]:
    """``ensemble.json`` of an ensemble stage, its format checked (``EnsembleError`` otherwise); when it is not
    there, None with ``missing_ok``, else ``EnsembleError``."""
    path = storage.join(out_dir, DESCRIPTION_FILE)
    if not storage.exists(path):
        if missing_ok:
            return None
        raise EnsembleError(f"{path} not found: run the ensemble stage (python -m jobs.ensemble) first")
    desc = storage.read_json(path)
    if desc.get("format") != ENSEMBLE_FORMAT:
        raise EnsembleError(f"{path}: format {desc.get('format')!r}, expected {ENSEMBLE_FORMAT!r}")
    return desc


def saved_sklearn_members(desc: Mapping[str, Any]) -> list[SavedSklearnMember]:
    """The description's scikit-learn members as typed records, in order."""
    out = []
    for e in desc.get("sklearn_members", []):
        features = e.get("features", "embedding")
        out.append(SavedSklearnMember(str(e["name"]), str(e["file"]), features,
                                      str(e["embedding_source"]) if features == "embedding" else None,
                                      e.get("pixel_size"), e.get("output", ONNX_OUTPUT)))
    return out


def read_stacker(out_dir: str, desc: Mapping[str, Any]) -> Stacker:
    """The fitted stacker the description names (``stacker.json``, checked by ``Stacker.from_arrays``)."""
    return Stacker.from_arrays(json.loads(storage.read_bytes(storage.join(out_dir, desc["stacker"]["file"]))))


def load_saved_members(out_dir: str, num_threads: int = 1) -> tuple[dict[str, Any], Stacker, GreedyEnsemble, dict]:
    """Reload a saved ensemble with numpy + onnxruntime: (sklearn members by name, stacker, greedy, description)."""
    desc = read_description(out_dir)
    sk = {m.name: load_sklearn_member(storage.read_bytes(storage.join(out_dir, m.file)), num_threads)
          for m in saved_sklearn_members(desc)}
    greedy = GreedyEnsemble.from_dict(storage.read_json(storage.join(out_dir, desc["greedy"]["file"])))
    return sk, read_stacker(out_dir, desc), greedy, desc


def verify_saved(out_dir: str, fit: EnsembleFit, inp: EnsembleInputs, num_threads: int = 1) -> dict[str, float]:
    """Reload the saved files (onnxruntime, JSON arrays) and compare their test predictions with the in-memory fit."""
    s = fit.first
    sk, stacker, greedy, desc = load_saved_members(out_dir, num_threads)
    probs = {m: s.test_probs[m] for m in s.cnn_members}
    diffs = {}
    entries = {m.name: m for m in saved_sklearn_members(desc)}
    for name, member in sk.items():
        e = entries[name]
        x = member_inputs(inp, e.features, "test", e.embedding_source)
        probs[name] = member(x).astype(np.float64)
        diffs[name] = float(np.abs(probs[name] - s.test_probs[name]).max())
    diffs["stack"] = float(np.abs(stacker.predict_proba(probs) - s.combined_test["stack"]).max())
    diffs["greedy"] = float(np.abs(greedy.predict_proba(probs) - s.combined_test["greedy"]).max())
    worst = max(diffs.values())
    if worst > 1e-3:  # float32 ONNX vs float64 scikit-learn differ by ~1e-6; more means a broken export
        raise EnsembleError(f"reloaded ensemble disagrees with the fitted one: max |diff| {diffs}")
    return diffs


@dataclass(frozen=True)
class EnsembleMetrics:
    """The ensemble stage's ``metrics.json``, typed where other stages read it: every member's and combiner's test
    metrics summarised over the seeds (``summary``: name -> metric -> mean, std, min, max, values), the best
    member's name and the class-weighting decision; ``raw`` keeps the whole file (the report's tables)."""

    summary: dict[str, dict[str, dict[str, Any]]]
    best_member: Optional[str]
    class_weight: Optional[dict[str, Any]]
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EnsembleMetrics":
        return cls(summary=dict(d.get("summary") or {}), best_member=(d.get("best_member") or {}).get("name"),
                   class_weight=d.get("class_weight"), raw=d)

    def mean(self, model: str, metric: str) -> Optional[float]:
        """``model``'s mean test ``metric`` over the seeds (None: not in the summary)."""
        v = self.summary.get(model, {}).get(metric)
        return None if v is None else float(v["mean"])


def fit_report(fit: EnsembleFit, inp: EnsembleInputs) -> dict[str, Any]:
    s = fit.first
    members = s.member_order
    best = max(members, key=lambda m: (s.metrics[m]["accuracy"], -s.metrics[m]["nll"]))
    summary = fit.summary()
    stack = summary["stack"]
    return {
        "seeds": [x.seed for x in fit.seeds],
        "test": {str(x.seed): x.metrics for x in fit.seeds},
        "summary": summary,
        "confusion_stack": tm.confusion(s.combined_test["stack"], inp.labels["test"]),
        "best_member": {"name": best, **s.metrics[best]},
        "stack_vs_best_member": {
            "accuracy_gain_mean": stack["accuracy"]["mean"] - summary[best]["accuracy"]["mean"],
            "nll_gain_mean": summary[best]["nll"]["mean"] - stack["nll"]["mean"],
            "beats_on_accuracy_or_nll": bool(stack["accuracy"]["mean"] > summary[best]["accuracy"]["mean"]
                                             or stack["nll"]["mean"] < summary[best]["nll"]["mean"]),
        },
        "greedy_weights": {str(x.seed): dict(zip(x.greedy.members, x.greedy.weights_.tolist())) for x in fit.seeds},
        "stacker": {str(x.seed): {"method": x.stacker.method, "features": x.stacker.features, "C": x.stacker.C,
                                  "member_weights": x.stacker.member_weights, "selection": x.stacker_selection,
                                  "class_weighted": x.stacker.class_weighted}
                    for x in fit.seeds},
        # temperature scaling of the stack, per seed (None: ensemble.temperature_scaling off)
        "calibration": {str(x.seed): x.calibration for x in fit.seeds},
        "leakage_check": s.leakage,
        "runner": fit.runner, "fit_seconds": fit.fit_seconds, "task_seconds": fit.task_seconds,
        "counts": {k: int(len(v)) for k, v in inp.ids.items()},
        "class_weight": learner_weights(inp, fit.class_weighted),
    }


def learner_weights(inp: EnsembleInputs, on: bool) -> dict[str, Any]:
    """Whether the members and the stacker were class-weighted and, when they were, the per-class weights (by class
    name) on each learner's fit labels: the final members' (train + holdout) and the stacker's (holdout). Fold
    models' weights are those of their own fit rows (train + K-1 holdout folds), close to the final ones."""
    if not on:
        return {"on": False}
    from transfuse.class_weights import by_name, class_weights

    k, names = inp.num_classes, inp.class_names
    members = np.concatenate([inp.labels["train"], inp.labels["holdout"]])
    return {"on": True, "sklearn_final": by_name(class_weights(members, k), names),
            "stacker": by_name(class_weights(inp.labels["holdout"], k), names)}




def _progress_file(out: str) -> Progress:
    """Writes ``<out>/progress.json`` as tasks finish, at most once a second (and at the last task); the stage
    clears its folder before writing its outputs, so the file lives only while it fits."""
    last = [0.0]

    def write(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= 1.0:
            last[0] = now
            storage.write_json(storage.join(out, PROGRESS_FILE), {"done": done, "total": total})

    return write


def run_ensemble(cfg: Config, *, force: bool = False, runner: Any = None) -> dict[str, Any]:
    """The ensemble stage: ``<storage>/<run>/ensemble/`` from the CNN members' files. Returns the manifest. With
    ``ensemble.search.enabled`` the scikit-learn members are the member search's choice, not the fixed list."""
    validate_members(cfg.ensemble)
    member_search.validate_search(cfg.ensemble)
    members = find_cnn_members(cfg)
    out = ENSEMBLE.dir(cfg)
    fp = stage_fingerprint(cfg, members)
    if storage.skip_complete(out, fp, ENSEMBLE.folder, force):
        return storage.read_manifest(out)
    inp, members = load_inputs(cfg, members)
    weighting = class_weighting(cfg, inp)  # one decision for every learner of the run
    on = bool(weighting["on"])
    validate_members(cfg.ensemble, on)
    ecfg, searched = cfg.ensemble, None
    if ecfg.search.enabled:
        searched = member_search.run_member_search(cfg, inp, members, force=force, class_weighted=on)
        ecfg = ecfg.model_copy(update={"members": searched.members})
    fit = fit_ensemble(inp, ecfg, runner, progress=_progress_file(out), class_weighted=on)
    storage.makedirs(out)
    storage.clear_outputs(out)  # a rerun must not leave old members behind
    desc = save_ensemble(out, fit, inp, members, ecfg)
    report = fit_report(fit, inp)
    report["class_weight"] = {**weighting, **report["class_weight"]}  # the run's decision + this stage's weights
    if searched is not None:
        member_search.write_results(out, searched)
        report["member_search"] = searched.summary
    report["reload_max_abs_diff"] = verify_saved(out, fit, inp, cfg.ensemble.onnx_threads)
    storage.write_json(ENSEMBLE.metrics_path(cfg), report)
    return storage.write_manifest(out, cfg, ENSEMBLE.folder, fp, members=desc["member_order"],
                                  embedding_source=inp.embedding_source, counts=report["counts"],
                                  metrics={k: v["accuracy"]["mean"] for k, v in report["summary"].items()},
                                  class_weight=report["class_weight"])


def format_table(report: Mapping[str, Any]) -> str:
    """A plain-text table of test metrics (mean over seeds, and the seed range)."""
    lines = [f"{'model':<24}{'accuracy':>22}{'nll':>22}{'ece':>10}{'bal. acc':>10}{'macro F1':>10}"]
    for model, m in report["summary"].items():
        a, n, e = m["accuracy"], m["nll"], m["ece"]
        extra = "".join(f"{m[k]['mean']:>10.4f}" if k in m else f"{'-':>10}" for k in ("balanced_accuracy", "macro_f1"))
        lines.append(f"{model:<24}{a['mean']:>8.4f} [{a['min']:.4f},{a['max']:.4f}]"
                     f"{n['mean']:>8.4f} [{n['min']:.4f},{n['max']:.4f}]{e['mean']:>10.4f}{extra}")
    cw = report.get("class_weight") or {}
    if cw.get("on"):
        lines.append(f"class-weighted fits (data.class_weight {cw.get('mode', '-')}): members and the stacker")
    for seed, c in (report.get("calibration") or {}).items():
        if c:
            b, a = c["test"]["before"], c["test"].get("rejected", c["test"]["after"])
            arrow = "->" if c.get("applied", True) else "-> (had it been applied)"
            lines.append(f"stack, seed {seed}: {temperature_line(c)}; "
                         f"test NLL {b['nll']:.4f} {arrow} {a['nll']:.4f}, ECE {b['ece']:.4f} -> {a['ece']:.4f}")
    return "\n".join(lines)


__all__ = [
    "COMBINERS", "EnsembleError", "EnsembleFit", "SeedFit", "fit_ensemble", "fit_report", "format_table",
    "load_saved_members", "read_description", "read_stacker", "run_ensemble", "save_ensemble",
    "saved_sklearn_members", "verify_saved",
]
