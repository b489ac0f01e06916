"""Input pipeline throughput: the seed's Keras flow_from_directory vs transfuse's training input on Ray.

Same image folder (N Fashion-MNIST PNGs), same work per image (decode, grey -> RGB, resize to 32x32, scale),
all run in this one command, so the ratios hold on a noisy shared machine even when absolute times drift:
  (a) seed recipe: ImageDataGenerator(rescale=1/255).flow_from_directory(...), one pass per epoch;
  (b) transfuse: `prepare` once (timed, reported apart), then `transfuse.data.dataset.training_split`, which
      picks the path by size: a split that fits in a quarter of this node's object store is read with pyarrow,
      preprocessed once with numpy and put in the object store (epoch 1 includes all of that), later epochs
      iterate the same materialized dataset; a larger split streams (c);
  (c) the streaming path alone (Ray Data read_parquet + map_batches, epoch 1 streamed, later epochs over its
      materialized result): what (b) does at scale, with Ray Data's fixed cost per pass.

    .venv/bin/python bench/data.py --n 10000 --epochs 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ray.data.dataset import MaterializedDataset

from transfuse import environment
from transfuse.config import load_config
from transfuse.data import PREPARE, prepare, preprocessed, read_split
from transfuse.data.dataset import training_split
from transfuse.data.sources import FASHION_MNIST_DIRS, read_idx
from transfuse.inference.preprocessing import PreprocessSpec

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
        # a private local Ray: its own temp dir (short: socket paths live under it), no token auth on 127.0.0.1
        os.environ.update(RAY_TMPDIR=tempfile.mkdtemp(prefix="tfb-", dir="/tmp"), RAY_AUTH_MODE="disabled")
        environment.init_ray(num_cpus=args.cpus)
        cfg = load_config(None, [f"storage={work}", "run=bench", "data.source=image_folder", f"data.path={root}",
                                 "data.split={val: 0.0, test: 0.05, holdout: 0.0}", "data.rows_per_shard=2048",
                                 "data.image_size=28", "data.channels=1"])  # stored as the PNGs are
        t = time.perf_counter()
        prepare(cfg)
        t_prepare = time.perf_counter() - t
        spec = PreprocessSpec(32, "unit")
        train_dir = PREPARE.dir(cfg)

        keras = [keras_epoch(root) for _ in range(args.epochs)]

        t = time.perf_counter()
        picked = training_split(train_dir, "train", spec)
        t_build = time.perf_counter() - t
        first = ray_epoch(picked)
        chosen = [(first[0] + t_build, first[1])] + [ray_epoch(picked) for _ in range(args.epochs - 1)]
        path = "in memory" if isinstance(picked, MaterializedDataset) else "streaming"

        streaming = preprocessed(read_split(train_dir, "train"), spec)
        ray_stream = ray_epoch(streaming)
        cached = streaming.materialize()
        ray_cached = [ray_epoch(cached) for _ in range(args.epochs - 1)]

        def rate(runs):
            return sum(n for _, n in runs) / sum(t for t, _ in runs)

        k = rate(keras)  # every ratio below is images/s over (a)'s images/s
        keras_per_epoch = sum(t for t, _ in keras) / args.epochs
        print(f"images: {args.n} PNGs, {args.epochs} epochs, batch {BATCH}, Ray CPUs {args.cpus}")
        print(f"one-time prepare (decode + validate + split + parquet): {t_prepare:.1f} s")
        print(f"(a) keras flow_from_directory      {k:10.0f} images/s  {keras_per_epoch:6.2f} s/epoch")
        for label, runs in ((f"(b) training_split ({path})", chosen),
                            ("(c) ray parquet streaming", [ray_stream, *ray_cached])):
            e1, mean = rate(runs[:1]), rate(runs)
            later = rate(runs[1:]) if len(runs) > 1 else float("nan")
            per_epoch = sum(t for t, _ in runs) / len(runs)
            print(label)
            print(f"    epoch 1        {e1:10.0f} images/s  ratio vs (a) {e1 / k:5.2f}x"
                  f"{'  (read + preprocess + put included)' if runs is chosen and path == 'in memory' else ''}")
            print(f"    epochs 2..{args.epochs}   {later:10.0f} images/s  ratio vs (a) {later / k:5.2f}x")
            print(f"    mean, {args.epochs} epochs {mean:10.0f} images/s  ratio vs (a) {mean / k:5.2f}x  "
                  f"{per_epoch:6.2f} s/epoch")
        print("goals for (b): epoch 1 >= 1.00x (a), mean over 3 epochs >= 5.00x (a)")
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
        if os.environ.get("RAY_TMPDIR", "").startswith("/tmp/tfb-"):
            shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
