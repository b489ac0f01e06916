"""Fine-tuning on Ray Train: phase 1 frozen backbone, phase 2 the last k layers unfrozen.

Three layers, as Ray's own examples: ``train_func(config)`` runs on every worker (tf_keras under
``MultiWorkerMirroredStrategy``, each worker reading its shard with ``ray.train.get_dataset_shard``);
``build_trainer(...)`` turns the config into a ``TensorflowTrainer``; ``finetune(...)`` runs it and writes the
member directory (model_spec.json, model.weights.h5, metrics.json, predictions/, embeddings/, manifest.json).
Ray Tune reuses ``build_trainer`` from a trial function with per-trial overrides and a
``TuneReportCallback`` in ``run_config_extra['callbacks']``.

With ``train.cache_frozen`` (default), each phase trains only the part above its cut point on activations
cached once (``transfuse.cache``); the full model's layers are shared with that top part, so the saved
weights are the full model's. Every epoch reports ``epoch`` (global, across both phases), ``phase``,
``loss``, ``accuracy``, ``val_loss``, ``val_accuracy`` and a checkpoint (weights + loop state + optimizer
state + the phase's best weights so far), so ``FailureConfig(max_failures)`` and a rerun with the same storage
path and name resume from it with the same Adam state. With ``train.restore_best_weights`` (default) each
phase ends with the weights of its best epoch by validation loss; the checkpoint of a phase's last epoch, the
metrics reported with it and the saved member are that best epoch's.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
from typing import Any, Callable, Optional

import numpy as np

from transfuse import runtime  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)
from transfuse import storage
from transfuse.config import Config
from transfuse.errors import TransfuseError

log = logging.getLogger(__name__)

STAGE = "finetune"
TRAIN_DIR = ".ray_train"  # Ray Train's storage under the member dir (dot: not listed in the manifest)
INIT_DIR = ".init"  # initial full-model weights shared by the cache builder and the workers
STATE_FILE = "state.json"
CKPT_WEIGHTS = "model.weights.npz"  # every weight array, in the model's order
LEGACY_CKPT_WEIGHTS = "model.weights.h5"  # checkpoints written before the .npz
BEST_WEIGHTS = "best.weights.npz"  # the phase's best epoch so far, when not the checkpoint's own weights
OPT_STATE = "optimizer.npz"  # the phase's optimizer variables (Adam: step, m, v), mid-phase checkpoints only
# Tune overrides accepted by build_trainer: per-trial values that change the model or the schedule
OVERRIDES = ("unfreeze", "unfreeze_unit", "lr_frozen", "lr_unfrozen", "head_dense", "dropout", "seed",
             "early_stopping_patience", "early_stopping_start", "epochs_frozen", "epochs_unfrozen", "batch_size")


class TrainError(TransfuseError, ValueError):
    """A training option is invalid."""


def mixed_policy(setting: str, use_gpu: bool) -> str:
    """Keras dtype policy: auto -> mixed_float16 with GPUs, float32 on CPUs."""
    if setting == "auto":
        return "mixed_float16" if use_gpu else "float32"
    return "float32" if setting == "off" else setting


# ----------------------------------------------------------------------------------------------- worker


def _phase_model(full: Any, phase: dict[str, Any], cached: bool) -> Any:
    """The model one phase trains: the full model, or only its part above the cut (trained on the cache)."""
    from transfuse import models

    if phase["cut_layer"] is None and phase["unfreeze"] >= len(models.backbone_layer_names(models.get_backbone(full))):
        for layer in full.layers:
            layer.trainable = True  # everything trains (pretraining, scratch)
        return full
    models.set_unfreeze(full, phase["unfreeze"])
    if cached and phase["cut_layer"] is not None:
        _, top = models.split_model(full, phase["cut_layer"])
        return top
    return full


def _tf_dataset(shard: Any, batch_size: int, shuffle: bool, seed: int, in_memory: bool,
                epoch: Callable[[], int] = lambda: 0) -> Any:
    """This worker's shard as a tf.data pipeline. ``in_memory`` (``train.materialize``: small data): the shard is
    read once into arrays and every epoch iterates those (a Ray Data pass per epoch cost 0.3-1 s of each 4-step
    epoch of the default's head), shuffled per epoch from (``seed``, ``epoch()``); otherwise it streams from Ray
    Data every epoch. The arrays are fed through a generator, as Ray's ``to_tf`` does: a ``from_tensor_slices``
    dataset (known cardinality) did not train at all under MultiWorkerMirroredStrategy with two workers here (val
    loss flat at chance in test_phase_ends_with_its_best_epoch[cached])."""
    import tensorflow as tf

    if in_memory:
        xs, ys = [], []
        for batch in shard.iter_batches(batch_size=4096, batch_format="numpy"):
            xs.append(np.asarray(batch["x"], dtype=np.float32))
            ys.append(np.asarray(batch["label"]))
        if not xs:
            raise TrainError("this worker's data shard is empty: fewer rows than workers?")
        x, y = np.concatenate(xs), np.concatenate(ys)

        def batches() -> Any:
            order = np.random.default_rng([seed, epoch()]).permutation(len(x)) if shuffle else np.arange(len(x))
            for i in range(0, len(x), batch_size):
                yield x[order[i:i + batch_size]], y[order[i:i + batch_size]]

        ds = tf.data.Dataset.from_generator(batches, output_signature=(
            tf.TensorSpec((None, *x.shape[1:]), tf.float32), tf.TensorSpec((None,), tf.as_dtype(y.dtype))))
    else:
        ds = shard.to_tf(feature_columns="x", label_columns="label", batch_size=batch_size,
                         local_shuffle_buffer_size=4 * batch_size if shuffle else None,
                         local_shuffle_seed=seed if shuffle else None)
    options = tf.data.Options()
    # each worker already has its own shard: Keras must not shard it again
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)


def save_checkpoint_weights(model: Any, d: str) -> None:
    """A checkpoint's model weights: every weight array in the model's order, as a plain .npz (0.06 s for
    EfficientNet-Lite0 where Keras's .h5 took 0.5 s, once per epoch)."""
    _save_arrays(os.path.join(d, CKPT_WEIGHTS), model.get_weights())


def load_checkpoint_weights(model: Any, d: str) -> None:
    """Load what ``save_checkpoint_weights`` wrote (or a checkpoint of an earlier version: Keras .h5)."""
    if os.path.exists(os.path.join(d, CKPT_WEIGHTS)):
        model.set_weights(_load_arrays(os.path.join(d, CKPT_WEIGHTS)))
    else:
        model.load_weights(os.path.join(d, LEGACY_CKPT_WEIGHTS))


def _save_arrays(path: str, arrays: list[np.ndarray]) -> None:
    """Arrays in order as a plain .npz (a checkpoint-private file; loaded with allow_pickle=False)."""
    np.savez(path, **{f"a{i:05d}": a for i, a in enumerate(arrays)})


def _load_arrays(path: str) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return [z[k] for k in sorted(z.files)]


def _restore_optimizer(model: Any, arrays: list[np.ndarray], strategy: Any) -> bool:
    """Load a checkpointed optimizer state (Adam's step, m and v) into ``model``'s freshly compiled optimizer.

    The optimizer's slots are created first (``build`` on the trainable variables, in the strategy's scope),
    then assigned; a state whose shapes do not match (a different model or trainable set) is refused and the
    phase continues with a fresh optimizer. Returns whether the state was loaded.
    """
    opt = model.optimizer
    try:
        with strategy.scope():
            opt.build(model.trainable_variables)
        variables = list(opt.variables)
    except (AttributeError, TypeError, ValueError) as e:  # e.g. an optimizer wrapper without build()
        log.warning("cannot restore the optimizer state (%s): continuing with a fresh optimizer", e)
        return False
    if len(variables) != len(arrays) or any(tuple(v.shape) != a.shape for v, a in zip(variables, arrays)):
        log.warning("optimizer state in the checkpoint does not match this model (%d vs %d variables): "
                    "continuing with a fresh optimizer", len(arrays), len(variables))
        return False
    for v, a in zip(variables, arrays):
        v.assign(a)
    return True


def _write_weights_digest(hook: Optional[dict[str, Any]], full: Any, rank: int, epoch: int) -> None:
    """Test hook: each rank writes the digest of its weights after a checkpoint (all ranks must agree)."""
    if hook:
        from transfuse import models

        with open(os.path.join(hook["dir"], f"epoch{epoch}-rank{rank}.txt"), "w") as f:
            f.write(models.weights_digest(full))


def train_func(config: dict[str, Any]) -> None:
    """Per-worker loop. ``config``: spec, init_weights, phases, batch_size, patience, restore_best, policy,
    seed, cached, in_memory.

    Early stopping per phase on validation loss. With ``restore_best``, the weights of the phase's best epoch
    (lowest val loss) are kept in memory on every worker (the val loss Keras reports is reduced across workers
    and the weights are mirrored, so every worker picks the same epoch and holds the same arrays) and put back
    when the phase ends, before that epoch's checkpoint is written: the checkpoint, the next phase and the saved
    member all start from the best epoch. Each checkpoint also holds the best weights so far (when they are not
    the current ones) and the optimizer state, so a resumed run keeps both.
    """
    import ray.train
    import tensorflow as tf

    from transfuse import models

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tf.keras.mixed_precision.set_global_policy(config["policy"])
    tf.keras.utils.set_random_seed(int(config["seed"]) + rank)
    if config.get("op_determinism"):
        tf.config.experimental.enable_op_determinism()
    # One worker: the default strategy. MultiWorkerMirroredStrategy over a single worker still runs a collective
    # all-reduce for every gradient: 8 from-scratch EfficientNet-Lite0 epochs took 1.2x (in-memory input) to
    # 1.7x (Ray Data input) longer with it and Ray's 2 s poll (bench/train_overhead.py --what scratch).
    # ``force_multi_worker`` (bench hook) keeps it for the comparison.
    if world > 1 or config.get("force_multi_worker"):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    per_worker = max(1, int(config["batch_size"]) // world)
    restore_best = bool(config.get("restore_best", True))
    in_memory = bool(config.get("in_memory"))

    state: dict[str, Any] = {"phase": 0, "phase_epoch": 0, "epoch": 0, "best": None, "best_epoch": None, "bad": 0,
                             "stopped": False, "history": [], "restored": []}
    best_weights: Optional[list[np.ndarray]] = None  # the current phase's best epoch (restore_best only)
    opt_state: Optional[list[np.ndarray]] = None  # optimizer state to load into the resumed phase's optimizer
    with strategy.scope():
        full = models.build_model(config["spec"], None, bn_training=bool(config.get("bn_training")))
        models.load_weights(full, config["init_weights"])
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            with open(os.path.join(d, STATE_FILE)) as f:
                state = {"best_epoch": None, "restored": [], **json.load(f)}
            if restore_best and os.path.exists(os.path.join(d, BEST_WEIGHTS)):
                best_weights = _load_arrays(os.path.join(d, BEST_WEIGHTS))
            if os.path.exists(os.path.join(d, OPT_STATE)):
                opt_state = _load_arrays(os.path.join(d, OPT_STATE))
            load_checkpoint_weights(full, d)
        if restore_best and best_weights is None and \
                state["best_epoch"] == state.get("weights_epoch", state["epoch"]):
            best_weights = full.get_weights()  # the checkpoint's own weights are the best so far
        log.info("rank %d: resumed at global epoch %d (phase %d)%s", rank, state["epoch"], state["phase"],
                 " with optimizer state" if opt_state is not None else "")

    fail = config.get("kill_at_epoch")  # test hook: SIGKILL this worker once, at a chosen global epoch
    digest_hook = config.get("weights_digest")  # test hook: every rank writes its weights' digest
    phases = config["phases"]
    for pi, phase in enumerate(phases):
        if pi < state["phase"]:
            continue
        if pi > state["phase"]:
            state.update(phase=pi, phase_epoch=0, best=None, best_epoch=None, bad=0, stopped=False)
            best_weights, opt_state = None, None  # a new phase: fresh optimizer, its own best epoch
        if state["phase_epoch"] >= phase["epochs"] or state["stopped"]:
            continue
        with strategy.scope():
            model = _phase_model(full, phase, config["cached"])
            model.compile(optimizer=tf.keras.optimizers.Adam(phase["lr"]),
                          loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        if opt_state is not None:
            _restore_optimizer(model, opt_state, strategy)
            opt_state = None
        train = _tf_dataset(ray.train.get_dataset_shard(phase["train"]), per_worker, True, config["seed"],
                            in_memory, epoch=lambda: state["epoch"])
        val = _tf_dataset(ray.train.get_dataset_shard(phase["val"]), per_worker, False, 0, in_memory)
        while state["phase_epoch"] < phase["epochs"] and not state["stopped"]:
            h = model.fit(train, validation_data=val, epochs=1, verbose=0).history
            row = {"phase": phase["name"], "epoch": state["epoch"] + 1, "phase_epoch": state["phase_epoch"] + 1,
                   **{k: float(v[-1]) for k, v in h.items()}}
            state["history"].append(row)
            state["epoch"] += 1
            state["phase_epoch"] += 1
            if state["phase_epoch"] <= config.get("patience_start", 0):
                pass  # (Keras's start_from_epoch) a phase's first epochs are not monitored: no best, no patience
            elif state["best"] is None or row["val_loss"] < state["best"] - 1e-6:
                state["best"], state["best_epoch"], state["bad"] = row["val_loss"], state["epoch"], 0
                if restore_best:
                    best_weights = full.get_weights()
            else:
                state["bad"] += 1
                if state["bad"] >= config["patience"]:
                    state["stopped"] = True  # early stopping on val loss: this phase ends here
            phase_end = state["stopped"] or state["phase_epoch"] >= phase["epochs"]
            reported = row
            if phase_end and restore_best and state["best_epoch"] not in (None, state["epoch"]):
                full.set_weights(best_weights)  # every worker: same epoch, same arrays
                reported = next(r for r in state["history"] if r["epoch"] == state["best_epoch"])
                state["restored"].append({"phase": phase["name"], "best_epoch": state["best_epoch"],
                                          "last_epoch": state["epoch"], "val_loss": reported["val_loss"]})
                log.info("rank %d: phase %s ends at epoch %d; restored epoch %d (val loss %.4f)", rank,
                         phase["name"], state["epoch"], state["best_epoch"], reported["val_loss"])
            # the metrics describe the weights in this epoch's checkpoint (the best epoch's at a phase end)
            metrics = {"epoch": state["epoch"], "phase": phase["name"], "loss": reported["loss"],
                       "accuracy": reported.get("accuracy"), "val_loss": reported["val_loss"],
                       "val_accuracy": reported.get("val_accuracy")}
            if reported is not row:
                metrics["restored_from_epoch"] = reported["epoch"]
            state["weights_epoch"] = reported["epoch"]  # whose weights this checkpoint holds
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:
                    save_checkpoint_weights(full, d)
                    # a resumed phase (interrupted, or extended by a rerun with more epochs) continues with the
                    # same Adam state and still knows its best epoch
                    _save_arrays(os.path.join(d, OPT_STATE), [v.numpy() for v in model.optimizer.variables])
                    if restore_best and state["best_epoch"] not in (None, state["weights_epoch"]):
                        _save_arrays(os.path.join(d, BEST_WEIGHTS), best_weights)
                    with open(os.path.join(d, STATE_FILE), "w") as f:
                        json.dump(state, f)
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=checkpoint)
            _write_weights_digest(digest_hook, full, rank, state["epoch"])
            if fail and fail["epoch"] == state["epoch"] and fail["rank"] == rank and not os.path.exists(fail["marker"]):
                open(fail["marker"], "w").close()
                log.warning("rank %d: killing myself at epoch %d (test hook)", rank, state["epoch"])
                os.kill(os.getpid(), signal.SIGKILL)


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
    return storage.stage_dir(cfg, "data")


def plan(cfg: Config, out_dir: str, *, data_dir: Optional[str] = None, weights: Optional[str] = None) -> dict[str, Any]:
    """Everything the workers need: the model spec, initial weights (written once), phases and datasets.

    ``weights`` overrides ``cfg.model.weights`` (the scratch baseline passes "none").
    """
    import tensorflow as tf

    from transfuse import cache, models
    from transfuse.data import data_manifest, preprocessed, read_split, read_split_numpy
    from transfuse.data.dataset import in_memory
    from transfuse.preprocess import PreprocessSpec, preprocess

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

    phases = [{"name": "frozen", "unfreeze": 0, "epochs": t.epochs_frozen, "lr": t.lr_frozen,
               "cut_layer": names[-1]},
              {"name": "unfrozen", "unfreeze": spec["unfreeze"], "epochs": t.epochs_unfrozen, "lr": t.lr_unfrozen,
               "cut_layer": spec["cut_layer"]}]
    phases = [p for p in phases if p["epochs"] > 0]
    cached = t.cache_frozen
    datasets: dict[str, Any] = {}
    if cached:
        cuts = {}
        for p in phases:
            if p["cut_layer"] is not None:
                models.split_model(full, p["cut_layer"])  # a clear error now for a cut inside a block
                cuts[cache.cache_key(spec, p["cut_layer"], cache.trunk_digest(full, p["cut_layer"]),
                                     manifest.get("fingerprint", ""))] = p["cut_layer"]
        dirs = cache.ensure_cache(cfg, data_dir, spec, init_path, cuts, actors=t.cache_actors,
                                  batch_size=t.cache_batch_size, use_gpu=t.use_gpu, actor_cpus=t.cache_actor_cpus,
                                  in_driver_max_rows=t.cache_in_driver_max_rows) if cuts else {}
    pspec = PreprocessSpec(**spec["preprocess"])
    augmenting = t.augment.flip or t.augment.pad_crop
    for p in phases:
        tag = p["cut_layer"] if cached and p["cut_layer"] is not None else "image"
        p["train"], p["val"] = f"train_{tag}", f"val_{tag}"
        if p["train"] in datasets:
            continue
        for split in ("train", "val"):
            augment = t.augment if split == "train" and augmenting else None
            if t.materialize and augment is None:
                # small data: read (and preprocess) here once, keep it in the object store for every epoch;
                # no per-epoch Ray Data tasks (their worker start-up dominated on a loaded 2-core machine)
                if tag == "image":
                    images, labels, _ = read_split_numpy(data_dir, split)
                    x = preprocess(images, pspec)
                else:
                    x, labels = cache.read_cache_numpy(dirs[p["cut_layer"]], split)
                ds = in_memory(x, labels)
            elif tag == "image":
                ds = preprocessed(read_split(data_dir, split), pspec, augment=augment).select_columns(["x", "label"])
            else:
                ds = cache.read_cache(dirs[p["cut_layer"]], split).select_columns(["x", "label"])
            datasets[f"{split}_{tag}"] = ds
    return {"spec": spec, "init_weights": init_path, "phases": phases, "datasets": datasets, "cached": cached,
            "data_dir": data_dir,
            # small data without per-epoch augmentation: each worker reads its shard once and keeps it (train_func)
            "in_memory": t.materialize and not augmenting}


def scaling_config(t: Any) -> Any:
    """Ray Train's ScalingConfig from the train config: workers, GPUs, and resources per worker."""
    from ray.train import ScalingConfig

    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    return ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources)


def make_trainer(t: Any, loop_config: dict[str, Any], datasets: dict[str, Any], out_dir: str, *,
                 name: str = TRAIN_DIR, run_config_extra: Optional[dict[str, Any]] = None) -> Any:
    """A TensorflowTrainer running ``train_func``: the one place train config becomes Ray's objects."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.tensorflow import TensorflowTrainer

    fs, path = storage.resolve(out_dir)
    run_config = RunConfig(
        name=name, storage_path=path, storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=t.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),  # the latest is what resumes; one spare
        worker_runtime_env=runtime.runtime_env(), **dict(run_config_extra or {}))
    return TensorflowTrainer(
        train_func, train_loop_config=loop_config,
        scaling_config=scaling_config(t),
        run_config=run_config, datasets=datasets)


def build_trainer(cfg: Config, out_dir: str, overrides: Optional[dict[str, Any]] = None, *,
                  run_config_extra: Optional[dict[str, Any]] = None, data_dir: Optional[str] = None,
                  weights: Optional[str] = None, name: str = TRAIN_DIR, test_hooks: Optional[dict] = None
                  ) -> tuple[Any, dict[str, Any], Config]:
    """(TensorflowTrainer, plan, effective config) for ``cfg`` + per-trial ``overrides``.

    ``run_config_extra``: extra ``RunConfig`` keyword arguments (e.g. ``callbacks=[TuneReportCallback()]``).
    Checkpoints go to ``<out_dir>/<name>/``; running again with the same out_dir and name resumes.
    """
    cfg = effective(cfg, overrides)
    t = cfg.train
    p = plan(cfg, out_dir, data_dir=data_dir, weights=weights)
    loop_config = {"spec": p["spec"], "init_weights": p["init_weights"], "phases": p["phases"],
                   "batch_size": t.batch_size, "patience": t.early_stopping_patience,
                   "patience_start": t.early_stopping_start, "seed": t.seed,
                   "restore_best": t.restore_best_weights,
                   "policy": mixed_policy(t.mixed_precision, t.use_gpu), "cached": p["cached"],
                   "in_memory": p["in_memory"],
                   # from random weights BatchNorm learns its statistics (training mode, as the pretrain stage);
                   # transferred backbones keep theirs (inference mode, however deep the unfreeze)
                   "bn_training": (weights or cfg.model.weights) == "none", "op_determinism": t.op_determinism,
                   **(test_hooks or {})}
    trainer = make_trainer(t, loop_config, p["datasets"], out_dir, name=name, run_config_extra=run_config_extra)
    return trainer, p, cfg


def _write_split_outputs(out_dir: str, outs: dict[str, dict[str, np.ndarray]], splits: list[str],
                         num_classes: int) -> dict[str, dict]:
    from transfuse.ensemble import write_member_split
    from transfuse.metrics import evaluate

    results = {}
    for split in splits:
        a = outs[split]
        probs = a["out0"].reshape(len(a["id"]), num_classes).astype(np.float32)
        write_member_split(out_dir, "embeddings", split, a["id"], a["label"], a["out1"])
        if split != "train":
            write_member_split(out_dir, "predictions", split, a["id"], a["label"], probs)
        if split != "train" and len(a["label"]):
            results[split] = evaluate(probs, a["label"])
    return results


def finalize(cfg: Config, out_dir: str, p: dict[str, Any], checkpoint: Any, *, fingerprint: str,
             extra_manifest: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Write the member dir from the last checkpoint: spec, weights, metrics, predictions, embeddings, manifest."""
    import tensorflow as tf

    from transfuse import cache, models

    spec = p["spec"]
    with checkpoint.as_directory() as d:
        with open(os.path.join(d, STATE_FILE)) as f:
            state = {"restored": [], "best_epoch": None, **json.load(f)}
        tf.keras.mixed_precision.set_global_policy("float32")
        model = models.build_model(spec, None)
        load_checkpoint_weights(model, d)
        best = os.path.join(d, BEST_WEIGHTS)
        if cfg.train.restore_best_weights and os.path.exists(best):
            # a run stopped inside a phase (e.g. by ASHA): its phase ends here, at its best epoch so far
            model.set_weights(_load_arrays(best))
            state["restored"].append({"phase": state["history"][-1]["phase"], "best_epoch": state["best_epoch"],
                                      "last_epoch": state["epoch"], "val_loss": state["best"]})
    models.save_member(model, spec, out_dir)
    weights = storage.join(out_dir, models.WEIGHTS_FILE)
    t = cfg.train
    splits = ["train", "val", "test", "holdout"]
    outs = cache.apply_model_numpy(p["data_dir"], splits, spec, weights, ["probs", "embedding"],
                                   actors=t.cache_actors, in_driver_max_rows=t.cache_in_driver_max_rows,
                                   batch_size=t.cache_batch_size, use_gpu=t.use_gpu, actor_cpus=t.cache_actor_cpus)
    evals = _write_split_outputs(out_dir, outs, splits, spec["num_classes"])
    # restored: per phase whose last epoch was not its best, the epoch whose weights were kept instead
    metrics = {"history": state["history"], **evals, "epochs": state["epoch"], "restored": state["restored"]}
    storage.write_json(storage.join(out_dir, "metrics.json"), metrics)
    storage.write_manifest(out_dir, cfg, STAGE, fingerprint, metrics={k: v for k, v in evals.items()},
                           epochs=state["epoch"], **(extra_manifest or {}))
    return metrics


def _fingerprint(eff: Config, weights: Optional[str]) -> str:
    return eff.fingerprint("data", "model", "train") + ("" if weights is None else f"-{weights}")


def latest_checkpoint(out_dir: str, name: str = TRAIN_DIR) -> Any:
    """The newest Ray Train checkpoint under ``<out_dir>/<name>/`` (None when there is none)."""
    import ray.train

    base = storage.join(out_dir, name)
    fs, p = storage.resolve(base)
    if not storage.exists(base):
        return None
    import pyarrow.fs as pafs

    dirs = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(p)) if i.type == pafs.FileType.Directory
                  and i.base_name.startswith("checkpoint_"))
    if not dirs:
        return None
    return ray.train.Checkpoint(path=f"{p}/{dirs[-1]}", filesystem=fs)


