"""Dataset sources, each producing canonical rows: ``image`` (uint8 H x W x C), ``label`` (int64), ``id`` (str).

A source returns a ``Source``: a Ray Dataset of canonical rows (plus ``error`` for rows that failed to
decode), the class names, a description for the manifest, and files it ignored with the reason. Monolithic
formats (idx, CIFAR pickles, digits) are parsed on the driver and handed to Ray Data as Arrow blocks; a user's
image folders and tables are read and decoded by Ray Data tasks (``transfuse.data.files``).
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa

from transfuse import storage
from transfuse.config import DataConfig
from transfuse.errors import TransfuseError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist", "~/.keras/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CIFAR10_DIRS = ("~/.keras/datasets/cifar-10-batches-py",)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_ROWS_PER_BLOCK = 2048


class DataError(TransfuseError, ValueError):
    """Input data is missing, corrupt or inconsistent; the message names the file and the problem."""


@dataclass
class Source:
    dataset: Any  # ray.data.Dataset with image, label, id (+ error, shape for decoded files); None with arrays
    class_names: list[str]
    description: dict[str, Any]
    ignored: list[dict[str, str]] = field(default_factory=list)
    test_prefix: Optional[str] = None  # ids of the source's own test set start with this (data.test_from_source)
    bad: list[dict[str, str]] = field(default_factory=list)  # rows found bad before decoding (a table's missing file)
    # the rows decoded in this process instead of a Ray Dataset (dataset None): image, label, id, error arrays
    arrays: Optional[dict[str, np.ndarray]] = None


def _tensor_table(images: np.ndarray, labels: np.ndarray, ids: list[str]) -> pa.Table:
    from ray.data.extensions import ArrowTensorArray

    return pa.table({
        "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
        "label": pa.array(labels.astype(np.int64)),
        "id": pa.array(ids, type=pa.string()),
    })


def from_arrays(images: np.ndarray, labels: np.ndarray, ids: list[str]) -> Any:
    """In-memory canonical arrays -> a Ray Dataset in blocks of ``_ROWS_PER_BLOCK`` rows."""
    import ray.data

    if images.ndim == 3:
        images = images[..., None]
    tables = [
        _tensor_table(images[i:i + _ROWS_PER_BLOCK], labels[i:i + _ROWS_PER_BLOCK], ids[i:i + _ROWS_PER_BLOCK])
        for i in range(0, len(labels), _ROWS_PER_BLOCK)
    ]
    return ray.data.from_arrow(tables)


# ---------------------------------------------------------------- scikit-learn digits


def load_digits_source(cfg: DataConfig) -> Source:
    """scikit-learn's bundled 8x8 digits (0..16 grey levels), scaled to uint8 0..255."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    ids = [f"digits/{i:05d}" for i in range(len(d.target))]
    return Source(from_arrays(images, d.target, ids), [str(c) for c in d.target_names],
                  {"source": "digits", "origin": "sklearn.datasets.load_digits", "n": len(ids)})


# ---------------------------------------------------------------- Fashion-MNIST idx


def read_idx(path: str) -> np.ndarray:
    """An idx file (optionally gzipped), as in the MNIST / Fashion-MNIST distribution."""
    raw = storage.read_bytes(path)
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an idx header ({len(raw)} bytes)")
    zero, dtype_code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: not an idx file of unsigned bytes (magic {raw[:4].hex()}, expected 000008xx)")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} = {int(np.prod(dims))} values, file holds {data.size}")
    return data.reshape(dims)


def find_dir(explicit: Optional[str], candidates: tuple[str, ...], required: tuple[str, ...]) -> Optional[str]:
    if explicit:
        return explicit
    for c in candidates:
        p = Path(c).expanduser()
        if all((p / f).is_file() for f in required):
            return str(p)
    return None


def load_fashion_mnist_source(cfg: DataConfig) -> Source:
    required = tuple(f for pair in FASHION_MNIST_FILES.values() for f in pair)
    folder = find_dir(cfg.path, FASHION_MNIST_DIRS, required)
    if folder is None:
        if not cfg.download:
            raise DataError(
                "Fashion-MNIST idx files not found in data.path, "
                + ", ".join(FASHION_MNIST_DIRS)
                + ". Install the Debian package dataset-fashion-mnist, set data.path to the folder holding "
                + ", ".join(required) + ", or set data.download=true (needs the internet)."
            )
        import tf_keras  # noqa: F401  (Keras' downloader fills ~/.keras/datasets/fashion-mnist)
        from tf_keras.datasets import fashion_mnist

        fashion_mnist.load_data()
        folder = str(Path(FASHION_MNIST_DIRS[1]).expanduser())
    images, labels, ids = [], [], []
    for part, (img_file, lbl_file) in FASHION_MNIST_FILES.items():
        img_path, lbl_path = storage.join(folder, img_file), storage.join(folder, lbl_file)
        for p in (img_path, lbl_path):
            if not storage.exists(p):
                raise DataError(f"Fashion-MNIST file missing: {p}")
        x, y = read_idx(img_path), read_idx(lbl_path)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{img_path} / {lbl_path}: expected N x 28 x 28 images and N labels, "
                            f"got {x.shape} and {y.shape}")
        images.append(x)
        labels.append(y.astype(np.int64))
        ids += [f"fashion_mnist/{part}/{i:05d}" for i in range(len(y))]
    return Source(from_arrays(np.concatenate(images)[..., None], np.concatenate(labels), ids),
                  list(FASHION_MNIST_CLASSES), {"source": "fashion_mnist", "path": folder, "n": len(ids)},
                  test_prefix="fashion_mnist/test/")


