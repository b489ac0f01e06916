"""The per-worker training loop (``train_func``) and what it reads and writes: the typed loop config, its
phases and test hooks, and the checkpoint (loop state, weights, optimizer state, the phase's best weights).
``transfuse.finetune.stage`` builds the ``LoopConfig`` from the config and runs this on Ray Train.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Optional

import numpy as np

from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)
from transfuse.errors import TransfuseError

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
CKPT_WEIGHTS = "model.weights.npz"  # every weight array, in the model's order
LEGACY_CKPT_WEIGHTS = "model.weights.h5"  # checkpoints written before the .npz
BEST_WEIGHTS = "best.weights.npz"  # the phase's best epoch so far, when not the checkpoint's own weights
OPT_STATE = "optimizer.npz"  # the phase's optimizer variables (Adam: step, m, v), mid-phase checkpoints only
# Tune overrides accepted by build_trainer: per-trial values that change the model or the schedule


class TrainError(TransfuseError, ValueError):
    """A training option is invalid."""


@dataclass
class Phase:
    """One training phase: the last ``unfreeze`` backbone units (and the head) train for up to ``epochs`` epochs at
    ``lr``; ``cut_layer``: where the frozen part ends (the cache's layer; None: nothing cached); ``train`` /
    ``val``: the names of the datasets the workers read; ``images``: they are stored rows, not model inputs (the
    streamed path: ``transfuse.data.training_rows``)."""

    name: str
    unfreeze: int
    epochs: int
    lr: float
    cut_layer: Optional[str]
    train: str = ""
    val: str = ""
    images: bool = False  # the datasets hold canonical rows (uint8 image, label) that each worker preprocesses


@dataclass
class LoopHooks:
    """Test and benchmark hooks, called once per epoch through ``after_epoch``. ``kill_at_epoch`` ({epoch, rank,
    marker}): that worker SIGKILLs itself once, after that global epoch's checkpoint; ``weights_digest`` ({dir}):
    every rank writes its weights' digest after each checkpoint (all ranks must agree); ``force_multi_worker``:
    MultiWorkerMirroredStrategy even for one worker (bench/train_overhead.py's baseline)."""

    kill_at_epoch: Optional[dict[str, Any]] = None
    weights_digest: Optional[dict[str, Any]] = None
    force_multi_worker: bool = False

    def after_epoch(self, full: Any, rank: int, epoch: int) -> None:
        if self.weights_digest:
            from transfuse.finetune import models

            with open(os.path.join(self.weights_digest["dir"], f"epoch{epoch}-rank{rank}.txt"), "w") as f:
                f.write(models.weights_digest(full))
        fail = self.kill_at_epoch
        if fail and fail["epoch"] == epoch and fail["rank"] == rank and not os.path.exists(fail["marker"]):
            open(fail["marker"], "w").close()
            log.warning("rank %d: killing myself at epoch %d (test hook)", rank, epoch)
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class LoopConfig:
    """What every worker's ``train_func`` runs: the model (spec and initial weights file), the phases, the batch
    size over all workers, early stopping (``patience`` epochs without a lower val loss, the first
    ``patience_start`` epochs of a phase not monitored), the best-epoch rule, precision and determinism;
    ``class_weights``: one weight per class 0..K-1 on the training loss (``transfuse.class_weights``; None:
    unweighted)."""

    spec: dict[str, Any]
    init_weights: str
    phases: list[Phase]
    batch_size: int
    patience: int
    seed: int
    policy: str
    cached: bool  # phases with a cut train only the part above it, on cached activations
    in_memory: bool  # each worker reads its shard once (train.materialize, no augmentation)
    patience_start: int = 0
    restore_best: bool = True
    bn_training: bool = False  # BatchNorm in training mode (from random weights)
    op_determinism: bool = False
    augment: Optional[Any] = None  # AugmentConfig for the training split of ``images`` phases
    hooks: LoopHooks = field(default_factory=LoopHooks)
    class_weights: Optional[list[float]] = None  # per class 0..K-1, on the training loss only


@dataclass
class LoopState:
    """Where the loop is, saved in every checkpoint (``state.json``) so a resumed run continues there."""

    phase: int = 0
    phase_epoch: int = 0
    epoch: int = 0  # global, over all phases
    best: Optional[float] = None  # the current phase's lowest val loss
    best_epoch: Optional[int] = None
    bad: int = 0  # epochs since the best
    stopped: bool = False  # early-stopped: the phase is over
    history: list[dict[str, Any]] = field(default_factory=list)
    restored: list[dict[str, Any]] = field(default_factory=list)  # per phase: the best epoch put back at its end
    weights_epoch: Optional[int] = None  # whose weights the checkpoint holds (the best epoch's at a phase end)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LoopState":
        """A checkpoint's state; keys a state of an earlier version lacks keep their defaults."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def read(cls, checkpoint_dir: str) -> "LoopState":
        with open(os.path.join(checkpoint_dir, STATE_FILE)) as f:
            return cls.from_json(json.load(f))


def _phase_model(full: Any, phase: Phase, cached: bool) -> Any:
    """The model one phase trains: the full model, or only its part above the cut (trained on the cache)."""
    from transfuse.finetune import models

    if phase.cut_layer is None and phase.unfreeze >= len(models.backbone_layer_names(models.get_backbone(full))):
        for layer in full.layers:
            layer.trainable = True  # everything trains (pretraining, scratch)
        return full
    models.set_unfreeze(full, phase.unfreeze)
    if cached and phase.cut_layer is not None:
        _, top = models.split_model(full, phase.cut_layer)
        return top
    return full


def tf_dataset(shard: Any, batch_size: int, shuffle: bool, seed: int, in_memory: bool,
               epoch: Callable[[], int] = lambda: 0, *, images: Optional[Any] = None, augment: Optional[Any] = None,
               rank: int = 0) -> Any:
    """This worker's shard as a tf.data pipeline. ``in_memory`` (``train.materialize``: small data): the shard is
    read once into arrays and every epoch iterates those (a Ray Data pass per epoch cost 0.3-1 s of each 4-step
    epoch of the default's head), shuffled per epoch from (``seed``, ``epoch()``); otherwise it streams from Ray
    Data every epoch. ``images`` (a PreprocessSpec): the streamed shard holds stored rows and each batch is
    preprocessed here, augmented (``augment``) from (``seed``, ``rank``, ``epoch()``), one batch ahead of the
    model. The arrays are fed through a generator, as Ray's ``to_tf`` does: a ``from_tensor_slices``
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
    elif images is not None:
        from transfuse.data.dataset import preprocess_batch

        def batches() -> Any:
            e = epoch()
            rng = np.random.default_rng([seed, rank, e]) if augment is not None else None
            for b in shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                        local_shuffle_buffer_size=4 * batch_size if shuffle else None,
                                        local_shuffle_seed=seed + e if shuffle else None):
                out = preprocess_batch(b, images, augment, rng=rng)
                yield out["x"], out["label"]

        size = images.input_size
        ds = tf.data.Dataset.from_generator(batches, output_signature=(
            tf.TensorSpec((None, size, size, 3), tf.float32), tf.TensorSpec((None,), tf.int64))).prefetch(1)
    else:
        ds = shard.to_tf(feature_columns="x", label_columns="label", batch_size=batch_size,
                         local_shuffle_buffer_size=4 * batch_size if shuffle else None,
                         local_shuffle_seed=seed if shuffle else None)
    options = tf.data.Options()
    # each worker already has its own shard: Keras must not shard it again
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)


def keras_class_weight(weights: Optional[list[float]]) -> Optional[dict[int, float]]:
    """``LoopConfig.class_weights`` as Keras's ``fit(class_weight=...)``: {class id: weight} for every class 0..K-1
    (Keras refuses gaps); None: unweighted."""
    return None if weights is None else {i: float(w) for i, w in enumerate(weights)}


def save_checkpoint_weights(model: Any, d: str) -> None:
    """A checkpoint's model weights: every weight array in the model's order, as a plain .npz (0.06 s for
    EfficientNet-Lite0 where Keras's .h5 took 0.5 s, once per epoch)."""
    _save_arrays(os.path.join(d, CKPT_WEIGHTS), model.get_weights())


def load_checkpoint_weights(model: Any, d: str) -> None:
    """Load what ``save_checkpoint_weights`` wrote (or a checkpoint of an earlier version: Keras .h5)."""
    if os.path.exists(os.path.join(d, CKPT_WEIGHTS)):
        model.set_weights(load_arrays(os.path.join(d, CKPT_WEIGHTS)))
    else:
        model.load_weights(os.path.join(d, LEGACY_CKPT_WEIGHTS))


def _save_arrays(path: str, arrays: list[np.ndarray]) -> None:
    """Arrays in order as a plain .npz (a checkpoint-private file; loaded with allow_pickle=False)."""
    np.savez(path, **{f"a{i:05d}": a for i, a in enumerate(arrays)})


def load_arrays(path: str) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return [z[k] for k in sorted(z.files)]


def save_optimizer_state(model: Any, d: str) -> None:
    """A checkpoint's optimizer variables (Adam: step, m, v), so a resumed run continues with the same state."""
    _save_arrays(os.path.join(d, OPT_STATE), [v.numpy() for v in model.optimizer.variables])


def read_optimizer_state(d: str) -> Optional[list[np.ndarray]]:
    """What ``save_optimizer_state`` wrote in checkpoint ``d`` (None: a checkpoint without it)."""
    path = os.path.join(d, OPT_STATE)
    return load_arrays(path) if os.path.exists(path) else None


def restore_optimizer(model: Any, arrays: list[np.ndarray], strategy: Any) -> bool:
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


def train_func(config: dict[str, Any]) -> None:
    """Per-worker loop; ``config["loop"]`` is the ``LoopConfig``.

    Early stopping per phase on validation loss. ``loop.class_weights`` weight the training loss per row by its
    class (Keras's ``class_weight``); the validation loss stays unweighted (see the comment at ``fit``). With
    ``restore_best``, the weights of the phase's best epoch (lowest val loss) are kept in memory on every worker
    (the val loss Keras reports is reduced across workers and the weights are mirrored, so every worker picks the
    same epoch and holds the same arrays) and put back when the phase ends, before that epoch's checkpoint is
    written: the checkpoint, the next phase and the saved member all start from the best epoch. Each checkpoint
    also holds the best weights so far (when they are not the current ones) and the optimizer state, so a resumed
    run keeps both.
    """
    import ray.train
    import tensorflow as tf

    from transfuse.finetune import models
    from transfuse.inference.preprocess import PreprocessSpec

    loop: LoopConfig = config["loop"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tf.keras.mixed_precision.set_global_policy(loop.policy)
    tf.keras.utils.set_random_seed(int(loop.seed) + rank)
    if loop.op_determinism:
        tf.config.experimental.enable_op_determinism()
    # One worker: the default strategy. MultiWorkerMirroredStrategy over a single worker still runs a collective
    # all-reduce for every gradient: 8 from-scratch EfficientNet-Lite0 epochs took 1.2x (in-memory input) to
    # 1.7x (Ray Data input) longer with it and Ray's 2 s poll (bench/train_overhead.py --what scratch).
    if world > 1 or loop.hooks.force_multi_worker:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    per_worker = max(1, int(loop.batch_size) // world)

    state = LoopState()
    best_weights: Optional[list[np.ndarray]] = None  # the current phase's best epoch (restore_best only)
    opt_state: Optional[list[np.ndarray]] = None  # optimizer state to load into the resumed phase's optimizer
    with strategy.scope():
        full = models.build_model(loop.spec, None, bn_training=loop.bn_training)
        models.load_weights(full, loop.init_weights)
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = LoopState.read(d)
            if loop.restore_best and os.path.exists(os.path.join(d, BEST_WEIGHTS)):
                best_weights = load_arrays(os.path.join(d, BEST_WEIGHTS))
            opt_state = read_optimizer_state(d)
            load_checkpoint_weights(full, d)
        weights_epoch = state.epoch if state.weights_epoch is None else state.weights_epoch
        if loop.restore_best and best_weights is None and state.best_epoch == weights_epoch:
            best_weights = full.get_weights()  # the checkpoint's own weights are the best so far
        log.info("rank %d: resumed at global epoch %d (phase %d)%s", rank, state.epoch, state.phase,
                 " with optimizer state" if opt_state is not None else "")

    for pi, phase in enumerate(loop.phases):
        if pi < state.phase:
            continue
        if pi > state.phase:
            state.phase, state.phase_epoch, state.best, state.best_epoch, state.bad, state.stopped = \
                pi, 0, None, None, 0, False
            best_weights, opt_state = None, None  # a new phase: fresh optimizer, its own best epoch
        if state.phase_epoch >= phase.epochs or state.stopped:
            continue
        with strategy.scope():
            model = _phase_model(full, phase, loop.cached)
            model.compile(optimizer=tf.keras.optimizers.Adam(phase.lr),
                          loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        if opt_state is not None:
            restore_optimizer(model, opt_state, strategy)
            opt_state = None
        images = PreprocessSpec(**loop.spec["preprocess"]) if phase.images else None
        train = tf_dataset(ray.train.get_dataset_shard(phase.train), per_worker, True, loop.seed, loop.in_memory,
                           epoch=lambda: state.epoch, images=images, augment=loop.augment, rank=rank)
        val = tf_dataset(ray.train.get_dataset_shard(phase.val), per_worker, False, 0, loop.in_memory,
                         images=images)
        # Class weights weight the training loss only: Keras applies class_weight to the training batches (each
        # row's loss times its class's weight; the weights average 1 over the train split, so the loss keeps its
        # scale and the learning rates their meaning). The val loss that drives early stopping and the best epoch
        # stays the plain NLL on the val split, the quantity the test metrics and the temperature read; weighted,
        # a class with a handful of val images would swing it (val is a few images per class on a label budget).
        # The compiled "accuracy" metric is unweighted either way (Keras weights only weighted_metrics).
        class_weight = keras_class_weight(loop.class_weights)
        while state.phase_epoch < phase.epochs and not state.stopped:
            h = model.fit(train, validation_data=val, epochs=1, verbose=0, class_weight=class_weight).history
            row = {"phase": phase.name, "epoch": state.epoch + 1, "phase_epoch": state.phase_epoch + 1,
                   **{k: float(v[-1]) for k, v in h.items()}}
            state.history.append(row)
            state.epoch += 1
            state.phase_epoch += 1
            if state.phase_epoch <= loop.patience_start:
                pass  # (Keras's start_from_epoch) a phase's first epochs are not monitored: no best, no patience
            elif state.best is None or row["val_loss"] < state.best - 1e-6:
                state.best, state.best_epoch, state.bad = row["val_loss"], state.epoch, 0
                if loop.restore_best:
                    best_weights = full.get_weights()
            else:
                state.bad += 1
                if state.bad >= loop.patience:
                    state.stopped = True  # early stopping on val loss: this phase ends here
            phase_end = state.stopped or state.phase_epoch >= phase.epochs
            reported = row
            if phase_end and loop.restore_best and state.best_epoch not in (None, state.epoch):
                full.set_weights(best_weights)  # every worker: same epoch, same arrays
                reported = next(r for r in state.history if r["epoch"] == state.best_epoch)
                state.restored.append({"phase": phase.name, "best_epoch": state.best_epoch,
                                       "last_epoch": state.epoch, "val_loss": reported["val_loss"]})
                log.info("rank %d: phase %s ends at epoch %d; restored epoch %d (val loss %.4f)", rank,
                         phase.name, state.epoch, state.best_epoch, reported["val_loss"])
            # the metrics describe the weights in this epoch's checkpoint (the best epoch's at a phase end)
            metrics = {"epoch": state.epoch, "phase": phase.name, "loss": reported["loss"],
                       "accuracy": reported.get("accuracy"), "val_loss": reported["val_loss"],
                       "val_accuracy": reported.get("val_accuracy")}
            if reported is not row:
                metrics["restored_from_epoch"] = reported["epoch"]
            state.weights_epoch = reported["epoch"]
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:
                    save_checkpoint_weights(full, d)
                    # a resumed phase (interrupted, or extended by a rerun with more epochs) continues with the
                    # same Adam state and still knows its best epoch
                    save_optimizer_state(model, d)
                    if loop.restore_best and state.best_epoch not in (None, state.weights_epoch):
                        _save_arrays(os.path.join(d, BEST_WEIGHTS), best_weights)
                    with open(os.path.join(d, STATE_FILE), "w") as f:
                        json.dump(state.to_json(), f)
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=checkpoint)
            loop.hooks.after_epoch(full, rank, state.epoch)
