"""Batch-1 and batch-64 cost of the one preprocessing function (what every served request pays first), against the
gather-based bilinear resize it used before (kept here as the baseline), in the same process.

    .venv/bin/python bench/preprocess.py [--runs 3000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from transfuse.inference.preprocessing import PreprocessSpec, normalize, preprocess  # noqa: E402


def gather_resize(x: np.ndarray, size: int) -> np.ndarray:
    """The previous resize_bilinear: per-axis gathers and blends (half-pixel centres)."""
    n, h, w, c = x.shape

    def coords(src: int):
        pos = np.clip((np.arange(size, dtype=np.float32) + 0.5) * (src / size) - 0.5, 0, src - 1)
        lo = np.floor(pos).astype(np.int64)
        return lo, np.minimum(lo + 1, src - 1), (pos - lo).astype(np.float32)

    y0, y1, wy = coords(h)
    x0, x1, wx = coords(w)
    top = x[:, y0] * (1 - wy)[None, :, None, None] + x[:, y1] * wy[None, :, None, None]
    return top[:, :, x0] * (1 - wx)[None, None, :, None] + top[:, :, x1] * wx[None, None, :, None]


def baseline(images: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The previous preprocess: grey repeated to RGB first, then the gather resize."""
    x = images.astype(np.float32)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.ascontiguousarray(normalize(gather_resize(x, spec.input_size), spec.normalization), dtype=np.float32)


def p50_us(fn, runs: int) -> float:
    for _ in range(20):
        fn()
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return float(np.median(t) * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for shape, spec in (((28, 28, 1), PreprocessSpec(32, "unit")), ((32, 32, 3), PreprocessSpec(64, "caffe"))):
        for n in (1, 64):
            x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
            diff = float(np.abs(preprocess(x, spec) - baseline(x, spec)).max())
            runs = args.runs if n == 1 else max(50, args.runs // 20)
            b, o = p50_us(lambda: baseline(x, spec), runs), p50_us(lambda: preprocess(x, spec), runs)
            print(f"{n:>3} x {shape} -> {spec.input_size} ({spec.normalization}): baseline {b:8.1f} us, "
                  f"preprocess {o:8.1f} us, {b / o:5.2f}x faster, max |diff| {diff:.2g}")


if __name__ == "__main__":
    main()
