"""The prepare stage's plan: the data source, its classes and splits, from the files' headers alone (no Ray, nothing
decoded or downloaded)."""

from __future__ import annotations

from typing import Any, Optional

from transfuse.config import FILE_SOURCES, Config
from transfuse.data.sources import DataError
from transfuse.errors import TransfuseError

# classes of the built-in sources when data.classes does not pick a subset (image folders and parquet files only
# know theirs once prepare has read them)
SOURCE_CLASSES = {"cifar10": 10, "fashion_mnist": 10, "digits": 10}


def num_classes(cfg: Config, data: Optional[dict[str, Any]] = None) -> int:
    """Classes of the target task: the chosen subset, the files' classes (``data``: their data plan), the
    built-in source's count, or the prepared data's."""
    if cfg.data.classes:
        return len(cfg.data.classes)
    if data is not None and "classes" in data and isinstance(data["classes"], dict):
        return len(data["classes"])
    if cfg.data.source in SOURCE_CLASSES:
        return SOURCE_CLASSES[cfg.data.source]
    from transfuse.data import PREPARE

    manifest = PREPARE.manifest(cfg)
    if manifest is not None:
        return len(manifest["class_names"])
    raise DataError(f"data.source {cfg.data.source!r}: its classes are known once prepare has read the data; run "
                    f"`python -m jobs.prepare` first or list them in data.classes")


def files_plan(cfg: Config) -> dict[str, Any]:
    """A user's files from their headers alone (nothing decoded, no Ray): the classes with their counts and how
    each is split, the sizes, formats and modes seen, the files skipped and the bad ones. ``problems`` lists what
    would stop the run (``check_data``)."""
    from collections import Counter

    from transfuse.data import files
    from transfuse.data.stage import class_ids, check_class_sizes, image_policy, split_counts

    d = cfg.data
    listing = files.list_files(d)
    found = files.inspect_all(listing, d.max_pixels)
    bad = listing.bad + [{"id": r["id"], "reason": r["error"]} for r in found if r.get("error")]
    bad_ids = {b["id"] for b in bad}
    counts: Counter = Counter()
    test_counts: Counter = Counter()
    for r in found:
        if r["id"] not in bad_ids or d.on_bad_file == "error":
            (test_counts if r["id"].startswith(files.TEST_PREFIX) else counts)[r["class"]] += 1
    kept = [listing.classes[i] for i in class_ids(d.classes, listing.classes)]
    ok = [r for r in found if not r.get("error")]
    problems: list[str] = []
    try:
        check_class_sizes({c: counts[c] for c in kept}, d)
    except TransfuseError as e:
        problems.append(str(e))
    if bad and d.on_bad_file == "error":
        from transfuse.data.stage import bad_files_error

        problems.append(str(bad_files_error(bad, d.source)))
    largest, smallest = max(counts[c] for c in kept), max(1, min(counts[c] for c in kept))

    def spread(key: str) -> dict[str, int]:
        v = sorted(r[key] for r in ok)
        return {"min": v[0], "median": v[len(v) // 2], "max": v[-1]} if v else {}

    return {
        "source": d.source, "path": d.path, "test_path": d.test_path,
        "classes": {c: {"images": counts[c], **({"test": test_counts[c]} if d.test_path else {}),
                        "split": split_counts(counts[c], d) if d.labelled_per_class is None else "label budget"}
                    for c in kept},
        "left_out": [c for c in listing.classes if c not in kept],
        "imbalance": f"{largest / smallest:.1f}x (largest / smallest class)",
        "width": spread("width"), "height": spread("height"),
        "formats": dict(Counter(r["format"] for r in ok)), "modes": dict(Counter(r["mode"] for r in ok)),
        "image_policy": image_policy(cfg).to_dict(),
        "skipped": {"count": len(listing.ignored), "reasons": dict(Counter(i["reason"] for i in listing.ignored))},
        "bad_files": bad, "on_bad_file": d.on_bad_file, "problems": problems,
        "output": _output(cfg),
    }


def check_data(data: dict[str, Any]) -> None:
    """Raise the data plan's problems (too few images in a class, bad files without data.on_bad_file=skip)."""
    if data.get("problems"):
        raise DataError("\n".join(data["problems"]))


def data_plan(cfg: Config) -> dict[str, Any]:
    from transfuse.data import sources

    d = cfg.data
    if d.source in FILE_SOURCES:
        return files_plan(cfg)
    fetch = None
    if d.source == "cifar10" and d.download:
        local = sources.find_dir(d.path, sources.CIFAR10_DIRS, ("data_batch_1", "batches.meta"))
        fetch = None if local else f"skipped by the plan: prepare downloads {sources.CIFAR10_URL}"
    if d.labelled_per_class is not None:  # one label budget: what every model learns from
        split: dict[str, Any] = {"label_budget_per_class": d.labelled_per_class, **d.budget_counts(),
                                 "test": d.test_per_class,
                                 "test_from": "the source's own test set" if d.test_from_source else "the pool"}
    else:
        split = d.split.model_dump()
    return {"source": d.source, "path": d.path, "download": fetch, "classes": d.classes or "all",
            "split": split, "rows_per_shard": d.rows_per_shard, "output": _output(cfg)}


def _output(cfg: Config) -> str:
    from transfuse.data import PREPARE

    return PREPARE.dir(cfg)
