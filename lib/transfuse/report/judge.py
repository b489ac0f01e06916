"""The report's verdict (its first section, drawn by ``sections.verdict_section``, and what the pipeline prints
at its end, ``verdict_lines``): a few lines and one table, each row met or missed against ``cfg.goals``: the
tuned CNN vs scratch and vs pixels, the searched depth vs the seed's, the stack vs its best member, the served
int8 variant vs float32, with the label budget and the number of draws. Rows read ``<run>/bench_transfer.json``
(written by bench/transfer.py: several draws of the label budget) where it has both models, else the run's own
files (1 draw).
Also the stage-file readers the other report modules share (``read_json``, ``description``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from transfuse import storage
from transfuse.compress import COMPRESS, served_variant
from transfuse.data import PREPARE
from transfuse.ensemble import ENSEMBLE
from transfuse.finetune import FINETUNE, SCRATCH, TRANSFER_FILE, TUNE

BENCH_FILE = "bench_transfer.json"  # under <storage>/<run>/, from bench/transfer.py
# bench_transfer.json's model names for the verdict's rows
BENCH_NAMES = {"transfer": "seed_recipe", "scratch": "scratch", "pixels": "pixels_logreg",
               "searched": "searched_depth", "stack": "stack"}


def read_json(path: str) -> Optional[Any]:
    return storage.read_json(path) if storage.exists(path) else None


def description(ens_dir: str) -> Optional[dict]:
    """ensemble.json through its reader (format checked); None when the ensemble stage has not written it."""
    from transfuse.ensemble import read_description

    return read_description(ens_dir, missing_ok=True)


# ------------------------------------------------------------------------------------------------ the verdict
@dataclass
class Measure:
    """One model's test accuracy: a value per draw (one draw when read from the run's own files)."""

    name: str
    values: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    def cell(self) -> str:
        if len(self.values) == 1:
            return f"{self.name} {self.values[0]:.4f}"
        return f"{self.name} {self.mean:.4f} [{min(self.values):.4f}, {max(self.values):.4f}]"


@dataclass
class VerdictRow:
    """One comparison: ``first`` against ``second``, their ``difference`` (points, or a ratio) against ``goal``.

    ``met`` is None when a stage it needs has not run (``missing`` names it)."""

    key: str
    comparison: str
    first: str = "-"
    second: str = "-"
    difference: Optional[float] = None  # the mean over draws
    worst: Optional[float] = None  # the smallest per-draw difference, with several draws
    unit: str = "points"  # points (of test accuracy) or x (a ratio)
    goal: float = 0.0
    draws: int = 1
    met: Optional[bool] = None
    missing: str = ""

    def difference_text(self) -> str:
        if self.difference is None:
            return "-"
        if self.unit == "x":
            return f"{self.difference:.2f}x"
        worst = f" (worst draw {self.worst:+.2f})" if self.worst is not None else ""
        return f"{self.difference:+.2f} points{worst}"

    def goal_text(self) -> str:
        return f">= {self.goal:.2f}x" if self.unit == "x" else f">= {self.goal:+.2f} points"

    def verdict_text(self) -> str:
        return "not run" if self.met is None else ("met" if self.met else "missed")


@dataclass
class Verdict:
    rows: list[VerdictRow]
    label_budget: Optional[dict[str, Any]]  # per_class, train, val, holdout (what is known of them)
    bench: bool  # some rows read bench_transfer.json

    @property
    def draws(self) -> list[int]:
        return sorted({r.draws for r in self.rows if r.met is not None})

    def headline(self) -> str:
        judged = [r for r in self.rows if r.met is not None]
        met = sum(bool(r.met) for r in judged)
        draws = "/".join(str(d) for d in self.draws) or "1"
        head = f"{met} of {len(judged)} goals met ({draws} draw{'s' if draws != '1' else ''}"
        budget = budget_text(self.label_budget)
        what = "label budget" if self.label_budget and self.label_budget.get("per_class") else "labels"
        return head + (f"; {what}: {budget})." if budget else ").")

    def lines(self) -> list[str]:
        """The verdict in a few lines: the headline, then what was missed and what did not run."""
        out = [self.headline()]
        missed = [r for r in self.rows if r.met is False]
        if missed:
            out.append("Missed: " + "; ".join(f"{r.comparison} {r.difference_text()} (goal {r.goal_text()})"
                                              for r in missed) + ".")
        absent = [r for r in self.rows if r.met is None]
        if absent:
            out.append("Not judged: " + "; ".join(f"{r.comparison} ({r.missing})" for r in absent) + ".")
        return out


def budget_text(b: Optional[dict[str, Any]]) -> str:
    if not b:
        return ""
    parts = [f"{b['per_class']:,} labelled per class"] if b.get("per_class") else []
    parts += [f"{k} {b[k]:,}" for k in ("train", "val", "holdout") if b.get(k) is not None]
    return ", ".join(parts)


def _label_budget(cfg: Any, bench: Optional[dict]) -> Optional[dict[str, Any]]:
    """The data manifest's ``label_budget`` record, else the bench's, else the prepared split sizes."""
    m = storage.read_manifest(PREPARE.dir(cfg)) or {}
    if m.get("label_budget"):
        return dict(m["label_budget"])
    if bench and bench.get("label_budget"):
        return dict(bench["label_budget"])
    totals = m.get("totals")
    if not totals:
        return None
    return {"per_class": cfg.data.train_per_class, **{k: totals.get(k) for k in ("train", "val", "holdout")}}


def _run_measures(cfg: Any, ens: Any, desc: Optional[dict]) -> dict[str, Measure]:
    """The run's own test accuracies (1 draw): transfer, scratch, pixels (the same-labels baseline of the scratch
    stage, else the ensemble's pixel member), searched, stack, best_member."""
    out: dict[str, Measure] = {}
    for key, stage, name in (("transfer", FINETUNE, "seed recipe"), ("scratch", SCRATCH, "scratch")):
        m = stage.read(cfg)
        if m is not None and m.test is not None:
            out[key] = Measure(name, [float(m.test.accuracy)])
    # the pixels on the CNNs' own labels (train, C chosen on val), written beside the scratch baseline
    tvs = read_json(storage.join(storage.run_dir(cfg), TRANSFER_FILE)) or {}
    if isinstance(tvs.get("pixels_logreg"), dict) and tvs["pixels_logreg"].get("accuracy") is not None:
        out["pixels"] = Measure("pixels logreg (train, C on val)", [float(tvs["pixels_logreg"]["accuracy"])])
    tsum = read_json(storage.join(TUNE.dir(cfg), "summary.json"))
    if tsum and tsum.get("best", {}).get("test_accuracy") is not None:
        out["searched"] = Measure(f"searched depth {tsum['best'].get('unfreeze')}",
                                  [float(tsum["best"]["test_accuracy"])])
    if ens is not None and ens.summary:
        pixels = [m["name"] for m in (desc or {}).get("sklearn_members", [])
                  if m.get("features") == "pixels" and m["name"] in ens.summary]
        if pixels and "pixels" not in out:  # the ensemble's pixel member (it also learns the holdout labels)
            out["pixels"] = Measure(f"pixels ({pixels[0]})", [ens.mean(pixels[0], "accuracy")])
        if "stack" in ens.summary:
            out["stack"] = Measure("stack", [ens.mean("stack", "accuracy")])
        if ens.best_member in ens.summary:
            out["best_member"] = Measure(f"best member {ens.best_member}", [ens.mean(ens.best_member, "accuracy")])
    return out


