"""Prepare once: decode, validate, split (seeded, stratified, disjoint), write sharded parquet + manifest.

Output: ``<storage>/<run>/data/{train,val,test,holdout}/*.parquet`` in the canonical schema and
``<storage>/<run>/data/manifest.json`` with class names, counts per class per split, the shard list with
sha256, the source description, and every skipped or excluded example counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Optional

import numpy as np

from transfuse import storage
from transfuse.config import PREPARED_SPLITS, UNLABELLED, Config, DataConfig, digest
from transfuse.data.sources import DataError, Source, load_source

log = logging.getLogger(__name__)
STAGE = "data"
_MAX_LISTED = 20


def _shape_of(batch: dict[str, Any]) -> dict[str, Any]:
    return {"shape": np.array(["x".join(map(str, np.asarray(im).shape)) for im in batch["image"]], dtype=object)}


def scan(source: Source) -> "Any":
    """id, label, error and shape of every row, as a pandas frame (images stay in Ray)."""
    ds = source.dataset
    names = ds.schema().names
    if "shape" not in names:
        ds = ds.map_batches(lambda b: {**b, **_shape_of(b)}, batch_format="numpy")
    if "error" not in names:
        ds = ds.map_batches(lambda b: {**b, "error": np.full(len(b["label"]), "", dtype=object)},
                            batch_format="numpy")
    source.dataset = ds.materialize()
    return source.dataset.select_columns(["id", "label", "error", "shape"]).to_pandas()


def _listing(rows: list[dict[str, Any]]) -> str:
    shown = "\n".join(f"  {r['id']}: {r['reason']}" for r in rows[:_MAX_LISTED])
    more = f"\n  ... and {len(rows) - _MAX_LISTED} more" if len(rows) > _MAX_LISTED else ""
    return shown + more


def validate(meta: Any, class_names: list[str], cfg: DataConfig) -> tuple[Any, list[dict[str, str]]]:
    """Bad rows (undecodable, label outside the class list): raise, or return them as skipped."""
    n_classes = len(class_names)
    dup = meta["id"][meta["id"].duplicated()]
    if len(dup):
        raise DataError(f"ids must be unique; {len(dup)} repeated, e.g. {list(dup[:5])}")
    bad_label = (meta["label"] < 0) | (meta["label"] >= n_classes)
    bad = (meta["error"] != "") | bad_label
    rows = [
        {"id": r.id, "reason": r.error or f"label {r.label} outside the class list 0..{n_classes - 1} {class_names}"}
        for r in meta[bad].itertuples()
    ]
    if rows and cfg.on_bad_file == "error":
        raise DataError(f"{len(rows)} bad example(s) in {cfg.source} data (set data.on_bad_file=skip to skip "
                        f"and record them):\n{_listing(rows)}")
    good = meta[~bad]
    shapes = good.groupby("shape")["id"].agg(["count", "first"])
    if len(shapes) > 1:
        detail = "; ".join(f"{s}: {c} images, e.g. {f}" for s, (c, f) in shapes.iterrows())
        raise DataError(f"images have mixed shapes ({detail}). All images of a dataset must share one "
                        "H x W x C; resize them beforehand (the model's input_size resizes at training time).")
    if cfg.classes is not None:
        unknown = [c for c in cfg.classes if c >= n_classes]
        if unknown:
            raise DataError(f"data.classes names class ids {unknown} outside 0..{n_classes - 1} {class_names}")
    return good, rows


def _budget_class(cls_ids: np.ndarray, is_test: Optional[np.ndarray], cfg: DataConfig, old: int,
                  new_label: int, out: dict[str, tuple[str, int]], excluded: Counter) -> None:
    """One class under the label budget: test_per_class test images, then labelled_per_class labelled ones split
    into val / holdout / train, the rest of the pool unlabelled. ``cls_ids`` in the class's seeded order."""
    b, n_test = int(cfg.labelled_per_class), int(cfg.test_per_class)
    test_pool, pool = (cls_ids[is_test], cls_ids[~is_test]) if is_test is not None else (cls_ids, cls_ids)
    # the source's test set: its first n_test per class in id order, the same for every seed (label draw)
    test = np.sort(test_pool)[:n_test] if is_test is not None else test_pool[:n_test]
    if is_test is None:
        pool = pool[n_test:]
    if len(test) < n_test or len(pool) < b:
        raise DataError(f"class {old}: test_per_class {n_test} and labelled_per_class {b} need that many images, "
                        f"the source has {len(test_pool)} for test and {len(pool)} left for the budget")
    n = cfg.budget_counts()
    parts = {"test": test, "val": pool[:n["val"]], "holdout": pool[n["val"]:n["val"] + n["holdout"]],
             "train": pool[n["val"] + n["holdout"]:b]}
    for split, part in parts.items():
        for i in part:
            out[i] = (split, new_label)
    for i in pool[b:b + int(cfg.unlabelled_per_class)]:
        out[i] = (UNLABELLED, -1)  # its label is not kept: the split is written without a label column
    excluded["unlabelled"] += len(pool) - b
    excluded["test_cap"] += len(test_pool) - n_test if is_test is not None else 0