def finalize_member(cfg: Config, out_dir: str, overrides: Optional[dict[str, Any]] = None, *,
                    data_dir: Optional[str] = None, weights: Optional[str] = None) -> dict[str, Any]:
    """Write the member dir from the newest checkpoint of a run that did not finish (e.g. a Tune trial that
    ASHA stopped): same outputs as ``finetune``; the history ends where that run stopped."""
    from transfuse import models
    from transfuse.data import data_manifest

    eff = effective(cfg, overrides)
    data_dir = data_dir or _data_dir(eff)
    names = data_manifest(data_dir)["class_names"]
    spec = models.model_spec(eff.model, len(names), names, seed=eff.train.seed)
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        raise TrainError(f"no checkpoint under {storage.join(out_dir, TRAIN_DIR)}: nothing to finalize")
    return finalize(eff, out_dir, {"spec": spec, "data_dir": data_dir}, ckpt, fingerprint=_fingerprint(eff, weights))


def finetune(cfg: Config, out_dir: Optional[str] = None, overrides: Optional[dict[str, Any]] = None, *,
             resume: bool = False, force: bool = False, data_dir: Optional[str] = None,
             weights: Optional[str] = None, run_config_extra: Optional[dict[str, Any]] = None,
             test_hooks: Optional[dict] = None) -> dict[str, Any]:
    """Fine-tune and write the member dir ``out_dir`` (default ``<run>/finetune``); returns metrics.json.

    Skipped when its manifest is complete for the same config (unless ``force``). Without ``resume`` an
    earlier, unfinished Ray Train run in ``out_dir`` is discarded; with it, training continues from its
    last checkpoint.
    """
    out_dir = out_dir or storage.stage_dir(cfg, STAGE)
    eff = effective(cfg, overrides)
    fp = _fingerprint(eff, weights)
    if not force and storage.is_complete(out_dir, fp):
        log.info("finetune: %s is complete, skipping", out_dir)
        return storage.read_json(storage.join(out_dir, "metrics.json"))
    train_path = storage.join(out_dir, TRAIN_DIR)
    if not resume and storage.exists(train_path):
        fs, p = storage.resolve(train_path)
        fs.delete_dir(p)
    trainer, p, eff = build_trainer(cfg, out_dir, overrides, run_config_extra=run_config_extra,
                                    data_dir=data_dir, weights=weights, test_hooks=test_hooks)
    result = trainer.fit()
    if result.checkpoint is None:
        raise TrainError(f"training finished without a checkpoint in {train_path} (no epochs ran?)")
    return finalize(eff, out_dir, p, result.checkpoint, fingerprint=fp)


