"""The distill stage: one student CNN learns the stacked ensemble's predictions on images nobody labelled.

A stacked ensemble of fine-tuned CNNs and scikit-learn learners costs every member at inference. The student is
one network (by default the best fine-tuned CNN member: its architecture, weights and unfrozen depth, optionally
at a smaller input) trained on Ray Train to match the ensemble (the teacher) on

- the unlabelled pool: the prepared ``unlabelled`` split (``data.unlabelled_per_class`` images per class of the
  training images outside the label budget), written without a label column; this stage refuses one that has a
  label column, so its labels can never be read;
- the labelled train split, whose labels add a cross-entropy term.

Each image is seen in ``distill.views`` views (the first as is, the others augmented with ``distill.augment``,
seeded by the image's id and the view), and the teacher labels every view itself (Beyer et al. 2022: teacher and
student see the same augmented image). The teacher runs on a Ray Data actor pool (``TeacherActor``: the float32
Keras members, the scikit-learn members in ONNX Runtime, the stacker: ``transfuse.ensemble.fitted.keras_baseline``); its
soft labels are computed once per view and materialized, and the student's epochs stream them from the object store.

The loss of a row: ``soft_weight * T^2 * KL(teacher_T || student_T) + hard_weight * labelled * CE(label,
student)``, with ``p_T = softmax(log p / T)`` (Hinton et al. 2015). Afterwards one temperature is fitted on the
student's val NLL (``transfuse.ensemble.stacker.checked_temperature``; not the holdout, whose labels the teacher's
scikit-learn members and stacker learned) and, where its K-fold check on val says it pays, served as a one-member
log-pool stacker, so the bundle and Serve need no code of their own for it.

Outputs in ``<run>/distill/``: ``student/`` (a member directory like any CNN member's, with its predictions on
val, holdout and test) and ``metrics.json``: teacher vs student vs the best single CNN member on test (accuracy,
NLL, ECE), the student's agreement with the teacher (top-1 fidelity), the share of the ensemble's accuracy gain
over that member the student keeps, and the temperature with NLL/ECE before and after. The compress stage turns
the student into the ``student_int8`` bundle variant.

The parts: ``transfuse.distill.teacher`` (the views and the teacher, Ray Data), ``transfuse.distill.student`` (the
student on the worker loop, Ray Train: ``transfuse.finetune.loop.run_worker`` with ``StudentTask``'s hooks); this
module runs the stage, step by step (``run_distill``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from transfuse.finetune import TRAIN_DIR  # the student's Ray Train storage under distill/, as a member's
from transfuse import metrics as tm
from transfuse import storage
from transfuse.config import Config, digest
from transfuse.data import PREPARE
from transfuse.distill import DISTILL, STUDENT
from transfuse.distill.student import StudentConfig, build_student, read_history, student_loop
from transfuse.distill.teacher import PROB_FLOOR, DistillError, soften, teacher_views
from transfuse.ensemble import ENSEMBLE
from transfuse.stage import read_metrics

log = logging.getLogger(__name__)



def temperature_stacker(temperature: float, num_classes: int) -> Any:
    """Temperature scaling of one member as a stacker: a log pool with weight 1/T (``softmax(log p / T)``), what
    the bundle serves with no code of its own."""
    from transfuse.inference import Stacker

    return Stacker(members=[STUDENT], features="log_probs", method="log_pool", C=1.0, eps=PROB_FLOOR,
                   coef_=np.eye(num_classes) / temperature, intercept_=np.zeros(num_classes),
                   classes_=np.arange(num_classes), temperature=float(temperature))


@dataclass(frozen=True)
class DistillMetrics:
    """The distill stage's ``metrics.json``, typed where other stages read it: teacher and student on test, the best
    CNN member's name and test accuracy, the student's fidelity to the teacher and its applied temperature (None:
    not fitted, or its check rejected it); ``raw`` keeps the whole file (the report's tables)."""

    teacher: tm.SplitMetrics
    student: tm.SplitMetrics
    best_member: str
    best_member_accuracy: float
    fidelity: float
    temperature: Optional[float]
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "DistillMetrics":
        best = d.get("best_cnn_member") or {}
        return cls(teacher=tm.SplitMetrics.from_json(d["teacher"]), student=tm.SplitMetrics.from_json(d["student"]),
                   best_member=best.get("name"), best_member_accuracy=best.get("accuracy"),
                   fidelity=float(d["fidelity"]), temperature=_applied_temperature(d), raw=d)


def _applied_temperature(metrics: dict[str, Any]) -> Optional[float]:
    cal = metrics.get("calibration") or {}
    return cal.get("temperature") if cal.get("applied", True) else None


def read_temperature(out_dir: str) -> Optional[float]:
    """The student's applied temperature from ``distill/metrics.json`` (None: not fitted, or its check rejected it)."""
    return _applied_temperature(read_metrics(out_dir))


def _fingerprint(cfg: Config, source_fp: str, *, epochs: bool = True) -> str:
    """The stage's fingerprint; without ``epochs``, that of the student's training run (the one it resumes)."""
    return digest({"distill": cfg.distill.model_dump(mode="json", exclude=None if epochs else {"epochs"}),
                   "data": cfg.fingerprint("data"),
                   "train": cfg.fingerprint("train"), "seed": cfg.seed, "teacher": source_fp})


def _best_cnn(ens: Any, cnn_names: list[str]) -> str:
    return max(cnn_names, key=lambda m: (ens.mean(m, "accuracy"), -ens.mean(m, "nll")))


@dataclass
class _Run:
    """One run of the stage: its config and folder, the teacher (the ensemble the compress stage would bundle), the
    ensemble stage's folder and metrics, the best CNN member (the student's start) and the prepared data."""

    cfg: Config
    out: str
    src: Any
    ens_dir: str
    ens: Any  # transfuse.ensemble.EnsembleMetrics
    best: str
    best_dir: str
    data_dir: str
    class_names: list[str]


def _teacher_source(cfg: Config) -> tuple[Any, str]:
    """The ensemble to learn from (``ensemble_to_compress``) and the ensemble stage's folder; a DistillError when
    the stage is off or the ensemble stage has not run."""
    from transfuse.ensemble import ensemble_to_compress

    if not cfg.distill.enabled:
        raise DistillError("distill.enabled is false")
    ens_dir = ENSEMBLE.dir(cfg)
    if not storage.exists(ENSEMBLE.metrics_path(cfg)):
        raise DistillError(f"no ensemble in {ens_dir}: the distill stage learns from it (run the ensemble stage)")
    src, _ = ensemble_to_compress(cfg)
    return src, ens_dir


def _open_run(cfg: Config, out: str, src: Any, ens_dir: str) -> _Run:
    from transfuse.data import data_manifest

    data_dir = PREPARE.dir(cfg)
    class_names = list(data_manifest(data_dir)["class_names"])
    ens = ENSEMBLE.read(cfg)
    best = _best_cnn(ens, [name for name, _ in src.members])
    return _Run(cfg, out, src, ens_dir, ens, best, dict(src.members)[best], data_dir, class_names)


def student_config(run: _Run) -> StudentConfig:
    """The student workers' config for this run: the best CNN member, ``distill``'s settings, the seed."""
    d = run.cfg.distill
    return StudentConfig(member_dir=run.best_dir, input_size=d.input_size, unfreeze_layers=d.unfreeze_layers,
                         materialize=d.materialize, epochs=d.epochs, batch_size=d.batch_size, lr=d.lr,
                         temperature=d.temperature, soft_weight=d.soft_weight, hard_weight=d.hard_weight,
                         num_classes=len(run.class_names), seed=run.cfg.seed, data_dir=run.data_dir)


def train_student(run: _Run, views: Any, *, force: bool) -> tuple[Any, float]:
    """Train the student on Ray Train over the teacher-labelled ``views``: (its last checkpoint, seconds)."""
    from transfuse.finetune import make_trainer

    cfg, out, d = run.cfg, run.out, run.cfg.distill
    loop = student_config(run)
    # Ray Train resumes from the checkpoints in TRAIN_DIR: only those of a run with the same settings but for its
    # epochs, and no more epochs than asked for (a rerun with more epochs trains only the new ones)
    stamp, train_fp = storage.join(out, ".train_fingerprint.json"), _fingerprint(cfg, run.src.fingerprint,
                                                                                   epochs=False)
    kept = storage.read_json(stamp) if storage.exists(stamp) else {}
    if force or kept.get("fingerprint") != train_fp or int(kept.get("epochs", d.epochs + 1)) > d.epochs:
        storage.delete(storage.join(out, TRAIN_DIR))
    storage.write_json(stamp, {"fingerprint": train_fp, "epochs": d.epochs})
    t1 = time.time()
    result = make_trainer(cfg.train, loop, {"train": views}, out, name=TRAIN_DIR, func=student_loop).fit()
    seconds = time.time() - t1
    if result.error is not None or result.checkpoint is None:
        raise DistillError(f"student training failed: {result.error}")
    return result.checkpoint, seconds


def save_student(run: _Run, checkpoint: Any) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, np.ndarray],
                                                       dict[str, np.ndarray]]:
    """Write the student's member directory from its last checkpoint, with its predictions on val, holdout and
    test: (its spec, its history, {split: probabilities}, {split: labels})."""
    from transfuse.data import read_split_numpy
    from transfuse import finetune
    from transfuse.finetune import load_checkpoint_weights
    from transfuse.finetune import write_member_split
    from transfuse.inference import PreprocessSpec, preprocess

    d = run.cfg.distill
    model, spec = build_student(run.best_dir, d.input_size, d.unfreeze_layers)
    with checkpoint.as_directory() as cd:
        load_checkpoint_weights(model, cd)
        history = read_history(cd)
    student_dir = storage.join(run.out, STUDENT)
    finetune.save_member(model, {**spec, "distilled_from": {"teacher": run.src.source, "init": run.best}},
                       student_dir)
    pspec = PreprocessSpec(**spec["preprocess"])
    probs, labels = {}, {}
    for split in ("val", "holdout", "test"):
        x, y, ids = read_split_numpy(run.data_dir, split)
        p = model.predict(preprocess(x, pspec), batch_size=256, verbose=0).astype(np.float64)
        write_member_split(student_dir, "predictions", split, ids, y, p)
        probs[split], labels[split] = p, y
    return spec, history, probs, labels


