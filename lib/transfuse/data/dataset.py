"""Reading prepared splits: as a streaming Ray Dataset (training at scale) or as numpy (small splits, eval).

``training_split`` picks between the two by size for a training input: a split that fits comfortably in this
node's object store is read with pyarrow here, preprocessed once with numpy and put in the object store as one
materialized dataset (no Ray Data read or map tasks: their start-up was most of a small epoch's time); a larger
one streams from parquet through ``map_batches``. Training itself streams ``training_rows`` (the stored uint8
rows), which each Train worker preprocesses and augments (``transfuse.finetune.loop.tf_dataset``).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from transfuse import storage
from transfuse.config import PREPARED_SPLITS, AugmentConfig
from transfuse.data.sources import DataError
from transfuse.inference import PreprocessSpec, preprocess


def data_manifest(data_dir: str) -> dict[str, Any]:
    m = storage.read_manifest(data_dir)
    if not m or not m.get("complete"):
        raise DataError(f"no complete prepared dataset at {data_dir}: run `python -m jobs.prepare` first")
    return m


def _split_dir(data_dir: str, split: str) -> str:
    if split not in PREPARED_SPLITS:
        raise ValueError(f"split must be one of {PREPARED_SPLITS}, got {split!r}")
    return storage.join(data_dir, split)


def read_split(data_dir: str, split: str) -> Any:
    """The split as a lazy Ray Dataset of canonical rows (image, label, id), streamed from parquet."""
    fs, path = storage.resolve(_split_dir(data_dir, split))
    return storage.read_parquet(path, fs)


def read_split_numpy(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 N x H x W x C, labels int64, ids) read with pyarrow alone, in id order."""
    import pyarrow.dataset as pads
    import ray.data  # noqa: F401  (registers Ray's Arrow tensor extension types)

    fs, path = storage.resolve(_split_dir(data_dir, split))
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    if table.num_rows == 0:
        return np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64), np.zeros(0, object)
    col = table.column("image")
    images = np.concatenate([c.to_numpy() for c in col.chunks]) if col.num_chunks > 1 else col.chunk(0).to_numpy()
    labels = table.column("label").to_numpy().astype(np.int64)
    ids = table.column("id").to_numpy(zero_copy_only=False).astype(object)
    # id order from the ids alone, applied to the arrays (Arrow's sort_by took the whole table: 0.43 s of a 0.6 s
    # read of 9,500 images, most of it copying the image column)
    order = np.argsort(ids, kind="stable")
    if np.any(order != np.arange(len(order))):
        images, labels, ids = images[order], labels[order], ids[order]
    return images.astype(np.uint8, copy=False), labels, ids


IN_MEMORY_FRACTION = 0.25  # of this node's object store: the most a split preprocessed in memory may take


def in_memory(x: np.ndarray, labels: np.ndarray) -> Any:
    """A materialized Ray Dataset (x float32 tensor, label int64) from arrays in this process (no read tasks)."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    x = np.ascontiguousarray(x, dtype=np.float32)
    return ray.data.from_arrow(pa.table({"x": ArrowTensorArray.from_numpy(x),
                                         "label": pa.array(np.asarray(labels, dtype=np.int64))}))


def in_memory_bytes(data_dir: str, split: str, spec: PreprocessSpec) -> Optional[int]:
    """Bytes the split takes preprocessed (float32 inputs + labels), from the data manifest's totals."""
    rows = data_manifest(data_dir).get("totals", {}).get(split)
    return None if rows is None else int(rows) * (spec.input_size * spec.input_size * 3 * 4 + 8)


def _local_object_store_bytes() -> int:
    import ray

    node = ray.get_runtime_context().get_node_id()
    for n in ray.nodes():
        if n["NodeID"] == node:
            return int(n["Resources"].get("object_store_memory", 0))
    return 0


def training_split(data_dir: str, split: str, spec: PreprocessSpec, *, max_bytes: Optional[int] = None) -> Any:
    """The split as model inputs (``x``, ``label``), by size, unaugmented (augmentation happens in the Train
    worker, ``transfuse.finetune.loop.tf_dataset``).

    At most ``max_bytes`` preprocessed (default: ``IN_MEMORY_FRACTION`` of this node's object store): read here,
    preprocessed once, one materialized dataset that every epoch reuses. Otherwise the streaming path
    (``preprocessed(read_split(...))``), which keeps only a window of blocks in the object store.
    """
    size = in_memory_bytes(data_dir, split, spec)
    limit = int(IN_MEMORY_FRACTION * _local_object_store_bytes()) if max_bytes is None else max_bytes
    if size is not None and size <= limit:
        images, labels, _ = read_split_numpy(data_dir, split)
        return in_memory(preprocess(images, spec), labels)
    return preprocessed(read_split(data_dir, split), spec).select_columns(["x", "label"])


def training_rows(data_dir: str, split: str) -> Any:
    """The split's canonical rows (uint8 ``image``, ``label``) for Train workers that preprocess their own
    batches (``preprocess_batch`` in ``transfuse.finetune.loop``): the streamed training path. The object store holds
    the stored uint8 images, not float32 model inputs: a quarter of the bytes at the input size, 1/141 for 28 x 28
    grey images trained at 96 px."""
    return read_split(data_dir, split).select_columns(["image", "label"])


def preprocess_batch(batch: dict[str, Any], spec: PreprocessSpec, augment: Optional[AugmentConfig] = None,
                     rng: Optional[np.random.Generator] = None) -> dict[str, Any]:
    """Canonical rows -> model input ``x`` (float32) and ``label`` (and ``id`` when the batch has one): the body
    of Ray Data's ``map_batches`` (unaugmented) and of a Train worker's streamed batches, which ``augment``
    from the worker's seeded ``rng``."""
    flip = pad_crop = 0
    if augment is not None and (augment.flip or augment.pad_crop):
        if rng is None:
            raise ValueError("augmentation needs the caller's seeded generator (rng)")
        flip, pad_crop = augment.flip, augment.pad_crop
    else:
        rng = None
    images = np.stack(list(batch["image"])) if batch["image"].dtype == object else batch["image"]
    out = {"x": preprocess(images, spec, rng=rng, flip=bool(flip), pad_crop=pad_crop),
           "label": np.asarray(batch["label"], dtype=np.int64)}
    if "id" in batch:
        out["id"] = batch["id"]
    return out


def preprocessed(ds: Any, spec: PreprocessSpec, *, batch_size: int = 512) -> Any:
    """Streaming preprocessing of a canonical Ray Dataset with the one preprocessing function (unaugmented)."""
    return ds.map_batches(preprocess_batch, fn_kwargs={"spec": spec}, batch_size=batch_size, batch_format="numpy")
