"""Run the whole pipeline as one Ray job: prepare -> pretrain -> finetune -> tune -> ensemble -> compress ->
deploy -> query the live endpoint -> report. Complete stages are skipped; an interrupted run continues.

    python -m jobs.pipeline --config configs/default.yaml [--force-stage STAGE ...] [--until STAGE] [--no-deploy]
                            [--verbose]   # Ray's own output here instead of <storage>/<run>/logs/pipeline.log
    python -m jobs.pipeline --config configs/cifar10_vgg16.yaml --plan   # what each stage would do; runs nothing
"""

from __future__ import annotations

import sys

from jobs._cli import main
from transfuse.pipeline import STAGES, run_pipeline
from transfuse.report import format_summary, summary, verdict_lines


def _args(p) -> None:
    p.add_argument("--force-stage", dest="force_stages", action="append", default=[], choices=STAGES,
                   metavar="STAGE", help=f"rerun this stage even when complete (repeatable): {', '.join(STAGES)}")
    p.add_argument("--until", choices=STAGES, help="stop after this stage")
    p.add_argument("--no-deploy", action="store_true", help="skip deploying and querying the Serve endpoint")
    p.add_argument("--plan", action="store_true",
                   help="print every stage's plan (shapes, workers, resources, search space, members) as JSON and "
                        "exit: no Ray, no data read or downloaded, nothing written")


def _run(cfg, args) -> None:
    if args.plan:
        import json

        from transfuse.plan import plan

        print(json.dumps(plan(cfg), indent=2, default=str))
        return
    deploy = None
    if not args.no_deploy:
        from serve.app import deploy
    con = args.console
    force = tuple(STAGES) if args.force else tuple(args.force_stages)
    results = run_pipeline(cfg, force=force, until=args.until, deploy=deploy, console=con)
    con.line("\n" + format_summary(summary(cfg, results)))
    for r in results:
        if r.name == "deploy" and r.detail:
            d = r.detail
            con.line(f"\nendpoint {d['url']} answered: {list(zip(d['ids'], d['predicted']))} "
                     f"(true labels {d['labels']}, {d['latency_ms']} ms)")
        if r.name == "report" and r.detail:
            for line in verdict_lines(cfg):
                con.line(line)
            con.line(f"report: {r.detail['path']}")
    if getattr(args, "log_path", None):
        con.line(f"Ray's, TensorFlow's and Tune's own output: {args.log_path} (--verbose prints it here)")


if __name__ == "__main__":
    sys.exit(main(__doc__, _run, extra=_args, needs_ray=lambda args: not args.plan,
                  console=lambda args: not args.plan))
