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

from transfuse import images, storage
from transfuse.config import FILE_SOURCES, MIN_PER_SPLIT, PREPARED_SPLITS, UNLABELLED, Config, DataConfig, digest
from transfuse.data.files import load_files_source
from transfuse.data.sources import LOADERS, DataError, Source
from transfuse.data import PREPARE


log = logging.getLogger(__name__)
_MAX_LISTED = 20


def load_source(cfg: DataConfig, policy: Any = None) -> Source:
    """The source's rows. A user's files (``FILE_SOURCES``) are decoded to ``policy`` (``images.ImagePolicy``)."""
    if cfg.source in FILE_SOURCES:
        if policy is None:
            raise DataError(f"data.source={cfg.source}: decoding files needs an image policy (size, channels)")
        return load_files_source(cfg, policy)
    return LOADERS[cfg.source](cfg)


def _shape_of(batch: dict[str, Any]) -> dict[str, Any]:
    return {"shape": np.array(["x".join(map(str, np.asarray(im).shape)) for im in batch["image"]], dtype=object)}


def scan(source: Source) -> "Any":
    """id, label, error and shape of every row, as a pandas frame (images stay in Ray, or in ``source.arrays``)."""
    if source.arrays is not None:
        import pandas as pd

        a = source.arrays
        shape = "x".join(map(str, a["image"].shape[1:]))
        return pd.DataFrame({"id": a["id"], "label": a["label"], "error": a["error"],
                             "shape": [shape if not e else "" for e in a["error"]]})
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


def image_policy(cfg: Config, dcfg: Optional[DataConfig] = None) -> images.ImagePolicy:
    """How a user's image files become the stored (and served) pixels: ``data.image_size`` (else the model's
    input size) square, in ``data.channels``, by ``data.resize``."""
    d = dcfg or cfg.data
    return images.ImagePolicy(size=d.image_size or cfg.model.input_size, channels=d.channels, resize=d.resize,
                              max_pixels=d.max_pixels)


def bad_files_error(rows: list[dict[str, str]], source: str) -> DataError:
    return DataError(f"{len(rows)} bad example(s) in {source} data (rerun with --set data.on_bad_file=skip to skip "
                     f"them and list them in the data manifest):\n{_listing(rows)}")


def class_ids(classes: Optional[list[Any]], class_names: list[str]) -> list[int]:
    """``data.classes`` (names, or the built-in sources' ids) as ids of the source's class list, in that order."""
    if classes is None:
        return list(range(len(class_names)))
    out, unknown = [], []
    for c in classes:
        if isinstance(c, int):
            (out if 0 <= c < len(class_names) else unknown).append(c)
        elif c in class_names:
            out.append(class_names.index(c))
        else:
            unknown.append(c)
    if unknown:
        raise DataError(f"data.classes names {unknown}, which the data does not have; its classes (ids 0.."
                        f"{len(class_names) - 1}): {class_names}")
    return out


def split_counts(n: int, cfg: DataConfig) -> dict[str, int]:
    """Images of a class of ``n`` in each split by the fractions: test (unless a set apart), val, holdout at
    least ``MIN_PER_SPLIT`` each where their fraction is above 0; train the rest."""
    counts = {}
    for s in ("test", "val", "holdout"):
        f = 0.0 if s == "test" and cfg.separate_test() else getattr(cfg.split, s)
        counts[s] = max(MIN_PER_SPLIT[s], int(round(f * n))) if f > 0 else 0
    counts["train"] = n - sum(counts.values())
    return counts


def min_images(cfg: DataConfig) -> int:
    """The fewest images of a class that the split fractions can divide: every split used gets its minimum and
    train keeps one (fractions near 1 round the other splits up past that)."""
    n = cfg.min_per_class()
    while split_counts(n, cfg)["train"] < MIN_PER_SPLIT["train"]:
        n += 1
    return n


def check_class_sizes(counts: dict[str, int], cfg: DataConfig) -> None:
    """Every class has enough labelled images for the split fractions, or a DataError naming each short class,
    its count and the minimum (``transfuse plan`` and ``transfuse run`` call it before Ray starts)."""
    if cfg.labelled_per_class is not None:
        return
    need = min_images(cfg)
    short = {c: n for c, n in counts.items() if n < need}
    if short:
        listed = ", ".join(f"{c!r} has {n}" for c, n in sorted(short.items(), key=lambda kv: kv[1]))
        fractions = ", ".join(f"{s} {getattr(cfg.split, s):g}" for s in ("val", "holdout", "test")
                              if not (s == "test" and cfg.separate_test()))
        least = ", ".join(f"{s} {n}" for s, n in MIN_PER_SPLIT.items() if not (s == "test" and cfg.separate_test()))
        raise DataError(f"too few images for the split: {listed}; each class needs at least {need} for the split "
                        f"fractions ({fractions}; each split at least: {least}). Add images to those classes, "
                        "leave them out with data.classes, or lower data.split's fractions")


