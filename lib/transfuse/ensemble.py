"""Ensembles of fine-tuned CNNs and scikit-learn learners on their embeddings: fitted on Ray, stacked without
leakage, judged on the test split, saved without pickle.

Who sees what (the leakage rule, checked from recorded ids by ``stacking.check_no_leakage``):

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

The members themselves (kinds, fitting tasks on Ray or in-process, ONNX export) are ``transfuse.learners``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from transfuse import metrics as tm
from transfuse import storage
from transfuse.config import Config, EnsembleConfig, MemberConfig
from transfuse.learners import (ONNX_INPUT, ONNX_OUTPUT, FitOutput, FitTask, Progress, data_key, make_runner,
                                 to_onnx_bytes, validate_members)
from transfuse.preprocess import pixel_features
from transfuse.stacking import (
    EnsembleError,
    FitRecord,
    GreedyEnsemble,
    Stacker,
    average,
    check_no_leakage,
    hard_vote,
    load_sklearn_member,
    select_stacker,
    stacker_candidates,
)

log = logging.getLogger(__name__)

STAGE = "ensemble"
ENSEMBLE_FORMAT = "transfuse.ensemble/v1"
COMBINERS = ("average", "hard_vote", "greedy", "stack")


# ----------------------------------------------------------------------------------------------------------------
# Inputs, one seed's fit, several seeds


@dataclass
class EnsembleInputs:
    """Everything the ensemble needs, aligned by id within each split (ids sorted)."""

    ids: dict[str, np.ndarray]  # split -> ids; needs "train", "holdout", "test"
    labels: dict[str, np.ndarray]  # split -> int64 labels
    embeddings: dict[str, np.ndarray]  # split -> N x D float32 (from ``embedding_source``)
    num_classes: int
    cnn_probs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # member -> split -> N x K
    cnn_fit_ids: dict[str, np.ndarray] = field(default_factory=dict)  # member -> ids it trained/early-stopped on
    embedding_source: Optional[str] = None
    class_names: Optional[list[str]] = None
    pixels: dict[str, np.ndarray] = field(default_factory=dict)  # split -> N x P float32 (pixel_features), if used
    # other CNN members' embeddings (member -> split -> N x D), read when a member or the member search uses them
    cnn_embeddings: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def check(self) -> None:
        for split in ("train", "holdout", "test"):
            if split not in self.ids or len(self.ids[split]) == 0:
                raise EnsembleError(f"split {split!r} is missing or empty; the ensemble needs train, holdout, test")
            n = len(self.ids[split])
            if len(self.labels[split]) != n or self.embeddings[split].shape[0] != n:
                raise EnsembleError(f"split {split!r}: {n} ids but {len(self.labels[split])} labels and "
                                    f"{self.embeddings[split].shape[0]} embeddings")
            if self.pixels and (split not in self.pixels or self.pixels[split].shape[0] != n):
                got = self.pixels[split].shape[0] if split in self.pixels else "no"
                raise EnsembleError(f"split {split!r}: {n} ids but {got} rows of pixel features")
            for m, emb in self.cnn_embeddings.items():
                if split not in emb or emb[split].shape[0] != n:
                    got = emb[split].shape[0] if split in emb else "no"
                    raise EnsembleError(f"split {split!r}: {n} ids but {got} rows of CNN member {m!r}'s embeddings")
        for m, probs in self.cnn_probs.items():
            for split in ("holdout", "test"):
                if split not in probs:
                    raise EnsembleError(f"CNN member {m!r} has no {split} predictions")
                if probs[split].shape != (len(self.ids[split]), self.num_classes):
                    raise EnsembleError(f"CNN member {m!r}: {split} probabilities have shape {probs[split].shape}, "
                                        f"expected {(len(self.ids[split]), self.num_classes)}")
            if m not in self.cnn_fit_ids:
                raise EnsembleError(f"CNN member {m!r}: the ids it was trained on are not recorded")


def shared_data(inp: EnsembleInputs, splits: Sequence[str] = ("train", "holdout", "test"),
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Rows of ``splits`` stacked into one array per view (put in the object store once) + each split's rows. The
    member search passes train and holdout only: its trials cannot see a test row."""
    def stacked(by_split: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.ascontiguousarray(np.concatenate([by_split[s] for s in splits]), dtype=np.float32)

    y = np.concatenate([inp.labels[s] for s in splits]).astype(np.int64)
    ids = np.concatenate([np.asarray(inp.ids[s]).astype(str) for s in splits])
    rows, start = {}, 0
    for s in splits:
        rows[s] = np.arange(start, start + len(inp.ids[s]))
        start += len(inp.ids[s])
    data = {"x": stacked(inp.embeddings), "y": y, "ids": ids}
    if inp.pixels:
        data["pixels"] = stacked(inp.pixels)
    for m, emb in inp.cnn_embeddings.items():
        if m != inp.embedding_source:
            data[f"emb:{m}"] = stacked(emb)
    return data, rows


def holdout_folds(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """K stratified folds of the holdout positions (plain K-fold where a class has fewer than K examples)."""
    from sklearn.model_selection import KFold, StratifiedKFold

    if folds > len(labels):
        raise EnsembleError(f"ensemble.folds={folds} is more than the {len(labels)} holdout examples")
    counts = np.bincount(labels)
    splitter = (StratifiedKFold(folds, shuffle=True, random_state=seed) if counts[counts > 0].min() >= folds
                else KFold(folds, shuffle=True, random_state=seed))
    return [test for _, test in splitter.split(np.zeros(len(labels)), labels)]


def fold_tasks(member: MemberConfig, seed: int, folds: Sequence[np.ndarray], rows: Mapping[str, np.ndarray],
               num_classes: int, n_jobs: int, key: Optional[str]) -> list[FitTask]:
    """K out-of-fold fits over the holdout: fold k's model fits on train + the other holdout folds, predicts fold k."""
    tasks = []
    for k, held in enumerate(folds):
        keep = np.setdiff1d(np.arange(len(rows["holdout"])), held)
        fit_idx = np.concatenate([rows["train"], rows["holdout"][keep]])
        tasks.append(FitTask(member, seed, k, fit_idx, {"holdout": rows["holdout"][held]}, num_classes, n_jobs,
                             data_key=key))
    return tasks


def plan_tasks(inp: EnsembleInputs, ecfg: EnsembleConfig, rows: dict[str, np.ndarray]) -> list[FitTask]:
    """Per seed and member: K out-of-fold fits over the holdout (each also fits on all of train) + one final fit."""
    n_jobs = max(1, int(ecfg.cpus_per_task))
    tasks = []
    for seed in ecfg.seeds:
        folds = holdout_folds(inp.labels["holdout"], ecfg.folds, seed)
        for m in ecfg.members:
            key = data_key(m, inp.embedding_source)
            tasks += fold_tasks(m, seed, folds, rows, inp.num_classes, n_jobs, key)
            tasks.append(FitTask(m, seed, None, np.concatenate([rows["train"], rows["holdout"]]),
                                 {"test": rows["test"]}, inp.num_classes, n_jobs, keep_estimator=True, data_key=key))
    return tasks


def oof_predictions(outputs: Sequence[FitOutput], name: str, seed: int, holdout_ids: np.ndarray,
                    num_classes: int) -> tuple[np.ndarray, list[FitRecord]]:
    """One member's out-of-fold holdout probabilities (rows in ``holdout_ids`` order) from its fold fits, and a
    record of what each fold model was fitted on and predicted (for ``check_no_leakage``)."""
    pos = {i: p for p, i in enumerate(holdout_ids)}
    oof = np.full((len(holdout_ids), num_classes), np.nan)
    records = []
    for o in outputs:
        if o.member == name and o.seed == seed and o.fold is not None:
            pids, probs = o.predictions["holdout"]
            oof[[pos[i] for i in pids]] = probs
            records.append(FitRecord(name, f"{name}/seed{seed}/fold{o.fold}", o.fit_ids, pids))
    if np.isnan(oof).any():
        raise EnsembleError(f"member {name!r} seed {seed}: out-of-fold predictions missing for some holdout rows")
    return oof, records


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


def _assemble_seed(inp: EnsembleInputs, ecfg: EnsembleConfig, seed: int, outputs: list[FitOutput]) -> SeedFit:
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
        folds=ecfg.folds, seed=seed, ids=ho_ids, num_classes=inp.num_classes, calibrate=ecfg.temperature_scaling)
    greedy = GreedyEnsemble(order, rounds=ecfg.greedy_rounds, metric=ecfg.greedy_metric).fit(holdout, y_ho, ho_ids)
    combined = {"average": average(test, order), "hard_vote": hard_vote(test, order),
                "greedy": greedy.predict_proba(test), "stack": stacker.predict_proba(test)}
    scores = {m: tm.evaluate(test[m], y_te) for m in order}
    scores.update({c: tm.evaluate(p, y_te) for c, p in combined.items()})
    if calibration is not None:
        uncalibrated = stacker.calibrated(1.0 / stacker.temperature).predict_proba(test)
        combined["stack_uncalibrated"] = uncalibrated  # saved for the report, not a servable combiner
        calibration["test"] = {"before": tm.evaluate(uncalibrated, y_te), "after": scores["stack"]}
    return SeedFit(seed, order, cnn, estimators, holdout, test, stacker, greedy, records, finals, scores, combined,
                   leakage, selection, calibration)


@dataclass
class EnsembleFit:
    seeds: list[SeedFit]
    runner: str
    fit_seconds: float
    task_seconds: float  # sum over tasks: with fit_seconds, how much the parallel run overlapped
    data_object_ids: list[Optional[str]]

    @property
    def first(self) -> SeedFit:
        return self.seeds[0]

    def summary(self) -> dict[str, Any]:
        """Per model and metric over seeds: mean, min, max and the values (the seed range)."""
        out: dict[str, Any] = {}
        for model in self.first.metrics:
            out[model] = {}
            for metric in ("accuracy", "nll", "ece"):
                v = [s.metrics[model][metric] for s in self.seeds]
                out[model][metric] = {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v)),
                                      "values": v}
        return out


