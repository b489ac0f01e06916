"""The distill stage's student on Ray Train: the best fine-tuned CNN member (optionally at a smaller input size or
another trained depth) learning the teacher-labelled views with the distillation loss (``kd_loss``). Every worker
runs the one worker loop (``transfuse.finetune.loop.run_worker``) with ``StudentTask``'s hooks, driven by a typed
``StudentConfig``: one phase of ``distill.epochs`` epochs, no early stopping, and a checkpoint after each epoch
holding the weights, Adam's state and the history (``history.json``) the loop resumes from. See
``transfuse.distill.stage``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from transfuse import metrics as tm
from transfuse.distill import HISTORY_FILE
from transfuse.distill.teacher import DistillError, batch_images
from transfuse.finetune import LoopState, WorkerContext, WorkerPlan, WorkerTask, run_worker

PHASE = "student"  # the one phase's name (the worker loop's logs)


@dataclass
class StudentConfig:
    """What every student worker runs: the member it starts from (``member_dir``, at ``input_size`` / training its
    last ``unfreeze_layers`` backbone layers when given), the epochs, the batch size over all workers, Adam's rate,
    the loss (``kd_loss``'s temperature and weights over ``num_classes``), the seed, whether each worker reads its
    shard into memory once (``materialize``), and the prepared data (``data_dir``: its val split is evaluated)."""

    member_dir: str
    input_size: Optional[int]
    unfreeze_layers: Optional[int]
    materialize: bool
    epochs: int
    batch_size: int
    lr: float
    temperature: float
    soft_weight: float
    hard_weight: float
    num_classes: int
    seed: int
    data_dir: str


@dataclass
class StudentPhase:
    """The student's one phase, as the worker loop reads it."""

    name: str
    epochs: int


def student_spec(member_spec: dict[str, Any], input_size: Optional[int],
                 unfreeze_layers: Optional[int] = None) -> dict[str, Any]:
    """The best member's spec, at ``input_size`` when given (its preprocessing follows the size), training its last
    ``unfreeze_layers`` backbone layers when given (else the member's own depth)."""
    from transfuse import finetune
    from transfuse.inference import PreprocessSpec

    spec = json.loads(json.dumps(member_spec))
    if input_size and input_size != spec["input_size"]:
        spec["input_size"] = int(input_size)
        spec["preprocess"] = PreprocessSpec.for_model(spec["backbone"], int(input_size)).to_dict()
    if unfreeze_layers is not None and unfreeze_layers != spec["unfreeze"]:
        for key in ("unfreeze_blocks", "trainable_blocks"):
            spec.pop(key, None)
        spec.update(unfreeze=int(unfreeze_layers), unfreeze_unit="layers",
                    cut_layer=finetune.cut_layer_for(spec["backbone_layers"], int(unfreeze_layers)))
    return spec


def build_student(member_dir: str, input_size: Optional[int] = None,
                  unfreeze_layers: Optional[int] = None) -> tuple[Any, dict[str, Any]]:
    """The student at its initial weights: the member's (every weight is input-size independent behind global
    pooling, so a smaller input keeps them all), with its trainable layers set."""
    from transfuse import finetune

    model, spec = finetune.load_member(member_dir)
    s = student_spec(spec, input_size, unfreeze_layers)
    if s["input_size"] != spec["input_size"]:
        student = finetune.build_model(s, None)
        student.set_weights(model.get_weights())
        model = student
    finetune.set_unfreeze(model, s["unfreeze"])
    return model, s


def kd_loss(num_classes: int, temperature: float, soft_weight: float, hard_weight: float) -> Any:
    """The Keras loss over the ``target`` column (see ``TeacherActor``) and the student's probabilities."""
    import tensorflow as tf

    k, t = num_classes, float(temperature)

    def loss(target: Any, probs: Any) -> Any:
        soft, onehot, labelled = target[:, :k], target[:, k:2 * k], target[:, 2 * k]
        logp = tf.math.log(tf.clip_by_value(tf.cast(probs, tf.float32), 1e-12, 1.0))
        log_student_t = tf.nn.log_softmax(logp / t, axis=-1)
        kl = tf.reduce_sum(soft * (tf.math.log(tf.clip_by_value(soft, 1e-12, 1.0)) - log_student_t), axis=-1)
        ce = -tf.reduce_sum(onehot * logp, axis=-1)
        return soft_weight * t * t * kl + hard_weight * labelled * ce

    return loss


class StudentTask(WorkerTask):
    """The student on the worker loop: the member's model compiled once with Adam and ``kd_loss``; each epoch one
    pass over this worker's shard of the teacher-labelled views, then the val split's accuracy and NLL. The loop's
    state in a checkpoint is the history alone (``history.json``): its length is the epochs trained."""

    def __init__(self, c: StudentConfig):
        self.c = c
        # every student run is deterministic: the same config and seed give the same student
        self.plan = WorkerPlan(seed=c.seed, batch_size=c.batch_size, phases=[StudentPhase(PHASE, int(c.epochs))],
                               op_determinism=True)
        self.model: Any = None
        self.spec: dict[str, Any] = {}
        self.pspec: Any = None
        self.x_val: Any = None
        self.y_val: Any = None
        self.shard: Any = None
        self.held: Optional[tuple[np.ndarray, np.ndarray]] = None
        self.per_worker = 1

    def build(self, ctx: WorkerContext) -> Any:
        import tensorflow as tf

        c = self.c
        self.model, self.spec = build_student(c.member_dir, c.input_size, c.unfreeze_layers)
        self.model.compile(optimizer=tf.keras.optimizers.Adam(c.lr),
                           loss=kd_loss(c.num_classes, c.temperature, c.soft_weight, c.hard_weight))
        return self.model

    def phase_model(self, index: int) -> Any:
        return self.model  # one phase: the model compiled in ``build``

    def phase_inputs(self, index: int, state: LoopState, ctx: WorkerContext) -> None:
        import ray.train

        from transfuse.data import read_split_numpy
        from transfuse.inference import PreprocessSpec, preprocess

        self.pspec = PreprocessSpec(**self.spec["preprocess"])
        x_val, self.y_val, _ = read_split_numpy(self.c.data_dir, "val")
        self.x_val = preprocess(x_val, self.pspec)
        self.shard = ray.train.get_dataset_shard("train")
        self.per_worker = ctx.per_worker
        self.held = read_student_shard(self.shard) if self.c.materialize else None

    def batches(self, epoch: int) -> Any:
        """Epoch ``epoch``'s (images, targets) batches: of the held shard, the same order for the same seed (rows
        sorted by (id, view), then permuted); streamed, the order of Ray Data's local shuffle."""
        from transfuse.inference import preprocess

        seed, per_worker = int(self.c.seed), self.per_worker
        if self.held is not None:
            images, target = self.held
            order = np.random.default_rng([seed, epoch]).permutation(len(target))
            for i in range(0, len(order), per_worker):
                yield preprocess(images[order[i:i + per_worker]], self.pspec), target[order[i:i + per_worker]]
            return
        for b in self.shard.iter_batches(batch_size=per_worker, batch_format="numpy",
                                         local_shuffle_buffer_size=8 * per_worker,
                                         local_shuffle_seed=seed * 1000 + epoch):
            yield preprocess(batch_images(b), self.pspec), np.asarray(b["target"], np.float32)

    def fit_epoch(self, model: Any, state: LoopState) -> dict[str, Any]:
        import tensorflow as tf

        epoch = state.epoch
        k2 = 2 * int(self.c.num_classes) + 1
        ds = tf.data.Dataset.from_generator(lambda: self.batches(epoch), output_signature=(
            tf.TensorSpec((None, *self.x_val.shape[1:]), tf.float32), tf.TensorSpec((None, k2), tf.float32)))
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        h = model.fit(ds.with_options(options), epochs=1, verbose=0).history
        pv = model.predict(self.x_val, batch_size=256, verbose=0)
        return {"epoch": epoch + 1, "loss": float(h["loss"][-1]), "val_accuracy": tm.accuracy(pv, self.y_val),
                "val_nll": tm.nll(pv, self.y_val)}

    def read_state(self, checkpoint_dir: str) -> LoopState:
        history = read_history(checkpoint_dir)
        return LoopState(phase=0, phase_epoch=len(history), epoch=len(history), history=history)

    def write_state(self, state: LoopState, checkpoint_dir: str) -> None:
        with open(os.path.join(checkpoint_dir, HISTORY_FILE), "w") as f:
            json.dump(state.history, f)


def student_loop(config: dict[str, Any]) -> None:
    """What every student worker runs: ``config["loop"]`` is the ``StudentConfig`` (see ``StudentTask``); resumes
    from a checkpoint with its weights and Adam's state, after a worker's failure or for a rerun with more epochs."""
    run_worker(StudentTask(config["loop"]))


def read_student_shard(shard: Any) -> tuple[np.ndarray, np.ndarray]:
    """A worker's whole shard as (images, targets), sorted by (id, view): Ray Data hands the teacher actors'
    output over in whatever order they finished, and the student's epochs must not depend on it."""
    images, target, keys = [], [], []
    for b in shard.iter_batches(batch_size=4096, batch_format="numpy"):
        images.append(batch_images(b))
        target.append(np.asarray(b["target"], np.float32))
        keys += [f"{i}\x00{v}" for i, v in zip(b["id"], b["view"])]
    if not keys:
        raise DistillError("this worker's shard of teacher-labelled views is empty: fewer rows than workers?")
    order = np.argsort(np.asarray(keys), kind="stable")
    return np.concatenate(images)[order], np.concatenate(target)[order]


def read_history(checkpoint_dir: str) -> list[dict[str, Any]]:
    """The epochs a student checkpoint has trained, with their loss and val metrics."""
    with open(os.path.join(checkpoint_dir, HISTORY_FILE)) as f:
        return list(json.load(f))