def label_budget(cfg: DataConfig, counts: dict[str, dict[str, int]]) -> Optional[dict[str, Any]]:
    """The manifest's record of the label budget: B per class and how it was split (None without one)."""
    if cfg.labelled_per_class is None:
        return None
    tot = {s: sum(counts.get(s, {}).values()) for s in ("train", "val", "holdout", "test")}
    return {"per_class": cfg.labelled_per_class, "total": tot["train"] + tot["val"] + tot["holdout"],
            "train": tot["train"], "val": tot["val"], "holdout": tot["holdout"], "test": tot["test"],
            "test_from": "the source's own test set" if cfg.test_from_source else "the pool",
            "note": "every model (CNNs, scikit-learn members, stacker) learns only from train + val + holdout"}


def assign_splits(labels: np.ndarray, ids: np.ndarray, cfg: DataConfig, seed: int,
                  n_classes: int, test_prefix: Optional[str] = None
                  ) -> tuple[dict[str, tuple[str, int]], dict[str, Any]]:
    """id -> (split, new label), per class in a seeded order; plus counts of what each cap excluded."""
    keep = cfg.classes if cfg.classes is not None else list(range(n_classes))
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[str, int]] = {}
    excluded = Counter()
    excluded["not_in_classes"] = int(np.sum(~np.isin(labels, keep)))
    if cfg.test_from_source and not test_prefix:
        raise DataError(f"data.test_from_source: the {cfg.source} source has no test set of its own; set it false")
    for new_label, old in enumerate(keep):
        cls_ids = np.sort(ids[labels == old])
        if len(cls_ids) == 0:
            raise DataError(f"class {old} has no examples; every class kept must have some")
        cls_ids = cls_ids[rng.permutation(len(cls_ids))]
        if cfg.labelled_per_class is not None:
            is_test = np.array([str(i).startswith(test_prefix) for i in cls_ids]) if cfg.test_from_source else None
            _budget_class(cls_ids, is_test, cfg, old, new_label, out, excluded)
            continue
        if cfg.limit_per_class is not None and len(cls_ids) > cfg.limit_per_class:
            excluded["limit_per_class"] += len(cls_ids) - cfg.limit_per_class
            cls_ids = cls_ids[: cfg.limit_per_class]
        n = len(cls_ids)
        counts = {s: int(round(getattr(cfg.split, s) * n)) for s in ("test", "val", "holdout")}
        counts["test"] = max(counts["test"], 1)
        start = 0
        for s in ("test", "val", "holdout"):
            for i in cls_ids[start:start + counts[s]]:
                out[i] = (s, new_label)
            start += counts[s]
        train = cls_ids[start:]
        n_train = len(train)
        if cfg.train_per_class is not None:
            n_train = min(n_train, cfg.train_per_class)
        n_train = int(round(n_train * cfg.train_fraction))
        if n_train < 1:
            raise DataError(f"class {old} has {n} examples: too few to leave one for train after test/val/"
                            f"holdout ({counts}); lower the split fractions or add examples")
        excluded["train_cap"] += len(train) - n_train
        for i in train[:n_train]:
            out[i] = ("train", new_label)
    return out, dict(excluded)