def fit_ensemble(inp: EnsembleInputs, ecfg: EnsembleConfig, runner: Any = None,
                 progress: Optional[Progress] = None) -> EnsembleFit:
    """Fit every sklearn member for every seed (all tasks at once), then the combiners; score everything on test.
    ``progress(done, total)`` is called as member tasks finish."""
    inp.check()
    validate_members(ecfg)
    wants = [m.name for m in ecfg.members if m.features == "pixels"]
    if wants and not inp.pixels:
        raise EnsembleError(f"members {wants} read pixels, but the ensemble inputs carry no pixel features")
    runner = runner or make_runner(ecfg)
    data, rows = shared_data(inp)
    tasks = plan_tasks(inp, ecfg, rows)
    t0 = time.perf_counter()
    outputs = runner.run(data, tasks, progress) if tasks else []
    wall = time.perf_counter() - t0
    log.info("fitted %d member tasks with the %s runner in %.1fs", len(tasks), runner.name, wall)
    seeds = [_assemble_seed(inp, ecfg, s, outputs) for s in ecfg.seeds]
    return EnsembleFit(seeds, runner.name, wall, float(sum(o.seconds for o in outputs)),
                       [o.data_object_id for o in outputs])


# ----------------------------------------------------------------------------------------------------------------
# The stage: read member dirs, fit, save, verify


