"""Fine-tuning on Ray Train: phase 1 frozen backbone, phase 2 the last k layers unfrozen.

Three layers, as Ray's own examples: ``transfuse.finetune.loop.train_func`` runs on every worker (tf_keras under
``MultiWorkerMirroredStrategy``, each worker reading its shard with ``ray.train.get_dataset_shard``);
``build_trainer(...)`` turns the config into a ``TensorflowTrainer``; ``finetune(...)`` runs it and writes the
member directory (model_spec.json, model.weights.h5, metrics.json, predictions/, embeddings/, manifest.json).
Ray Tune reuses ``build_trainer`` from a trial function with per-trial overrides and a
``TuneReportCallback`` in ``run_config_extra['callbacks']``.

With ``train.cache_frozen`` (default), each phase trains only the part above its cut point on activations
cached once (``transfuse.finetune.cache``); the full model's layers are shared with that top part, so the saved
weights are the full model's. Every epoch reports ``epoch`` (global, across both phases), ``phase``,
``loss``, ``accuracy``, ``val_loss``, ``val_accuracy`` and a checkpoint (weights + loop state + optimizer
state + the phase's best weights so far), so ``FailureConfig(max_failures)`` and a rerun with the same storage
path and name resume from it with the same Adam state. With ``train.restore_best_weights`` (default) each
phase ends with the weights of its best epoch by validation loss; the checkpoint of a phase's last epoch, the
metrics reported with it and the saved member are that best epoch's.

Class weights (``data.class_weight``): the run decides once from the data manifest's train counts
(``class_weights.decision``); when on, the training loss weights each row by its class's weight on the train
split (``LoopConfig.class_weights``), and ``metrics.json`` and the manifest record the decision and the weights.
Every split's metrics include balanced accuracy, macro F1 and recall per class (by class name).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)
from transfuse import class_weights, storage
from transfuse.config import Config, TrainConfig
from transfuse.data import PREPARE
from transfuse.finetune import FINETUNE, SCRATCH
from transfuse.finetune.loop import (BEST_WEIGHTS, LoopConfig, LoopHooks, LoopState, Phase, TrainError, load_arrays,
                                     load_checkpoint_weights, train_func)
from transfuse.stage import METRICS, read_metrics

log = logging.getLogger(__name__)

TRAIN_DIR = ".ray_train"  # Ray Train's storage under the member dir (dot: not listed in the manifest)
INIT_DIR = ".init"  # initial full-model weights shared by the cache builder and the workers
OVERRIDES = ("unfreeze", "unfreeze_unit", "lr_frozen", "lr_unfrozen", "head_dense", "dropout", "seed",
             "early_stopping_patience", "early_stopping_start", "epochs_frozen", "epochs_unfrozen", "batch_size")


@dataclass
class RunInputs:
    """What ``prepare_run`` made ready for one training run: the model spec, its initial weights file, the phases,
    the datasets they read (Ray Data, by name), and where the prepared data lives."""

    spec: dict[str, Any]
    init_weights: str
    phases: list[Phase]
    datasets: dict[str, Any]
    cached: bool
    in_memory: bool
    data_dir: str
    class_weight: Optional[dict[str, Any]] = None  # the run's decision (class_weights.decision)


def mixed_policy(setting: str, use_gpu: bool) -> str:
    """Keras dtype policy: auto -> mixed_float16 with GPUs, float32 on CPUs."""
    if setting == "auto":
        return "mixed_float16" if use_gpu else "float32"
    return "float32" if setting == "off" else setting


# ----------------------------------------------------------------------------------------------- driver


def effective(cfg: Config, overrides: Optional[dict[str, Any]] = None) -> Config:
    """A copy of ``cfg`` with Tune's per-trial overrides applied to model/train (validated)."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise TrainError(f"unknown overrides {unknown}; allowed: {list(OVERRIDES)}")
    data = cfg.model_dump(mode="json")
    for k, v in overrides.items():
        if k == "unfreeze":
            data["model"]["unfreeze"] = int(v)
        elif k == "unfreeze_unit":
            data["model"]["unfreeze_unit"] = v
        elif k == "head_dense":
            data["model"]["head"]["dense"] = [int(u) for u in (v if isinstance(v, (list, tuple)) else [v]) if int(u)]
        elif k == "dropout":
            data["model"]["head"]["dropout"] = float(v)
        elif k == "seed":
            data["train"]["seed"] = int(v)
        else:
            data["train"][k] = v
    return Config.model_validate(data)


