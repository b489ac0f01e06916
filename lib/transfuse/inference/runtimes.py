"""The inference runtimes a bundle's model files run on: LiteRT for .tflite, ONNX Runtime for .onnx.

Each adapter loads one model (a file, or its bytes when the bundle stores it coded), checks it has one input,
and is called with a batch (a numpy array) to return its outputs by name. They import only their runtime (no
TensorFlow), so a Serve replica loads them without it.
A file the runtime cannot load, or one whose signature is not what a bundle expects, is a ``ModelLoadError``
(``bundle.load_bundle`` reports it as a ``BundleError`` naming the member).

``onnx_session`` is the one place an ONNX Runtime session is made (session options, threads, the CPU provider,
load errors): ``OnnxRunner`` here, the scikit-learn members of ``transfuse.inference.combine`` and the checks of
``transfuse.compress.onnx_rewrite`` all open their graphs through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from transfuse.errors import TransfuseError

MODEL_FORMATS = ("tflite", "onnx")


class ModelLoadError(TransfuseError, RuntimeError):
    """A model file that its runtime cannot load, or whose inputs and outputs are not as expected. ``reason``: the
    runtime's own error, when it refused the file."""

    def __init__(self, message: str, reason: Optional[BaseException] = None):
        super().__init__(message)
        self.reason = reason


def _source(model: Union[str, Path, bytes]) -> tuple[Union[str, bytes], str]:
    """(what the runtime loads: a path as a string, which it maps, or the model's bytes; a name for errors)."""
    if isinstance(model, (bytes, bytearray)):
        return bytes(model), f"the decoded model ({len(model):,} bytes)"
    return str(model), Path(model).name


class LiteRTRunner:
    """One .tflite model run through its serving signature; inputs are resized to each batch."""

    def __init__(self, model: Union[Path, bytes], num_threads: int, what: str):
        from ai_edge_litert.interpreter import Interpreter

        src, name = _source(model)
        try:
            kw = {"model_content": src} if isinstance(src, bytes) else {"model_path": src}
            self.interpreter = Interpreter(num_threads=num_threads, **kw)
            sigs = self.interpreter.get_signature_list()
            if len(sigs) != 1:
                raise ModelLoadError(f"{what}: expected one signature in {name}, found {sorted(sigs)}")
            self.runner = self.interpreter.get_signature_runner(next(iter(sigs)))
        except (ValueError, RuntimeError) as e:
            raise ModelLoadError(f"{what}: LiteRT cannot load {name}: {e}") from None
        ins = self.runner.get_input_details()
        if len(ins) != 1:
            raise ModelLoadError(f"{what}: {name} must take one input, takes {sorted(ins)}")
        self.input_name = next(iter(ins))
        self.input_dtype = ins[self.input_name]["dtype"]
        self.outputs = sorted(self.runner.get_output_details())

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.runner(**{self.input_name: np.ascontiguousarray(x, dtype=self.input_dtype)})


def onnx_session(model: Union[str, Path, bytes], num_threads: int, what: str) -> Any:
    """An ONNX Runtime ``InferenceSession`` over a model file's path or its bytes, on the CPU provider with
    ``num_threads`` intra-op threads (onnxruntime's default takes every core) and one inter-op thread.
    ``ModelLoadError`` (its ``reason`` the runtime's error) when ONNX Runtime cannot load it."""
    import onnxruntime as ort

    src, name = _source(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = num_threads
    opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelLoadError(f"{what}: ONNX Runtime cannot load {name}: {e}", reason=e) from None


class OnnxRunner:
    """One ONNX model on ONNX Runtime's CPU provider (``onnx_session``)."""

    def __init__(self, model: Union[Path, bytes], num_threads: int, what: str):
        self.session = onnx_session(model, num_threads, what)
        ins = self.session.get_inputs()
        if len(ins) != 1:
            raise ModelLoadError(f"{what}: {_source(model)[1]} must take one input, takes {[i.name for i in ins]}")
        self.input_name = ins[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        res = self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        return dict(zip(self.outputs, res))


def load_runner(model: Union[Path, bytes], fmt: str, num_threads: int, what: str) -> LiteRTRunner | OnnxRunner:
    """The adapter for ``fmt`` (one of ``MODEL_FORMATS``) over a model file's path or its bytes; ``what`` names
    the model in errors."""
    if fmt == "tflite":
        return LiteRTRunner(model, num_threads, what)
    if fmt == "onnx":
        return OnnxRunner(model, num_threads, what)
    raise ModelLoadError(f"{what}: format must be one of {MODEL_FORMATS}, got {fmt!r}")


__all__ = ["MODEL_FORMATS", "LiteRTRunner", "ModelLoadError", "OnnxRunner", "load_runner", "onnx_session"]