@dataclass
class CnnMember:
    name: str
    dir: str
    val_accuracy: Optional[float] = None


def _read_table(path: str) -> Any:
    import pyarrow.parquet as pq

    fs, p = storage.resolve(path)
    if not storage.exists(path):
        raise EnsembleError(f"missing file {path}")
    return pq.read_table(p, filesystem=fs)


def _list_column(table: Any, column: str, where: str) -> np.ndarray:
    """A list<float> column as an N x width float32 array; every row must have the same width."""
    import pyarrow.compute as pc

    if column not in table.column_names:
        raise EnsembleError(f"{where}: no column {column!r}; has {table.column_names}")
    col = table.column(column).combine_chunks()
    if col.null_count:
        raise EnsembleError(f"{where}: {col.null_count} rows have a null {column}")
    lengths = np.asarray(pc.list_value_length(col))
    if len(lengths) and lengths.min() != lengths.max():
        raise EnsembleError(f"{where}: {column} rows have different lengths ({lengths.min()}..{lengths.max()})")
    width = int(lengths[0]) if len(lengths) else 0
    return np.asarray(col.flatten(), dtype=np.float32).reshape(len(col), width)


SPLIT_COLUMNS = {"predictions": "probs", "embeddings": "embedding"}  # <dir>/<kind>/<split>.parquet's value column


