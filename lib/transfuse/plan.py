"""What every stage would do for a config, built by the stages' own code, with nothing run, written or downloaded.

``python -m jobs.pipeline --config FILE --plan`` prints it. It answers "will this config do what I mean on that
cluster?" before any GPU is rented: data source and splits, the model's shapes and which layers each phase trains,
Ray Train's scaling config, Tune's search space, scheduler and per-trial resources, the scikit-learn members as
built estimators, the compression variants and the Serve deployment. The one step a plan never takes is fetching
data or weights (CIFAR-10, ImageNet): it says what would be fetched.
"""

from __future__ import annotations

from typing import Any, Optional

from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)
from transfuse import storage
from transfuse.config import Config
from transfuse.data import PREPARE, check_data, data_plan, files_plan, num_classes
from transfuse.finetune import model_plan
from transfuse.pipeline import PIPELINE


def plan(cfg: Config, data: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Every stage's plan, each built by the stage's own ``plan`` (``Stage.plan``). Raises the stage's own error
    where the config cannot work (e.g. an unfreeze depth beyond the backbone, an unknown scikit-learn parameter, a
    class with too few images, bad files). ``data``: the data plan when the caller has it already."""
    data = data_plan(cfg) if data is None else data
    check_data(data)
    k = num_classes(cfg, data)
    stages = {st.name: st.entry("plan")(cfg) for st in PIPELINE if st.plan and st is not PREPARE}
    return {"run": storage.run_dir(cfg), "data": data, "model": model_plan(cfg, k), **stages,
            "serve": cfg.serve.model_dump(mode="json"), "ray": cfg.ray.model_dump(mode="json")}


__all__ = ["check_data", "data_plan", "files_plan", "num_classes", "plan"]
