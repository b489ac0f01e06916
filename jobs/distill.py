"""Distil the stacked ensemble into one student CNN on the unlabelled pool (Ray Data teacher, Ray Train student).

python -m jobs.distill --config configs/default.yaml --set distill.enabled=true [--force]
"""

from __future__ import annotations

import sys
from typing import Optional

from jobs._cli import main as cli_main
from transfuse.distill import DISTILL, run_distill


def _run(cfg, args) -> None:
    run_distill(cfg, force=args.force)
    out = DISTILL.dir(cfg)
    m = DISTILL.read(cfg)
    print(f"teacher {m.teacher.accuracy:.4f}  student {m.student.accuracy:.4f}  best member "
          f"{m.best_member} {m.best_member_accuracy:.4f}  fidelity {m.fidelity:.4f}")
    print(f"-> {out}")


def main(argv: Optional[list[str]] = None) -> int:
    return cli_main(__doc__, _run, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
