"""The ensemble: scikit-learn members on the CNNs' embeddings or the pixels, their inputs and out-of-fold
predictions, the member search, fitting the stacker, and the stage that writes ``<run>/ensemble/``.

Its stage: ``ENSEMBLE``. The other names below are what other wings use, imported on first use.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from transfuse import storage
from transfuse.stage import Stage
from transfuse.wing import public_face

DESCRIPTION_FILE = "ensemble.json"  # the fitted ensemble's description (format transfuse.ensemble/v1)
PROGRESS_FILE = "progress.json"  # {"done": n, "total": m} member tasks, while the stage runs
COMBINERS = ("average", "hard_vote", "greedy", "stack")  # reported beside the members in metrics.json


def _progress(cfg: Any, since: float) -> Callable[[], Optional[tuple[int, int, str]]]:
    path = ENSEMBLE.path(cfg, PROGRESS_FILE)

    def tasks() -> Optional[tuple[int, int, str]]:
        if not storage.written_since(path, since):
            return None
        p = storage.read_json(path)
        return int(p["done"]), int(p["total"]), "member fits"

    return tasks


ENSEMBLE = Stage("ensemble", name="ensemble", inputs=("prepare", "finetune", "tune"),
                 outputs=(DESCRIPTION_FILE, "stacker.json", "greedy.json", "fit_records.json", "predictions/"),
                 run="transfuse.ensemble.stage:run_ensemble", progress="transfuse.ensemble:_progress",
                 plan="transfuse.ensemble.plan:ensemble_plan", reader="transfuse.ensemble.stage:EnsembleMetrics")

# name -> module: the public face other wings import from ``transfuse.ensemble``
_FACE = {
    "EnsembleParts": "transfuse.ensemble.fitted",
    "EnsembleSource": "transfuse.ensemble.fitted",
    "ensemble_to_compress": "transfuse.ensemble.fitted",
    "keras_baseline": "transfuse.ensemble.fitted",
    "checked_temperature": "transfuse.ensemble.stacker",
    "temperature_line": "transfuse.ensemble.stacker",
    "EnsembleMetrics": "transfuse.ensemble.stage",
    "format_table": "transfuse.ensemble.stage",
    "read_description": "transfuse.ensemble.stage",
    "run_ensemble": "transfuse.ensemble.stage",
}

__getattr__ = public_face(__name__, _FACE)
