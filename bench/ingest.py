"""Preparing a user's photos: transfuse's prepare stage vs Keras's image_dataset_from_directory, same files.

N JPEGs of mixed sizes (20 to 300 pixels a side, up to 2:1, Fashion-MNIST pictures on tinted backgrounds:
``transfuse.data.messy``) in one subfolder per class, read once by each, to 96 x 96 RGB with the same size policy
(centre crop to a square: Keras's ``crop_to_aspect_ratio=True`` is transfuse's ``data.resize: crop``), all in
this one command so the ratio holds on a noisy shared machine:
  (a) Keras: ``tf.keras.utils.image_dataset_from_directory(root, image_size=(96, 96), crop_to_aspect_ratio=True,
      batch_size=64)`` iterated once (decode, crop, resize, batch; nothing written);
  (b) transfuse: the prepare stage (list, decode with EXIF and modes, resize, validate, stratified split, write
      sharded parquet and the manifest) on a local Ray started before the clock starts.
Both are timed twice, alternating, and the better of each is kept (the first pass also warms the page cache).

    .venv/bin/python bench/ingest.py --n 10000
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from transfuse import environment
from transfuse.config import load_config
from transfuse.data import prepare
from transfuse.data.messy import write

SIZE = 96
CLASSES = ["trouser", "dress", "sandal", "sneaker", "ankle boot"]


def keras_pass(root: Path) -> tuple[float, int]:
    import tensorflow as tf

    t = time.perf_counter()
    ds = tf.keras.utils.image_dataset_from_directory(str(root), image_size=(SIZE, SIZE), crop_to_aspect_ratio=True,
                                                     batch_size=64, shuffle=False)
    n = sum(int(x.shape[0]) for x, _ in ds)
    return time.perf_counter() - t, n


def transfuse_pass(root: Path, work: Path, i: int) -> tuple[float, int]:
    cfg = load_config(None, [f"storage={work}", f"run=ingest{i}", "data.source=image_folder", f"data.path={root}",
                             f"data.image_size={SIZE}", "data.resize=crop", "model.input_size=96"])
    t = time.perf_counter()
    m = prepare(cfg)
    return time.perf_counter() - t, sum(m["totals"].values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10000, help="JPEG files in all (split evenly over 5 classes)")
    ap.add_argument("--cpus", type=int, default=2, help="the local Ray's logical CPUs")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ingest-"))
    try:
        root = work / "photos"
        t = time.perf_counter()
        write(root, {c: args.n // len(CLASSES) for c in CLASSES}, junk=False, kinds=[("JPEG", ".jpg", "RGB")])
        print(f"wrote {args.n} JPEGs in {time.perf_counter() - t:.0f}s to {root}")
        os.environ.update(RAY_TMPDIR=tempfile.mkdtemp(prefix="tfi-", dir="/tmp"), RAY_AUTH_MODE="disabled")
        environment.init_ray(num_cpus=args.cpus, quiet=True)
        keras, ours = [], []
        for i in range(args.rounds):
            keras.append(keras_pass(root))
            ours.append(transfuse_pass(root, work, i))
            print(f"round {i}: keras {keras[-1][1] / keras[-1][0]:.0f} img/s, transfuse prepare "
                  f"{ours[-1][1] / ours[-1][0]:.0f} img/s")
        k, o = min(keras), min(ours)
        print(f"keras image_dataset_from_directory: {k[1]} images in {k[0]:.1f}s = {k[1] / k[0]:.0f} img/s")
        print(f"transfuse prepare (decode + split + parquet): {o[1]} images in {o[0]:.1f}s = {o[1] / o[0]:.0f} img/s")
        print(f"ratio transfuse / keras: {(o[1] / o[0]) / (k[1] / k[0]):.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
