"""Class weights on an 8x-imbalanced photo folder: the stack's minority recall and accuracy, weighted vs not.

A messy photo folder (``transfuse.data.messy``: Fashion-MNIST's odd classes as photos of every size, format and
mode) with 160 / 100 / 80 / 60 / 20 images per class, and a separate balanced test folder of other pictures
(``--test-per-class`` per class, ``data.test_path``) so that every class's recall rests on the same number of
test images. For each seed (the split and every learner's seed), the pipeline up to the ensemble runs twice on
the same labels: ``data.class_weight=balanced`` and ``none``; one depth trial (``tune.unfreeze=[2]``) to keep a
run to minutes on 2 cores. Printed: the stack's test accuracy, balanced accuracy and the minority class's recall
per seed and on the mean.

    .venv/bin/python bench/imbalance.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from transfuse import environment
from transfuse.cli import USER_DEFAULTS
from transfuse.config import load_config
from transfuse.data.messy import FASHION_ODD, write
from transfuse.pipeline import run_pipeline

COUNTS = {"trouser": 160, "dress": 100, "sandal": 80, "sneaker": 60, "ankle boot": 20}  # 8x
MINORITY = "ankle boot"


def stack_metrics(run_dir: Path) -> dict:
    m = json.loads((run_dir / "ensemble" / "metrics.json").read_text())
    seed = str(m["seeds"][0])
    return m["test"][seed]["stack"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--cpus", type=int, default=4, help="the local Ray's logical CPUs")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imbalance-"))
    try:
        ids = [FASHION_ODD[c] for c in COUNTS]
        write(work / "photos", COUNTS, classes=ids, junk=False)
        write(work / "test", {c: args.test_per_class for c in COUNTS}, classes=ids, offset=1000, junk=False, seed=9)
        os.environ.update(RAY_TMPDIR=tempfile.mkdtemp(prefix="tfm-", dir="/tmp"), RAY_AUTH_MODE="disabled")
        environment.init_ray(num_cpus=args.cpus, quiet=True)
        rows = []
        for seed in args.seeds:
            for mode in ("none", "balanced"):
                cfg = load_config(USER_DEFAULTS, [
                    f"storage={work / 'runs'}", f"run=s{seed}_{mode}", f"seed={seed}", f"train.seed={seed}",
                    "data.source=image_folder", f"data.path={work / 'photos'}", f"data.test_path={work / 'test'}",
                    "data.split.test=0", f"data.class_weight={mode}", "tune.num_samples=1", "tune.unfreeze=[2]",
                    "tune.members=1", f"ensemble.seeds=[{seed}]"])
                run_pipeline(cfg, until="ensemble", echo=lambda s: None)
                m = stack_metrics(Path(cfg.storage) / cfg.run)
                rows.append((seed, mode, m["accuracy"], m["balanced_accuracy"], m["per_class_recall"][MINORITY]))
                print(f"seed {seed} class_weight={mode:<8}: stack accuracy {rows[-1][2]:.4f}, balanced accuracy "
                      f"{rows[-1][3]:.4f}, {MINORITY} recall {rows[-1][4]:.4f}", flush=True)
        for mode in ("none", "balanced"):
            r = np.array([x[2:] for x in rows if x[1] == mode])
            print(f"mean class_weight={mode:<8}: accuracy {r[:, 0].mean():.4f}, balanced accuracy {r[:, 1].mean():.4f}, "
                  f"{MINORITY} recall {r[:, 2].mean():.4f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