def write_member_split(member_dir: str, kind: str, split: str, ids: np.ndarray, labels: np.ndarray,
                       values: np.ndarray) -> None:
    """``<member_dir>/<kind>/<split>.parquet``: id (str), label (int64) and one float32 list per row (probs for
    predictions, embedding for embeddings), what ``read_member_split`` reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind not in SPLIT_COLUMNS:
        raise EnsembleError(f"split kind must be one of {sorted(SPLIT_COLUMNS)}, got {kind!r}")
    values = np.asarray(values, dtype=np.float32).reshape(len(ids), -1)
    table = pa.table({"id": pa.array(np.asarray(ids).astype(str)),
                      "label": pa.array(np.asarray(labels).astype(np.int64)),
                      SPLIT_COLUMNS[kind]: pa.array(list(values), type=pa.list_(pa.float32()))})
    fs, path = storage.resolve(storage.join(member_dir, kind, f"{split}.parquet"))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        pq.write_table(table, f)


def read_member_split(member_dir: str, kind: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels, values) of ``<member_dir>/<kind>/<split>.parquet`` sorted by id; kind: predictions (probs) or
    embeddings (embedding)."""
    path = storage.join(member_dir, kind, f"{split}.parquet")
    table = _read_table(path)
    for c in ("id", "label"):
        if c not in table.column_names:
            raise EnsembleError(f"{path}: no column {c!r}; has {table.column_names}")
    ids = np.asarray(table.column("id").to_pylist(), dtype=str)
    labels = np.asarray(table.column("label"), dtype=np.int64)
    values = _list_column(table, SPLIT_COLUMNS[kind], path)
    if len(np.unique(ids)) != len(ids):
        raise EnsembleError(f"{path}: ids are not unique")
    order = np.argsort(ids, kind="stable")
    return ids[order], labels[order], values[order]


def find_cnn_members(cfg: Config) -> list[CnnMember]:
    """The members chosen by Tune (``<run>/tune/members.json``), else the single fine-tuned model."""
    from transfuse.search import MEMBERS_FILE, read_members, tune_dir

    ft_dir = storage.stage_dir(cfg, "finetune")
    tuned = read_members(cfg)
    if tuned is not None:
        return [CnnMember(m.name, m.dir, m.val_accuracy) for m in tuned]
    if storage.exists(storage.join(ft_dir, "predictions")):
        return [CnnMember("finetune", ft_dir, None)]
    raise EnsembleError(f"no CNN members found: expected {storage.join(tune_dir(cfg), MEMBERS_FILE)} (jobs.tune) "
                        f"or {ft_dir}/predictions (jobs.finetune); run one of them first")


def _member_val_accuracy(m: CnnMember) -> float:
    if m.val_accuracy is not None:
        return float(m.val_accuracy)
    path = storage.join(m.dir, "metrics.json")
    if storage.exists(path):
        return float(storage.read_json(path).get("val", {}).get("accuracy", float("-inf")))
    return float("-inf")


