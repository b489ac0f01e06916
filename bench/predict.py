"""Batch predictions over a folder: `transfuse predict` vs a Keras model.predict loop, same files, same run.

N new image files (Fashion-MNIST pictures the run never saw, written as a messy photo folder of every format and
mode by ``transfuse.data.messy``), all in this one command so the ratio holds on a noisy shared machine:
  (a) Keras: batches of 64 files decoded with ``transfuse.images`` (the same pixels as the bundle sees), then
      ``model.predict`` of every float32 CNN member of the run (tf_keras, rebuilt from the tune stage's weights),
      the members' probabilities averaged: what a user with the fine-tuned Keras models would write;
  (b) transfuse: ``transfuse predict`` (``predict.predict_files``) through the run's served bundle: decode,
      the int8 CNN members (shared trunk), the scikit-learn members and the stacker.
The answers are compared per CNN member (int8 in the bundle vs float32 in Keras: top-1 agreement and the largest
probability difference) and for the whole ensemble against the Keras members' average; accuracy of both against
the pictures' true classes.

    .venv/bin/python bench/predict.py --run runs/my_photos --n 10000
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from transfuse import environment  # noqa: F401  (tf_keras)
from transfuse import images, runs, storage
from transfuse.compress import COMPRESS
from transfuse.data.messy import FASHION_ODD, write
from transfuse.predict import load, predict_files

BATCH = 64


def keras_loop(cfg, files: list[str], policy: images.ImagePolicy) -> tuple[float, dict[str, np.ndarray]]:
    from transfuse.finetune import models
    from transfuse.inference.preprocessing import PreprocessSpec, preprocess
    from transfuse.finetune.tune import read_members

    members = {m.name: models.load_member(m.dir) for m in read_members(cfg)}
    t = time.perf_counter()
    out: dict[str, list[np.ndarray]] = {n: [] for n in members}
    for start in range(0, len(files), BATCH):
        x = np.stack([images.load(f, policy) for f in files[start:start + BATCH]])
        for name, (model, spec) in members.items():
            xb = preprocess(x, PreprocessSpec(**spec["preprocess"]))
            out[name].append(model.predict(xb, batch_size=BATCH, verbose=0))
    return time.perf_counter() - t, {n: np.concatenate(v) for n, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a finished run (transfuse run DATA), e.g. runs/my_photos")
    ap.add_argument("--n", type=int, default=10000, help="new files to classify")
    ap.add_argument("--offset", type=int, default=3000, help="first Fashion-MNIST picture of each class used")
    args = ap.parse_args()
    cfg = runs.open_run(args.run)
    predictor = load(args.run)
    names = predictor.class_names
    if not set(names) <= set(FASHION_ODD):
        raise SystemExit(f"the run's classes {names} are not Fashion-MNIST's odd classes {list(FASHION_ODD)}: run "
                         "it on a folder written by `python -m transfuse.data.messy`")
    work = Path(tempfile.mkdtemp(prefix="predict-"))
    try:
        per = -(-args.n // len(names))
        made = write(work / "new", {n: per for n in names}, classes=[FASHION_ODD[n] for n in names],
                     offset=args.offset, junk=False)
        files = [str(p) for n in names for p in made.files[n]][: args.n]
        truth = np.array([names.index(Path(f).parent.name) for f in files])
        print(f"{len(files)} files, {len(names)} classes {names}")

        t = time.perf_counter()
        pred = predict_files(predictor, files)
        t_ours = time.perf_counter() - t
        t_keras, keras = keras_loop(cfg, files, predictor.policy)

        ours = pred.probabilities
        print(f"keras model.predict loop ({len(keras)} float32 members): {len(files) / t_keras:.0f} files/s "
              f"({t_keras:.1f}s)")
        print(f"transfuse predict (served {predictor.bundle.manifest['variant']} bundle, whole ensemble): "
              f"{len(files) / t_ours:.0f} files/s ({t_ours:.1f}s)")
        print(f"ratio transfuse / keras: {t_keras / t_ours:.2f}x")
        f32 = storage.join(COMPRESS.dir(cfg), "float32")
        if storage.exists(f32) and predictor.bundle.manifest["variant"] != "float32":
            t = time.perf_counter()
            ref = predict_files(load(f32), files).probabilities
            t_f32 = time.perf_counter() - t
            print(f"transfuse predict, float32 bundle: {len(files) / t_f32:.0f} files/s; served vs float32 ensemble: "
                  f"top-1 agreement {np.mean(ours.argmax(1) == ref.argmax(1)):.4f}, accuracy "
                  f"{np.mean(ours.argmax(1) == truth):.4f} vs {np.mean(ref.argmax(1) == truth):.4f}")
        mine = predictor.bundle.member_probs(np.stack([images.load(f, predictor.policy) for f in files[:2000]]))
        for n, p in keras.items():
            if n in mine:
                k = len(mine[n])
                agree = np.mean(mine[n].argmax(1) == p[:k].argmax(1))
                print(f"  member {n}: int8 bundle vs float32 Keras top-1 agreement {agree:.4f} on {k} files, "
                      f"largest probability difference {np.abs(mine[n] - p[:k]).max():.4f}")
        avg = np.mean(list(keras.values()), axis=0)
        print(f"ensemble vs Keras members' average: top-1 agreement {np.mean(ours.argmax(1) == avg.argmax(1)):.4f}")
        print(f"accuracy: transfuse ensemble {np.mean(ours.argmax(1) == truth):.4f}, Keras members' average "
              f"{np.mean(avg.argmax(1) == truth):.4f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
