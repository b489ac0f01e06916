"""Input pipeline throughput: the seed's Keras flow_from_directory vs prepared parquet on Ray Data.

Same image folder (N Fashion-MNIST PNGs), same work per image (decode, grey -> RGB, resize to 32x32, scale),
both run in this one command, so the ratio holds on a noisy shared machine even when absolute times drift:
  (a) seed recipe: ImageDataGenerator(rescale=1/255).flow_from_directory(...), one pass per epoch;
  (b) transfuse: `prepare` once (timed, reported apart), then per epoch a pass over the parquet shards with the
      project's streaming preprocessing (`transfuse.data.preprocessed`): epoch 1 streams from parquet, later
      epochs reuse the materialized result (what fits in the object store stays there across epochs).

    .venv/bin/python bench/data.py --n 10000 --epochs 3
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from transfuse import runtime, storage
from transfuse.config import load_config
from transfuse.data import prepare, preprocessed, read_split
from transfuse.data.sources import FASHION_MNIST_DIRS, read_idx
from transfuse.preprocess import PreprocessSpec

BATCH = 256  # images per batch for both pipelines


def write_pngs(root: Path, n: int) -> None:
    from PIL import Image

    folder = Path(FASHION_MNIST_DIRS[0])
    images = read_idx(str(folder / "train-images-idx3-ubyte.gz"))[:n]
    labels = read_idx(str(folder / "train-labels-idx1-ubyte.gz"))[:n]
    for i, (im, y) in enumerate(zip(images, labels)):
        d = root / f"class_{y}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{i:05d}.png")


def keras_epoch(root: Path) -> tuple[float, int]:
    import tensorflow as tf

    gen = tf.keras.preprocessing.image.ImageDataGenerator(rescale=1 / 255).flow_from_directory(
        str(root), target_size=(32, 32), color_mode="rgb", batch_size=BATCH, class_mode="sparse", shuffle=True)
    t = time.perf_counter()
    seen = 0
    for _ in range(len(gen)):
        x, _ = next(gen)
        seen += len(x)
    return time.perf_counter() - t, seen


def ray_epoch(ds) -> tuple[float, int]:
    t = time.perf_counter()
    seen = 0
    for batch in ds.iter_batches(batch_size=BATCH, batch_format="numpy"):
        seen += len(batch["x"])
    return time.perf_counter() - t, seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000, help="PNG images in the folder")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray cluster")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="transfuse-bench-data-"))
    try:
        root = work / "pngs"
        write_pngs(root, args.n)
        runtime.init_ray(num_cpus=args.cpus)
        cfg = load_config(None, [f"storage={work}", "run=bench", "data.source=image_folder", f"data.path={root}",
                                 "data.split={val: 0.0, test: 0.05, holdout: 0.0}", "data.rows_per_shard=2048"])
        t = time.perf_counter()
        prepare(cfg)
        t_prepare = time.perf_counter() - t
        spec = PreprocessSpec(32, "unit")
        train_dir = storage.stage_dir(cfg, "data")

        keras = [keras_epoch(root) for _ in range(args.epochs)]
        streaming = preprocessed(read_split(train_dir, "train"), spec)
        ray_stream = ray_epoch(streaming)
        cached = streaming.materialize()
        ray_cached = [ray_epoch(cached) for _ in range(args.epochs - 1)]

        def rate(runs):
            return sum(n for _, n in runs) / sum(t for t, _ in runs)

        k = rate(keras)
        s = rate([ray_stream])
        c = rate(ray_cached) if ray_cached else float("nan")
        per_epoch = (ray_stream[0] + sum(t for t, _ in ray_cached)) / args.epochs
        keras_per_epoch = sum(t for t, _ in keras) / args.epochs
        print(f"images: {args.n} PNGs, {args.epochs} epochs, batch {BATCH}, Ray CPUs {args.cpus}")
        print(f"one-time prepare (decode + validate + split + parquet): {t_prepare:.1f} s")
        print(f"(a) keras flow_from_directory      {k:10.0f} images/s  {keras_per_epoch:6.2f} s/epoch")
        print(f"(b) ray parquet, streaming epoch 1 {s:10.0f} images/s  ratio vs (a) {s / k:5.2f}x")
        print(f"(b) ray parquet, epochs 2..{args.epochs} cached  {c:10.0f} images/s  ratio vs (a) {c / k:5.2f}x")
        print(f"(b) mean over {args.epochs} epochs          {args.n * 0.95 / per_epoch:10.0f} images/s  "
              f"{per_epoch:6.2f} s/epoch  ratio vs (a) {keras_per_epoch / per_epoch:5.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
