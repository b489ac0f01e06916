"""Reading prepared splits: as a streaming Ray Dataset (training at scale) or as numpy (small splits, eval)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from transfuse import storage
from transfuse.config import SPLITS, AugmentConfig
from transfuse.data.sources import DataError
from transfuse.preprocess import PreprocessSpec, preprocess


def data_manifest(data_dir: str) -> dict[str, Any]:
    m = storage.read_manifest(data_dir)
    if not m or not m.get("complete"):
        raise DataError(f"no complete prepared dataset at {data_dir}: run `python -m jobs.prepare` first")
    return m


def _split_dir(data_dir: str, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return storage.join(data_dir, split)


def read_split(data_dir: str, split: str) -> Any:
    """The split as a lazy Ray Dataset of canonical rows (image, label, id), streamed from parquet."""
    import ray.data

    fs, path = storage.resolve(_split_dir(data_dir, split))
    return ray.data.read_parquet(path, filesystem=fs)


def read_split_numpy(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 N x H x W x C, labels int64, ids) read with pyarrow alone, in id order."""
    import pyarrow.dataset as pads
    import ray.data  # noqa: F401  (registers Ray's Arrow tensor extension types)

    fs, path = storage.resolve(_split_dir(data_dir, split))
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    if table.num_rows == 0:
        return np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64), np.zeros(0, object)
    table = table.sort_by("id")
    col = table.column("image")
    images = np.concatenate([c.to_numpy() for c in col.chunks]) if col.num_chunks > 1 else col.chunk(0).to_numpy()
    return (images.astype(np.uint8, copy=False), table.column("label").to_numpy().astype(np.int64),
            table.column("id").to_numpy(zero_copy_only=False).astype(object))


def preprocess_batch(batch: dict[str, Any], spec: PreprocessSpec, augment: Optional[AugmentConfig] = None,
                     seed: Optional[int] = None) -> dict[str, Any]:
    """Ray Data ``map_batches`` body: canonical rows -> model input ``x`` (float32) and ``label``."""
    rng = None
    flip = pad_crop = 0
    if augment is not None and (augment.flip or augment.pad_crop):
        rng = np.random.default_rng(seed)
        flip, pad_crop = augment.flip, augment.pad_crop
    images = np.stack(list(batch["image"])) if batch["image"].dtype == object else batch["image"]
    return {"x": preprocess(images, spec, rng=rng, flip=bool(flip), pad_crop=pad_crop),
            "label": np.asarray(batch["label"], dtype=np.int64), "id": batch["id"]}


def preprocessed(ds: Any, spec: PreprocessSpec, *, augment: Optional[AugmentConfig] = None,
                 batch_size: int = 512) -> Any:
    """Streaming preprocessing of a canonical Ray Dataset with the one preprocessing function."""
    return ds.map_batches(preprocess_batch, fn_kwargs={"spec": spec, "augment": augment}, batch_size=batch_size,
                          batch_format="numpy")
