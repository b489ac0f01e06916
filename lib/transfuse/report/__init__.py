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
4. every member vs the ensemble, accuracy, ECE, balanced accuracy and macro F1 (``ensemble/metrics.json``:
   ``summary``);
5. the ensemble's confusion matrix (``ensemble/metrics.json``: ``confusion_stack``), the stacked ensemble's recall
   per class by class name beside the best member's, with the run's class weighting (``test``, ``class_weight``),
   and the stacked ensemble's
   reliability diagram before and after temperature scaling (``ensemble/predictions/test*.parquet``), with NLL
   and ECE; from the best CNN member's ``predictions/test.parquet`` when the ensemble saved none (the caption
   says which);
6. the compression table (``compress/metrics.json``: ``variants``); 6b. with ``distill.enabled``, the distilled
   student against its teacher (the stacked ensemble) and the best single CNN member (``distill/metrics.json``);
7. precision and recall per class, float32 vs the served variant, and their balanced accuracy and macro F1: both
   bundles under ``compress/`` run on the prepared test split;
8. the pipeline summary (``summary``, also printed at the pipeline's end), plus stage timings when given;
appendix: storage, fingerprints, stage manifests, git commits, the label budget record and package versions.

Modules: ``page`` (the HTML machinery: escaping, number cells, tables, the ``Page`` that writes the PNGs, the
CSS, the matplotlib import, the reliability figure and the wrapper that shows a failed section's error),
``judge`` (the verdict: its rows, ``verdict`` and ``verdict_lines``, and the stage-file readers the others
share), ``sections`` (the title, the verdict table, sections 1-5 and the appendix), ``variants`` (sections 6-7
with ``per_class``), ``pipeline_summary`` (section 8: ``summary`` and ``format_summary``, also printed by the
pipeline). This module writes the page (``write_report``) and is the command line (``main``: ``python -m
transfuse.report``); every name other code imports is importable from here. (No submodule is named like a
function re-exported here.)
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

from transfuse import storage
from transfuse.ensemble import ENSEMBLE
from transfuse.report.variants import compression, distillation, per_class, per_class_section
from transfuse.report.judge import Measure, Verdict, VerdictRow, budget_text, description, verdict, verdict_lines
from transfuse.report.page import CSS, Page, esc, pyplot, section
from transfuse.report.pipeline_summary import format_summary, summary, summary_section
from transfuse.report.sections import (appendix, calibration, depth_search, learning_curves, members_vs_ensemble,
                                       title, transfer_vs_scratch, verdict_section)
from transfuse.stage import Folder

log = logging.getLogger(__name__)

REPORT_DIR = Folder("report")  # <storage>/<run>/report/: the page and its PNGs
INDEX = "index.html"


def write_report(cfg: Any, results: Optional[Sequence[Any]] = None) -> str:
    """Write ``<storage>/<run>/report/index.html`` and its PNGs from whatever stages have run; return its path.

    ``results``: the pipeline's ``StageResult`` list, shown as a timing table when given.
    """
    pyplot()
    out = REPORT_DIR.dir(cfg)
    storage.makedirs(out)
    storage.clear_dir(out)  # no stale plots from an earlier report
    page = Page(out)
    ens_dir = ENSEMBLE.dir(cfg)
    ens: Optional[dict] = None
    desc: Optional[dict] = None
    try:
        ens = ENSEMBLE.metrics(cfg)
        desc = description(ens_dir)
    except Exception as e:  # noqa: BLE001 - shown in sections 4 and 5
        log.warning("report: cannot read %s: %s", ens_dir, e)
    title(cfg, page)
    section(page, "verdict", lambda: verdict_section(cfg, page))
    section(page, "learning curves", lambda: learning_curves(cfg, page))
    section(page, "depth search", lambda: depth_search(cfg, page))
    section(page, "transfer vs scratch", lambda: transfer_vs_scratch(cfg, page))
    section(page, "members vs ensemble", lambda: members_vs_ensemble(cfg, page, ens, desc))
    section(page, "confusion and reliability", lambda: calibration(cfg, page, ens, desc))
    section(page, "compression", lambda: compression(cfg, page))
    section(page, "distillation", lambda: distillation(cfg, page))
    section(page, "per class", lambda: per_class_section(cfg, page))
    section(page, "pipeline summary", lambda: summary_section(cfg, page, results))
    section(page, "appendix", lambda: appendix(cfg, page))
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>transfuse report: {esc(cfg.run)}</title><style>{CSS}</style></head><body>\n"
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


__all__ = ["Measure", "Verdict", "VerdictRow", "budget_text", "format_summary", "main", "per_class", "summary",
           "verdict", "verdict_lines", "write_report"]
