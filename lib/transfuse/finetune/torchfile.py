"""A reader of PyTorch's legacy serialization (``torch.save`` before 1.6, not a zip) that needs neither torch nor
trust in the file.

The format is five pickles in a row (magic number, protocol version, system info, the object, the list of
storage keys) followed by every storage's raw bytes, each as an 8-byte little-endian element count and the
elements, in key-list order. The object pickle refers to storages by persistent id
``('storage', <StorageClass>, key, location, numel[, view_metadata])`` and builds tensors with
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks)``.

The unpickler resolves only ``collections.OrderedDict``, that rebuild function and the storage classes, each to
code of this module; any other global is refused with an error naming it, so a crafted file cannot run code.
Element counts are checked against the bytes, every stride against its storage, and nothing may follow the
last storage. Numpy only.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from transfuse.errors import TransfuseError

MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL = 1001

# storage class -> numpy dtype (little-endian). LongStorage elements are 8 bytes even where the file's system
# info says long = 4 (that entry describes the C long of the machine that saved it, not the storage)
STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "LongStorage": "<i8",
    "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}


class TorchFileError(TransfuseError, ValueError):
    """The file is not a legacy torch file this reader accepts; the message says what was wrong."""


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(STORAGE_DTYPES[self.name])


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> _TensorRef:
    """Stands in for ``torch._utils._rebuild_tensor_v2``: records where the tensor's elements are."""
    if not isinstance(storage, _StorageRef):
        raise TorchFileError(f"a tensor refers to {type(storage).__name__}, not to a storage")
    try:
        size_t, stride_t = tuple(int(s) for s in size), tuple(int(s) for s in stride)
        offset_i = int(offset)
    except (TypeError, ValueError):
        raise TorchFileError(f"a tensor's offset/size/stride are not integers: {offset!r} {size!r} "
                             f"{stride!r}") from None
    if len(size_t) != len(stride_t) or offset_i < 0 or any(s < 0 for s in size_t + stride_t):
        raise TorchFileError(f"a tensor has size {size_t}, stride {stride_t}, offset {offset_i}")
    return _TensorRef(storage, offset_i, size_t, stride_t)


class _Unpickler(pickle.Unpickler):
    ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in self.ALLOWED)
            raise TorchFileError(f"refused global {module}.{name}: a legacy torch state dict needs only {allowed}") \
                from None

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            raise TorchFileError(f"unsupported persistent id {pid!r:.200}: only ('storage', type, key, location, "
                                 "numel[, view]) is read")
        _, stype, key, _location, numel = pid[:5]
        if len(pid) == 6 and pid[5] is not None:
            raise TorchFileError(f"storage {key}: storage views are not supported")
        if not isinstance(stype, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise TorchFileError(f"storage {key}: bad type {stype!r} or element count {numel!r}")
        return _StorageRef(str(key), stype.dtype, numel)


def _load_pickle(f: io.BytesIO, what: str) -> Any:
    try:
        return _Unpickler(f).load()
    except TorchFileError:
        raise
    except Exception as e:  # a truncated or garbled pickle raises many types
        raise TorchFileError(f"cannot read the {what} pickle: {type(e).__name__}: {e}") from None


def _tensors_of(obj: Any, prefix: str = "") -> dict[str, _TensorRef]:
    """Tensor references in a (nested) state dict, by dotted key."""
    if isinstance(obj, _TensorRef):
        return {prefix: obj}
    if isinstance(obj, dict):
        out: dict[str, _TensorRef] = {}
        for k, v in obj.items():
            out.update(_tensors_of(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    raise TorchFileError(f"{prefix or '<root>'}: holds a {type(obj).__name__}; only dicts of tensors are read")


def read_state_dict(data: bytes, source: str = "<bytes>") -> dict[str, np.ndarray]:
    """The tensors of a legacy torch file as numpy arrays (copies, C-contiguous), by state-dict key."""
    if data[:2] == b"PK":
        raise TorchFileError(f"{source}: a zip-format torch file (torch >= 1.6); this reader reads the legacy format")
    f = io.BytesIO(data)
    try:
        magic = _load_pickle(f, "magic number")
        if magic != MAGIC:
            raise TorchFileError(f"magic number {magic!r} is not the legacy torch magic {MAGIC:#x}")
        version = _load_pickle(f, "protocol version")
        if version != PROTOCOL:
            raise TorchFileError(f"protocol version {version!r}, this reader reads {PROTOCOL}")
        info = _load_pickle(f, "system info")
        if not isinstance(info, dict) or not info.get("little_endian", False):
            raise TorchFileError(f"system info {info!r:.200}: only little-endian files are read")
        tensors = _tensors_of(_load_pickle(f, "state dict"))
        keys = _load_pickle(f, "storage key list")
        if not isinstance(keys, list):
            raise TorchFileError(f"storage key list is a {type(keys).__name__}")
        by_key = {t.storage.key: t.storage for t in tensors.values()}
        if set(map(str, keys)) != set(by_key):
            raise TorchFileError(f"the storage key list ({len(keys)} keys) does not match the tensors' storages "
                                 f"({len(by_key)})")
        buffers: dict[str, np.ndarray] = {}
        for key in map(str, keys):
            ref = by_key[key]
            head = f.read(8)
            if len(head) != 8:
                raise TorchFileError(f"storage {key}: file ends before its element count")
            (count,) = struct.unpack("<q", head)
            if count != ref.numel:
                raise TorchFileError(f"storage {key}: {count} elements in the file, the state dict says {ref.numel}")
            nbytes = count * ref.dtype.itemsize
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise TorchFileError(f"storage {key}: needs {nbytes} bytes, the file has {len(raw)} left")
            buffers[key] = np.frombuffer(raw, dtype=ref.dtype)
        rest = len(data) - f.tell()
        if rest:
            raise TorchFileError(f"{rest} bytes follow the last storage")
    except TorchFileError as e:
        raise TorchFileError(f"{source}: {e}") from None
    out = {}
    for name, t in tensors.items():
        buf = buffers[t.storage.key]
        last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride)) if all(t.size) else t.offset - 1
        if last >= len(buf) or (t.offset > len(buf)):
            raise TorchFileError(f"{source}: tensor {name} (size {t.size}, stride {t.stride}, offset {t.offset}) "
                                 f"reaches past its storage of {len(buf)} elements")
        item = buf.itemsize
        view = np.lib.stride_tricks.as_strided(buf[t.offset:], shape=t.size,
                                               strides=tuple(s * item for s in t.stride), writeable=False)
        out[name] = np.array(view, order="C")  # a copy (ascontiguousarray would make scalars 1-d)
    return out


def read_state_dict_file(path: str) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        return read_state_dict(f.read(), path)
