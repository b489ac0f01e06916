"""The one Ray Train worker loop and what it reads and writes.

``run_worker`` is the skeleton every training worker runs, fine-tuning and the distill stage's student alike: the
Ray Train context (seed, precision, determinism, the distribution strategy), resuming from a checkpoint (weights,
optimizer state, the loop's state and the phase's best weights), the phases and their epochs, early stopping and
the best epoch's weights, and a reported checkpoint after every epoch. Its typed config is a ``WorkerPlan``; what
differs between callers (the model, its inputs and loss, one epoch's fit and evaluation, the state file) comes
through the hooks of a ``WorkerTask``. ``FinetuneTask`` is fine-tuning's: ``train_func`` runs it on a
``LoopConfig``, which ``transfuse.finetune.stage`` builds from the config; the student's is
``transfuse.distill.student.StudentTask``. The checkpoint's files are ``transfuse.finetune.checkpoint``'s (their
names are importable from here too).
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np

from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)
from transfuse.errors import TransfuseError
from transfuse.finetune.checkpoint import (BEST_WEIGHTS, CKPT_WEIGHTS, LEGACY_CKPT_WEIGHTS, OPT_STATE, STATE_FILE,
                                           LoopState, load_arrays, load_checkpoint_weights, read_optimizer_state,
                                           restore_optimizer, save_arrays, save_checkpoint_weights,
                                           save_optimizer_state)

log = logging.getLogger(__name__)

MONITOR = "val_loss"  # what early stopping and the best epoch read (lower is better)
MIN_DELTA = 1e-6  # a new best must beat the old one by more than this


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


# ----------------------------------------------------------------------------------------------------------------
# The skeleton: what every training worker runs


class PhasePlan(Protocol):
    """What the skeleton reads of a phase: its name (the history's, the logs') and its epochs."""

    name: str
    epochs: int


@dataclass
class EarlyStopping:
    """Early stopping per phase on the val loss (``MONITOR``): ``patience`` epochs without a lower one end the
    phase, its first ``start`` epochs not monitored (Keras's start_from_epoch). ``restore_best``: the phase ends
    with the weights of its best epoch (kept on every worker, and in each checkpoint while they are not its own)."""

    patience: int
    start: int = 0
    restore_best: bool = True


@dataclass
class WorkerPlan:
    """The skeleton's config: the seed (each worker's: ``seed + rank``), the batch size over all workers, the phases
    in order, the Keras dtype policy (None: Keras's default), op determinism, early stopping (None: every phase
    runs all its epochs) and the test hooks."""

    seed: int
    batch_size: int
    phases: Sequence[PhasePlan]
    policy: Optional[str] = None
    op_determinism: bool = False
    stopping: Optional[EarlyStopping] = None
    hooks: LoopHooks = field(default_factory=LoopHooks)


@dataclass
class WorkerContext:
    """This worker in the Ray Train run: its rank, the number of workers, the distribution strategy, and its part
    of the batch."""

    rank: int
    world: int
    strategy: Any
    per_worker: int


class WorkerTask(ABC):
    """What a caller plugs into ``run_worker``: its ``plan`` and the hooks below, called in this order: ``build``
    (once), ``read_state`` (resuming), then per phase ``phase_model`` and ``phase_inputs``, then per epoch
    ``fit_epoch``, ``metrics`` and (rank 0) ``write_state``. The default state file is ``LoopState`` as
    ``state.json``; the default metrics are the epoch's history row."""

    plan: WorkerPlan

    @abstractmethod
    def build(self, ctx: WorkerContext) -> Any:
        """The model whose weights the checkpoints hold, at its initial weights (called in the strategy's scope)."""

    @abstractmethod
    def phase_model(self, index: int) -> Any:
        """The compiled model phase ``index`` fits (in the strategy's scope); its optimizer is the checkpoint's."""

    @abstractmethod
    def phase_inputs(self, index: int, state: LoopState, ctx: WorkerContext) -> None:
        """Make phase ``index``'s inputs ready (datasets, evaluation data); ``state.epoch`` is live."""

    @abstractmethod
    def fit_epoch(self, model: Any, state: LoopState) -> dict[str, Any]:
        """Train one epoch and evaluate it: the history row, with ``epoch`` (``state.epoch + 1``) and, where the
        plan stops early, ``val_loss``."""

    def metrics(self, row: dict[str, Any], state: LoopState) -> dict[str, Any]:
        """What Ray Train reports with the epoch's checkpoint, from the row of the weights it holds."""
        return row

    def read_state(self, checkpoint_dir: str) -> LoopState:
        return LoopState.read(checkpoint_dir)

    def write_state(self, state: LoopState, checkpoint_dir: str) -> None:
        state.write(checkpoint_dir)