def _tag_split(batch: dict[str, Any], assignment: dict[str, tuple[str, int]]) -> dict[str, Any]:
    tags = [assignment.get(i, ("", -1)) for i in batch["id"]]
    return {
        "image": batch["image"],
        "label": np.array([t[1] for t in tags], dtype=np.int64),
        "id": np.asarray(batch["id"], dtype=object),
        "split": np.array([t[0] for t in tags], dtype=object),
    }


def prepare(cfg: Config, *, force: bool = False, data_cfg: Optional[DataConfig] = None,
            stage: str = STAGE) -> dict[str, Any]:
    """Run the prepare stage (skipped when its manifest is complete for the same config)."""
    import ray
    from ray.data.expressions import col

    dcfg = data_cfg or cfg.data
    out = storage.stage_dir(cfg, stage)
    fingerprint = digest({"data": dcfg.model_dump(mode="json"), "seed": cfg.seed})
    if storage.skip_complete(out, fingerprint, "prepare", force):
        return storage.read_manifest(out)

    source = load_source(dcfg)
    meta = scan(source)
    good, skipped = validate(meta, source.class_names, dcfg)
    assignment, excluded = assign_splits(good["label"].to_numpy(), good["id"].to_numpy(dtype=object), dcfg,
                                         cfg.seed, len(source.class_names), source.test_prefix)
    ref = ray.put(assignment)
    tagged = source.dataset.map_batches(
        lambda b, a: _tag_split(b, ray.get(a) if isinstance(a, ray.ObjectRef) else a),
        fn_kwargs={"a": ref}, batch_format="numpy",
    ).materialize()

    storage.clear_dir(out)  # partial output of an interrupted run
    fs, base = storage.resolve(out)  # Ray Data writes through the filesystem itself
    counts: dict[str, dict[str, int]] = {}
    for split in PREPARED_SPLITS:
        n = sum(1 for v in assignment.values() if v[0] == split)
        if n == 0:
            counts[split] = {}
            continue
        drop = ["split", "label"] if split == UNLABELLED else ["split"]
        part = tagged.filter(expr=col("split") == split).drop_columns(drop)
        part.repartition(max(1, -(-n // dcfg.rows_per_shard))).write_parquet(
            f"{base}/{split}", filesystem=fs, max_rows_per_file=dcfg.rows_per_shard)
        c = Counter(v[1] for v in assignment.values() if v[0] == split)
        counts[split] = {str(k): int(c[k]) for k in sorted(c)}
    # its rows carry no label (-1): the manifest keeps only its size, apart from the labelled splits' class counts
    n_unlabelled = sum(counts.pop(UNLABELLED).values())

    kept = dcfg.classes if dcfg.classes is not None else list(range(len(source.class_names)))
    class_names = [source.class_names[i] for i in kept]
    shards = {s: [{"file": f, "rows": _rows(storage.join(out, f))} for f in storage.list_files(out)
                  if f.startswith(f"{s}/")] for s in PREPARED_SPLITS}
    image_shape = [int(v) for v in good["shape"].iloc[0].split("x")]
    return storage.write_manifest(
        out, cfg, stage, fingerprint,
        data_config=dcfg.model_dump(mode="json"),
        class_names=class_names,
        source_class_ids=kept,
        image_shape=image_shape,
        source=source.description,
        counts=counts,
        totals={s: sum(c.values()) for s, c in counts.items()},
        shards=shards,
        skipped={"count": len(skipped), "rows": skipped},
        ignored_files={"count": len(source.ignored), "files": source.ignored},
        excluded=excluded,
        unlabelled={"rows": n_unlabelled, "per_class": dcfg.unlabelled_per_class, "columns": ["image", "id"]},
        label_budget=label_budget(dcfg, counts),
    )


def _rows(path: str) -> int:
    import pyarrow.parquet as pq

    fs, p = storage.resolve(path)
    with fs.open_input_file(p) as f:
        return pq.ParquetFile(f).metadata.num_rows