def _data_dir(cfg: Config) -> str:
    return PREPARE.dir(cfg)


def loop_class_weights(decision: dict[str, Any], class_names: list[str]) -> Optional[list[float]]:
    """The decision's weights in class order 0..K-1 for the training loop (None: off)."""
    if not decision.get("on"):
        return None
    return [float(decision["weights"][str(c)]) for c in class_names]


def prepare_run(cfg: Config, out_dir: str, *, data_dir: Optional[str] = None,
                weights: Optional[str] = None) -> RunInputs:
    """Make one training run ready: writes the initial weights under ``out_dir``, builds the frozen-activation
    cache when ``train.cache_frozen`` (``transfuse.finetune.cache``), and returns the spec, phases and datasets the
    workers read. (``transfuse.plan`` is the dry run that writes nothing.)

    ``weights`` overrides ``cfg.model.weights`` (the scratch baseline passes "none").
    """
    import tensorflow as tf

    from transfuse.finetune import cache

    from transfuse.finetune import models
    from transfuse.data import data_manifest, read_split_numpy, training_rows
    from transfuse.data import in_memory
    from transfuse.inference import PreprocessSpec, preprocess

    data_dir = data_dir or _data_dir(cfg)
    manifest = data_manifest(data_dir)
    class_names = manifest["class_names"]
    t = cfg.train
    spec = models.model_spec(cfg.model, len(class_names), class_names, seed=t.seed)
    names = spec["backbone_layers"]
    init_path = storage.join(out_dir, INIT_DIR, "initial.weights.h5")
    tf.keras.mixed_precision.set_global_policy("float32")
    full = models.build_model(spec, models.resolve_weights(weights or cfg.model.weights, storage.run_dir(cfg)))
    models.save_weights(full, init_path)

    phases = [Phase("frozen", 0, t.epochs_frozen, t.lr_frozen, names[-1]),
              Phase("unfrozen", spec["unfreeze"], t.epochs_unfrozen, t.lr_unfrozen, spec["cut_layer"])]
    phases = [p for p in phases if p.epochs > 0]
    cached = t.cache_frozen
    datasets: dict[str, Any] = {}
    if cached:
        cuts = {}
        for p in phases:
            if p.cut_layer is not None:
                models.split_model(full, p.cut_layer)  # a clear error now for a cut inside a block
                cuts[cache.cache_key(spec, p.cut_layer, cache.trunk_digest(full, p.cut_layer),
                                     manifest.get("fingerprint", ""))] = p.cut_layer
        dirs = cache.ensure_cache(cfg, data_dir, spec, init_path, cuts, actors=t.cache_actors,
                                  batch_size=t.cache_batch_size, use_gpu=t.use_gpu, actor_cpus=t.cache_actor_cpus,
                                  in_driver_max_rows=t.cache_in_driver_max_rows) if cuts else {}
    pspec = PreprocessSpec(**spec["preprocess"])
    # image phases read stored rows that each worker preprocesses (and augments) per batch, except small data
    # without augmentation: preprocessed here once
    rows = bool(t.augment.flip or t.augment.pad_crop) or not t.materialize
    for p in phases:
        tag = p.cut_layer if cached and p.cut_layer is not None else "image"
        p.train, p.val = f"train_{tag}", f"val_{tag}"
        p.images = tag == "image" and rows
        if p.train in datasets:
            continue
        for split in ("train", "val"):
            if p.images:
                ds = training_rows(data_dir, split)
                if t.materialize:
                    ds = ds.materialize()  # small data augmented per epoch: its uint8 rows, no read tasks per epoch
            elif t.materialize:
                # small data: read (and preprocess) here once, keep it in the object store for every epoch;
                # no per-epoch Ray Data tasks (their worker start-up dominated on a loaded 2-core machine)
                if tag == "image":
                    images, labels, _ = read_split_numpy(data_dir, split)
                    x = preprocess(images, pspec)
                else:
                    x, labels = cache.read_cache_numpy(dirs[p.cut_layer], split)
                ds = in_memory(x, labels)
            else:
                ds = cache.read_cache(dirs[p.cut_layer], split).select_columns(["x", "label"])
            datasets[f"{split}_{tag}"] = ds
    # small data without per-epoch augmentation (no rows): each worker reads its shard once and keeps it
    return RunInputs(spec, init_path, phases, datasets, cached, not rows, data_dir,
                     class_weights.decision(cfg.data, manifest))


