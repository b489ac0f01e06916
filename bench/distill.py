"""Distillation benchmark: does one student CNN keep the stacked ensemble's gain, and how much faster is it served?

For several label draws (as bench/transfer.py: the config's seed decides which images are labelled) it runs the
pipeline up to compress with the distill stage on (``distill.enabled``; ``data.unlabelled_per_class`` must give
it a pool) and without the scratch baseline (complete stages are reused), then reads per draw: the teacher (the
stacked ensemble), the student and the best single fine-tuned CNN member on test (accuracy, NLL, ECE), the
student's agreement with the teacher, the share of the ensemble's accuracy gain over that member the student
keeps, and the served int8 ensemble against ``student_int8``: bundle bytes, and batch-1 p50 latency in warm
blocks as one replica serving one bundle sees it (the compress stage's ``measure.blocked_latency``). Prints the
table and the issue's goals; writes
``<storage>/<run>/bench_distill.json``.

    python bench/distill.py --config configs/default.yaml --set data.unlabelled_per_class=200 \\
        --set distill.enabled=true [--draws 0 1 2] [--set distill.input_size=64 ...]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.transfer import run_draws  # noqa: E402
from transfuse import storage  # noqa: E402
from transfuse.config import Config  # noqa: E402
from transfuse.compress import COMPRESS
from transfuse.distill import DISTILL

GAIN_KEPT, FIDELITY, FASTER = 0.8, 0.95, 3.0  # the goals


def one_draw(cfg: Config) -> dict[str, Any]:
    from transfuse.pipeline import run_pipeline

    run_pipeline(cfg, until="compress", skip=("scratch",))
    m = storage.read_json(DISTILL.metrics_path(cfg))
    comp = COMPRESS.dir(cfg)
    rows = {r["variant"]: r for r in storage.read_json(storage.join(comp, "metrics.json"))["variants"]}
    ens, stu = rows["int8"], rows["student_int8"]
    return {"teacher": m["teacher"], "student": m["student"], "best_member": m["best_cnn_member"],
            "fidelity": m["fidelity"], "gain_kept": m["gain_kept"], "calibration": m["calibration"],
            "served": {v: {k: rows[v][k] for k in ("accuracy", "nll", "ece", "p50_ms_b1", "p99_ms_b1",
                                                   "size_bytes")}
                       for v in ("int8", "student_int8")},
            "faster_b1": ens["p50_ms_b1"] / stu["p50_ms_b1"], "smaller": ens["size_bytes"] / stu["size_bytes"],
            "student_input_size": m["student_input_size"], "seconds": {"teacher": m["teacher_seconds"],
                                                                       "student": m["train_seconds"]}}


def gain_kept(rows: list[dict[str, Any]]) -> float | None:
    """The student's accuracy gain over the best member as a share of the ensemble's, over all draws together
    (a draw where the ensemble does not beat the member has no share of its own)."""
    acc = lambda key: float(np.mean([r[key]["accuracy"] for r in rows]))  # noqa: E731
    gain = acc("teacher") - acc("best_member")
    return (acc("student") - acc("best_member")) / gain if gain > 0 else None


def goals(rows: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    kept = gain_kept(rows)
    return [
        (f"student keeps >= {GAIN_KEPT:.0%} of the ensemble's accuracy gain over the best member (mean accuracies: "
         f"{'no gain' if kept is None else f'{kept:.0%}'})", kept is not None and kept >= GAIN_KEPT),
        (f"student agrees with the teacher on >= {FIDELITY:.0%} of test (mean)", mean("fidelity") >= FIDELITY),
        (f"student_int8 >= {FASTER:g}x faster than the int8 ensemble at batch 1 (every draw)",
         all(r["faster_b1"] >= FASTER for r in rows)),
    ]


def format_table(draws: list[int], rows: list[dict[str, Any]]) -> str:
    lines = [f"{'draw':>5}{'teacher':>9}{'student':>9}{'best mem':>9}{'kept':>7}{'fidelity':>9}"
             f"{'ens ms':>8}{'stu ms':>8}{'faster':>7}{'smaller':>8}   NLL teacher/student"]
    for d, r in zip(draws, rows):
        s = r["served"]
        kept = "-" if r["gain_kept"] is None else f"{r['gain_kept']:.2f}"
        lines.append(f"{d:>5}{r['teacher']['accuracy']:>9.4f}{r['student']['accuracy']:>9.4f}"
                     f"{r['best_member']['accuracy']:>9.4f}{kept:>7}{r['fidelity']:>9.4f}"
                     f"{s['int8']['p50_ms_b1']:>8.3f}{s['student_int8']['p50_ms_b1']:>8.3f}{r['faster_b1']:>7.2f}"
                     f"{r['smaller']:>8.2f}   {r['teacher']['nll']:.4f}/{r['student']['nll']:.4f}")
    return "\n".join(lines)


def progress(r: dict[str, Any]) -> str:
    return (f"teacher {r['teacher']['accuracy']:.4f}, student {r['student']['accuracy']:.4f}, "
            f"fidelity {r['fidelity']:.4f}, {r['faster_b1']:.2f}x faster")


def main(argv: list[str] | None = None) -> int:
    return run_draws(__doc__.splitlines()[0], argv, one_draw, progress, goals, format_table, "bench_distill.json")


if __name__ == "__main__":
    sys.exit(main())
