"""Prune and quantize the ensemble, measure every variant, write <run>/compress/ and the served <run>/bundle/."""

from __future__ import annotations

import sys

from jobs._cli import main
from transfuse.compress import COMPRESS, format_table, goals_line, run_compress


def _run(cfg, args) -> None:
    m = run_compress(cfg, force=args.force)
    report = COMPRESS.metrics(cfg)
    print(format_table(report["variants"]))
    if report["goals"]:
        print(f"goals (this run): {goals_line(report['goals'])}")
    print(f"bundle ({m['serve_variant']}) -> {m['bundle']}")


if __name__ == "__main__":
    sys.exit(main(__doc__, _run, needs_ray=False))