# ---------------------------------------------------------------- CIFAR-10 python batches


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR-10 python format uses: dicts, lists, bytes, ints and numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refused global {module}.{name}: a CIFAR-10 batch holds only dicts, lists, bytes, ints and numpy "
            "arrays; this file is not a genuine CIFAR-10 batch"
        )


def safe_unpickle(raw: bytes, path: str) -> Any:
    try:
        return RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: {e}") from None
    except Exception as e:  # truncated or garbled files raise many types
        raise DataError(f"{path}: not a readable CIFAR-10 pickle ({type(e).__name__}: {e})") from None


def _key(d: dict, name: str, path: str) -> Any:
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise DataError(f"{path}: missing key {name!r}; a CIFAR-10 batch has data, labels, filenames, batch_label")


def read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    d = safe_unpickle(storage.read_bytes(path), path)
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict, got {type(d).__name__}")
    data = np.asarray(_key(d, "data", path))
    labels = np.asarray(_key(d, "labels", path), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{path}: data must be uint8 N x 3072 with N labels, got {data.dtype} {data.shape} "
                        f"and {labels.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_cifar10_source(cfg: DataConfig) -> Source:
    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    folder = find_dir(cfg.path, CIFAR10_DIRS, (*batches, "batches.meta"))
    if folder is None:
        if not cfg.download:
            raise DataError(
                f"CIFAR-10 batches not found in data.path or {CIFAR10_DIRS[0]}: expected a cifar-10-batches-py "
                "folder holding data_batch_1..5, test_batch and batches.meta. Set data.path, or data.download=true "
                "(needs the internet)."
            )
        import tf_keras  # noqa: F401
        from tf_keras.utils import get_file

        archive = get_file("cifar-10-batches-py", origin=CIFAR10_URL, untar=True)
        folder = archive
    meta_path = storage.join(folder, "batches.meta")
    if not storage.exists(meta_path):
        raise DataError(f"CIFAR-10 file missing: {meta_path}")
    meta = safe_unpickle(storage.read_bytes(meta_path), meta_path)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _key(meta, "label_names", meta_path)]
    images, labels, ids = [], [], []
    for b in batches:
        p = storage.join(folder, b)
        if not storage.exists(p):
            raise DataError(f"CIFAR-10 file missing: {p}")
        x, y = read_cifar_batch(p)
        images.append(x)
        labels.append(y)
        ids += [f"cifar10/{b}/{i:05d}" for i in range(len(y))]
    return Source(from_arrays(np.concatenate(images), np.concatenate(labels), ids), names,
                  {"source": "cifar10", "path": folder, "n": len(ids)}, test_prefix="cifar10/test_batch/")


# ---------------------------------------------------------------- parquet


def load_parquet_source(cfg: DataConfig) -> Source:
    if not cfg.path:
        raise DataError("data.source=parquet needs data.path: a folder or URI of parquet files")
    fs, base = storage.resolve(cfg.path)
    if not storage.exists(cfg.path):
        raise DataError(f"parquet path not found: {cfg.path}")
    ds = storage.read_parquet(base, fs)
    cols = set(ds.schema().names)
    missing = {"image", "label", "id"} - cols
    if missing:
        raise DataError(f"parquet at {cfg.path} lacks columns {sorted(missing)}; the canonical schema is "
                        f"image (uint8 H x W x C), label (int64), id (string); found {sorted(cols)}")
    ds = ds.select_columns(["image", "label", "id"])
    manifest = storage.read_manifest(cfg.path)
    if manifest and "class_names" in manifest:
        names = list(manifest["class_names"])
    else:
        n = int(ds.max("label")) + 1
        names = [str(i) for i in range(n)]
    return Source(ds, names, {"source": "parquet", "path": cfg.path})


LOADERS: dict[str, Callable[[DataConfig], Source]] = {
    "digits": load_digits_source,
    "fashion_mnist": load_fashion_mnist_source,
    "cifar10": load_cifar10_source,
    "parquet": load_parquet_source,
}
