"""Deploy the run's bundle (<storage>/<run>/bundle/) with Ray Serve on the current Ray cluster; print the URL.

    python -m jobs.deploy --config configs/smoke.yaml [--bundle DIR_OR_URI] [--block]

On a cluster started with `ray start` / `ray up` the app outlives this job. Without one (a local Ray started by
this process) pass --block to keep serving until Ctrl-C.
"""

from __future__ import annotations

import sys
import time

from jobs._cli import main
from transfuse.compress import BUNDLE


def _args(p) -> None:
    p.add_argument("--bundle", help="bundle directory or URI (default: <storage>/<run>/bundle)")
    p.add_argument("--app-name", default="transfuse", help="Serve application name")
    p.add_argument("--route-prefix", default="/", help="HTTP route prefix of the application")
    p.add_argument("--block", action="store_true", help="keep this process (and a local Ray) serving until Ctrl-C")


def _run(cfg, args) -> None:
    from serve.app import deploy

    bundle = args.bundle or BUNDLE.dir(cfg)
    url = deploy(cfg.serve, bundle, app_name=args.app_name, route_prefix=args.route_prefix)
    print(f"serving {cfg.serve.name}: {url}  (POST {url}:predict, POST {url}/images, GET {url})")
    if args.block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    sys.exit(main(__doc__, _run, extra=_args))