def start_worker(plan: WorkerPlan) -> WorkerContext:
    """Ray Train's context for this worker, its seed, precision, determinism and distribution strategy."""
    import ray.train
    import tensorflow as tf

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if plan.policy is not None:
        tf.keras.mixed_precision.set_global_policy(plan.policy)
    tf.keras.utils.set_random_seed(int(plan.seed) + rank)
    if plan.op_determinism:
        tf.config.experimental.enable_op_determinism()
    # One worker: the default strategy. MultiWorkerMirroredStrategy over a single worker still runs a collective
    # all-reduce for every gradient, which makes each epoch slower (bench/train_overhead.py --what scratch).
    if world > 1 or plan.hooks.force_multi_worker:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    return WorkerContext(rank, world, strategy, max(1, int(plan.batch_size) // world))


def run_worker(task: WorkerTask) -> None:
    """The worker loop: build the task's model, resume from Ray Train's checkpoint if there is one, and run the
    phases' remaining epochs, each ending with a checkpoint reported to Ray Train.

    Early stopping (``plan.stopping``) is per phase on validation loss. With ``restore_best``, the weights of the
    phase's best epoch are kept in memory on every worker (the val loss Keras reports is reduced across workers and
    the weights are mirrored, so every worker picks the same epoch and holds the same arrays) and put back when the
    phase ends, before that epoch's checkpoint is written: the checkpoint, the next phase and what the caller saves
    all start from the best epoch. Each checkpoint holds the weights, the optimizer state, the task's state file
    and, when they are not the current ones, the best weights so far, so a resumed run keeps all of them.
    """
    import ray.train

    ctx = start_worker(task.plan)
    with ctx.strategy.scope():
        full = task.build(ctx)
    run = _WorkerRun(task, ctx, full)
    run.resume(ray.train.get_checkpoint())
    for index, phase in enumerate(task.plan.phases):
        run.run_phase(index, phase)


class _WorkerRun:
    """``run_worker``'s moving parts: the loop state, the phase's best weights and a checkpoint's optimizer state."""

    def __init__(self, task: WorkerTask, ctx: WorkerContext, full: Any):
        self.task, self.ctx, self.full, self.plan = task, ctx, full, task.plan
        self.state = LoopState()
        self.best_weights: Optional[list[np.ndarray]] = None  # the current phase's best epoch (restore_best only)
        self.opt_state: Optional[list[np.ndarray]] = None  # to load into the resumed phase's optimizer

    @property
    def restore_best(self) -> bool:
        return self.plan.stopping is not None and self.plan.stopping.restore_best

    def resume(self, ckpt: Any) -> None:
        if not ckpt:
            return
        with ckpt.as_directory() as d:
            self.state = self.task.read_state(d)
            if self.restore_best and os.path.exists(os.path.join(d, BEST_WEIGHTS)):
                self.best_weights = load_arrays(os.path.join(d, BEST_WEIGHTS))
            self.opt_state = read_optimizer_state(d)
            load_checkpoint_weights(self.full, d)
        state = self.state
        weights_epoch = state.epoch if state.weights_epoch is None else state.weights_epoch
        if self.restore_best and self.best_weights is None and state.best_epoch == weights_epoch:
            self.best_weights = self.full.get_weights()  # the checkpoint's own weights are the best so far
        log.info("rank %d: resumed at global epoch %d (phase %d)%s", self.ctx.rank, state.epoch, state.phase,
                 " with optimizer state" if self.opt_state is not None else "")

    def run_phase(self, index: int, phase: PhasePlan) -> None:
        """Phase ``index``'s remaining epochs (none: a finished or early-stopped phase, or one already passed)."""
        state = self.state
        if index < state.phase:
            return
        if index > state.phase:
            state.phase, state.phase_epoch, state.best, state.best_epoch, state.bad, state.stopped = \
                index, 0, None, None, 0, False
            self.best_weights, self.opt_state = None, None  # a new phase: fresh optimizer, its own best epoch
        if state.phase_epoch >= phase.epochs or state.stopped:
            return
        with self.ctx.strategy.scope():
            model = self.task.phase_model(index)
        if self.opt_state is not None:
            restore_optimizer(model, self.opt_state, self.ctx.strategy)
            self.opt_state = None
        self.task.phase_inputs(index, state, self.ctx)
        while state.phase_epoch < phase.epochs and not state.stopped:
            row = self.task.fit_epoch(model, state)
            state.history.append(row)
            state.epoch += 1
            state.phase_epoch += 1
            self.monitor(row)
            reported = self.end_phase(phase, row) if state.stopped or state.phase_epoch >= phase.epochs else row
            # the metrics describe the weights in this epoch's checkpoint (the best epoch's at a phase end)
            metrics = self.task.metrics(reported, state)
            if reported is not row:
                metrics["restored_from_epoch"] = reported["epoch"]
            state.weights_epoch = reported["epoch"]
            self.report(model, metrics)
            self.plan.hooks.after_epoch(self.full, self.ctx.rank, state.epoch)

    def monitor(self, row: dict[str, Any]) -> None:
        """Early stopping's bookkeeping after an epoch: a new best (and its weights), or one more bad epoch."""
        stopping, state = self.plan.stopping, self.state
        if stopping is None or state.phase_epoch <= stopping.start:
            return  # (Keras's start_from_epoch) a phase's first epochs are not monitored: no best, no patience
        if state.best is None or row[MONITOR] < state.best - MIN_DELTA:
            state.best, state.best_epoch, state.bad = row[MONITOR], state.epoch, 0
            if stopping.restore_best:
                self.best_weights = self.full.get_weights()
        else:
            state.bad += 1
            if state.bad >= stopping.patience:
                state.stopped = True  # early stopping on val loss: this phase ends here

    def end_phase(self, phase: PhasePlan, row: dict[str, Any]) -> dict[str, Any]:
        """The row of the weights the phase ends with: its best epoch's, put back, or the last epoch's own."""
        state = self.state
        if not self.restore_best or state.best_epoch in (None, state.epoch):
            return row
        self.full.set_weights(self.best_weights)  # every worker: same epoch, same arrays
        best = next(r for r in state.history if r["epoch"] == state.best_epoch)
        state.restored.append({"phase": phase.name, "best_epoch": state.best_epoch, "last_epoch": state.epoch,
                               "val_loss": best[MONITOR]})
        log.info("rank %d: phase %s ends at epoch %d; restored epoch %d (val loss %.4f)", self.ctx.rank,
                 phase.name, state.epoch, state.best_epoch, best[MONITOR])
        return best

    def report(self, model: Any, metrics: dict[str, Any]) -> None:
        """Report the epoch to Ray Train with its checkpoint (written by rank 0 only)."""
        import ray.train

        state = self.state
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if self.ctx.rank == 0:
                save_checkpoint_weights(self.full, d)
                # a resumed phase (interrupted, or extended by a rerun with more epochs) continues with the same
                # optimizer state and still knows its best epoch
                save_optimizer_state(model, d)
                if self.restore_best and state.best_epoch not in (None, state.weights_epoch):
                    save_arrays(os.path.join(d, BEST_WEIGHTS), self.best_weights)
                self.task.write_state(state, d)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning's task


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
    read once into arrays and every epoch iterates those (a Ray Data pass per epoch costs a large share of a short
    epoch of a small head), shuffled per epoch from (``seed``, ``epoch()``); otherwise it streams from Ray Data
    every epoch. ``images`` (a PreprocessSpec): the streamed shard holds stored rows and each batch is
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
        from transfuse.data import preprocess_batch

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


class FinetuneTask(WorkerTask):
    """Fine-tuning (and pretraining, and the scratch baseline) on the skeleton: the full model from its spec and
    initial weights; per phase the part that trains (``_phase_model``) with Adam at the phase's rate and sparse
    cross-entropy, on its shard of the phase's datasets (``tf_dataset``); Keras's own val loss and accuracy.

    ``loop.class_weights`` weight the training loss per row by its class (Keras's ``class_weight``); the
    validation loss stays unweighted (see ``phase_inputs``)."""

    def __init__(self, loop: LoopConfig):
        self.loop = loop
        self.plan = WorkerPlan(seed=loop.seed, batch_size=loop.batch_size, phases=loop.phases, policy=loop.policy,
                               op_determinism=loop.op_determinism, hooks=loop.hooks,
                               stopping=EarlyStopping(loop.patience, loop.patience_start, loop.restore_best))
        self.full: Any = None
        self.phase: Optional[Phase] = None
        self.train: Any = None
        self.val: Any = None
        self.class_weight: Optional[dict[int, float]] = None

    def build(self, ctx: WorkerContext) -> Any:
        from transfuse.finetune import models

        self.full = models.build_model(self.loop.spec, None, bn_training=self.loop.bn_training)
        models.load_weights(self.full, self.loop.init_weights)
        return self.full

    def phase_model(self, index: int) -> Any:
        import tensorflow as tf

        phase = self.loop.phases[index]
        model = _phase_model(self.full, phase, self.loop.cached)
        model.compile(optimizer=tf.keras.optimizers.Adam(phase.lr), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        return model

    def phase_inputs(self, index: int, state: LoopState, ctx: WorkerContext) -> None:
        import ray.train

        from transfuse.inference import PreprocessSpec

        loop = self.loop
        self.phase = phase = loop.phases[index]
        images = PreprocessSpec(**loop.spec["preprocess"]) if phase.images else None
        self.train = tf_dataset(ray.train.get_dataset_shard(phase.train), ctx.per_worker, True, loop.seed,
                                loop.in_memory, epoch=lambda: state.epoch, images=images, augment=loop.augment,
                                rank=ctx.rank)
        self.val = tf_dataset(ray.train.get_dataset_shard(phase.val), ctx.per_worker, False, 0, loop.in_memory,
                              images=images)
        # Class weights weight the training loss only: Keras applies class_weight to the training batches (each
        # row's loss times its class's weight; the weights average 1 over the train split, so the loss keeps its
        # scale and the learning rates their meaning). The val loss that drives early stopping and the best epoch
        # stays the plain NLL on the val split, the quantity the test metrics and the temperature read; weighted,
        # a class with a handful of val images would swing it (val is a few images per class on a label budget).
        # The compiled "accuracy" metric is unweighted either way (Keras weights only weighted_metrics).
        self.class_weight = keras_class_weight(loop.class_weights)

    def fit_epoch(self, model: Any, state: LoopState) -> dict[str, Any]:
        h = model.fit(self.train, validation_data=self.val, epochs=1, verbose=0,
                      class_weight=self.class_weight).history
        return {"phase": self.phase.name, "epoch": state.epoch + 1, "phase_epoch": state.phase_epoch + 1,
                **{k: float(v[-1]) for k, v in h.items()}}

    def metrics(self, row: dict[str, Any], state: LoopState) -> dict[str, Any]:
        return {"epoch": state.epoch, "phase": self.phase.name, "loss": row["loss"], "accuracy": row.get("accuracy"),
                "val_loss": row["val_loss"], "val_accuracy": row.get("val_accuracy")}


def train_func(config: dict[str, Any]) -> None:
    """What every fine-tuning worker runs: ``config["loop"]`` is the ``LoopConfig`` (see ``FinetuneTask``)."""
    run_worker(FinetuneTask(config["loop"]))


__all__ = ["BEST_WEIGHTS", "CKPT_WEIGHTS", "EarlyStopping", "FinetuneTask", "LEGACY_CKPT_WEIGHTS", "LoopConfig",
           "LoopHooks", "LoopState", "OPT_STATE", "Phase", "PhasePlan", "STATE_FILE", "TrainError", "WorkerContext",
           "WorkerPlan", "WorkerTask", "keras_class_weight", "load_arrays", "load_checkpoint_weights",
           "read_optimizer_state", "restore_optimizer", "run_worker", "save_checkpoint_weights",
           "save_optimizer_state", "start_worker", "tf_dataset", "train_func"]
