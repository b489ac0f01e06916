"""Transfer benchmark: does the ImageNet backbone pay, does the depth search pay, does the stack pay?

For several label draws (the config's seed decides which images of the pool are labelled; the test split is the
same for every draw) it runs the pipeline up to the ensemble stage and compares, on the same labels:

- pixels_logreg: logistic regression on the raw pixels (StandardScaler; C chosen on val by NLL);
- frozen_logreg: the same on the frozen ImageNet backbone's pooled features (no fine-tuning);
- scratch: the same CNN from random weights, same epochs (the pipeline's scratch stage);
- seed_recipe: the head, then the last ``model.unfreeze`` layers (the pipeline's finetune stage);
- searched_depth: the Tune trial chosen by val accuracy, ties by val NLL (the pipeline's tune stage);
- stack: the stacked ensemble (mean over the ensemble stage's seeds).

Every model learns from the draw's train split and picks its hyper-parameters or epoch on val; the stack's
members and meta-learner also read the holdout split of the same budget. Prints a table (mean and range over
draws) and writes ``<storage>/<run>/bench_transfer.json``, which the report reads.

    python bench/transfer.py --config configs/default.yaml [--draws 0 1 2] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from transfuse import environment, storage  # noqa: E402
from transfuse.config import Config, load_config  # noqa: E402
from transfuse.data import PREPARE

MODELS = ("pixels_logreg", "frozen_logreg", "scratch", "seed_recipe", "searched_depth", "stack")


def draw_config(cfg: Config, draw: int) -> Config:
    """The config of one label draw: its own seed and run folder (draw = the base seed keeps the base run)."""
    if draw == cfg.seed:
        return cfg
    data = cfg.model_dump(mode="json")
    data.update(seed=draw, run=f"{cfg.run}-draw{draw}")
    return Config.model_validate(data)


def frozen_features(cfg: Config, images: np.ndarray, batch: int = 128) -> np.ndarray:
    """Pooled features of the backbone with its pretrained weights, nothing fine-tuned."""
    import tensorflow as tf

    from transfuse.finetune import models
    from transfuse.inference.preprocessing import PreprocessSpec, preprocess

    tf.keras.mixed_precision.set_global_policy("float32")
    net = models.build_backbone(cfg.model.backbone, cfg.model.input_size, cfg.model.width,
                                models.resolve_weights(cfg.model.weights, storage.run_dir(cfg)))
    pooled = tf.keras.Sequential([net, tf.keras.layers.GlobalAveragePooling2D()])
    run = tf.function(lambda t: pooled(t, training=False), reduce_retracing=True)
    spec = PreprocessSpec.for_model(cfg.model.backbone, cfg.model.input_size)
    return np.concatenate([run(preprocess(images[i:i + batch], spec)).numpy() for i in range(0, len(images), batch)])


def baselines(cfg: Config) -> dict[str, dict[str, float]]:
    from transfuse.finetune.baselines import budget_splits, logreg_on_val, pixels_logreg

    images, y = budget_splits(PREPARE.dir(cfg))
    frozen = {s: frozen_features(cfg, v) for s, v in images.items()}
    return {"pixels_logreg": pixels_logreg(images, y), "frozen_logreg": logreg_on_val(frozen, y)}


def pipeline_results(cfg: Config) -> dict[str, dict[str, float]]:
    """The CNNs' and the stack's test metrics from the run's own files."""
    from transfuse.ensemble import ENSEMBLE
    from transfuse.finetune import FINETUNE, SCRATCH, read_members
    from transfuse.stage import read_metrics

    test = lambda d: read_metrics(d)["test"]  # noqa: E731
    best = read_members(cfg)[0]
    ens = ENSEMBLE.metrics(cfg)["summary"]["stack"]
    return {"scratch": test(SCRATCH.dir(cfg)), "seed_recipe": test(FINETUNE.dir(cfg)),
            "searched_depth": {**test(best.dir), "unfreeze": best.config["unfreeze"]},
            "stack": {k: ens[k]["mean"] for k in ("accuracy", "nll", "ece")}}


