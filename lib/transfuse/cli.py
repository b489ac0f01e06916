"""The ``transfuse`` command: a user's own images to a served model and batch predictions.

    transfuse plan DATA                  # classes, counts, sizes, modes, bad files, the split; refuses what cannot run
    transfuse run DATA                   # the whole pipeline on DATA (a folder of class folders, or a CSV/parquet table)
    transfuse predict RUN FILES|DIR|CSV  # offline predictions through the run's served bundle (--ray: on Ray Data)
    transfuse serve RUN                  # the run's bundle on Ray Serve until Ctrl-C
    transfuse report RUN                 # (re)write the run's HTML report

DATA is a folder (one subfolder per class, named by the class) or a .csv/.tsv/.parquet table of (path, label)
rows, local or s3:// / gs://. A run is named after DATA and never written over by another config. ``--config``
and ``--set key.path=value ...`` work as for every job (``python -m jobs.<stage>``, which Ray job submission
uses, runs the same library code).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS before anything imports TensorFlow)
from transfuse.config import FILE_SOURCES, Config, load_config
from transfuse.errors import TransfuseError

USER_DEFAULTS = Path(__file__).parent / "config" / "images.yaml"  # the defaults for a user's images
TABLES = (".csv", ".tsv", ".parquet", ".pq")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"YAML config (default: the defaults for your own images, {USER_DEFAULTS.name})")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY.PATH=VALUE",
                   help="override config values, e.g. --set model.input_size=224 data.resize=crop")
    p.add_argument("--run", help="the run's name (default: named after DATA; a taken name is an error)")
    p.add_argument("--storage", help="where runs are written (default: the config's storage, ./runs)")


def data_config(args: argparse.Namespace) -> Config:
    """The config for DATA: the user defaults (or --config), DATA's source and path, the run named after DATA,
    then the user's --set on top."""
    from transfuse.runs import name_for

    data = args.data
    if Path(data).is_file() or data.lower().endswith(TABLES):
        source = "table"
    else:
        source = "image_folder"
    base = [f"data.source={source}", f"data.path={data}", f"run={args.run or name_for(data)}"]
    if getattr(args, "test", None):
        base += [f"data.test_path={args.test}", "data.split.test=0"]
    if args.storage:
        base.append(f"storage={args.storage}")
    return load_config(args.config or USER_DEFAULTS, base + list(args.overrides))


def _print_data(plan: dict[str, Any], out: Callable[[str], None]) -> None:
    """A data plan (``plan.files_plan``) for a person."""
    out(f"data: {plan['path']} ({plan['source']})" + (f", test set {plan['test_path']}" if plan["test_path"] else ""))
    split_names = ("train", "val", "holdout", "test")
    out(f"  {'class':<24} {'images':>7}  " + "  ".join(f"{s:>7}" for s in split_names))
    for c, row in plan["classes"].items():
        split = row["split"] if isinstance(row["split"], dict) else {}
        test = row.get("test", split.get("test", ""))
        cells = [split.get("train", ""), split.get("val", ""), split.get("holdout", ""), test]
        out(f"  {c:<24} {row['images']:>7}  " + "  ".join(f"{v:>7}" for v in cells))
    if plan["left_out"]:
        out(f"  left out by data.classes: {plan['left_out']}")
    w, h = plan["width"], plan["height"]
    if w:
        out(f"  sizes: width {w['min']}..{w['max']} (median {w['median']}), height {h['min']}..{h['max']} "
            f"(median {h['median']}); imbalance {plan['imbalance']}")
    out(f"  formats: {plan['formats']}; modes: {plan['modes']}")
    pol = plan["image_policy"]
    out(f"  every image becomes {pol['size']} x {pol['size']} x {pol['channels']} ({pol['resize']})")
    if plan["skipped"]["count"]:
        out(f"  skipped {plan['skipped']['count']} file(s): " +
            "; ".join(f"{n} {r}" for r, n in plan["skipped"]["reasons"].items()))
    if plan["bad_files"]:
        verb = "skipped (data.on_bad_file=skip)" if plan["on_bad_file"] == "skip" else "undecodable"
        out(f"  {len(plan['bad_files'])} {verb}:")
        for b in plan["bad_files"][:20]:
            out(f"    {b['id']}: {b['reason']}")


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from transfuse import plan as planning

    cfg = data_config(args)
    if cfg.data.source not in FILE_SOURCES:
        print(json.dumps(planning.plan(cfg), indent=2, default=str))
        return 0
    data = planning.files_plan(cfg)
    _print_data(data, print)
    whole = planning.plan(cfg, data)  # raises the data's problems and any stage's refusal
    print(f"run: {whole['run']} (exists: a rerun of the same config resumes it; another config gets a new name)")
    print(f"model: {whole['model']['backbone']} at {whole['model']['input_shape']}, {whole['tune']['trials']} "
          f"depth trials, ensemble of the best {whole['tune']['members']} CNNs + {list(whole['ensemble']['members'])}")
    if args.json:
        print(json.dumps(whole, indent=2, default=str))
    return 0