def scaling_config(t: TrainConfig) -> Any:
    """Ray Train's ScalingConfig from the train config: workers, GPUs, and resources per worker."""
    from ray.train import ScalingConfig

    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    return ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources)


def make_trainer(t: TrainConfig, loop: Any, datasets: dict[str, Any], out_dir: str, *,
                 name: str = TRAIN_DIR, run_config_extra: Optional[dict[str, Any]] = None,
                 func: Callable[[dict[str, Any]], None] = train_func) -> Any:
    """A TensorflowTrainer running ``func`` (``train_func``, or the distill stage's ``student_loop``: both the
    worker loop of ``transfuse.finetune.loop``) with ``{"loop": loop}``, ``loop`` that function's typed config
    (``LoopConfig``, ``StudentConfig``): the one place train config becomes Ray's objects."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.tensorflow import TensorflowTrainer

    fs, path = storage.resolve(out_dir)
    run_config = RunConfig(
        name=name, storage_path=path, storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=t.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),  # the latest is what resumes; one spare
        worker_runtime_env=environment.runtime_env(), **dict(run_config_extra or {}))
    return TensorflowTrainer(
        func, train_loop_config={"loop": loop},
        scaling_config=scaling_config(t),
        run_config=run_config, datasets=datasets)


def build_trainer(cfg: Config, out_dir: str, overrides: Optional[dict[str, Any]] = None, *,
                  run_config_extra: Optional[dict[str, Any]] = None, data_dir: Optional[str] = None,
                  weights: Optional[str] = None, name: str = TRAIN_DIR, test_hooks: Optional[dict] = None
                  ) -> tuple[Any, RunInputs, Config]:
    """(TensorflowTrainer, its RunInputs, effective config) for ``cfg`` + per-trial ``overrides``.

    ``run_config_extra``: extra ``RunConfig`` keyword arguments (e.g. ``callbacks=[TuneReportCallback()]``).
    Checkpoints go to ``<out_dir>/<name>/``; running again with the same out_dir and name resumes.
    """
    cfg = effective(cfg, overrides)
    t = cfg.train
    p = prepare_run(cfg, out_dir, data_dir=data_dir, weights=weights)
    loop = LoopConfig(spec=p.spec, init_weights=p.init_weights, phases=p.phases, batch_size=t.batch_size,
                      patience=t.early_stopping_patience, seed=t.seed,
                      policy=mixed_policy(t.mixed_precision, t.use_gpu), cached=p.cached, in_memory=p.in_memory,
                      patience_start=t.early_stopping_start, restore_best=t.restore_best_weights,
                      # from random weights BatchNorm learns its statistics (training mode, as the pretrain
                      # stage); transferred backbones keep theirs (inference mode, however deep the unfreeze)
                      bn_training=(weights or cfg.model.weights) == "none", op_determinism=t.op_determinism,
                      augment=t.augment,
                      hooks=LoopHooks(**(test_hooks or {})),
                      class_weights=loop_class_weights(p.class_weight, p.spec["class_names"]))
    trainer = make_trainer(t, loop, p.datasets, out_dir, name=name, run_config_extra=run_config_extra)
    return trainer, p, cfg


def _write_split_outputs(out_dir: str, outs: dict[str, dict[str, np.ndarray]], splits: list[str],
                         num_classes: int, class_names: Optional[list[str]] = None) -> dict[str, dict]:
    from transfuse.finetune.predictions import write_member_split
    from transfuse.metrics import evaluate

    results = {}
    for split in splits:
        a = outs[split]
        probs = a["out0"].reshape(len(a["id"]), num_classes).astype(np.float32)
        write_member_split(out_dir, "embeddings", split, a["id"], a["label"], a["out1"])
        if split != "train":
            write_member_split(out_dir, "predictions", split, a["id"], a["label"], probs)
        if split != "train" and len(a["label"]):
            results[split] = evaluate(probs, a["label"], class_names)
    return results


def finalize(cfg: Config, out_dir: str, spec: dict[str, Any], data_dir: str, checkpoint: Any, *, fingerprint: str,
             extra_manifest: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Write the member dir from the last checkpoint: spec, weights, metrics, predictions, embeddings, manifest."""
    import tensorflow as tf

    from transfuse.finetune import cache

    from transfuse.finetune import models

    with checkpoint.as_directory() as d:
        state = LoopState.read(d)
        tf.keras.mixed_precision.set_global_policy("float32")
        model = models.build_model(spec, None)
        load_checkpoint_weights(model, d)
        best = os.path.join(d, BEST_WEIGHTS)
        if cfg.train.restore_best_weights and os.path.exists(best):
            # a run stopped inside a phase (e.g. by ASHA): its phase ends here, at its best epoch so far
            model.set_weights(load_arrays(best))
            state.restored.append({"phase": state.history[-1]["phase"], "best_epoch": state.best_epoch,
                                   "last_epoch": state.epoch, "val_loss": state.best})
    models.save_member(model, spec, out_dir)
    weights = storage.join(out_dir, models.WEIGHTS_FILE)
    t = cfg.train
    splits = ["train", "val", "test", "holdout"]
    outs = cache.apply_model_numpy(data_dir, splits, spec, weights, ["probs", "embedding"],
                                   actors=t.cache_actors, in_driver_max_rows=t.cache_in_driver_max_rows,
                                   batch_size=t.cache_batch_size, use_gpu=t.use_gpu, actor_cpus=t.cache_actor_cpus)
    from transfuse.data import data_manifest

    evals = _write_split_outputs(out_dir, outs, splits, spec["num_classes"], spec.get("class_names"))
    weighting = class_weights.decision(cfg.data, data_manifest(data_dir))  # what the loop got (same manifest)
    # restored: per phase whose last epoch was not its best, the epoch whose weights were kept instead
    metrics = {"history": state.history, **evals, "epochs": state.epoch, "restored": state.restored,
               "class_weight": weighting}
    storage.write_json(storage.join(out_dir, METRICS), metrics)
    storage.write_manifest(out_dir, cfg, FINETUNE.folder, fingerprint, metrics={k: v for k, v in evals.items()},
                           epochs=state.epoch, class_weight=weighting, **(extra_manifest or {}))
    return metrics


