"""Ray Train's per-epoch overhead on small data: the fine-tune as transfuse runs it vs Ray's own defaults.

Two things made every epoch of the default's small phases slow, and this bench measures both against a baseline
run in the same command (same config, data, seed and epochs):

- baseline: Ray Train's controller polls its workers every 2 s (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, Ray's
  default) and a worker's result queue holds one report, so an epoch cannot end faster than a poll; and
  ``MultiWorkerMirroredStrategy`` even with one worker, which runs a collective all-reduce for every gradient;
- transfuse: polls every 0.25 s (``transfuse.environment.WORKER_ENV``) and the default strategy for one worker.

``--what finetune`` runs the seed recipe (the linear head on cached features, then the last layers);
``--what scratch`` the from-scratch baseline (every layer of the network, on images). Prints wall seconds of
``trainer.fit()`` and per epoch, the ratio, and each run's last val loss (the two runs train the same model).

    python bench/train_overhead.py --config configs/default.yaml [--what finetune|scratch] [--epochs N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from transfuse import environment, storage  # noqa: E402

from transfuse.finetune import stage as train
from transfuse.config import load_config  # noqa: E402
from transfuse.data import prepare  # noqa: E402

POLL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--what", choices=("finetune", "scratch"), default="finetune")
    ap.add_argument("--epochs", type=int, default=None,
                    help="scratch: epochs (default: the config's); finetune: frozen epochs (unfrozen: half)")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    environment.init_ray(cfg.ray.address, cfg.ray.num_cpus, quiet=True)
    prepare(cfg)
    weights = None
    if args.what == "scratch":
        overrides = train.scratch_overrides(cfg)
        weights = "none"
        if args.epochs:
            overrides.update(epochs_unfrozen=args.epochs, early_stopping_start=args.epochs)
    else:
        overrides = {}
        if args.epochs:
            overrides = {"epochs_frozen": args.epochs, "epochs_unfrozen": max(1, args.epochs // 2)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="train_overhead-") as tmp:
        for name, poll, force_mw in (("baseline (Ray defaults)", "2.0", True), ("transfuse", "0.25", False)):
            os.environ[POLL] = poll  # read by the trainer's fit() in this process, propagated to its controller
            out = storage.join(tmp, name.split()[0])
            trainer, _, _ = train.build_trainer(cfg, out, overrides, weights=weights,
                                                test_hooks={"force_multi_worker": force_mw})
            t0 = time.perf_counter()
            result = trainer.fit()
            wall = time.perf_counter() - t0
            hist = result.metrics_dataframe
            epochs = int(hist["epoch"].max())
            rows.append((name, wall, epochs, float(hist["val_loss"].iloc[-1])))
    base = rows[0][1]
    print(f"\n{args.what}: {cfg.model.backbone} at {cfg.model.input_size} px, {cfg.train.num_workers} worker(s)")
    print(f"{'run':<26}{'fit s':>8}{'epochs':>8}{'s/epoch':>9}{'last val loss':>15}{'speed-up':>10}")
    for name, wall, epochs, val in rows:
        print(f"{name:<26}{wall:8.1f}{epochs:8d}{wall / epochs:9.2f}{val:15.4f}{base / wall:9.2f}x")


if __name__ == "__main__":
    main()