def calibrate(run: _Run, val_probs: np.ndarray, val_labels: np.ndarray, s_test: np.ndarray,
              t_labels: np.ndarray) -> Optional[dict[str, Any]]:
    """The student's temperature, fitted and checked on val, with test's metrics before and after (None:
    ``distill.temperature_scaling`` is off)."""
    from transfuse.ensemble import checked_temperature, temperature_line
    from transfuse.inference import EnsembleError

    cfg, d = run.cfg, run.cfg.distill
    if not d.temperature_scaling:
        return None
    # on val, not on the holdout: the teacher's scikit-learn members and stacker learned the holdout's labels,
    # and the student learns the teacher: it is right more often on the holdout than on test (where the members
    # score the same on both), so a temperature fitted there would not carry over
    try:
        calibration = checked_temperature(np.log(np.clip(val_probs, PROB_FLOOR, 1.0)), val_labels,
                                          folds=cfg.ensemble.folds, seed=cfg.seed, check=d.temperature_check)
    except EnsembleError as e:
        raise DistillError(f"the student's temperature on val: {e} (a larger label budget's val split, or "
                           "distill.temperature_check / distill.temperature_scaling false)") from e
    fitted = tm.evaluate(soften(s_test, calibration["fitted_temperature"]), t_labels, run.class_names)
    before = tm.evaluate(s_test, t_labels, run.class_names)
    calibration.update(fitted_on="val", test={"before": before, "after": fitted} if calibration["applied"]
                       else {"before": before, "after": before, "rejected": fitted})
    log.info("distill: student %s", temperature_line(calibration))
    return calibration