def summarize(per_draw: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    out = {}
    for m in MODELS:
        row = {}
        for metric in ("accuracy", "nll"):
            v = [d[m][metric] for d in per_draw]
            row.update({f"{metric}_mean": float(np.mean(v)), f"{metric}_min": float(np.min(v)),
                        f"{metric}_max": float(np.max(v))})
        out[m] = row
    return out


def goals(per_draw: list[dict[str, dict[str, float]]], summary: dict[str, dict[str, float]]) -> list[tuple[str, bool]]:
    """The transfer issue's goals, each with whether it held."""
    acc = lambda d, m: d[m]["accuracy"]  # noqa: E731
    return [
        ("searched CNN >= scratch + 5 points, mean and every draw",
         all(acc(d, "searched_depth") - acc(d, "scratch") >= 0.05 for d in per_draw)),
        ("searched CNN >= pixels + logistic regression + 3 points, mean and every draw",
         all(acc(d, "searched_depth") - acc(d, "pixels_logreg") >= 0.03 for d in per_draw)),
        ("searched depth beats the seed's fixed depth on mean test accuracy",
         summary["searched_depth"]["accuracy_mean"] > summary["seed_recipe"]["accuracy_mean"]),
        ("stack beats every other model of this table on mean accuracy and NLL",
         all(summary["stack"]["accuracy_mean"] > summary[m]["accuracy_mean"] and
             summary["stack"]["nll_mean"] < summary[m]["nll_mean"] for m in MODELS if m != "stack")),
    ]


def format_table(summary: dict[str, dict[str, float]], draws: list[int]) -> str:
    lines = [f"test metrics over {len(draws)} label draws (seeds {draws}): mean [min, max]",
             f"{'model':<16}{'accuracy':>28}{'NLL':>28}"]
    for m, r in summary.items():
        lines.append(f"{m:<16}{r['accuracy_mean']:>10.4f} [{r['accuracy_min']:.4f}, {r['accuracy_max']:.4f}]"
                     f"{r['nll_mean']:>10.4f} [{r['nll_min']:.4f}, {r['nll_max']:.4f}]")
    return "\n".join(lines)


def draws_cli(description: str, argv: list[str] | None) -> tuple[Config, list[int]]:
    """``--config``, ``--draws``, ``--set`` as every over-draws benchmark takes them; starts Ray."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--draws", type=int, nargs="+", default=None, help="label draws (seeds); default: seed, +1, +2")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    environment.init_ray(cfg.ray.address, cfg.ray.num_cpus)
    return cfg, args.draws or [cfg.seed, cfg.seed + 1, cfg.seed + 2]


def print_goals(met: list[tuple[str, bool]], path: str) -> None:
    for g, ok in met:
        print(f"{'met   ' if ok else 'MISSED'} {g}")
    print(f"wrote {path}")


Row = dict[str, Any]  # one draw's results


def run_draws(description: str, argv: list[str] | None, one_draw: Callable[[Config], Row],
              progress: Callable[[Row], str], goals: Callable[[list[Row]], list[tuple[str, bool]]],
              table: Callable[[list[int], list[Row]], str], out_file: str) -> int:
    """The body of an over-draws benchmark: ``one_draw`` per label draw (a line of ``progress`` after each), then
    the goals, ``<storage>/<run>/<out_file>`` (draws, per-draw rows, goals), the table and the goals printed."""
    cfg, draws = draws_cli(description, argv)
    rows = []
    for d in draws:
        rows.append(one_draw(draw_config(cfg, d)))
        print(f"draw {d}: {progress(rows[-1])}", flush=True)
    met = goals(rows)
    path = storage.join(storage.run_dir(cfg), out_file)
    storage.write_json(path, {"draws": draws, "per_draw": rows, "goals": [{"goal": g, "met": ok} for g, ok in met]})
    print(table(draws, rows))
    print_goals(met, path)
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg, draws = draws_cli(__doc__.splitlines()[0], argv)
    from transfuse.pipeline import run_pipeline

    per_draw, seconds = [], []
    for d in draws:
        dcfg = draw_config(cfg, d)
        t = time.time()
        run_pipeline(dcfg, until="ensemble")
        per_draw.append({**baselines(dcfg), **pipeline_results(dcfg)})
        seconds.append(round(time.time() - t, 1))
        print(f"draw {d}: " + ", ".join(f"{m} {per_draw[-1][m]['accuracy']:.4f}" for m in MODELS), flush=True)
    summary = summarize(per_draw)
    budget = storage.read_manifest(PREPARE.dir(cfg)).get("label_budget")
    met = goals(per_draw, summary)
    out = {"label_budget": budget, "draws": draws, "seconds": seconds,
           "models": {m: {k: [d[m][k] for d in per_draw] for k in ("accuracy", "nll")} for m in MODELS},
           "per_draw": per_draw, "summary": summary, "goals": [{"goal": g, "met": ok} for g, ok in met]}
    path = storage.join(storage.run_dir(cfg), "bench_transfer.json")
    storage.write_json(path, out)
    print(format_table(summary, draws))
    print_goals(met, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
