"""The run report: ``<storage>/<run>/report/index.html`` with PNG plots beside it, read from the stage files.

A plain HTML page (no JavaScript, no network: the images are files next to it) that people can open after a
run. Every section reads the files its stage wrote, and is drawn only when they exist; a stage that has not run
gives the line "stage X not run" instead, so the report can be written at any point of a run (even on an empty
run folder) and never stops the pipeline for a missing stage. A stage output that exists but cannot be read is
named on the page with the error (and logged), not raised: the report is the last step of a long run.

Sections:
0. the verdict (``verdict``): a few lines and one table, each row met or missed against ``cfg.goals``: transfer
   vs scratch vs pixels, the searched depth vs the seed's, the stack vs its best member, the served int8 variant
   vs float32, with the label budget and the number of draws. Rows read ``<run>/bench_transfer.json`` (written by
   bench/transfer.py: several draws of the label budget) where it has both models, else the run's own files
   (1 draw);
1. learning curves of the best trial (member dir: first entry of ``tune/members.json``, else ``finetune/``);
2. val accuracy against unfreeze depth (``tune/results.json``, ``tune/val_accuracy_vs_depth.png``);
3. transfer vs scratch (test metrics of ``finetune/`` and ``scratch/``);
4. every member vs the ensemble, accuracy and ECE (``ensemble/metrics.json``: ``summary``);
5. the ensemble's confusion matrix (``ensemble/metrics.json``: ``confusion_stack``) and the stacked ensemble's
   reliability diagram before and after temperature scaling (``ensemble/predictions/test*.parquet``), with NLL
   and ECE; from the best CNN member's ``predictions/test.parquet`` when the ensemble saved none (the caption
   says which);
6. the compression table (``compress/metrics.json``: ``variants``);
7. precision and recall per class, float32 vs the served variant: both bundles under ``compress/`` run on the
   prepared test split;
8. the pipeline summary (``summary``, also printed at the pipeline's end), plus stage timings when given;
appendix: storage, fingerprints, stage manifests, git commits, the label budget record and package versions.
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from transfuse import metrics as tm
from transfuse import storage
from transfuse.errors import TransfuseError

log = logging.getLogger(__name__)

STAGE = "report"
INDEX = "index.html"
# Stages whose manifest.json is listed in the header (fingerprint, creation time, git commit).
MANIFEST_STAGES = ("data", "pretrain_data", "pretrain", "finetune", "scratch", "tune", "ensemble", "compress",
                   "bundle")
COMBINERS = ("average", "hard_vote", "greedy", "stack")  # transfuse.ensemble.COMBINERS: not members
DPI = 110  # ~550-800 px wide figures: readable in a browser without zooming
BENCH_FILE = "bench_transfer.json"  # under <storage>/<run>/, from bench/transfer.py
# bench_transfer.json's model names for the verdict's rows
BENCH_NAMES = {"transfer": "seed_recipe", "scratch": "scratch", "pixels": "pixels_logreg",
               "searched": "searched_depth", "stack": "stack"}


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _num(v: Any, fmt: str = "{:.4f}") -> str:
    """A table cell: numbers formatted, None/NaN as '-'."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        return "-" if math.isnan(v) else fmt.format(v)
    return _esc(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _not_run(*stages: str) -> str:
    return "".join(f'<p class="missing">stage {_esc(s)} not run</p>' for s in stages)


def _read_json(path: str) -> Optional[Any]:
    return storage.read_json(path) if storage.exists(path) else None


class _Page:
    """Collects HTML sections and writes each figure as a PNG beside index.html."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.parts: list[str] = []
        self.images: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def figure(self, fig: Any, name: str, alt: str, caption: str = "") -> None:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=DPI)
        plt.close(fig)
        self.image_bytes(buf.getvalue(), name, alt, caption)

    def image_bytes(self, data: bytes, name: str, alt: str, caption: str = "") -> None:
        storage.write_bytes(storage.join(self.out_dir, name), data)
        self.images.append(name)
        cap = f"<figcaption>{caption}</figcaption>" if caption else ""
        self.add(f'<figure><img src="{_esc(name)}" alt="{_esc(alt)}">{cap}</figure>')


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def _description(ens_dir: str) -> Optional[dict]:
    """ensemble.json through its reader (format checked); None when the ensemble stage has not written it."""
    from transfuse.ensemble import read_description

    return read_description(ens_dir, missing_ok=True)


def _tuned_members(cfg: Any) -> list[Any]:
    """tune/members.json through its reader; [] when absent or unreadable (the report never stops for it)."""
    from transfuse.search import read_members

    try:
        return read_members(cfg) or []
    except TransfuseError as e:
        log.warning("report: %s", e)
        return []


def _member_dir(cfg: Any) -> tuple[Optional[str], str]:
    """(dir of the best trial's member, how it was found): tune/members.json's first entry, else finetune/."""
    tuned = _tuned_members(cfg)
    if tuned:
        return tuned[0].dir, f"best tuned trial {tuned[0].name} (first entry of tune/members.json)"
    ft = storage.stage_dir(cfg, "finetune")
    if storage.exists(storage.join(ft, "metrics.json")):
        return ft, "the seed's fixed-depth model (finetune/; tune not run)"
    return None, ""


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
        return head + (f"; label budget: {budget})." if budget else ").")

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
    m = storage.read_manifest(storage.stage_dir(cfg, "data")) or {}
    if m.get("label_budget"):
        return dict(m["label_budget"])
    if bench and bench.get("label_budget"):
        return dict(bench["label_budget"])
    totals = m.get("totals")
    if not totals:
        return None
    return {"per_class": cfg.data.train_per_class, **{k: totals.get(k) for k in ("train", "val", "holdout")}}


def _run_measures(cfg: Any, ens: Optional[dict], desc: Optional[dict]) -> dict[str, Measure]:
    """The run's own test accuracies (1 draw): transfer, scratch, pixels, searched, stack, best_member."""
    out: dict[str, Measure] = {}
    for key, stage, name in (("transfer", "finetune", "seed recipe"), ("scratch", "scratch", "scratch")):
        m = _read_json(storage.join(storage.stage_dir(cfg, stage), "metrics.json"))
        if m and isinstance(m.get("test"), dict):
            out[key] = Measure(name, [float(m["test"]["accuracy"])])
    tsum = _read_json(storage.join(storage.stage_dir(cfg, "tune"), "summary.json"))
    if tsum and tsum.get("best", {}).get("test_accuracy") is not None:
        out["searched"] = Measure(f"searched depth {tsum['best'].get('unfreeze')}",
                                  [float(tsum["best"]["test_accuracy"])])
    if ens and ens.get("summary"):
        summ = ens["summary"]
        pixels = [m["name"] for m in (desc or {}).get("sklearn_members", [])
                  if m.get("features") == "pixels" and m["name"] in summ]
        if pixels:
            out["pixels"] = Measure(f"pixels ({pixels[0]})", [float(summ[pixels[0]]["accuracy"]["mean"])])
        if "stack" in summ:
            out["stack"] = Measure("stack", [float(summ["stack"]["accuracy"]["mean"])])
        best = (ens.get("best_member") or {}).get("name")
        if best in summ:
            out["best_member"] = Measure(f"best member {best}", [float(summ[best]["accuracy"]["mean"])])
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
    g, serve = cfg.goals, cfg.compress.serve_variant
    rows = [VerdictRow("served_accuracy", f"{serve} vs float32: accuracy", goal=g.served_accuracy_points),
            VerdictRow("served_size", f"{serve} vs float32: size", unit="x", goal=g.served_smaller),
            VerdictRow("served_speed", f"{serve} vs float32: batch-1 latency", unit="x", goal=g.served_faster)]
    rep = _read_json(storage.join(storage.stage_dir(cfg, "compress"), "metrics.json")) or {}
    by = {r.get("variant"): r for r in rep.get("variants") or []}
    s, f = by.get(serve), by.get("float32")
    if s is None or f is None or "speedup_b1" not in s:
        for r in rows:
            r.missing = "needs compress with float32 and " + serve
        return rows
    cells = {"served_accuracy": ("accuracy_delta_points", "accuracy", "{:.4f}"),
             "served_size": ("smaller_raw", "size_bytes", "{:,} bytes"),
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
    bench = _read_json(storage.join(storage.run_dir(cfg), BENCH_FILE))
    ens_dir = storage.stage_dir(cfg, "ensemble")
    ens, desc = _read_json(storage.join(ens_dir, "metrics.json")), _description(ens_dir)
    b, r, g = _bench_measures(bench), _run_measures(cfg, ens, desc), cfg.goals
    rows = [
        _accuracy_row("transfer_vs_scratch", "transfer vs scratch", "transfer", "scratch",
                      g.transfer_vs_scratch_points, b, r, "finetune and scratch"),
        _accuracy_row("transfer_vs_pixels", "transfer vs pixels", "transfer", "pixels",
                      g.transfer_vs_pixels_points, b, r, "finetune and a pixels member in ensemble"),
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
    comp = _read_json(storage.join(storage.stage_dir(cfg, "compress"), "metrics.json")) or {}
    dropped = (comp.get("zero_weight_members") or {}).get("dropped")
    if dropped:
        lines.append(f"note: left out of every compressed variant (zero stacker weight): {', '.join(dropped)}")
    return lines


def _verdict(cfg: Any, page: _Page) -> None:
    page.add('<h2 id="verdict">Verdict</h2>')
    v = verdict(cfg)
    page.add('<div class="verdict-lines">' + "".join(f"<p>{_esc(line)}</p>" for line in v.lines()) + "</div>")
    head = "".join(f"<th>{h}</th>" for h in ("comparison", "first", "second", "difference", "goal", "draws",
                                            "verdict"))
    body = "".join(
        f'<tr data-key="{_esc(r.key)}" data-met="{_esc(r.verdict_text())}"'
        f' data-difference="{"" if r.difference is None else repr(r.difference)}">'
        f"<td>{_esc(r.comparison)}</td><td>{_esc(r.first)}</td><td>{_esc(r.second)}</td>"
        f"<td>{_esc(r.difference_text())}</td><td>{_esc(r.goal_text())}</td>"
        f"<td>{r.draws if r.met is not None else '-'}</td>"
        f'<td class="{_esc(r.verdict_text().replace(" ", "-"))}">{_esc(r.verdict_text())}</td></tr>'
        for r in v.rows)
    page.add(f'<table id="verdict-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')
    src = (f"Rows with several draws read {BENCH_FILE} (bench/transfer.py); the others this run's files."
           if v.bench else "Every row reads this run's files (1 draw; bench/transfer.py writes several).")
    page.add(f'<p class="note">{_esc(src)} Goals: the config\'s <code>goals</code> section. Accuracy on the '
             "test split; a difference is the first model minus the second.</p>")


# ------------------------------------------------------------------------------------------------ sections
def _title(cfg: Any, page: _Page) -> None:
    page.add(f"<h1>transfuse run <code>{_esc(cfg.run)}</code></h1>")


def _versions(manifests: list[dict]) -> list[tuple[str, str]]:
    """Package versions as the stage manifests recorded them (a package whose version changed between stages
    lists each), else this process's; and the Python that writes the report."""
    import platform

    seen: dict[str, list[str]] = {}
    for m in manifests or [{"versions": storage.versions()}]:
        for k, v in (m.get("versions") or {}).items():
            if v not in seen.setdefault(k, []):
                seen[k].append(v)
    return [(k, ", ".join(v)) for k, v in seen.items()] + [("python (report)", platform.python_version())]


def _appendix(cfg: Any, page: _Page) -> None:
    page.add('<h2 id="appendix">Appendix: paths, fingerprints and versions</h2>')
    rows, commits, manifests = [], [], []
    for s in MANIFEST_STAGES:
        m = storage.read_manifest(storage.stage_dir(cfg, s))
        if not m:
            continue
        manifests.append(m)
        commit = m.get("git_commit")
        if commit and commit not in commits:
            commits.append(commit)
        rows.append([_esc(s), _num(m.get("complete")), f"<code>{_esc(m.get('fingerprint', '-'))}</code>",
                     _esc(m.get("created", "-")), f"<code>{_esc((commit or '-')[:12])}</code>"])
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    info = [("storage", storage.run_dir(cfg)), ("config fingerprint", cfg.fingerprint()),
            ("git commit", ", ".join(commits) if commits else "- (no stage manifest records one)"),
            ("backbone", f"{cfg.model.backbone} (width {cfg.model.width}, {cfg.model.input_size} px, "
                         f"weights {cfg.model.weights}, unfreeze {cfg.model.unfreeze})"),
            ("written", now)]
    data = storage.read_manifest(storage.stage_dir(cfg, "data")) or {}
    if data.get("label_budget"):
        info.append(("label budget (data manifest)", json.dumps(data["label_budget"], sort_keys=True)))
    page.add(_table(["", ""], [[_esc(k), f"<code>{_esc(v)}</code>"] for k, v in info]))
    page.add("<h3>Stage manifests</h3>")
    page.add(_table(["stage", "complete", "fingerprint", "created", "git commit"], rows) if rows
             else "<p>no stage has written a manifest yet</p>")
    page.add("<h3>Package versions</h3>")
    page.add(_table(["package", "version"], [[_esc(k), _esc(v)] for k, v in _versions(manifests)]))


def _learning_curves(cfg: Any, page: _Page) -> None:
    page.add("<h2>1. Learning curves of the best trial</h2>")
    d, how = _member_dir(cfg)
    if d is None:
        page.add(_not_run("tune", "finetune"))
        return
    m = storage.read_json(storage.join(d, "metrics.json"))
    hist = m.get("history") or []
    if not hist:
        page.add(f"<p>{_esc(d)}/metrics.json has no per-epoch history</p>")
        return
    plt = _plt()
    epochs = [int(r["epoch"]) for r in hist]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in ((axes[0], "loss", "loss (cross-entropy)"), (axes[1], "accuracy", "accuracy")):
        for k, style in ((key, "o-"), (f"val_{key}", "s--")):
            pts = [(e, r[k]) for e, r in zip(epochs, hist) if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=k.replace("_", " "), ms=4)
        ax.set_xlabel("epoch (both phases)")
        ax.set_ylabel(label)
    phases = [r.get("phase") for r in hist]
    boundary = next((i for i in range(1, len(phases)) if phases[i] != phases[i - 1]), None)
    for ax in axes:
        if boundary is not None:  # between the last epoch of one phase and the first of the next
            x = (epochs[boundary - 1] + epochs[boundary]) / 2
            ax.axvline(x, color="grey", ls=":", lw=1.5, label=f"{phases[boundary - 1]} -> {phases[boundary]}")
        ax.legend(fontsize=8)
    axes[0].set_title("loss")
    axes[1].set_title("accuracy")
    per_phase = ", ".join(f"{p}: {phases.count(p)} epoch(s)" for p in dict.fromkeys(phases))
    caption = (f"{_esc(how)}. Phases: {_esc(per_phase)}"
               + ("; the dotted line marks where the backbone was unfrozen." if boundary is not None
                  else "; one phase only (no boundary)."))
    page.figure(fig, "learning_curves.png", "learning curves", caption)
    rows = [[_esc(split), _num(m[split].get("accuracy")), _num(m[split].get("nll")), _num(m[split].get("ece")),
             _num(m[split].get("n"))] for split in ("val", "test", "holdout") if isinstance(m.get(split), dict)]
    if rows:
        page.add(_table(["split", "accuracy", "NLL", "ECE", "n"], rows))


def _depth_search(cfg: Any, page: _Page) -> None:
    page.add("<h2>2. Val accuracy against unfreeze depth</h2>")
    tune_dir = storage.stage_dir(cfg, "tune")
    rows = _read_json(storage.join(tune_dir, "results.json"))
    if rows is None:
        page.add(_not_run("tune"))
        return
    tune_png = storage.join(tune_dir, "val_accuracy_vs_depth.png")
    caption = (f"Best val accuracy of every trial by the number of unfrozen backbone layers; crosses were stopped "
               f"early by the scheduler; dashed line: the seed's depth ({cfg.model.unfreeze}).")
    if storage.exists(tune_png):  # the search's own plot, copied so the page works from its folder
        page.image_bytes(storage.read_bytes(tune_png), "val_accuracy_vs_depth.png", "val accuracy vs depth",
                         caption + " (plot written by the tune stage)")
    else:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for stopped in (False, True):
            pts = [(r["unfreeze"], r["best_val_accuracy"]) for r in rows if bool(r.get("stopped_early")) == stopped
                   and r.get("best_val_accuracy") is not None and not math.isnan(r["best_val_accuracy"])]
            if pts:
                ax.scatter(*zip(*pts), marker="x" if stopped else "o",
                           label="stopped early" if stopped else "ran to the end", alpha=0.8)
        ax.axvline(cfg.model.unfreeze, color="grey", ls="--", lw=1, label=f"seed's depth ({cfg.model.unfreeze})")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # depths are layer counts
        ax.set_xlabel("unfrozen backbone layers (from the top)")
        ax.set_ylabel("best val accuracy")
        ax.set_title("Depth search")
        ax.legend(fontsize=8)
        page.figure(fig, "val_accuracy_vs_depth.png", "val accuracy vs depth", caption)
    ordered = sorted(rows, key=lambda r: (r.get("unfreeze", 0), -(r.get("best_val_accuracy") or 0.0)))
    page.add(_table(
        ["trial", "unfreeze", "best val acc", "epochs", "stopped early", "finished", "member val acc",
         "member test acc", "error"],
        [[_esc(r.get("trial_id", "-")), _num(r.get("unfreeze")), _num(r.get("best_val_accuracy")),
          _num(r.get("epochs_run")), _num(r.get("stopped_early")), _num(r.get("finished")),
          _num(r.get("val_accuracy")), _num(r.get("test_accuracy")), _esc(r.get("error") or "")] for r in ordered]))


def _transfer_vs_scratch(cfg: Any, page: _Page) -> None:
    page.add("<h2>3. Transfer vs scratch</h2>")
    found, missing = {}, []
    for stage, label in (("finetune", f"transferred weights ({cfg.model.weights}), unfreeze {cfg.model.unfreeze}"),
                         ("scratch", "same network from random weights")):
        m = _read_json(storage.join(storage.stage_dir(cfg, stage), "metrics.json"))
        if m is None or not isinstance(m.get("test"), dict):
            missing.append(stage)
        else:
            found[stage] = (label, m["test"], m.get("epochs"))
    page.add(_not_run(*missing))
    if not found:
        return
    page.add(_table(["stage", "model", "test accuracy", "NLL", "ECE", "n", "epochs"],
                    [[_esc(s), _esc(lab), _num(t.get("accuracy")), _num(t.get("nll")), _num(t.get("ece")),
                      _num(t.get("n")), _num(ep)] for s, (lab, t, ep) in found.items()]))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    names = list(found)
    x = np.arange(len(names))
    w = 0.38
    for i, (key, label) in enumerate((("accuracy", "test accuracy"), ("ece", "test ECE"))):
        vals = [float(found[s][1].get(key, float("nan"))) for s in names]
        bars = ax.bar(x + (i - 0.5) * w, vals, w, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(x, [f"{s}\n({'transfer' if s == 'finetune' else 'random init'})" for s in names])
    ax.set_ylim(0, 1.1)
    ax.set_title("Transfer vs scratch (test split)")
    ax.legend(fontsize=8)
    page.figure(fig, "transfer_vs_scratch.png", "transfer vs scratch",
                "Same architecture and epoch budget; higher accuracy and lower ECE are better.")


def _members_vs_ensemble(cfg: Any, page: _Page, ens: Optional[dict], desc: Optional[dict]) -> None:
    page.add("<h2>4. Every member vs the ensemble</h2>")
    if ens is None:
        page.add(_not_run("ensemble"))
        return
    per_model = ens["summary"]
    # metrics.json is written with sorted keys: restore the ensemble's member order, then the combiners
    order = [m for m in (desc or {}).get("member_order", []) if m in per_model]
    models = order + sorted((m for m in per_model if m not in order and m not in COMBINERS), key=str) \
        + [c for c in COMBINERS if c in per_model]
    seeds = ens.get("seeds", [])
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.45 * len(models) + 1.4), sharey=True)
    y = np.arange(len(models))
    colors = ["tab:orange" if m in COMBINERS else "tab:blue" for m in models]
    for ax, metric, label in ((axes[0], "accuracy", "test accuracy (higher is better)"),
                              (axes[1], "ece", "test ECE (lower is better)")):
        mean = np.array([per_model[m][metric]["mean"] for m in models])
        # clipped: the mean of equal seed values can round one ulp above their min, and matplotlib refuses a
        # negative error bar (it did, in a default run where a member gave the same accuracy on every seed)
        lo = np.clip(mean - np.array([per_model[m][metric]["min"] for m in models]), 0.0, None)
        hi = np.clip(np.array([per_model[m][metric]["max"] for m in models]) - mean, 0.0, None)
        ax.barh(y, mean, color=colors, xerr=[lo, hi] if len(seeds) > 1 else None, capsize=3)
        for yi, v in zip(y, mean):
            ax.text(v, yi, f" {v:.3f}", va="center", fontsize=8)
        ax.set_xlabel(label)
        ax.set_xlim(0, max(1.0, float(mean.max()) * 1.2) if metric == "accuracy" else float(mean.max()) * 1.35 + 1e-3)
    axes[0].set_yticks(y, models)
    axes[0].invert_yaxis()
    from matplotlib.patches import Patch

    axes[1].legend(handles=[Patch(color="tab:blue", label="member"), Patch(color="tab:orange", label="combiner")],
                   fontsize=8, loc="lower right")
    page.figure(fig, "members_vs_ensemble.png", "members vs ensemble",
                f"Test split, mean over {len(seeds) or 1} ensemble seed(s)"
                + ("; error bars span the seed range." if len(seeds) > 1 else "."))
    rows = []
    for m in models:
        s = per_model[m]
        cell = lambda k: f"{_num(s[k]['mean'])} [{_num(s[k]['min'])}, {_num(s[k]['max'])}]"  # noqa: E731
        rows.append([_esc(m), "combiner" if m in COMBINERS else "member", cell("accuracy"), cell("nll"),
                     cell("ece")])
    page.add(_table(["model", "kind", "accuracy mean [min, max]", "NLL", "ECE"], rows))
    best, gain = ens.get("best_member"), ens.get("stack_vs_best_member")
    if best and gain:
        page.add(f"<p>Best single member: <b>{_esc(best['name'])}</b> (accuracy {_num(best.get('accuracy'))}). "
                 f"Stacked ensemble vs it: accuracy {gain['accuracy_gain_mean']:+.4f}, NLL gain "
                 f"{gain['nll_gain_mean']:+.4f}; beats it on accuracy or NLL: "
                 f"{_num(bool(gain['beats_on_accuracy_or_nll']))}.</p>")
    counts = ens.get("counts")
    if counts:
        page.add(f"<p>Examples per split: {_esc(', '.join(f'{k} {v}' for k, v in counts.items()))}.</p>")


def _best_cnn_member(cfg: Any, ens: Optional[dict], desc: Optional[dict]) -> tuple[Optional[str], str]:
    """The CNN member with the best test accuracy in the ensemble report, else the best trial / finetune."""
    if ens and desc and desc.get("cnn_members"):
        summary = ens.get("summary", {})
        cnn = [c for c in desc["cnn_members"] if c["name"] in summary] or desc["cnn_members"]
        best = max(cnn, key=lambda c: summary.get(c["name"], {}).get("accuracy", {}).get("mean", -1.0))
        return str(best["dir"]), f"CNN member {best['name']} (best CNN member on test in the ensemble report)"
    return _member_dir(cfg)


def _calibration(cfg: Any, page: _Page, ens: Optional[dict], desc: Optional[dict]) -> None:
    page.add("<h2>5. Confusion matrix and reliability</h2>")
    class_names = (desc or {}).get("class_names")
    if ens is None or "confusion_stack" not in ens:
        page.add(_not_run("ensemble"))
    else:
        cm = np.asarray(ens["confusion_stack"], dtype=np.int64)
        k = cm.shape[0]
        names = [str(c) for c in class_names] if class_names and len(class_names) == k else [str(i) for i in range(k)]
        plt = _plt()
        side = min(9.0, 2.5 + 0.45 * k)
        fig, ax = plt.subplots(figsize=(side + 1.0, side))
        im = ax.imshow(cm, cmap="Blues")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        if k <= 20:  # counts are readable up to ~20 classes
            thresh = cm.max() / 2 if cm.size else 0
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if cm[i, j] > thresh else "black")
        ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        acc = float(np.trace(cm) / max(cm.sum(), 1))
        ax.set_title(f"Stacked ensemble, test (accuracy {acc:.3f}, n={int(cm.sum())})")
        page.figure(fig, "confusion_ensemble.png", "confusion matrix of the stacked ensemble",
                    "Confusion matrix of the stacked ensemble on the test split (rows: true class, columns: "
                    "predicted), from ensemble/metrics.json.")
    from transfuse.stack_inputs import read_member_split

    ens_dir = storage.stage_dir(cfg, "ensemble")
    curves = []  # (label, probs, labels)
    if storage.exists(storage.join(ens_dir, "predictions", "test.parquet")):
        how, served = "the stacked ensemble, from ensemble/predictions/test*.parquet", "stacked ensemble (served)"
        if storage.exists(storage.join(ens_dir, "predictions", "test_uncalibrated.parquet")):  # temperature-scaled
            t = float((desc or {}).get("stacker", {}).get("temperature", 1.0))
            _, labels, probs = read_member_split(ens_dir, "predictions", "test_uncalibrated")
            curves.append(("stacked ensemble, before temperature scaling", probs, labels))
            served = f"stacked ensemble, T = {t:.3f} (served)"
            how += (f"; the temperature T = {t:.3f} was fitted on the stacker's out-of-fold holdout logits "
                    "(Guo et al. 2017) and divides the served stacker's logits")
        _, labels, probs = read_member_split(ens_dir, "predictions", "test")
        curves.append((served, probs, labels))
    else:
        d, how = _best_cnn_member(cfg, ens, desc)
        if d is None or not storage.exists(storage.join(d, "predictions", "test.parquet")):
            page.add("<p>No test predictions to draw a reliability diagram from "
                     "(no ensemble/predictions/test.parquet, no member dir with predictions/test.parquet).</p>")
            return
        _, labels, probs = read_member_split(d, "predictions", "test")
        curves.append((how, probs, labels))
        how += ", from its predictions/test.parquet (the ensemble stage has not saved test probabilities)"
    plt = _plt()
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(5.5, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    rows = []
    for i, (label, probs, labels) in enumerate(curves):
        rel = tm.reliability(probs, labels)
        edges = np.asarray(rel["edges"])
        centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        count = np.asarray(rel["count"])
        has = count > 0
        ece, nll = tm.ece(probs, labels), tm.nll(probs, labels)
        rows.append((label, tm.accuracy(probs, labels), nll, ece, len(labels)))
        last = i == len(curves) - 1
        if last:  # the served model's bins as bars, an earlier curve as a line over them
            ax.bar(centers[has], np.asarray(rel["accuracy"])[has], width[has], edgecolor="black", alpha=0.6,
                   label="accuracy per confidence bin")
            axc.bar(centers, count, width, color="tab:grey", edgecolor="black")
        ax.plot(np.asarray(rel["confidence"])[has], np.asarray(rel["accuracy"])[has], "o" if last else "o-",
                color="tab:red" if last else "tab:orange", ms=4, label=f"{label}: ECE {ece:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.45)  # room above 1.0 for the legend
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_title(f"Reliability on the test split (n={rows[-1][4]})")
    ax.legend(fontsize=6.5, loc="upper left")
    axc.set_xlabel("confidence (max probability)")
    axc.set_ylabel("examples")
    axc.set_xlim(0, 1)
    page.figure(fig, "reliability.png", "reliability diagram", f"Reliability diagram of {_esc(how)}.")
    page.add(_table(["model", "test accuracy", "NLL", "ECE", "n"],
                    [(_esc(label), _num(a), _num(n), _num(e), _num(k)) for label, a, n, e, k in rows]))


def _compression(cfg: Any, page: _Page) -> None:
    page.add("<h2>6. Compression: size, latency and accuracy per variant</h2>")
    rep = _read_json(storage.join(storage.stage_dir(cfg, "compress"), "metrics.json"))
    if rep is None:
        page.add(_not_run("compress"))
        return
    rows = rep.get("variants") or []
    if not rows:
        page.add("<p>compress/metrics.json lists no variants</p>")
        return
    thr_key = next((k for k in rows[0] if k.startswith("throughput_b")), None)
    cols = [("variant", "variant", "{}"), ("size_bytes", "bytes", "{}"), ("size_gzip_bytes", "gzip bytes", "{}"),
            ("p50_ms_b1", "p50 ms (batch 1)", "{:.2f}"), ("p99_ms_b1", "p99 ms (batch 1)", "{:.2f}")]
    if thr_key:
        cols.append((thr_key, f"images/s (batch {thr_key[len('throughput_b'):]})", "{:.1f}"))
    cols += [("accuracy", "accuracy", "{:.4f}"), ("nll", "NLL", "{:.4f}"), ("ece", "ECE", "{:.4f}"),
             ("speedup_b1", "x faster", "{:.2f}"), ("smaller_raw", "x smaller", "{:.2f}"),
             ("smaller_gzip", "x smaller (gzip)", "{:.2f}"), ("accuracy_delta_points", "accuracy change (points)",
                                                              "{:+.2f}")]
    page.add(_table([c[1] for c in cols], [[_num(r.get(k), f) for k, _, f in cols] for r in rows]))
    serve = getattr(cfg.compress, "serve_variant", None)
    notes = [f"ensemble source: {rep.get('ensemble_source', '-')}", f"test examples: {rep.get('test_n', '-')}",
             f"threads: {rep.get('num_threads', '-')}", f"served variant: {serve}"]
    page.add(f"<p>{_esc('; '.join(notes))}. Ratios are against float32, measured in the same run.</p>")
    dropped = (rep.get("zero_weight_members") or {}).get("dropped")
    if dropped:
        page.add(f"<p>Left out of every variant (zero stacker weight: they cannot change a prediction): "
                 f"{_esc(', '.join(dropped))}.</p>")
    from transfuse.measure import goals_line

    for key in ("goals", "goals_pruned_int8"):
        g = rep.get(key) or {}
        if g and "faster_goal" in g:  # (a run from before the goals config lacks them: the verdict table judges)
            page.add(f"<p>Goals: {_esc(goals_line(g))}.</p>")
    plt = _plt()
    names = [str(r["variant"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    sizes = [r.get("size_bytes") for r in rows]
    mib = max((x or 0) for x in sizes) >= 10 * 2**20  # MiB for real bundles, KiB for tiny ones
    panels = ((axes[0], sizes, 2.0 ** (-20 if mib else -10), f"size ({'MiB' if mib else 'KiB'})", "{:.3g}"),
              (axes[1], [r.get("p50_ms_b1") for r in rows], 1.0, "p50 latency, batch 1 (ms)", "{:.3g}"),
              (axes[2], [r.get("accuracy") for r in rows], 1.0, "test accuracy", "{:.3f}"))
    for ax, vals, scale, label, fmt in panels:
        v = np.array([np.nan if x is None else float(x) * scale for x in vals])
        bars = ax.bar(names, v, color=["tab:green" if n == serve else "tab:blue" for n in names])
        ax.bar_label(bars, labels=["" if np.isnan(x) else fmt.format(x) for x in v], fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    page.figure(fig, "compression.png", "compression variants",
                "Every variant as a full bundle, loaded back and measured (served variant in green).")


def per_class(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Precision and recall per class (NaN where a class is never predicted / never present) and support."""
    cm = np.asarray(tm.confusion(probs, labels), dtype=np.float64)
    hit = np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"precision": hit / cm.sum(0), "recall": hit / cm.sum(1), "n": cm.sum(1).astype(np.int64)}


def _per_class(cfg: Any, page: _Page) -> None:
    serve = cfg.compress.serve_variant
    page.add(f"<h2>7. Precision and recall per class: float32 vs {_esc(serve)}</h2>")
    from transfuse.bundle import MANIFEST, load_bundle

    comp = storage.stage_dir(cfg, "compress")
    names = list(dict.fromkeys(["float32", serve]))
    if not all(storage.exists(storage.join(comp, v, MANIFEST)) for v in names):
        page.add(_not_run("compress") if not storage.exists(comp) else
                 f"<p>compress/ has no {_esc(' and '.join(names))} bundle to compare</p>")
        return
    data_dir = storage.stage_dir(cfg, "data")
    if not storage.read_manifest(data_dir):
        page.add(_not_run("prepare"))
        return
    from transfuse.data import read_split_numpy

    images, labels, _ = read_split_numpy(data_dir, "test")
    stats, class_names = {}, None
    for v in names:
        b = load_bundle(storage.join(comp, v))
        stats[v] = per_class(b.predict_proba(images), labels)
        class_names = b.class_names
    rows = []
    for k, cname in enumerate(class_names or []):
        row = [_esc(cname), _num(int(stats["float32"]["n"][k]))]
        for metric in ("precision", "recall"):
            a, q = float(stats["float32"][metric][k]), float(stats[serve][metric][k])
            row += [_num(a), _num(q), _num(100.0 * (q - a), "{:+.2f}")]
        rows.append(row)
    page.add(_table(["class", "test n", "precision float32", f"precision {serve}", "change (points)",
                     "recall float32", f"recall {serve}", "change (points)"], rows))
    page.add(f"<p>Both bundles (compress/float32/ and compress/{_esc(serve)}/) run on the prepared test split "
             f"({len(labels):,} images); '-': the class was never predicted.</p>")


def summary(cfg: Any, results: Sequence[Any]) -> list[dict[str, Any]]:
    """Rows of the final table (the pipeline prints it; section 8 shows it): test accuracy / NLL / ECE of the
    models that matter, read from their files."""
    rows: list[dict[str, Any]] = []

    def member_row(label: str, d: str) -> None:
        path = storage.join(d, "metrics.json")
        if storage.exists(path):
            m = storage.read_json(path)["test"]
            rows.append({"model": label, **{k: m[k] for k in ("accuracy", "nll", "ece")}})

    member_row(f"seed recipe (unfreeze {cfg.model.unfreeze})", storage.stage_dir(cfg, "finetune"))
    member_row("same network from scratch", storage.stage_dir(cfg, "scratch"))
    tuned = _tuned_members(cfg)
    if tuned:
        member_row(f"best tuned ({tuned[0].name})", tuned[0].dir)
    ens_path = storage.join(storage.stage_dir(cfg, "ensemble"), "metrics.json")
    if storage.exists(ens_path):
        rep = storage.read_json(ens_path)
        before = [c["test"]["before"] for c in (rep.get("calibration") or {}).values() if c]
        if before:  # mean over seeds, as the summary's rows
            rows.append({"model": "stack, before temperature scaling",
                         **{k: float(sum(b[k] for b in before) / len(before)) for k in ("accuracy", "nll", "ece")}})
        for key, label in (("average", "simple average"), ("stack", "stacked ensemble")):
            if key in rep.get("summary", {}):
                s = rep["summary"][key]
                rows.append({"model": label, **{k: s[k]["mean"] for k in ("accuracy", "nll", "ece")}})
    comp_path = storage.join(storage.stage_dir(cfg, "compress"), "metrics.json")
    if storage.exists(comp_path):
        comp = storage.read_json(comp_path)
        for r in comp.get("variants", []):
            if r.get("variant") == cfg.compress.serve_variant:
                rows.append({"model": f"compressed ensemble ({r['variant']})",
                             **{k: r.get(k) for k in ("accuracy", "nll", "ece")},
                             "bundle_bytes": r.get("size_bytes"), "p50_ms": r.get("p50_ms_b1")})
    for r in results:
        if r.name == "deploy" and r.detail:
            rows.append({"model": "served endpoint (one HTTP query)", "latency_ms": r.detail.get("latency_ms")})
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, fmt: str = "{:.4f}") -> str:
        return "" if v is None else fmt.format(v)

    lines = [f"{'model':<38}{'accuracy':>10}{'nll':>9}{'ece':>9}{'size':>12}{'latency':>12}"]
    for r in rows:
        size = f(r.get("bundle_bytes"), "{:,}")
        lat = f(r.get("p50_ms") or r.get("latency_ms"), "{:.1f} ms")
        lines.append(f"{r['model']:<38}{f(r.get('accuracy')):>10}{f(r.get('nll')):>9}{f(r.get('ece')):>9}"
                     f"{size:>12}{lat:>12}")
    return "\n".join(lines)


def _summary(cfg: Any, page: _Page, results: Optional[Sequence[Any]]) -> None:
    page.add("<h2>8. Pipeline summary</h2>")
    rows = summary(cfg, list(results or []))
    if results:
        page.add(_table(["stage", "status", "seconds"],
                        [[_esc(r.name), _esc(r.status), _num(float(r.seconds), "{:.1f}")] for r in results]))
    if not rows:
        page.add("<p>no model has written test metrics yet (stages finetune, scratch, tune, ensemble and compress "
                 "not run)</p>")
        return
    keys = [("accuracy", "accuracy", "{:.4f}"), ("nll", "NLL", "{:.4f}"), ("ece", "ECE", "{:.4f}"),
            ("bundle_bytes", "bundle bytes", "{}"), ("p50_ms", "p50 ms", "{:.1f}"), ("latency_ms", "latency ms",
                                                                                     "{:.1f}")]
    keys = [k for k in keys if any(r.get(k[0]) is not None for r in rows)]
    page.add(_table(["model", *(k[1] for k in keys)],
                    [[_esc(r["model"]), *(_num(r.get(k), f) for k, _, f in keys)] for r in rows]))


# ------------------------------------------------------------------------------------------------ the page
_CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555;max-width:800px}
.missing{color:#a33;font-style:italic}.error{color:#a00}code{font-size:.9em}h1{margin:.2em 0 .4em}
.verdict-lines p{margin:.2em 0}td.met{color:#161;font-weight:bold}td.missed{color:#a00;font-weight:bold}
td.not-run{color:#777}.note{font-size:.85em;color:#555}"""


def _section(page: _Page, title: str, fn: Callable[[], None]) -> None:
    """Run one section; a stage output that exists but cannot be read is named on the page, not raised."""
    start = len(page.parts)
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the report must not fail a finished run; the error is shown + logged
        log.warning("report section %r failed: %s: %s", title, type(e).__name__, e, exc_info=True)
        del page.parts[start + 1:]  # keep the heading, drop a half-written section
        page.add(f'<p class="error">section {_esc(title)} could not be drawn: {_esc(type(e).__name__)}: '
                 f"{_esc(e)}</p>")


def write_report(cfg: Any, results: Optional[Sequence[Any]] = None) -> str:
    """Write ``<storage>/<run>/report/index.html`` and its PNGs from whatever stages have run; return its path.

    ``results``: the pipeline's ``StageResult`` list, shown as a timing table when given.
    """
    _plt()
    out = storage.stage_dir(cfg, STAGE)
    storage.makedirs(out)
    storage.clear_dir(out)  # no stale plots from an earlier report
    page = _Page(out)
    ens_dir = storage.stage_dir(cfg, "ensemble")
    ens: Optional[dict] = None
    desc: Optional[dict] = None
    try:
        ens = _read_json(storage.join(ens_dir, "metrics.json"))
        desc = _description(ens_dir)
    except Exception as e:  # noqa: BLE001 - shown in sections 4 and 5
        log.warning("report: cannot read %s: %s", ens_dir, e)
    _title(cfg, page)
    _section(page, "verdict", lambda: _verdict(cfg, page))
    _section(page, "learning curves", lambda: _learning_curves(cfg, page))
    _section(page, "depth search", lambda: _depth_search(cfg, page))
    _section(page, "transfer vs scratch", lambda: _transfer_vs_scratch(cfg, page))
    _section(page, "members vs ensemble", lambda: _members_vs_ensemble(cfg, page, ens, desc))
    _section(page, "confusion and reliability", lambda: _calibration(cfg, page, ens, desc))
    _section(page, "compression", lambda: _compression(cfg, page))
    _section(page, "per class", lambda: _per_class(cfg, page))
    _section(page, "pipeline summary", lambda: _summary(cfg, page, results))
    _section(page, "appendix", lambda: _appendix(cfg, page))
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>transfuse report: {_esc(cfg.run)}</title><style>{_CSS}</style></head><body>\n"
           + "\n".join(page.parts) + "\n</body></html>\n")
    index = storage.join(out, INDEX)
    storage.write_bytes(index, doc.encode("utf-8"))
    log.info("report: %s (%d plots)", index, len(page.images))
    return index


def main(argv: Optional[Sequence[str]] = None) -> int:
    """(Re)write a run's report without Ray: ``python -m transfuse.report --config FILE [--set key=value ...]``."""
    import argparse

    from transfuse.config import load_config

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--config", required=True, help="the run's YAML config (storage and run name the run folder)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. storage=s3://bucket/runs (repeatable)")
    args = ap.parse_args(argv)
    print(write_report(load_config(args.config, args.overrides)))
    return 0


__all__ = ["Verdict", "VerdictRow", "main", "per_class", "verdict", "verdict_lines", "write_report"]

if __name__ == "__main__":
    raise SystemExit(main())