def _fingerprint(eff: Config, weights: Optional[str]) -> str:
    return eff.fingerprint("data", "model", "train") + ("" if weights is None else f"-{weights}")


def latest_checkpoint(out_dir: str, name: str = TRAIN_DIR) -> Any:
    """The newest Ray Train checkpoint under ``<out_dir>/<name>/`` (None when there is none)."""
    import ray.train

    base = storage.join(out_dir, name)
    dirs = [d for d in storage.list_dirs(base) if d.startswith("checkpoint_")]
    if not dirs:
        return None
    fs, p = storage.resolve(base)
    return ray.train.Checkpoint(path=f"{p}/{dirs[-1]}", filesystem=fs)


def finalize_member(cfg: Config, out_dir: str, overrides: Optional[dict[str, Any]] = None, *,
                    data_dir: Optional[str] = None, weights: Optional[str] = None) -> dict[str, Any]:
    """Write the member dir from the newest checkpoint of a run that did not finish (e.g. a Tune trial that
    ASHA stopped): same outputs as ``finetune``; the history ends where that run stopped."""
    from transfuse.finetune import models
    from transfuse.data import data_manifest

    eff = effective(cfg, overrides)
    data_dir = data_dir or _data_dir(eff)
    names = data_manifest(data_dir)["class_names"]
    spec = models.model_spec(eff.model, len(names), names, seed=eff.train.seed)
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        raise TrainError(f"no checkpoint under {storage.join(out_dir, TRAIN_DIR)}: nothing to finalize")
    return finalize(eff, out_dir, spec, data_dir, ckpt, fingerprint=_fingerprint(eff, weights))