def _agree(split: str, ref: tuple[str, np.ndarray, np.ndarray], other: tuple[str, np.ndarray, np.ndarray]) -> None:
    """Members must predict the same ids with the same labels (they come from the same data stage)."""
    (a, ids_a, lab_a), (b, ids_b, lab_b) = ref, other
    if not np.array_equal(ids_a, ids_b):
        only_a, only_b = np.setdiff1d(ids_a, ids_b), np.setdiff1d(ids_b, ids_a)
        raise EnsembleError(f"split {split!r}: members {a!r} and {b!r} cover different ids ({len(ids_a)} vs "
                            f"{len(ids_b)}; only in {a!r}: {only_a[:3].tolist()}, only in {b!r}: "
                            f"{only_b[:3].tolist()}); were they trained on the same prepared data?")
    bad = np.flatnonzero(lab_a != lab_b)
    if len(bad):
        raise EnsembleError(f"split {split!r}: members {a!r} and {b!r} disagree on the labels of {len(bad)} ids, "
                            f"e.g. {ids_a[bad[:3]].tolist()}")


def load_inputs(cfg: Config, members: Optional[list[CnnMember]] = None) -> tuple[EnsembleInputs, list[CnnMember]]:
    """Read every CNN member's predictions and the best member's embeddings, joined and checked by id."""
    members = members or find_cnn_members(cfg)
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise EnsembleError(f"CNN member names must be unique, got {names}")
    best = max(members, key=_member_val_accuracy)
    inp_ids: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    embeddings: dict[str, np.ndarray] = {}
    for split in ("train", "holdout", "test"):
        ids, lab, emb = read_member_split(best.dir, "embeddings", split)
        inp_ids[split], labels[split], embeddings[split] = ids, lab, emb
    cnn_probs: dict[str, dict[str, np.ndarray]] = {}
    fit_ids: dict[str, np.ndarray] = {}
    k = None
    for m in members:
        cnn_probs[m.name] = {}
        for split in ("holdout", "test"):
            ids, lab, probs = read_member_split(m.dir, "predictions", split)
            _agree(split, (best.name, inp_ids[split], labels[split]), (m.name, ids, lab))
            if k is not None and probs.shape[1] != k:
                raise EnsembleError(f"member {m.name!r} predicts {probs.shape[1]} classes, others {k}")
            k = probs.shape[1]
            cnn_probs[m.name][split] = probs
        train_ids = read_member_split(m.dir, "embeddings", "train")[0]
        if not np.array_equal(train_ids, inp_ids["train"]):
            raise EnsembleError(f"members {best.name!r} and {m.name!r} were trained on different train ids")
        seen = [train_ids]
        if storage.exists(storage.join(m.dir, "predictions", "val.parquet")):
            seen.append(read_member_split(m.dir, "predictions", "val")[0])  # val drove early stopping
        fit_ids[m.name] = np.concatenate(seen)
    if labels["train"].size and labels["train"].max() >= k:
        raise EnsembleError(f"labels go up to {labels['train'].max()} but members predict {k} classes")
    wants_pixels, wants_embeddings = _views_read(cfg.ensemble, names)
    pixels = (read_pixels(storage.stage_dir(cfg, "data"), inp_ids, labels, cfg.ensemble.pixel_size)
              if wants_pixels else {})
    cnn_embeddings = {best.name: embeddings} if best.name in wants_embeddings else {}
    for m in members:
        if m.name in wants_embeddings and m.name != best.name:
            cnn_embeddings[m.name] = {}
            for split in ("train", "holdout", "test"):
                ids, _, emb = read_member_split(m.dir, "embeddings", split)
                if not np.array_equal(ids, inp_ids[split]):
                    raise EnsembleError(f"split {split!r}: members {best.name!r} and {m.name!r} have embeddings of "
                                        f"different ids; were they trained on the same prepared data?")
                cnn_embeddings[m.name][split] = emb
    inp = EnsembleInputs(inp_ids, labels, embeddings, int(k), cnn_probs, fit_ids, best.name,
                         _class_names(cfg, best, int(k)), pixels, cnn_embeddings)
    inp.check()
    return inp, members


