"""Member-search benchmark: does Ray Tune's search over the scikit-learn members pay, and what does it cost?

For several label draws (as bench/transfer.py: the config's seed decides which images are labelled) it runs the
pipeline up to the tune stage without the scratch baseline (complete stages are reused), then fits the ensemble
twice on the same CNN members and the same labels: with the fixed ``ensemble.members`` list (the baseline) and
with the members the member search chose (``ensemble.search``). Neither fit touches the run's ensemble stage
folder except the member search's own state (``ensemble/.search/``, resumable). Prints, per draw and as the mean
over draws, the stacks' test accuracy / NLL / ECE and the member search's seconds against the tune stage's (the
CNN depth search of the same draw), with the trials' overlap; writes ``<storage>/<run>/bench_member_search.json``.

    python bench/member_search.py --config configs/default.yaml [--draws 0 1 2] [--set key=value ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.transfer import run_draws  # noqa: E402
from transfuse import storage  # noqa: E402
from transfuse.config import Config  # noqa: E402
from transfuse.finetune import TUNE

METRICS = ("accuracy", "nll", "ece")


def stack_metrics(cfg: Config, inp: Any, ecfg: Any) -> dict[str, float]:
    """The stack's test metrics (mean over ``ensemble.seeds``) of an ensemble fitted with ``ecfg``'s members."""
    from transfuse.ensemble.stage import fit_ensemble

    s = fit_ensemble(inp, ecfg).summary()["stack"]
    return {k: float(s[k]["mean"]) for k in METRICS}


def one_draw(cfg: Config) -> dict[str, Any]:
    from transfuse.ensemble import member_search
    from transfuse.ensemble.inputs import load_inputs
    from transfuse.pipeline import run_pipeline

    run_pipeline(cfg, until="tune", skip=("scratch",))  # the ensemble reads no scratch baseline
    tune_seconds = float(storage.read_json(storage.join(TUNE.dir(cfg), "summary.json"))["seconds"])
    scfg = cfg.model_copy(update={"ensemble": cfg.ensemble.model_copy(
        update={"search": cfg.ensemble.search.model_copy(update={"enabled": True})})})
    # the inputs as the ensemble stage reads them with the search on: every CNN member's embedding (a searched
    # trial's view is drawn among them); read with the search off, only the best member's would be there
    inp, members = load_inputs(scfg)
    fixed = stack_metrics(cfg, inp, cfg.ensemble)
    t = time.time()
    found = member_search.run_member_search(scfg, inp, members, force=True)  # timed from scratch, never restored
    search_wall = time.time() - t
    searched = stack_metrics(cfg, inp, cfg.ensemble.model_copy(update={"members": found.members}))
    s = found.summary
    return {"fixed": fixed, "searched": searched, "tune_seconds": tune_seconds,
            "search_seconds": s["seconds"], "search_wall_seconds": round(search_wall, 1),
            "max_overlap": s["max_overlap"], "trials": s["trials"], "leaks": s["leakage_check"]["leaks"],
            "chosen": [c["name"] for c in s["chosen"]]}


def goals(rows: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    mean = lambda key, m: float(np.mean([r[key][m] for r in rows]))  # noqa: E731
    return [
        ("searched stack: lower test NLL than the fixed list's (mean over draws)",
         mean("searched", "nll") < mean("fixed", "nll")),
        ("searched stack: at least the fixed list's test accuracy (mean over draws)",
         mean("searched", "accuracy") >= mean("fixed", "accuracy")),
        ("searched stack: lower test NLL on every draw", all(r["searched"]["nll"] < r["fixed"]["nll"] for r in rows)),
        ("member trials overlap in time (max_overlap > 1 on every draw)", all(r["max_overlap"] > 1 for r in rows)),
        ("member search costs at most the CNN depth search (every draw)",
         all(r["search_seconds"] <= r["tune_seconds"] for r in rows)),
        ("no trial saw a test row or predicted a row it was fitted on", all(r["leaks"] == 0 for r in rows)),
    ]


def format_table(draws: list[int], rows: list[dict[str, Any]]) -> str:
    lines = [f"{'draw':>5} {'model':<9}{'accuracy':>10}{'nll':>9}{'ece':>9}   "
             f"{'search s':>9}{'tune s':>8}{'ratio':>7}{'overlap':>8}"]
    for d, r in zip(draws, rows):
        for key in ("fixed", "searched"):
            m = r[key]
            ratio = r["search_seconds"] / r["tune_seconds"]
            tail = (f"   {r['search_seconds']:>9.1f}{r['tune_seconds']:>8.1f}{ratio:>7.2f}{r['max_overlap']:>8d}"
                    if key == "searched" else "")
            lines.append(f"{d:>5} {key:<9}{m['accuracy']:>10.4f}{m['nll']:>9.4f}{m['ece']:>9.4f}{tail}")
    for key in ("fixed", "searched"):
        lines.append(f"{'mean':>5} {key:<9}" + "".join(f"{np.mean([r[key][k] for r in rows]):>{w}.4f}"
                                                      for k, w in zip(METRICS, (10, 9, 9))))
    return "\n".join(lines)


def progress(r: dict[str, Any]) -> str:
    return (f"fixed nll {r['fixed']['nll']:.4f}, searched nll {r['searched']['nll']:.4f}, search "
            f"{r['search_seconds']:.0f} s vs tune {r['tune_seconds']:.0f} s; chosen {r['chosen']}")


def main(argv: list[str] | None = None) -> int:
    return run_draws(__doc__.splitlines()[0], argv, one_draw, progress, goals, format_table,
                     "bench_member_search.json")


if __name__ == "__main__":
    sys.exit(main())
