"""Pretrain the backbone on a source task (where no pretrained weights exist) and save its weights."""

from __future__ import annotations

import sys

from jobs._cli import main
from transfuse.finetune import pretrain


def _extra(p) -> None:
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")


def _run(cfg, args) -> None:
    m = pretrain(cfg, force=args.force, resume=args.resume)
    print(f"pretrained {cfg.model.backbone} on {m['source_classes']}: test {m.get('test')} "
          f"-> {cfg.storage}/{cfg.run}/pretrain/backbone.weights.h5")


if __name__ == "__main__":
    sys.exit(main(__doc__, _run, extra=_extra))
