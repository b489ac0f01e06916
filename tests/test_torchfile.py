"""The legacy torch reader on small files written here in the real format, and on a crafted malicious one."""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest

from transfuse.finetune.torchfile import MAGIC, TorchFileError, read_state_dict


class _Storage:
    def __init__(self, key: str, values: np.ndarray):
        self.key, self.values = key, values


def _write_legacy(tensors: dict[str, tuple[np.ndarray, int, tuple, tuple]], *, extra_count: int = 0,
                  trailing: bytes = b"") -> bytes:
    """A legacy torch file: name -> (storage values, offset, size, stride), as torch.save wrote before 1.6.

    The torch globals are pickled from stand-in modules that exist only while this runs."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # pragma: no cover - only pickled by reference
        raise AssertionError

    class FloatStorage:  # noqa: D401 - pickled by reference
        pass

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    utils._rebuild_tensor_v2, torch.FloatStorage, torch._utils = _rebuild_tensor_v2, FloatStorage, utils

    class _Tensor:
        def __init__(self, storage, offset, size, stride):
            self.args = (storage, offset, size, stride, False, OrderedDict())

        def __reduce__(self):
            return _rebuild_tensor_v2, self.args

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return ("storage", FloatStorage, obj.key, "cpu", len(obj.values), None)
            return None

    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        storages = {}
        state = OrderedDict()
        for i, (name, (values, offset, size, stride)) in enumerate(tensors.items()):
            st = storages.setdefault(name, _Storage(str(1000 + i), values.astype("<f4")))
            state[name] = _Tensor(st, offset, size, stride)
        out = io.BytesIO()
        for obj in (MAGIC, 1001, {"protocol_version": 1001, "little_endian": True,
                                  "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(obj, out, protocol=2)
        _Pickler(out, protocol=2).dump(state)
        pickle.dump([s.key for s in storages.values()], out, protocol=2)
        for s in storages.values():
            out.write(struct.pack("<q", len(s.values) + extra_count))
            out.write(s.values.tobytes())
        return out.getvalue() + trailing
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def test_reads_contiguous_and_strided_tensors():
    values = np.arange(24, dtype=np.float32)
    raw = _write_legacy({
        "a": (values, 0, (2, 3, 4), (12, 4, 1)),  # C-contiguous
        "b": (values, 2, (4, 3), (1, 4)),  # a transposed view with an offset (channels-last layouts look so)
        "c": (np.array([7.5], dtype=np.float32), 0, (), ()),  # a scalar
    })
    sd = read_state_dict(raw)
    assert list(sd) == ["a", "b", "c"]
    np.testing.assert_array_equal(sd["a"], values.reshape(2, 3, 4))
    np.testing.assert_array_equal(sd["b"], [[values[2 + i + 4 * j] for j in range(3)] for i in range(4)])
    assert sd["c"].shape == () and float(sd["c"]) == 7.5
    assert all(a.flags["C_CONTIGUOUS"] for a in sd.values())


@pytest.mark.parametrize("kwargs, tensors, pattern", [
    ({"extra_count": 1}, None, r"elements in the file, the state dict says"),
    ({"trailing": b"\0" * 5}, None, r"5 bytes follow the last storage"),
    ({}, {"a": (np.zeros(4), 0, (2, 3), (3, 1))}, r"reaches past its storage of 4 elements"),
])
def test_inconsistent_files_are_refused(kwargs, tensors, pattern):
    raw = _write_legacy(tensors or {"a": (np.zeros(6), 0, (2, 3), (3, 1))}, **kwargs)
    with pytest.raises(TorchFileError, match=pattern):
        read_state_dict(raw, "crafted.pth")


def test_truncated_file_is_refused():
    raw = _write_legacy({"a": (np.zeros(6), 0, (2, 3), (3, 1))})
    with pytest.raises(TorchFileError, match=r"needs 24 bytes"):
        read_state_dict(raw[:-3])


def test_forbidden_global_is_refused_and_never_called(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    out = io.BytesIO()
    for obj in (MAGIC, 1001, {"little_endian": True}):
        pickle.dump(obj, out, protocol=2)
    pickle.dump(OrderedDict(w=Evil()), out, protocol=2)
    with pytest.raises(TorchFileError, match=r"refused global (posix|os)\.system: a legacy torch state dict needs "
                                             r"only collections\.OrderedDict, torch\._utils\._rebuild_tensor_v2"):
        read_state_dict(out.getvalue(), "evil.pth")
    assert not marker.exists()


def test_zip_format_and_wrong_magic_are_named():
    with pytest.raises(TorchFileError, match="zip-format"):
        read_state_dict(b"PK\x03\x04rest")
    with pytest.raises(TorchFileError, match="not the legacy torch magic"):
        read_state_dict(pickle.dumps(12345, protocol=2))
