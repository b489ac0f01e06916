"""Compression: pruning, the TFLite export with one shared trunk, the ONNX rewrites of the scikit-learn members,
measuring every variant, and the stage that writes them as bundles and picks the one to serve.

Its stage: ``COMPRESS``; the folder it writes besides: ``BUNDLE`` (the served variant). The other names below
are what other wings use, imported on first use.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from transfuse import storage
from transfuse.stage import Folder, Stage
from transfuse.wing import public_face

BUNDLE = Folder("bundle")


def _progress(cfg: Any, since: float) -> Callable[[], Optional[tuple[int, int, str]]]:
    names = cfg.compress.variant_names()
    return lambda: (sum(storage.written_since(COMPRESS.path(cfg, v, storage.MANIFEST), since) for v in names),
                    len(names), "variants")


COMPRESS = Stage("compress", name="compress", inputs=("prepare", "ensemble", "distill"),
                 outputs=("<variant>/",), run="transfuse.compress.stage:run_compress",
                 progress="transfuse.compress:_progress", plan="transfuse.compress.plan:compress_plan",
                 reader="transfuse.compress.measure:CompressMetrics")

# name -> module: the public face other wings import from ``transfuse.compress``
_FACE = {
    "CompressMetrics": "transfuse.compress.measure",
    "format_table": "transfuse.compress.measure",
    "goals_line": "transfuse.compress.measure",
    "served_variant": "transfuse.compress.measure",
    "run_compress": "transfuse.compress.stage",
}

__getattr__ = public_face(__name__, _FACE)
