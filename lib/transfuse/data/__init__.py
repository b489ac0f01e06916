"""The data layer: sources, the prepare stage, and reading prepared splits (Ray Data)."""

from transfuse.data.dataset import data_manifest, preprocessed, read_split, read_split_numpy, training_rows
from transfuse.data.prepare import prepare
from transfuse.data.sources import DataError, load_source

__all__ = ["DataError", "data_manifest", "load_source", "prepare", "preprocessed", "read_split",
           "read_split_numpy", "training_rows"]
