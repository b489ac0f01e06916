"""How much full-integer int8 buys one CNN against float32, by backbone size, on this CPU (LiteRT, 1 thread).

The ensemble's int8/float32 ratios cannot exceed its CNN's: the other parts (preprocessing, scikit-learn members,
stacker) are the same files in both variants. This prints the CNN's own ratios for the default's small VGG at
32x32 and for VGG16 at larger inputs, each model exported whole with the compress stage's ``to_tflite`` (random
weights: ImageNet weights need the internet, and speed and size do not depend on the values; the int8 calibration
set is random images through the one preprocessing function; no accuracy is measured here, the compress stage
does that on real members). Batch-1 latency is timed in turns (float, int8,
int8, float, ...) in one process, so load from other processes falls on both alike.

    .venv/bin/python bench/int8_scale.py                      # vgg_small@32, vgg16@64, vgg16@224
    .venv/bin/python bench/int8_scale.py --models vgg16@224 --runs 20
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from transfuse import runtime  # noqa: E402,F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)
from transfuse import models, tflite_export  # noqa: E402
from transfuse.runtimes import LiteRTRunner  # noqa: E402
from transfuse.config import HeadConfig, ModelConfig  # noqa: E402
from transfuse.preprocess import PreprocessSpec, preprocess  # noqa: E402


def export(backbone: str, size: int, width: float, calib: int) -> tuple[dict[str, bytes], int, np.ndarray]:
    mc = ModelConfig(backbone=backbone, weights="none", input_size=size, width=width, head=HeadConfig(dense=[256]))
    spec = models.model_spec(mc, 10, [str(i) for i in range(10)], seed=0, unfreeze=4)
    model = models.build_model(spec)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(calib + 1, size, size, 3), dtype=np.uint8)
    x = preprocess(raw, PreprocessSpec(**spec["preprocess"]))
    files = {"float32": tflite_export.to_tflite(model, "float32"), "int8": tflite_export.to_tflite(model, "int8", x[:calib])}
    return files, int(model.count_params()), x[calib:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg_small@32,vgg16@64,vgg16@224",
                    help="backbone@input_size list (vgg_small uses width 0.125, the default config's)")
    ap.add_argument("--runs", type=int, default=0, help="batch-1 calls per model (0: 300 below 10 ms, else 20)")
    ap.add_argument("--calib", type=int, default=32, help="int8 calibration images")
    args = ap.parse_args()
    print(f"{'model':<16}{'params':>12}{'f32 bytes':>12}{'int8 bytes':>12}{'x smaller':>10}{'x gzip':>8}"
          f"{'f32 p50 ms':>12}{'int8 p50 ms':>12}{'x faster':>10}")
    for item in args.models.split(","):
        backbone, size = item.split("@")
        files, params, x1 = export(backbone, int(size), 0.125, args.calib)
        with tempfile.TemporaryDirectory() as d:
            runners = {}
            for mode, data in files.items():
                (Path(d) / f"{mode}.tflite").write_bytes(data)
                runners[mode] = LiteRTRunner(Path(d) / f"{mode}.tflite", 1, mode)
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


if __name__ == "__main__":
    main()
