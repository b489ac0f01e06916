"""The distill stage's plan: teacher, student, views and the loss, with nothing trained."""

from __future__ import annotations

from typing import Any

from transfuse.config import Config
from transfuse.data import num_classes
from transfuse.finetune import train_plan_resources


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