def _views_read(ecfg: EnsembleConfig, cnn_names: list[str]) -> tuple[bool, set[str]]:
    """Whether some member (fixed, or one the member search may draw) reads the pixels, and which CNN members'
    embeddings they read besides the best one's."""
    pixels = any(m.features == "pixels" for m in ecfg.members)
    named = {m.embedding_of for m in ecfg.members if m.embedding_of is not None}
    unknown = sorted(named - set(cnn_names))
    if unknown:
        raise EnsembleError(f"ensemble.members: embedding_of {unknown} names no CNN member; the members are "
                            f"{cnn_names}")
    if ecfg.search.enabled:
        pixels = pixels or "pixels" in ecfg.search.features
        named |= set(cnn_names) if "embedding" in ecfg.search.features else set()
    return pixels, named


def read_pixels(data_dir: str, ids: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                size: Optional[int]) -> dict[str, np.ndarray]:
    """``pixel_features`` of the prepared images, per split, in the order of ``ids`` (the CNN members' rows); an
    id the prepared split lacks, or a label that differs, is an error (the members were built on other data)."""
    from transfuse.data.dataset import read_split_numpy

    out = {}
    for split, want in ids.items():
        images, lab, have = read_split_numpy(data_dir, split)
        pos = {str(i): p for p, i in enumerate(have)}
        missing = [str(i) for i in want if str(i) not in pos]
        if missing:
            raise EnsembleError(f"{data_dir}/{split}: {len(missing)} of the members' {split} ids are not in the "
                                f"prepared data (first: {missing[:3]}); rerun the ensemble on the data they used")
        rows = np.array([pos[str(i)] for i in want], dtype=np.int64)
        if not np.array_equal(lab[rows], labels[split]):
            raise EnsembleError(f"{data_dir}/{split}: labels differ from the CNN members' for the same ids")
        out[split] = pixel_features(images[rows], size)
    return out


def _class_names(cfg: Config, best: CnnMember, k: int) -> list[str]:
    for path in (storage.join(best.dir, "model_spec.json"), storage.join(storage.stage_dir(cfg, "data"),
                                                                         storage.MANIFEST)):
        if storage.exists(path):
            names = storage.read_json(path).get("class_names")
            if names and len(names) == k:
                return [str(n) for n in names]
    return [str(i) for i in range(k)]


def stage_fingerprint(cfg: Config, members: list[CnnMember], head: Optional[str] = None) -> str:
    """Same config (or ``head``: a digest of the parts that matter) and the same member files (their manifests'
    checksums) -> the stage (or the member search) is complete."""
    h = hashlib.sha256((head or cfg.fingerprint("ensemble")).encode())
    for m in members:
        man = storage.join(m.dir, storage.MANIFEST)
        h.update(m.name.encode() + (storage.sha256(man) if storage.exists(man) else m.dir).encode())
    return h.hexdigest()[:16]


def member_inputs(inp: EnsembleInputs, features: str, split: str, embedding_of: Optional[str] = None) -> np.ndarray:
    """What a member with ``features`` (embedding | pixels) reads for ``split``: the pixels, or the embedding of the
    CNN member ``embedding_of`` (None: the best on val, ``inp.embedding_source``)."""
    if features == "pixels":
        return inp.pixels[split]
    if embedding_of in (None, inp.embedding_source):
        return inp.embeddings[split]
    if embedding_of not in inp.cnn_embeddings:
        raise EnsembleError(f"no embeddings of CNN member {embedding_of!r} were read; read: "
                            f"{[inp.embedding_source, *inp.cnn_embeddings]}")
    return inp.cnn_embeddings[embedding_of][split]


def save_ensemble(out_dir: str, fit: EnsembleFit, inp: EnsembleInputs, members: list[CnnMember],
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
                    "temperature": s.stacker.temperature,
                    "fitted_on": "holdout (out-of-fold for sklearn members)", "selection": s.stacker_selection},
        "greedy": {"file": "greedy.json", **s.greedy.to_dict()},
        "combiners": list(COMBINERS), "default_combiner": "stack",
    }
    storage.write_json(storage.join(out_dir, DESCRIPTION_FILE), desc)
    return desc


