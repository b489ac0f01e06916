"""Prepare the dataset once: decode, validate, split, write sharded parquet + manifest (Ray Data)."""

from __future__ import annotations

import sys

from jobs._cli import main
from transfuse.data import prepare


def _run(cfg, args) -> None:
    m = prepare(cfg, force=args.force)
    print(f"prepared {m['totals']} examples of {len(m['class_names'])} classes -> {cfg.storage}/{cfg.run}/data")


if __name__ == "__main__":
    sys.exit(main(__doc__, _run))