def validate(meta: Any, class_names: list[str], cfg: DataConfig,
             found_bad: Optional[list[dict[str, str]]] = None) -> tuple[Any, list[dict[str, str]]]:
    """Bad rows (undecodable, label outside the class list, and ``found_bad``: rows the source found bad before
    decoding): raise, or return them as skipped."""
    n_classes = len(class_names)
    dup = meta["id"][meta["id"].duplicated()]
    if len(dup):
        raise DataError(f"ids must be unique; {len(dup)} repeated, e.g. {list(dup[:5])}")
    bad_label = (meta["label"] < 0) | (meta["label"] >= n_classes)
    bad = (meta["error"] != "") | bad_label
    rows = list(found_bad or []) + [
        {"id": r.id, "reason": r.error or f"label {r.label} outside the class list 0..{n_classes - 1} {class_names}"}
        for r in meta[bad].itertuples()
    ]
    if rows and cfg.on_bad_file == "error":
        raise bad_files_error(rows, cfg.source)
    good = meta[~bad]
    shapes = good.groupby("shape")["id"].agg(["count", "first"])
    if len(shapes) > 1:
        detail = "; ".join(f"{s}: {c} images, e.g. {f}" for s, (c, f) in shapes.iterrows())
        raise DataError(f"images have mixed shapes ({detail}). All images of a dataset must share one "
                        "H x W x C; resize them beforehand (the model's input_size resizes at training time).")
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
                  class_names: list[str], test_prefix: Optional[str] = None
                  ) -> tuple[dict[str, tuple[str, int]], dict[str, Any]]:
    """id -> (split, new label), per class in a seeded order; plus counts of what each cap excluded.

    A separate test set (ids starting with ``test_prefix``: data.test_path, or the source's own with
    test_from_source) is the test split whole; the fractions then split the rest into train, val and holdout."""
    keep = class_ids(cfg.classes, class_names)
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[str, int]] = {}
    excluded = Counter()
    excluded["not_in_classes"] = int(np.sum(~np.isin(labels, keep)))
    if cfg.separate_test() and not test_prefix:
        raise DataError(f"data.test_from_source: the {cfg.source} source has no test set of its own; set it false")
    for new_label, old in enumerate(keep):
        cls_ids = np.sort(ids[labels == old])
        if len(cls_ids) == 0:
            raise DataError(f"class {class_names[old]!r} has no examples; every class kept must have some")
        cls_ids = cls_ids[rng.permutation(len(cls_ids))]
        is_test = np.array([str(i).startswith(test_prefix) for i in cls_ids]) if cfg.separate_test() else None
        if cfg.labelled_per_class is not None:
            _budget_class(cls_ids, is_test, cfg, old, new_label, out, excluded)
            continue
        if is_test is not None:
            for i in cls_ids[is_test]:
                out[i] = ("test", new_label)
            cls_ids = cls_ids[~is_test]
        if cfg.limit_per_class is not None and len(cls_ids) > cfg.limit_per_class:
            excluded["limit_per_class"] += len(cls_ids) - cfg.limit_per_class
            cls_ids = cls_ids[: cfg.limit_per_class]
        check_class_sizes({class_names[old]: len(cls_ids)}, cfg)
        counts = split_counts(len(cls_ids), cfg)
        start = 0
        for s in ("test", "val", "holdout"):
            for i in cls_ids[start:start + counts[s]]:
                out[i] = (s, new_label)
            start += counts[s]
        train = cls_ids[start:]
        n_train = len(train)
        if cfg.train_per_class is not None:
            n_train = min(n_train, cfg.train_per_class)
        n_train = max(1, int(round(n_train * cfg.train_fraction)))
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
            stage: Optional[str] = None) -> dict[str, Any]:
    """Run the prepare stage (skipped when its manifest is complete for the same config)."""
    import ray
    from ray.data.expressions import col

    dcfg = data_cfg or cfg.data
    stage = stage or PREPARE.folder  # the pretrain stage prepares its own data into another folder
    out = storage.join(storage.run_dir(cfg), stage)
    policy = image_policy(cfg, dcfg) if dcfg.source in FILE_SOURCES else None
    inputs = {"data": dcfg.model_dump(mode="json"), "seed": cfg.seed}
    fingerprint = digest(inputs if policy is None else {**inputs, "image_policy": policy.to_dict()})
    if storage.skip_complete(out, fingerprint, "prepare", force):
        return storage.read_manifest(out)

    source = load_source(dcfg, policy)
    meta = scan(source)
    good, skipped = validate(meta, source.class_names, dcfg, source.bad)
    assignment, excluded = assign_splits(good["label"].to_numpy(), good["id"].to_numpy(dtype=object), dcfg,
                                         cfg.seed, source.class_names, source.test_prefix)
    storage.clear_dir(out)  # partial output of an interrupted run
    fs, base = storage.resolve(out)  # Ray Data and pyarrow write through the filesystem itself
    if source.arrays is not None:
        _write_arrays(source.arrays, assignment, fs, base, dcfg.rows_per_shard)
    else:
        ref = ray.put(assignment)
        tagged = source.dataset.map_batches(
            lambda b, a: _tag_split(b, ray.get(a) if isinstance(a, ray.ObjectRef) else a),
            fn_kwargs={"a": ref}, batch_format="numpy",
        ).materialize()
    counts: dict[str, dict[str, int]] = {}
    for split in PREPARED_SPLITS:
        n = sum(1 for v in assignment.values() if v[0] == split)
        if n == 0:
            counts[split] = {}
            continue
        if source.arrays is None:
            drop = ["split", "label"] if split == UNLABELLED else ["split"]
            part = tagged.filter(expr=col("split") == split).drop_columns(drop)
            part.repartition(max(1, -(-n // dcfg.rows_per_shard))).write_parquet(
                f"{base}/{split}", filesystem=fs, max_rows_per_file=dcfg.rows_per_shard)
        c = Counter(v[1] for v in assignment.values() if v[0] == split)
        counts[split] = {str(k): int(c[k]) for k in sorted(c)}
    # its rows carry no label (-1): the manifest keeps only its size, apart from the labelled splits' class counts
    n_unlabelled = sum(counts.pop(UNLABELLED).values())

    kept = class_ids(dcfg.classes, source.class_names)
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
        # how a file becomes these pixels (a user's files): the bundle carries it so that served images match
        image_policy=source.description.get("image_policy"),
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


def _write_arrays(arrays: dict[str, np.ndarray], assignment: dict[str, tuple[str, int]], fs: Any, base: str,
                  rows_per_shard: int) -> None:
    """Rows decoded in this process, written split by split with pyarrow in shards of ``rows_per_shard`` (the
    same canonical schema Ray Data writes)."""
    import pyarrow.parquet as pq

    from transfuse.data.sources import _tensor_table

    from concurrent.futures import ThreadPoolExecutor

    tags = [assignment.get(i, ("", -1)) for i in arrays["id"]]
    shards: list[tuple[str, int, np.ndarray]] = []
    for split in PREPARED_SPLITS:
        idx = np.array([k for k, t in enumerate(tags) if t[0] == split], np.int64)
        if len(idx) == 0:
            continue
        idx = idx[np.argsort(arrays["id"][idx], kind="stable")]
        fs.create_dir(f"{base}/{split}", recursive=True)
        shards += [(split, j, idx[start:start + rows_per_shard])
                   for j, start in enumerate(range(0, len(idx), rows_per_shard))]

    def write(shard: tuple[str, int, np.ndarray]) -> None:
        split, j, chunk = shard
        table = _tensor_table(arrays["image"][chunk], np.array([tags[k][1] for k in chunk], np.int64),
                              [str(i) for i in arrays["id"][chunk]])
        if split == UNLABELLED:
            table = table.drop_columns(["label"])
        pq.write_table(table, f"{base}/{split}/part-{j:05d}.parquet", filesystem=fs)

    with ThreadPoolExecutor(4) as pool:  # pyarrow encodes outside the GIL: shards in parallel
        list(pool.map(write, shards))


def _rows(path: str) -> int:
    import pyarrow.parquet as pq

    fs, p = storage.resolve(path)
    with fs.open_input_file(p) as f:
        return pq.ParquetFile(f).metadata.num_rows