def _bench_measures(bench: Optional[dict]) -> dict[str, Measure]:
    """bench_transfer.json's per-draw accuracies under the verdict's keys; best_member: the best non-stack model."""
    models = (bench or {}).get("models") or {}
    out = {key: Measure(name.replace("_", " "), [float(v) for v in models[name]["accuracy"]])
           for key, name in BENCH_NAMES.items() if models.get(name, {}).get("accuracy")}
    others = [n for n in models if n != BENCH_NAMES["stack"] and models[n].get("accuracy")]
    if others:
        best = max(others, key=lambda n: float(np.mean(models[n]["accuracy"])))
        out["best_member"] = Measure(f"best single {best.replace('_', ' ')}",
                                     [float(v) for v in models[best]["accuracy"]])
    return out


def _accuracy_row(key: str, comparison: str, a: str, b: str, goal: float, bench: dict[str, Measure],
                  run: dict[str, Measure], needs: str) -> VerdictRow:
    """first minus second in points, from the bench when it has both (paired by draw), else from the run."""
    row = VerdictRow(key, comparison, goal=goal)
    src = bench if a in bench and b in bench and len(bench[a].values) == len(bench[b].values) else run
    if a not in src or b not in src:
        row.missing = f"needs {needs}"
        return row
    first, second = src[a], src[b]
    diffs = 100.0 * (np.asarray(first.values) - np.asarray(second.values))
    row.first, row.second, row.draws = first.cell(), second.cell(), len(diffs)
    row.difference = float(diffs.mean())
    row.worst = float(diffs.min()) if len(diffs) > 1 else None
    row.met = round(row.difference, 6) >= goal  # rounded: float noise is not a miss
    return row