def finetune(cfg: Config, out_dir: Optional[str] = None, overrides: Optional[dict[str, Any]] = None, *,
             resume: bool = False, force: bool = False, data_dir: Optional[str] = None,
             weights: Optional[str] = None, run_config_extra: Optional[dict[str, Any]] = None,
             test_hooks: Optional[dict] = None) -> dict[str, Any]:
    """Fine-tune and write the member dir ``out_dir`` (default ``<run>/finetune``); returns metrics.json.

    Skipped when its manifest is complete for the same config (unless ``force``). Without ``resume`` an
    earlier, unfinished Ray Train run in ``out_dir`` is discarded; with it, training continues from its
    last checkpoint.
    """
    out_dir = out_dir or FINETUNE.dir(cfg)
    eff = effective(cfg, overrides)
    fp = _fingerprint(eff, weights)
    if storage.skip_complete(out_dir, fp, FINETUNE.folder, force):
        return read_metrics(out_dir)
    train_path = storage.join(out_dir, TRAIN_DIR)
    if not resume:
        storage.delete(train_path)
    trainer, p, eff = build_trainer(cfg, out_dir, overrides, run_config_extra=run_config_extra,
                                    data_dir=data_dir, weights=weights, test_hooks=test_hooks)
    result = trainer.fit()
    if result.checkpoint is None:
        raise TrainError(f"training finished without a checkpoint in {train_path} (no epochs ran?)")
    return finalize(eff, out_dir, p.spec, p.data_dir, result.checkpoint, fingerprint=fp)


def scratch_overrides(cfg: Config) -> dict[str, Any]:
    """The same network from random weights with the same budget: every layer trains at ``train.lr_scratch``
    (default: the phase-1 rate; a from-scratch net needs a higher rate than fine-tuning) for up to all the
    epochs, keeping its best epoch by val loss as every run does. Only the second half is monitored (early
    stopping and the best epoch, as Keras's ``start_from_epoch``): from random weights the val loss often rises
    for a while before it falls, and with the whole run monitored a first, chance-level epoch could be the one
    kept."""
    from transfuse.finetune import models

    n = models.unfreeze_units(cfg.model)
    t = cfg.train
    epochs = t.epochs_frozen + t.epochs_unfrozen
    return {"unfreeze": n, "epochs_frozen": 0, "epochs_unfrozen": epochs,
            "lr_unfrozen": t.lr_scratch if t.lr_scratch is not None else t.lr_frozen,
            "early_stopping_start": epochs // 2}


def transfer_vs_scratch(cfg: Config, *, force: bool = False) -> dict[str, Any]:
    """Train the scratch baseline into ``<run>/scratch`` and compare its test metrics with ``<run>/finetune``'s
    and with a logistic regression on the pixels fitted on the same labels (``baselines.pixels_logreg``)."""
    from transfuse.finetune.baselines import TRANSFER_FILE, budget_splits, pixels_logreg

    transfer = FINETUNE.metrics(cfg)
    if transfer is None:
        raise TrainError(f"the scratch baseline compares with the finetune stage: no {FINETUNE.metrics_path(cfg)}; "
                         "run the finetune stage first")
    scratch = finetune(cfg, SCRATCH.dir(cfg), scratch_overrides(cfg), weights="none", force=force)
    out = {"transfer": transfer.get("test", {}), "scratch": scratch.get("test", {}),
           "pixels_logreg": pixels_logreg(*budget_splits(PREPARE.dir(cfg)),
                                          class_weighted=bool(scratch.get("class_weight", {}).get("on"))),
           "weights": cfg.model.weights, "unfreeze": cfg.model.unfreeze,
           "epochs": cfg.train.epochs_frozen + cfg.train.epochs_unfrozen}
    storage.write_json(storage.join(storage.run_dir(cfg), TRANSFER_FILE), out)
    return out