def scratch_overrides(cfg: Config) -> dict[str, Any]:
    """The same network from random weights with the same budget: every layer trains at ``train.lr_scratch``
    (default: the phase-1 rate; a from-scratch net needs a higher rate than fine-tuning) for up to all the
    epochs, keeping its best epoch by val loss as every run does. Only the second half is monitored (early
    stopping and the best epoch, as Keras's ``start_from_epoch``): from random weights the val loss often rises
    for a while before it falls (draw 0's first 16 epochs were all worse than its first; on draw 2 no epoch up to
    27 beat the first, chance-level one, which was then kept while the first half was still monitored)."""
    from transfuse import models

    n = models.unfreeze_units(cfg.model)
    t = cfg.train
    epochs = t.epochs_frozen + t.epochs_unfrozen
    return {"unfreeze": n, "epochs_frozen": 0, "epochs_unfrozen": epochs,
            "lr_unfrozen": t.lr_scratch if t.lr_scratch is not None else t.lr_frozen,
            "early_stopping_start": epochs // 2}


def transfer_vs_scratch(cfg: Config, *, force: bool = False) -> dict[str, Any]:
    """Train the scratch baseline into ``<run>/scratch`` and compare its test metrics with ``<run>/finetune``."""
    transfer = storage.read_json(storage.join(storage.stage_dir(cfg, STAGE), "metrics.json"))
    scratch = finetune(cfg, storage.stage_dir(cfg, "scratch"), scratch_overrides(cfg), weights="none", force=force)
    out = {"transfer": transfer.get("test", {}), "scratch": scratch.get("test", {}),
           "weights": cfg.model.weights, "unfreeze": cfg.model.unfreeze,
           "epochs": cfg.train.epochs_frozen + cfg.train.epochs_unfrozen}
    storage.write_json(storage.join(storage.run_dir(cfg), "transfer_vs_scratch.json"), out)
    return out