def _served_rows(cfg: Any) -> list[VerdictRow]:
    """The served variant against float32: accuracy points, size and batch-1 speed ratios (compress's own)."""
    g, serve = cfg.goals, served_variant(cfg)
    rows = [VerdictRow("served_accuracy", f"{serve} vs float32: accuracy", goal=g.served_accuracy_points),
            VerdictRow("served_size", f"{serve} vs float32: size", unit="x", goal=g.served_smaller),
            VerdictRow("served_speed", f"{serve} vs float32: batch-1 latency", unit="x", goal=g.served_faster)]
    rep = COMPRESS.read(cfg)
    s, f = (rep.variant(serve), rep.variant("float32")) if rep is not None else (None, None)
    if s is None or f is None or "speedup_b1" not in s:
        for r in rows:
            r.missing = "needs compress with float32 and " + serve
        return rows
    cells = {"served_accuracy": ("accuracy_delta_points", "accuracy", "{:.4f}"),
             "served_size": ("smaller_raw", "size_bytes", "{:,} bytes stored"),
             "served_speed": ("speedup_b1", "p50_ms_b1", "{:.2f} ms p50")}
    for r in rows:
        value_key, shown, fmt = cells[r.key]
        r.first, r.second = f"{serve} {fmt.format(s[shown])}", f"float32 {fmt.format(f[shown])}"
        r.difference = float(s[value_key])
        r.met = round(r.difference, 6) >= r.goal
    return rows


def verdict(cfg: Any) -> Verdict:
    """The report's first section, from bench_transfer.json (several draws) where it has the models, else the
    run's files (1 draw); a row whose stage has not run is "not run", never a miss."""
    bench = read_json(storage.join(storage.run_dir(cfg), BENCH_FILE))
    ens_dir = ENSEMBLE.dir(cfg)
    ens, desc = ENSEMBLE.read(cfg), description(ens_dir)
    b, r, g = _bench_measures(bench), _run_measures(cfg, ens, desc), cfg.goals
    rows = [
        # transfer is judged on the tuned CNN (the goal: "the tuned ImageNet CNN beats ..."); the seed
        # recipe's own margin is the searched-vs-seed row's other side and section 3's plot
        _accuracy_row("transfer_vs_scratch", "tuned transfer vs scratch", "searched", "scratch",
                      g.transfer_vs_scratch_points, b, r, "tune and scratch"),
        _accuracy_row("transfer_vs_pixels", "tuned transfer vs pixels", "searched", "pixels",
                      g.transfer_vs_pixels_points, b, r, "tune and a pixels member in ensemble"),
        _accuracy_row("searched_vs_seed", "searched depth vs the seed's", "searched", "transfer",
                      g.searched_vs_seed_points, b, r, "finetune and tune"),
        _accuracy_row("stack_vs_best_member", "stack vs best member", "stack", "best_member",
                      g.stack_vs_best_member_points, b, r, "ensemble"),
        *_served_rows(cfg),
    ]
    return Verdict(rows, _label_budget(cfg, bench), bool(b))


def verdict_lines(cfg: Any) -> list[str]:
    """The verdict for a console: its headline, a line per row, and the members the served bundle left out."""
    v = verdict(cfg)
    width = max(len(r.comparison) for r in v.rows)
    lines = ["", "verdict: " + v.headline()] + [
        f"  {r.verdict_text():<8}{r.comparison:<{width}}  {r.difference_text():<32} goal {r.goal_text()}"
        for r in v.rows]
    comp = COMPRESS.read(cfg)
    dropped = comp.dropped if comp is not None else []
    if dropped:
        lines.append(f"note: left out of every compressed variant (zero stacker weight): {', '.join(dropped)}")
    return lines
