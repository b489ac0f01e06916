"""Fine-tune the backbone on the prepared dataset with Ray Train: frozen phase, then unfreeze the last k layers.

With ``model.weights: pretrain`` (or ``--scratch``) the same network is also trained from scratch with the same
budget, and transfer vs scratch test accuracy is reported side by side.
"""

from __future__ import annotations

import sys

from jobs._cli import main
from transfuse.finetune import finetune, transfer_vs_scratch


def _extra(p) -> None:
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--scratch", choices=["auto", "yes", "no"], default="auto",
                   help="also train from scratch for comparison (auto: when model.weights is pretrain)")


def _run(cfg, args) -> None:
    m = finetune(cfg, resume=args.resume, force=args.force)
    print(f"finetune: {len(m['history'])} epochs; test {m.get('test')} -> {cfg.storage}/{cfg.run}/finetune")
    if args.scratch == "yes" or (args.scratch == "auto" and cfg.model.weights == "pretrain"):
        cmp = transfer_vs_scratch(cfg, force=args.force)
        print(f"transfer vs scratch (test accuracy): {cmp['transfer']['accuracy']:.4f} vs "
              f"{cmp['scratch']['accuracy']:.4f}")


if __name__ == "__main__":
    sys.exit(main(__doc__, _run, extra=_extra))
