"""Fit the ensemble: CNN members + scikit-learn learners on their embeddings, stacked without leakage (Ray tasks).

python -m jobs.ensemble --config configs/default.yaml [--set ensemble.seeds=[0]] [--force]
"""

from __future__ import annotations

import sys
from typing import Optional

from jobs._cli import main as cli_main
from transfuse.ensemble import ENSEMBLE, format_table, run_ensemble


def _run(cfg, args) -> None:
    run_ensemble(cfg, force=args.force)
    out = ENSEMBLE.dir(cfg)
    print(format_table(ENSEMBLE.metrics(cfg)))
    print(f"-> {out}")


def main(argv: Optional[list[str]] = None) -> int:
    return cli_main(__doc__, _run, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
