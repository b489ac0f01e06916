"""The data: sources (built-in datasets, image folders, tables of paths), listing and inspecting a user's files,
the prepare stage (decode, split, write parquet shards) and reading prepared splits (Ray Data).

Its stage: ``PREPARE`` (folder ``data/``). The other names below are what other wings use, imported on first use.
"""

from __future__ import annotations

from transfuse.stage import Stage
from transfuse.wing import public_face

PREPARE = Stage("data", name="prepare", outputs=("<split>/*.parquet", "manifest.json"),
                run="transfuse.data.stage:prepare", plan="transfuse.data.plan:data_plan")

# name -> module: the public face other wings import from ``transfuse.data``
_FACE = {
    "data_manifest": "transfuse.data.dataset",
    "in_memory": "transfuse.data.dataset",
    "preprocess_batch": "transfuse.data.dataset",
    "preprocessed": "transfuse.data.dataset",
    "prepare": "transfuse.data.stage",
    "read_split": "transfuse.data.dataset",
    "read_split_numpy": "transfuse.data.dataset",
    "training_rows": "transfuse.data.dataset",
    "skip_reason": "transfuse.data.files",
    "table_paths": "transfuse.data.files",
    "check_data": "transfuse.data.plan",
    "data_plan": "transfuse.data.plan",
    "files_plan": "transfuse.data.plan",
    "num_classes": "transfuse.data.plan",
    "DataError": "transfuse.data.sources",
}

__getattr__ = public_face(__name__, _FACE)