def _console(cfg: Config, verbose: bool) -> Any:
    from transfuse import console as con

    if verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
        return con.verbose(), None
    path = con.log_path(cfg)
    return con.quiet(path), path


def cmd_run(args: argparse.Namespace) -> int:
    from transfuse import plan as planning
    from transfuse import runs, storage
    from transfuse.pipeline import run_pipeline

    cfg = data_config(args)
    bad: list[dict[str, str]] = []
    if cfg.data.source in FILE_SOURCES:  # everything knowable before Ray starts: listing, headers, class sizes
        data = planning.files_plan(cfg)
        planning.check_data(data)
        bad = data["bad_files"]
    cfg = runs.claim(cfg, named=bool(args.run))
    console, log = _console(cfg, args.verbose)
    console.line(f"run {cfg.run}: {storage.run_dir(cfg)}")
    if bad:  # only with data.on_bad_file=skip: check_data refused them otherwise
        console.line(f"skipping {len(bad)} undecodable file(s) (listed in the data manifest):")
        for b in bad[:20]:
            console.line(f"  {b['id']}: {b['reason']}")
    environment.init_ray(cfg.ray.address, cfg.ray.num_cpus, quiet=not args.verbose, ingress=cfg.serve.ingress)
    deploy = None
    if args.serve:
        from serve.app import deploy
    results = run_pipeline(cfg, deploy=deploy, console=console)
    _print_results(cfg, console.line)
    report = next((r.detail.get("path") for r in results if r.name == "report" and r.detail), None)
    if report:
        console.line(f"report: {report}")
    folder = storage.run_dir(cfg)
    console.line(f"predict: transfuse predict {folder} NEW_IMAGES --out predictions.csv")
    console.line(f"serve:   transfuse serve {folder}")
    if log:
        console.line(f"Ray's, TensorFlow's and Tune's own output: {log} (--verbose prints it here)")
    if args.serve:
        _block(f"serving {cfg.serve.name} on http://{cfg.serve.host}:{cfg.serve.port}")
    return 0


def _print_results(cfg: Config, out: Callable[[str], None]) -> None:
    """The served model's test metrics, per class by name (from the compress stage's metrics)."""
    from transfuse.compress import COMPRESS, served_variant

    m = COMPRESS.read(cfg)
    served = served_variant(cfg)
    row = m.variant(served) if m is not None else None
    if not row:
        return
    keys = [k for k in ("accuracy", "balanced_accuracy", "macro_f1", "nll") if k in row]
    out(f"served {served} bundle on the test split: " +
        ", ".join(f"{k} {row[k]:.4f}" for k in keys))
    recall = row.get("per_class_recall")
    if isinstance(recall, dict):
        out("  recall per class: " + ", ".join(f"{c} {v:.3f}" for c, v in recall.items()))


