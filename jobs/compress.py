"""Prune and quantize the ensemble, measure every variant, write <run>/compress/ and the served <run>/bundle/."""

from __future__ import annotations

import sys

from jobs._cli import main
from transfuse.bundle import BundleError
from transfuse.compress import CompressError, PruningError, format_table, run_compress


def _run(cfg, args) -> None:
    from transfuse import storage

    try:
        m = run_compress(cfg, force=args.force)
    except (CompressError, PruningError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    report = storage.read_json(storage.join(storage.stage_dir(cfg, "compress"), "metrics.json"))
    print(format_table(report["variants"]))
    print(f"goals (int8 vs float32, this run): {report['goals']}")
    print(f"bundle ({m['serve_variant']}) -> {m['bundle']}")


if __name__ == "__main__":
    sys.exit(main(__doc__, _run, needs_ray=False))
