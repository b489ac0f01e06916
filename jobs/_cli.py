"""What every job shares: the arguments, config loading with overrides, logging and Ray start-up."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional

from transfuse import environment  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)
from transfuse import console as con
from transfuse.config import Config, load_config
from transfuse.errors import TransfuseError


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY.PATH=VALUE",
                   help="override config values, e.g. --set train.epochs_frozen=2 data.on_bad_file=skip "
                        "(repeatable)")
    p.add_argument("--force", action="store_true", help="rerun even when the stage's manifest is complete")
    return p


def main(description: str, body: Callable[[Config, argparse.Namespace], object],
         extra: Optional[Callable[[argparse.ArgumentParser], None]] = None, argv: Optional[list[str]] = None,
         needs_ray: bool | Callable[[argparse.Namespace], bool] = True,
         console: bool | Callable[[argparse.Namespace], bool] = False) -> int:
    """Parse, load the config, start Ray, run ``body``. With ``console`` the job gets ``--verbose`` and, without
    it, a quiet console (``transfuse.console.quiet``): ``args.console`` is where the job writes for a person."""
    p = parser(description)
    if console:
        p.add_argument("--verbose", action="store_true",
                       help="print Ray's, TensorFlow's and Tune's own output and progress bars as they come, "
                            "instead of sending them to <storage>/<run>/logs/pipeline.log")
    if extra:
        extra(p)
    args = p.parse_args(argv)
    wants = console(args) if callable(console) else console
    quiet = bool(wants) and not args.verbose
    if not quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    err: Callable[[str], None] = lambda text: print(text, file=sys.stderr)  # noqa: E731
    try:
        cfg = load_config(args.config, args.overrides)
        args.console = con.verbose() if wants and not quiet else None
        if quiet:
            args.log_path = con.log_path(cfg)
            args.console = con.quiet(args.log_path)
            err = args.console.line
        if needs_ray(args) if callable(needs_ray) else needs_ray:
            environment.init_ray(cfg.ray.address, cfg.ray.num_cpus, quiet=quiet, ingress=cfg.serve.ingress)
        body(cfg, args)
    except TransfuseError as e:
        # the library's own errors (bad config, data, members, bundles) say what was wrong: print that, no
        # traceback; anything else is a bug and keeps its traceback
        err(f"error: {e}")
        if getattr(args, "log_path", None):
            err(f"(Ray's and TensorFlow's output: {args.log_path})")
        return 2
    return 0
