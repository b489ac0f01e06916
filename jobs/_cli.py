"""What every job shares: the arguments, config loading with overrides, logging and Ray start-up."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional

from transfuse import runtime  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)
from transfuse.config import Config, ConfigError, load_config
from transfuse.data.sources import DataError


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config value, e.g. --set train.epochs_frozen=2 (repeatable)")
    p.add_argument("--force", action="store_true", help="rerun even when the stage's manifest is complete")
    return p


def main(description: str, body: Callable[[Config, argparse.Namespace], object],
         extra: Optional[Callable[[argparse.ArgumentParser], None]] = None, argv: Optional[list[str]] = None,
         needs_ray: bool | Callable[[argparse.Namespace], bool] = True) -> int:
    p = parser(description)
    if extra:
        extra(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
        if needs_ray(args) if callable(needs_ray) else needs_ray:
            runtime.init_ray(cfg.ray.address, cfg.ray.num_cpus)
        body(cfg, args)
    except (ValueError, RuntimeError) as e:
        # the library's own errors (bad config, data, members, bundles) say what was wrong: print that, no
        # traceback; anything else is a bug and keeps its traceback
        if isinstance(e, (ConfigError, DataError)) or type(e).__module__.startswith("transfuse."):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0