# ---------------------------------------------------------------------- ensemble.json (this module owns it)
DESCRIPTION_FILE = "ensemble.json"


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


def _report(fit: EnsembleFit, inp: EnsembleInputs) -> dict[str, Any]:
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
                                  "member_weights": x.stacker.member_weights, "selection": x.stacker_selection}
                    for x in fit.seeds},
        # temperature scaling of the stack, per seed (None: ensemble.temperature_scaling off)
        "calibration": {str(x.seed): x.calibration for x in fit.seeds},
        "leakage_check": s.leakage,
        "runner": fit.runner, "fit_seconds": fit.fit_seconds, "task_seconds": fit.task_seconds,
        "counts": {k: int(len(v)) for k, v in inp.ids.items()},
    }


PROGRESS_FILE = "progress.json"  # {"done": n, "total": m} member tasks, while the stage runs (the console reads it)


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
    from transfuse import member_search  # it imports this module

    validate_members(cfg.ensemble)
    member_search.validate_search(cfg.ensemble)
    members = find_cnn_members(cfg)
    out = storage.stage_dir(cfg, STAGE)
    fp = stage_fingerprint(cfg, members)
    if not force and storage.is_complete(out, fp):
        log.info("ensemble stage complete (fingerprint %s): %s", fp, out)
        return storage.read_manifest(out)
    inp, members = load_inputs(cfg, members)
    ecfg, searched = cfg.ensemble, None
    if ecfg.search.enabled:
        searched = member_search.run_member_search(cfg, inp, members, force=force)
        ecfg = ecfg.model_copy(update={"members": searched.members})
    fit = fit_ensemble(inp, ecfg, runner, progress=_progress_file(out))
    storage.makedirs(out)
    for stale in storage.list_files(out) + [storage.MANIFEST]:  # a rerun must not leave old members behind
        storage.delete(storage.join(out, stale))
    desc = save_ensemble(out, fit, inp, members, ecfg)
    report = _report(fit, inp)
    if searched is not None:
        member_search.write_results(out, searched)
        report["member_search"] = searched.summary
    report["reload_max_abs_diff"] = verify_saved(out, fit, inp, cfg.ensemble.onnx_threads)
    storage.write_json(storage.join(out, "metrics.json"), report)
    return storage.write_manifest(out, cfg, STAGE, fp, members=desc["member_order"],
                                  embedding_source=inp.embedding_source, counts=report["counts"],
                                  metrics={k: v["accuracy"]["mean"] for k, v in report["summary"].items()})


def format_table(report: Mapping[str, Any]) -> str:
    """A plain-text table of test metrics (mean over seeds, and the seed range)."""
    lines = [f"{'model':<24}{'accuracy':>22}{'nll':>22}{'ece':>10}"]
    for model, m in report["summary"].items():
        a, n, e = m["accuracy"], m["nll"], m["ece"]
        lines.append(f"{model:<24}{a['mean']:>8.4f} [{a['min']:.4f},{a['max']:.4f}]"
                     f"{n['mean']:>8.4f} [{n['min']:.4f},{n['max']:.4f}]{e['mean']:>10.4f}")
    for seed, c in (report.get("calibration") or {}).items():
        if c:
            b, a = c["test"]["before"], c["test"]["after"]
            lines.append(f"stack, seed {seed}: temperature {c['temperature']:.3f} (fitted on {c['fitted_on']}); "
                         f"test NLL {b['nll']:.4f} -> {a['nll']:.4f}, ECE {b['ece']:.4f} -> {a['ece']:.4f}")
    return "\n".join(lines)


__all__ = [
    "COMBINERS", "EnsembleError", "EnsembleFit", "EnsembleInputs", "SeedFit", "fit_ensemble", "find_cnn_members",
    "format_table", "fold_tasks", "holdout_folds", "load_inputs", "load_saved_members", "member_inputs",
    "oof_predictions", "read_member_split", "read_pixels", "run_ensemble", "save_ensemble", "shared_data",
    "stage_fingerprint", "verify_saved", "write_member_split",
]
