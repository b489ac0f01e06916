"""Distillation: one CNN student trained on the stacked ensemble's soft labels (the teacher), on the labelled and
unlabelled images, in the fine-tuning wing's worker loop.

Its stage: ``DISTILL``. The other names below are what other wings use, imported on first use.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from transfuse import storage
from transfuse.stage import Stage
from transfuse.wing import public_face

STUDENT = "student"  # the member directory under distill/, and the member's name in its bundle
HISTORY_FILE = "history.json"  # in each student checkpoint, beside the weights


def _enabled(cfg: Any) -> bool:
    return cfg.distill.enabled


def _progress(cfg: Any, since: float) -> Callable[[], Optional[tuple[int, int, str]]]:
    from transfuse.finetune import TRAIN_DIR, newest_checkpoint_file

    base = DISTILL.path(cfg, TRAIN_DIR)

    def student() -> Optional[tuple[int, int, str]]:
        path = newest_checkpoint_file(base, HISTORY_FILE, since)
        return (0 if path is None else len(storage.read_json(path))), cfg.distill.epochs, "student epochs"

    return student


DISTILL = Stage("distill", name="distill", inputs=("prepare", "ensemble"), outputs=(STUDENT + "/",),
                run="transfuse.distill.stage:run_distill", progress="transfuse.distill:_progress",
                plan="transfuse.distill.plan:distill_plan", reader="transfuse.distill.stage:DistillMetrics",
                enabled=_enabled)

# name -> module: the public face other wings import from ``transfuse.distill``
_FACE = {
    "DistillMetrics": "transfuse.distill.stage",
    "read_temperature": "transfuse.distill.stage",
    "run_distill": "transfuse.distill.stage",
    "temperature_stacker": "transfuse.distill.stage",
    "soften": "transfuse.distill.teacher",
}

__getattr__ = public_face(__name__, _FACE)
