"""The CNN sections: the model (backbone, head, unfreeze depth), how it is trained, pretrained on a source task,
tuned by Ray Tune, and distilled into one student."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from transfuse.config.base import Strict
from transfuse.config.data import DataConfig

BACKBONES = ("vgg16", "resnet50", "mobilenet_v2", "efficientnet_b0", "efficientnet_lite0", "efficientnet_lite1",
             "efficientnet_lite2", "vgg_small")
UNFREEZE_UNITS = ("layers", "blocks")


class AugmentConfig(Strict):
    flip: bool = False  # random horizontal flip
    pad_crop: int = Field(0, ge=0, le=16)  # pad by this many pixels, then random crop back


class HeadConfig(Strict):
    dense: list[int] = [256]  # the seed's head: Flatten -> Dense(256, relu) -> Dense(classes)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    pooling: Literal["flatten", "avg"] = "flatten"


class ModelConfig(Strict):
    backbone: Literal[BACKBONES] = "vgg_small"  # type: ignore[valid-type]
    # imagenet (Keras download), none (random init), pretrain (the pretrain stage's output) or a file path
    weights: str = "pretrain"
    input_size: int = Field(32, ge=32, le=512)  # pixels; images are resized to input_size x input_size
    width: float = Field(0.25, gt=0.0, le=1.0)  # vgg_small only: fraction of VGG16's filters
    head: HeadConfig = HeadConfig()
    unfreeze: int = Field(4, ge=0)  # backbone layers (or blocks, see unfreeze_unit) trainable in phase 2, from the top
    # what `unfreeze` counts: single layers (the seed's base_model.layers[-k:]) or whole blocks (a VGG conv block,
    # a ResNet residual block, an MBConv block; stem and head are blocks too): cutting inside a block harms
    unfreeze_unit: Literal[UNFREEZE_UNITS] = "layers"  # type: ignore[valid-type]

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        if v in ("imagenet", "none", "pretrain"):
            return v
        if not (v.endswith(".h5") or v.endswith(".weights.h5") or "://" in v or Path(v).suffix):
            raise ValueError(f"must be 'imagenet', 'none', 'pretrain' or a weights file path (.h5), got {v!r}")
        return v


class TrainConfig(Strict):
    num_workers: int = Field(1, ge=1)  # Ray Train workers
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, ge=0.0)
    batch_size: int = Field(64, ge=1)  # global batch, split across workers
    epochs_frozen: int = Field(3, ge=0)  # phase 1: backbone frozen, head trained
    epochs_unfrozen: int = Field(3, ge=0)  # phase 2: last `unfreeze` layers trainable
    lr_frozen: float = Field(1e-3, gt=0.0)  # Adam
    lr_unfrozen: float = Field(1e-4, gt=0.0)  # lower, as in the seed
    lr_scratch: Optional[float] = Field(None, gt=0.0)  # the from-scratch baseline's Adam rate (None: lr_frozen)
    early_stopping_patience: int = Field(3, ge=1)  # epochs without val-loss improvement
    early_stopping_start: int = Field(0, ge=0)  # a phase's first epochs, not monitored (Keras's start_from_epoch):
    # they neither count against patience nor can be its best epoch; a phase no longer than this keeps its last
    restore_best_weights: bool = True  # each phase ends with its best epoch's weights (lowest val loss)
    mixed_precision: Literal["auto", "off", "mixed_float16", "mixed_bfloat16"] = "auto"  # auto: on with GPUs
    cache_frozen: bool = True  # cache activations at the cut point; incompatible with augmentation
    cache_actors: int = Field(1, ge=1)  # Ray Data actors computing the cache and final outputs (1 per GPU)
    cache_batch_size: int = Field(256, ge=1)  # images per actor call
    # CPUs each cache actor asks for. Ray sets OMP_NUM_THREADS to it, and TensorFlow's oneDNN build takes its
    # intra-op threads from that: a 1-CPU actor computes the cache on one thread, slower than the driver
    cache_actor_cpus: float = Field(1.0, gt=0.0)
    # without GPUs and with one cache actor, splits of at most this many rows are cached by the driver itself
    # (an actor's start-up, a second TensorFlow import, dominated small passes); 0: always the actor pool
    cache_in_driver_max_rows: int = Field(20000, ge=0)
    materialize: bool = True  # keep training inputs in the object store across epochs (small data)
    augment: AugmentConfig = AugmentConfig()
    max_failures: int = Field(2, ge=0)  # worker failures tolerated; training resumes from the checkpoint
    seed: int = 0
    # TensorFlow's deterministic ops (tf.config.experimental.enable_op_determinism) in every worker: the same
    # config and seed give the same weights, at some cost in speed on GPUs
    op_determinism: bool = False
    # the scratch stage: the same network from random weights and a logistic regression on the pixels, on the
    # same labels, to measure what the transfer bought (an experiment's question; a user's run can skip it)
    baselines: bool = True

    @model_validator(mode="after")
    def _cache_vs_augment(self) -> "TrainConfig":
        if self.cache_frozen and (self.augment.flip or self.augment.pad_crop):
            raise ValueError(
                "cache_frozen=true cannot be combined with per-epoch augmentation (augment.flip/pad_crop): "
                "cached activations do not change between epochs. Set one of them off."
            )
        if self.use_gpu and self.gpus_per_worker > 1:
            raise ValueError(
                f"gpus_per_worker must be <= 1, got {self.gpus_per_worker}. For more GPUs raise num_workers."
            )
        return self


class PretrainConfig(Strict):
    """Train the backbone on a source task where no pretrained weights exist (the offline default)."""

    data: DataConfig = DataConfig(classes=[0, 2, 4, 6, 8])
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0.0)


class TuneConfig(Strict):
    num_samples: int = Field(6, ge=1)  # trials
    unfreeze: list[int] = [0, 4, 8, 13]  # depths searched, from the top, in unfreeze_unit
    unfreeze_unit: Optional[Literal[UNFREEZE_UNITS]] = None  # type: ignore[valid-type]  # None: model.unfreeze_unit
    lr_frozen: tuple[float, float] = (3e-4, 3e-3)  # log-uniform range
    lr_unfrozen: tuple[float, float] = (3e-5, 3e-4)
    head_dense: list[int] = [128, 256]  # units of the head's hidden layer; 0: none (pooled features -> softmax)
    dropout: list[float] = [0.0, 0.3]
    scheduler: Literal["asha", "hyperband", "none"] = "asha"
    grace_period: int = Field(1, ge=1)  # epochs before ASHA may stop a trial (raised to epochs_frozen + 1)
    search_alg: Literal["random", "optuna"] = "random"
    max_concurrent: int = Field(2, ge=1)
    cpus_per_trial: float = Field(0.25, gt=0.0)  # the trial function itself; workers ask for train.*
    members: int = Field(3, ge=1)  # CNN members kept for the ensemble: best M, diverse


class DistillConfig(Strict):
    """One student CNN trained on the stacked ensemble's predictions (the teacher) over the unlabelled pool
    (``data.unlabelled_per_class``) and the labelled train split, on augmented views the teacher labels itself.
    The student starts from the best fine-tuned CNN member: its architecture, weights and unfrozen depth."""

    enabled: bool = False
    input_size: Optional[int] = Field(None, ge=16)  # None: the member's; smaller is a faster student, same weights
    unfreeze_layers: Optional[int] = Field(None, ge=0)  # backbone layers the student trains; None: the member's
    views: int = Field(2, ge=1)  # views of each image: the first as is, the others augmented (distill.augment)
    augment: AugmentConfig = AugmentConfig(flip=True, pad_crop=2)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    # each worker reads its shard of labelled views into memory once: a fixed order (sorted by id and view,
    # permuted per epoch from the seed), so the same config and seed give the same student; false: stream it from
    # Ray Data every epoch (pools larger than a worker's memory; the order then follows Ray Data's)
    materialize: bool = True
    lr: float = Field(1e-4, gt=0.0)  # Adam, on the member's trainable layers
    temperature: float = Field(2.0, gt=0.0)  # softens teacher and student alike (Hinton et al. 2015)
    soft_weight: float = Field(1.0, ge=0.0)  # on T^2 KL(teacher_T || student_T), every row
    hard_weight: float = Field(1.0, ge=0.0)  # on the cross-entropy with the label, labelled rows only
    teacher_actors: int = Field(1, ge=1)  # Ray Data actors labelling the views (one per GPU on a cluster)
    teacher_batch_size: int = Field(128, ge=1)
    temperature_scaling: bool = True  # fit one temperature on the student's val NLL; the bundle serves it...
    temperature_check: bool = True  # ...only where K-fold cross-validation on val says it lowers the NLL

    @model_validator(mode="after")
    def _weights(self) -> "DistillConfig":
        if self.soft_weight == 0 and self.hard_weight == 0:
            raise ValueError("soft_weight and hard_weight cannot both be 0")
        return self
