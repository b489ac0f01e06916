"""What the ensemble stage and the member search read, and the out-of-fold protocol they share.

The inputs: the CNN members' saved outputs (``<member>/<kind>/<split>.parquet``: id, label, and probabilities or
an embedding; ``transfuse.finetune.predictions`` owns that format), the images' pixels as a second view, all aligned by
id in ``EnsembleInputs``; and the fingerprint of those inputs (``stage_fingerprint``). The protocol: the holdout is
split into K stratified folds (``holdout_folds``), fold k's model is fitted on train + the other folds and predicts
fold k (``fold_tasks``), and the K predictions make one member's out-of-fold holdout probabilities with a record
of what each fold model saw (``oof_predictions``, checked by ``transfuse.ensemble.stacker.check_no_leakage``). The
ensemble fits its members this way for the stacker; the member search scores each trial this way, on the same folds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from transfuse import storage
from transfuse.config import Config, EnsembleConfig, MemberConfig
from transfuse.data import PREPARE
from transfuse.ensemble.learners import FitOutput, FitTask
from transfuse.ensemble.stacker import FitRecord
from transfuse.finetune import FINETUNE, MemberMetrics, read_member_split
from transfuse.inference import EnsembleError, pixel_features

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
               num_classes: int, n_jobs: int, key: Optional[str], class_weighted: bool = False) -> list[FitTask]:
    """K out-of-fold fits over the holdout: fold k's model fits on train + the other holdout folds, predicts fold k
    (``class_weighted``: each by the class weights of its own fit rows' labels)."""
    tasks = []
    for k, held in enumerate(folds):
        keep = np.setdiff1d(np.arange(len(rows["holdout"])), held)
        fit_idx = np.concatenate([rows["train"], rows["holdout"][keep]])
        tasks.append(FitTask(member, seed, k, fit_idx, {"holdout": rows["holdout"][held]}, num_classes, n_jobs,
                             data_key=key, class_weighted=class_weighted))
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
class MemberDir:
    name: str
    dir: str
    val_accuracy: Optional[float] = None


def find_cnn_members(cfg: Config) -> list[MemberDir]:
    """The members chosen by Tune (``<run>/tune/members.json``), else the single fine-tuned model."""
    from transfuse.finetune import MEMBERS_FILE, read_members, tune_dir

    ft_dir = FINETUNE.dir(cfg)
    tuned = read_members(cfg)
    if tuned is not None:
        return [MemberDir(m.name, m.dir, m.val_accuracy) for m in tuned]
    if storage.exists(storage.join(ft_dir, "predictions")):
        return [MemberDir("finetune", ft_dir, None)]
    raise EnsembleError(f"no CNN members found: expected {storage.join(tune_dir(cfg), MEMBERS_FILE)} (jobs.tune) "
                        f"or {ft_dir}/predictions (jobs.finetune); run one of them first")


def _member_val_accuracy(m: MemberDir) -> float:
    if m.val_accuracy is not None:
        return float(m.val_accuracy)
    metrics = MemberMetrics.read(m.dir)
    if metrics is not None and metrics.val is not None and metrics.val.accuracy is not None:
        return float(metrics.val.accuracy)
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


def load_inputs(cfg: Config, members: Optional[list[MemberDir]] = None) -> tuple[EnsembleInputs, list[MemberDir]]:
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
    pixels = (read_pixels(PREPARE.dir(cfg), inp_ids, labels, cfg.ensemble.pixel_size)
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
    from transfuse.data import read_split_numpy

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


def _class_names(cfg: Config, best: MemberDir, k: int) -> list[str]:
    for path in (storage.join(best.dir, "model_spec.json"), storage.join(PREPARE.dir(cfg),
                                                                         storage.MANIFEST)):
        if storage.exists(path):
            names = storage.read_json(path).get("class_names")
            if names and len(names) == k:
                return [str(n) for n in names]
    return [str(i) for i in range(k)]


def class_weighting(cfg: Config, inp: EnsembleInputs) -> dict[str, Any]:
    """The run's class-weighting decision (``class_weights.decision``) from the data manifest's train counts, the
    one the CNN members were trained under; where the run has no data manifest, from the members' train labels
    (the same split)."""
    from transfuse import class_weights

    manifest = storage.read_manifest(PREPARE.dir(cfg)) or {}
    if not (manifest.get("class_names") and (manifest.get("counts") or {}).get("train")):
        names = inp.class_names or [str(i) for i in range(inp.num_classes)]
        counts = class_weights.class_counts(inp.labels["train"], inp.num_classes)
        manifest = {"class_names": names, "counts": {"train": {str(i): int(c) for i, c in enumerate(counts)
                                                               if c}}}
    return class_weights.decision(cfg.data, manifest)


def stage_fingerprint(cfg: Config, members: list[MemberDir], head: Optional[str] = None) -> str:
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


__all__ = [
    "MemberDir", "EnsembleInputs", "class_weighting", "find_cnn_members", "fold_tasks", "holdout_folds",
    "load_inputs", "member_inputs", "oof_predictions", "read_pixels", "shared_data", "stage_fingerprint",
]
