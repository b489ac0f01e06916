"""The compress stage's plan: the variants it would build and the one it would serve."""

from __future__ import annotations

from typing import Any

from transfuse.config import Config


def compress_plan(cfg: Config) -> dict[str, Any]:
    from transfuse.compress import BUNDLE

    c = cfg.compress
    return {"variants": c.variant_names() + (["student_int8"] if cfg.distill.enabled else []), "sparsity": c.sparsity,
            "serve_variant": c.serve_variant, "num_threads": c.num_threads,
            "output": BUNDLE.dir(cfg)}
