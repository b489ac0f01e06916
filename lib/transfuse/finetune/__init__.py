"""Fine-tuning: the backbones and the network built on them, the frozen-activation cache, the Ray Train worker
loop, the fine-tune and scratch stages, Tune's depth search, pretraining, and the pixel baselines.

Its stages (``transfuse.stage.Stage``): ``PRETRAIN``, ``FINETUNE``, ``SCRATCH``, ``TUNE``; the folders it writes
besides: ``PRETRAIN_DATA``, ``CACHE``. The other names below are what other wings use, imported on first use (this
package imports no TensorFlow or Ray until one is asked for).
"""

from __future__ import annotations

from typing import Any

from transfuse.stage import Folder, Stage
from transfuse.wing import public_face


def _pretraining(cfg: Any) -> bool:
    return cfg.model.weights == "pretrain"


def _baselines(cfg: Any) -> bool:
    # the transfer baseline only means something when weights were transferred
    return cfg.model.weights != "none" and cfg.train.baselines


_MEMBER = "transfuse.finetune.predictions:MemberMetrics"  # a member dir's metrics.json, typed
PRETRAIN_DATA = Folder("pretrain_data")
CACHE = Folder("cache")
PRETRAIN = Stage("pretrain", name="pretrain", inputs=("prepare",), outputs=("model_spec.json", "backbone.weights.h5"),
                 run="transfuse.finetune.pretraining:pretrain", reader=_MEMBER, enabled=_pretraining)
FINETUNE = Stage("finetune", name="finetune", inputs=("prepare", "pretrain"),
                 outputs=("model_spec.json", "model.weights.h5", "predictions/", "embeddings/"),
                 run="transfuse.finetune.stage:finetune", progress="transfuse.finetune.progress:finetune",
                 plan="transfuse.finetune.plan:finetune_plan", reader=_MEMBER)
SCRATCH = Stage("scratch", name="scratch", inputs=("prepare", "finetune"),
                outputs=("model_spec.json", "model.weights.h5", "predictions/", "embeddings/"),
                run="transfuse.finetune.stage:transfer_vs_scratch", progress="transfuse.finetune.progress:scratch",
                reader=_MEMBER, enabled=_baselines)
TUNE = Stage("tune", name="tune", inputs=("prepare", "finetune"),
             outputs=("members.json", "results.json", "results.csv", "best_config.json", "summary.json",
                      "val_accuracy_vs_depth.png", "trials/"),
             run="transfuse.finetune.tune:run_search", progress="transfuse.finetune.progress:tune",
             plan="transfuse.finetune.plan:tune_plan")

# name -> module: the public face other wings import from ``transfuse.finetune``
_FACE = {
    "TRANSFER_FILE": "transfuse.finetune.baselines",
    "LoopState": "transfuse.finetune.checkpoint",
    "load_checkpoint_weights": "transfuse.finetune.checkpoint",
    "WorkerContext": "transfuse.finetune.loop",
    "WorkerPlan": "transfuse.finetune.loop",
    "WorkerTask": "transfuse.finetune.loop",
    "run_worker": "transfuse.finetune.loop",
    "KerasMember": "transfuse.finetune.models",
    "backbone_layer_names": "transfuse.finetune.models",
    "build_model": "transfuse.finetune.models",
    "cut_layer_for": "transfuse.finetune.models",
    "embedding_layer_name": "transfuse.finetune.models",
    "embedding_model": "transfuse.finetune.models",
    "get_backbone": "transfuse.finetune.models",
    "head_of": "transfuse.finetune.models",
    "load_member": "transfuse.finetune.models",
    "save_member": "transfuse.finetune.models",
    "set_unfreeze": "transfuse.finetune.models",
    "describe": "transfuse.finetune.plan",
    "model_plan": "transfuse.finetune.plan",
    "train_plan_resources": "transfuse.finetune.plan",
    "MemberMetrics": "transfuse.finetune.predictions",
    "read_member_split": "transfuse.finetune.predictions",
    "write_member_split": "transfuse.finetune.predictions",
    "pretrain": "transfuse.finetune.pretraining",
    "newest_checkpoint_file": "transfuse.finetune.progress",
    "TRAIN_DIR": "transfuse.finetune.stage",
    "finetune": "transfuse.finetune.stage",
    "make_trainer": "transfuse.finetune.stage",
    "transfer_vs_scratch": "transfuse.finetune.stage",
    "MEMBERS_FILE": "transfuse.finetune.tune",
    "read_members": "transfuse.finetune.tune",
    "run_search": "transfuse.finetune.tune",
    "tune_dir": "transfuse.finetune.tune",
}

__getattr__ = public_face(__name__, _FACE)
