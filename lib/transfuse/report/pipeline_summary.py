"""The pipeline summary: the rows of the final table (``summary``; the pipeline prints them with
``format_summary`` at its end) and section 8 of the report (``summary_section``, with the stage timings when
given): test accuracy / NLL / ECE of the models that matter, read from their files. Also ``tuned_members``,
tune/members.json as the report reads it."""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

from transfuse import storage
from transfuse.compress import COMPRESS, served_variant
from transfuse.ensemble import ENSEMBLE
from transfuse.errors import TransfuseError
from transfuse.finetune import FINETUNE, SCRATCH, MemberMetrics
from transfuse.report.page import Page, esc, num, table

log = logging.getLogger(__package__)  # "transfuse.report": one logger for the package's modules


def tuned_members(cfg: Any) -> list[Any]:
    """tune/members.json through its reader; [] when absent or unreadable (the report never stops for it)."""
    from transfuse.finetune import read_members

    try:
        return read_members(cfg) or []
    except TransfuseError as e:
        log.warning("report: %s", e)
        return []


def summary(cfg: Any, results: Sequence[Any]) -> list[dict[str, Any]]:
    """Rows of the final table (the pipeline prints it; section 8 shows it): test accuracy / NLL / ECE of the
    models that matter, read from their files."""
    rows: list[dict[str, Any]] = []

    def member_row(label: str, d: str) -> None:
        m = MemberMetrics.read(d)
        if m is not None:
            rows.append({"model": label, "accuracy": m.test.accuracy, "nll": m.test.nll, "ece": m.test.ece})

    member_row(f"seed recipe (unfreeze {cfg.model.unfreeze})", FINETUNE.dir(cfg))
    member_row("same network from scratch", SCRATCH.dir(cfg))
    tuned = tuned_members(cfg)
    if tuned:
        member_row(f"best tuned ({tuned[0].name})", tuned[0].dir)
    ens_path = ENSEMBLE.metrics_path(cfg)
    if storage.exists(ens_path):
        rep = storage.read_json(ens_path)
        before = [c["test"]["before"] for c in (rep.get("calibration") or {}).values() if c and c.get("applied", True)]
        if before:  # mean over seeds, as the summary's rows
            rows.append({"model": "stack, before temperature scaling",
                         **{k: float(sum(b[k] for b in before) / len(before)) for k in ("accuracy", "nll", "ece")}})
        for key, label in (("average", "simple average"), ("stack", "stacked ensemble")):
            if key in rep.get("summary", {}):
                s = rep["summary"][key]
                rows.append({"model": label, **{k: s[k]["mean"] for k in ("accuracy", "nll", "ece")}})
    comp_path = COMPRESS.metrics_path(cfg)
    if storage.exists(comp_path):
        comp = storage.read_json(comp_path)
        for r in comp.get("variants", []):
            if r.get("variant") == served_variant(cfg):
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


def summary_section(cfg: Any, page: Page, results: Optional[Sequence[Any]]) -> None:
    page.add("<h2>8. Pipeline summary</h2>")
    rows = summary(cfg, list(results or []))
    if results:
        page.add(table(["stage", "status", "seconds"],
                        [[esc(r.name), esc(r.status), num(float(r.seconds), "{:.1f}")] for r in results]))
    if not rows:
        page.add("<p>no model has written test metrics yet (stages finetune, scratch, tune, ensemble and compress "
                 "not run)</p>")
        return
    keys = [("accuracy", "accuracy", "{:.4f}"), ("nll", "NLL", "{:.4f}"), ("ece", "ECE", "{:.4f}"),
            ("bundle_bytes", "bundle bytes", "{}"), ("p50_ms", "p50 ms", "{:.1f}"), ("latency_ms", "latency ms",
                                                                                     "{:.1f}")]
    keys = [k for k in keys if any(r.get(k[0]) is not None for r in rows)]
    page.add(table(["model", *(k[1] for k in keys)],
                    [[esc(r["model"]), *(num(r.get(k), f) for k, _, f in keys)] for r in rows]))