def run_distill(cfg: Config, *, force: bool = False) -> dict[str, Any]:
    """The distill stage (see the module docstring): the teacher labels the views, the student learns them, its
    member directory and predictions are written, its temperature fitted and everything compared on test.
    Returns its manifest."""
    from transfuse.finetune import read_member_split

    src, ens_dir = _teacher_source(cfg)
    out = DISTILL.dir(cfg)
    fp = _fingerprint(cfg, src.fingerprint)
    if storage.skip_complete(out, fp, DISTILL.folder, force):
        return storage.read_manifest(out)
    run = _open_run(cfg, out, src, ens_dir)
    storage.makedirs(out)
    storage.clear_outputs(out)  # Ray Train's working state (a dot folder) stays: it resumes

    t0 = time.time()
    views = teacher_views(cfg, list(src.members), src.parts, len(run.class_names))
    teacher_seconds = time.time() - t0
    n_rows = views.count()
    checkpoint, train_seconds = train_student(run, views, force=force)
    spec, history, probs, labels = save_student(run, checkpoint)
    _, t_labels, teacher_test = read_member_split(ens_dir, "predictions", "test")
    _, _, s_test = read_member_split(storage.join(out, STUDENT), "predictions", "test")
    calibration = calibrate(run, probs["val"], labels["val"], s_test, t_labels)
    report = _report(run, teacher_test, s_test, t_labels, calibration)
    report.update(rows={"views": int(n_rows), "per_view": int(n_rows // cfg.distill.views),
                        "views_per_image": cfg.distill.views},
                  history=history, teacher_seconds=round(teacher_seconds, 1),
                  train_seconds=round(train_seconds, 1), student_input_size=spec["input_size"])
    storage.write_json(DISTILL.metrics_path(cfg), json.loads(json.dumps(report, default=float)))
    student, best_m = report["student"], report["best_cnn_member"]
    log.info("distill: student %.4f (teacher %.4f, best member %s %.4f), fidelity %.4f", student["accuracy"],
             report["teacher"]["accuracy"], run.best, best_m["accuracy"], report["fidelity"])
    return storage.write_manifest(out, cfg, DISTILL.folder, fp, student=STUDENT, teacher=src.source,
                                  metrics={"student_accuracy": student["accuracy"], "fidelity": report["fidelity"]})


def _report(run: _Run, teacher_test: np.ndarray, s_test: np.ndarray, t_labels: np.ndarray,
            calibration: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Teacher vs student vs the best CNN member on test, the student's fidelity to the teacher and the share of
    the ensemble's gain it keeps, and its calibration (``metrics.json`` without the run's counts and times)."""
    best_m = {m: run.ens.mean(run.best, m) for m in ("accuracy", "nll", "ece")}
    teacher = tm.evaluate(teacher_test, t_labels, run.class_names)
    student = tm.evaluate(s_test, t_labels, run.class_names)
    gain = teacher["accuracy"] - best_m["accuracy"]
    return {
        "teacher": {"source": run.src.source, **teacher}, "student": student,
        "best_cnn_member": {"name": run.best, **best_m},
        "fidelity": float(np.mean(s_test.argmax(1) == teacher_test.argmax(1))),
        "gain_kept": (student["accuracy"] - best_m["accuracy"]) / gain if gain > 0 else None,
        "calibration": calibration,
    }


__all__ = ["DistillMetrics", "calibrate", "read_temperature", "run_distill", "save_student", "student_config",
           "temperature_stacker", "train_student"]
