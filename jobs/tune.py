"""Search unfreeze depth, learning rates and head with Ray Tune; keep the best diverse trials as members."""

from __future__ import annotations

import json
import sys

from jobs._cli import main
from transfuse.finetune import run_search


def _args(p) -> None:
    p.add_argument("--resume", action="store_true", help="continue an interrupted search (finished trials kept)")


def _run(cfg, args) -> None:
    m = run_search(cfg, resume=args.resume, force=args.force)
    print(json.dumps(m["summary"], indent=2))


if __name__ == "__main__":
    sys.exit(main(__doc__, _run, extra=_args))