def _block(what: str) -> None:
    print(f"{what}; Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from serve.app import deploy
    from transfuse import runs
    from transfuse.compress import BUNDLE

    cfg = runs.open_run(args.run_dir, args.storage or "./runs", list(args.overrides))
    own = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    environment.init_ray(cfg.ray.address, cfg.ray.num_cpus, ingress=cfg.serve.ingress)
    url = deploy(cfg.serve, BUNDLE.dir(cfg))
    print(f"serving {cfg.serve.name}: {url}  (POST {url}:predict, POST {url}/images, GET {url}; the page: "
          f"{url.split('/v1/')[0]}/)", flush=True)
    if own or args.block:  # a Ray this process started ends with it: keep serving until Ctrl-C
        _block("serving")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from transfuse import runs
    from transfuse.report import write_report

    cfg = runs.open_run(args.run_dir, args.storage or "./runs")
    print(write_report(cfg))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from transfuse import predict as pred
    from transfuse import runs

    try:
        target = runs.run_folder(args.run_or_bundle, args.storage or "./runs")
    except runs.RunError:
        target = args.run_or_bundle  # a bundle folder or URI
    files, skipped = pred.input_files(args.inputs)
    t = time.perf_counter()
    if args.ray:
        environment.init_ray(None, args.ray_cpus)
        parts = list(pred.predict_files_ray(target, files, actors=args.actors))
        names = parts[0].class_names
        rows = (r for p in parts for r in p.rows())
    else:
        predictor = pred.load(target)
        result = pred.predict_files(predictor, files)
        names, parts = predictor.class_names, [result]
        rows = result.rows()
    out = args.out or sys.stdout
    n = pred.write_csv(rows, out if isinstance(out, str) else sys.stdout, names)
    errors = [(f, e) for p in parts for f, e in zip(p.names, p.errors) if e]
    seconds = time.perf_counter() - t
    say = (lambda s: print(s, file=sys.stderr))  # noqa: E731  (stdout may be the CSV)
    say(f"{n - len(errors)} of {n} file(s) classified in {seconds:.1f}s" + (f" -> {args.out}" if args.out else ""))
    if skipped:
        say(f"skipped {len(skipped)} file(s) in the folders (hidden or not an image)")
    for f, e in errors[:20]:
        say(f"  not classified: {f}: {e}")
    return 1 if errors and not args.keep_going else 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="transfuse", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="what a run on DATA would do, from the files' headers; starts nothing")
    p.add_argument("data", help="a folder with one subfolder per class, or a CSV/parquet table of path,label")
    p.add_argument("--test", help="a separate labelled test set (folder or table) instead of a test fraction")
    p.add_argument("--json", action="store_true", help="also print every stage's plan as JSON")
    _config_args(p)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("run", help="the whole pipeline on DATA: fine-tune, search, stack, compress, report")
    p.add_argument("data", help="a folder with one subfolder per class, or a CSV/parquet table of path,label")
    p.add_argument("--test", help="a separate labelled test set (folder or table) instead of a test fraction")
    p.add_argument("--serve", action="store_true", help="then serve the bundle on Ray Serve until Ctrl-C")
    p.add_argument("--verbose", action="store_true", help="print Ray's and TensorFlow's own output here")
    _config_args(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("predict", help="classify image files offline with a run's served bundle")
    p.add_argument("run_or_bundle", help="a run (folder or name under --storage) or a bundle folder/URI")
    p.add_argument("inputs", nargs="+", help="image files, folders, or CSV/parquet tables with a path column")
    p.add_argument("--out", help="CSV to write (default: stdout): file, class, one probability per class, error")
    p.add_argument("--ray", action="store_true", help="on a Ray Data actor pool (large folders and buckets)")
    p.add_argument("--actors", type=int, default=2, help="with --ray: bundle copies classifying in parallel")
    p.add_argument("--ray-cpus", type=int, default=None, help="with --ray and no cluster: a local Ray's CPUs")
    p.add_argument("--keep-going", action="store_true", help="exit 0 even when some files could not be read")
    p.add_argument("--storage", help="where runs are (default ./runs)")
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("serve", help="serve a run's bundle on Ray Serve (HTTP, gRPC, the page)")
    p.add_argument("run_dir", metavar="RUN", help="a run folder, or a run name under --storage")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY.PATH=VALUE",
                   help="override serving settings, e.g. --set serve.port=8080 serve.host=0.0.0.0")
    p.add_argument("--storage", help="where runs are (default ./runs)")
    p.add_argument("--block", action="store_true", help="keep this process serving even on a cluster")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("report", help="(re)write a run's HTML report and print its path")
    p.add_argument("run_dir", metavar="RUN", help="a run folder, or a run name under --storage")
    p.add_argument("--storage", help="where runs are (default ./runs)")
    p.set_defaults(func=cmd_report)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except TransfuseError as e:  # the library's own errors say what was wrong and what is allowed: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
