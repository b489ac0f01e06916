"""How much full-integer int8 buys one CNN against float32, by backbone size, on this CPU (LiteRT, 1 thread).

The ensemble's int8/float32 ratios cannot exceed its CNN's: the other parts (preprocessing, scikit-learn members,
stacker) are the same files in both variants. This prints the CNN's own ratios for the default's small VGG at
32x32 and for VGG16 at larger inputs, each model exported whole with the compress stage's ``to_tflite`` (random
weights: ImageNet weights need the internet, and speed and size do not depend on the values; the int8 calibration
set is random images through the one preprocessing function; no accuracy is measured here, the compress stage
does that on real members). Batch-1 latency is timed in turns (float, int8,
int8, float, ...) in one process, so load from other processes falls on both alike.

``--runtimes`` adds other CPU runtimes for the same model, timed in the same turns and printed as ratios against
LiteRT's float32 (the bundle's baseline): ONNX Runtime float32 and static int8 (the Keras model through tf2onnx,
``quantize_static`` QOperator, per-channel int8 weights, uint8 activations, the same calibration images) and
OpenVINO (the two .tflite files; float32, bf16 and the int8 file). Both are optional:
``.venv/bin/pip install -e '.[runtimes]'``; a runtime that is not installed is named and skipped.

    .venv/bin/python bench/int8_scale.py                      # vgg_small@32, vgg16@64, vgg16@224
    .venv/bin/python bench/int8_scale.py --models vgg16@224 --runs 20
    .venv/bin/python bench/int8_scale.py --models efficientnet_lite0@96 --head avg \
        --runtimes litert,onnxruntime,openvino
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from transfuse import environment  # noqa: E402,F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)
from transfuse.finetune import models  # noqa: E402
from transfuse.inference.runtimes import LiteRTRunner  # noqa: E402
from transfuse.config import HeadConfig, ModelConfig  # noqa: E402
from transfuse.inference.preprocessing import PreprocessSpec, preprocess  # noqa: E402
from transfuse.compress import tflite


HEADS = {"dense256": HeadConfig(dense=[256]),  # the seed's head: Flatten -> Dense(256) -> Dense(classes)
         "avg": HeadConfig(dense=[], pooling="avg")}  # configs/default.yaml's: global average pooling -> softmax


def export(backbone: str, size: int, width: float, calib: int,
           head: str = "dense256") -> tuple[dict[str, bytes], int, np.ndarray, Any, np.ndarray]:
    """The two .tflite files, the parameter count, one image to time, the Keras model and the calibration set."""
    mc = ModelConfig(backbone=backbone, weights="none", input_size=size, width=width, head=HEADS[head])
    spec = models.model_spec(mc, 10, [str(i) for i in range(10)], seed=0, unfreeze=4)
    model = models.build_model(spec)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(calib + 1, size, size, 3), dtype=np.uint8)
    x = preprocess(raw, PreprocessSpec(**spec["preprocess"]))
    files = {"float32": tflite.to_tflite(model, "float32"),
             "int8": tflite.to_tflite(model, "int8", x[:calib])}
    return files, int(model.count_params()), x[calib:], model, x[:calib]


def onnxruntime_runners(model: Any, calib: np.ndarray, d: Path) -> dict[str, Callable[[np.ndarray], Any]]:
    """ONNX Runtime float32 and static int8 (QOperator) of the Keras model, one thread each."""
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    spec = (tf.TensorSpec((None, *model.input.shape[1:]), tf.float32, name="image"),)
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=str(d / "f32.onnx"))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(calib[i:i + 1] for i in range(len(calib)))

        def get_next(self) -> Optional[dict[str, np.ndarray]]:
            row = next(self.rows, None)
            return None if row is None else {"image": row}

    quantize_static(str(d / "f32.onnx"), str(d / "int8.onnx"), Reader(), quant_format=QuantFormat.QOperator,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    out = {}
    for mode in ("f32", "int8"):
        sess = ort.InferenceSession(str(d / f"{mode}.onnx"), opts, providers=["CPUExecutionProvider"])
        out[f"ort {mode}"] = lambda x, s=sess: s.run(None, {"image": x})
    return out


def openvino_runners(model: Any, calib: np.ndarray, d: Path) -> dict[str, Callable[[np.ndarray], Any]]:
    """OpenVINO (CPU plugin, one thread, latency hint) on the .tflite files in ``d``: float32, bf16 and the int8
    file (``model`` and ``calib``: unused, the .tflite files carry both)."""
    import openvino as ov

    core = ov.Core()
    out = {}
    for name, f, hint in (("ov f32", "float32", "f32"), ("ov bf16", "float32", "bf16"), ("ov int8", "int8", None)):
        cfg = {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if hint:
            cfg["INFERENCE_PRECISION_HINT"] = hint
        req = core.compile_model(core.read_model(str(d / f"{f}.tflite")), "CPU", cfg).create_infer_request()
        out[name] = lambda x, r=req: r.infer({0: x})
    return out


# runtime -> (module it needs, runners(keras model, calibration images, folder of the .tflite files)); litert: always
RUNTIMES = {"litert": None, "onnxruntime": ("tf2onnx", onnxruntime_runners), "openvino": ("openvino", openvino_runners)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg_small@32,vgg16@64,vgg16@224",
                    help="backbone@input_size list (vgg_small uses width 0.125, the default config's)")
    ap.add_argument("--runs", type=int, default=0, help="batch-1 calls per model (0: 300 below 10 ms, else 20)")
    ap.add_argument("--calib", type=int, default=32, help="int8 calibration images")
    ap.add_argument("--head", choices=sorted(HEADS), default="dense256",
                    help="dense256: Flatten -> Dense(256) (a large matmul, int8's best case); avg: the default "
                         "config's pooled softmax (the served Lite0 members' head)")
    ap.add_argument("--runtimes", default="litert", help=f"comma list of {sorted(RUNTIMES)}: more runtimes, "
                    f"timed in the same turns, printed against LiteRT float32")
    args = ap.parse_args()
    wanted = [r for r in args.runtimes.split(",") if r]
    bad = [r for r in wanted if r not in RUNTIMES]
    if bad:
        ap.error(f"--runtimes: {bad} not in {sorted(RUNTIMES)}")
    others = []
    for r in wanted:
        if RUNTIMES[r] is None:
            continue
        module, _ = RUNTIMES[r]
        try:
            __import__(module)
            others.append(r)
        except ImportError:
            print(f"{r}: skipped ({module} is not installed: .venv/bin/pip install -e '.[runtimes]')")
    print(f"{'model':<16}{'params':>12}{'f32 bytes':>12}{'int8 bytes':>12}{'x smaller':>10}{'x gzip':>8}"
          f"{'f32 p50 ms':>12}{'int8 p50 ms':>12}{'x faster':>10}")
    for item in args.models.split(","):
        backbone, size = item.split("@")
        files, params, x1, model, calib = export(backbone, int(size), 0.125, args.calib, args.head)
        with tempfile.TemporaryDirectory() as d:
            runners: dict[str, Callable[[np.ndarray], Any]] = {}
            for mode, data in files.items():
                (Path(d) / f"{mode}.tflite").write_bytes(data)
                runners[mode] = LiteRTRunner(Path(d) / f"{mode}.tflite", 1, mode)
            for r in others:
                runners.update(RUNTIMES[r][1](model, calib, Path(d)))
            t0 = time.perf_counter()
            runners["float32"](x1)
            first = time.perf_counter() - t0
            runs = args.runs or (300 if first < 0.01 else 20)
            t = {m: [] for m in runners}
            order = list(runners)
            for i in range(runs):
                for m in (order if i % 2 == 0 else order[::-1]):
                    s = time.perf_counter()
                    runners[m](x1)
                    t[m].append(time.perf_counter() - s)
        p50 = {m: float(np.median(v) * 1e3) for m, v in t.items()}
        gz = {m: len(gzip.compress(b, 9)) for m, b in files.items()}
        print(f"{item:<16}{params:>12,}{len(files['float32']):>12,}{len(files['int8']):>12,}"
              f"{len(files['float32']) / len(files['int8']):>10.2f}{gz['float32'] / gz['int8']:>8.2f}"
              f"{p50['float32']:>12.3f}{p50['int8']:>12.3f}{p50['float32'] / p50['int8']:>10.2f}",
              flush=True)
        for name in [m for m in runners if m not in files]:
            print(f"  {name:<14}p50 {p50[name]:8.3f} ms: {p50['float32'] / p50[name]:5.2f}x LiteRT float32's speed "
                  f"(LiteRT int8: {p50['float32'] / p50['int8']:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
