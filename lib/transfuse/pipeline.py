"""The whole run as one Ray job: every stage in order, skipping those whose manifest is complete.

prepare -> pretrain (when ``model.weights: pretrain``) -> finetune (the seed's fixed depth) -> scratch (the same
network from random weights, same budget: the transfer baseline) -> tune -> ensemble -> compress -> deploy ->
query -> report. Stages hand over through files under ``<storage>/<run>/``, so an interrupted pipeline, run
again, continues where it stopped. Deploying needs the Serve app, which lives outside the library: the caller
passes a ``deploy`` function (``jobs.pipeline`` passes ``serve.app.deploy``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)
from transfuse.compress import BUNDLE, COMPRESS
from transfuse.config import Config
from transfuse.console import Console, StageProgress
from transfuse.data import PREPARE
from transfuse.distill import DISTILL
from transfuse.ensemble import ENSEMBLE
from transfuse.errors import TransfuseError
from transfuse.finetune import FINETUNE, PRETRAIN, SCRATCH, TUNE
from transfuse.stage import Stage

log = logging.getLogger(__name__)

class PipelineError(TransfuseError, ValueError):
    """A pipeline argument names an unknown stage."""


@dataclass
class StageResult:
    name: str
    seconds: float
    status: str  # ran | skipped (complete) | off
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunContext:
    """What a stage's ``run`` reads besides the config: rerun even when complete, the caller's deploy function,
    and the results of the stages before it (the report shows their timings)."""

    force: bool
    deploy: Optional[Callable[..., str]]
    results: list[StageResult]


def _deploy(cfg: Config, ctx: RunContext) -> Any:
    url = ctx.deploy(cfg.serve, BUNDLE.dir(cfg))
    return {"url": url, **query(url, cfg)}


def _report(cfg: Config, ctx: RunContext) -> Any:
    from transfuse.report import write_report

    return {"path": write_report(cfg, ctx.results)}


# the two steps that keep no folder of their own: how each runs, given the run's context
DEPLOY = Stage(None, name="deploy", inputs=("compress",))
REPORT = Stage(None, name="report", inputs=("prepare", "finetune", "scratch", "tune", "ensemble", "distill",
                                            "compress"))
_CONTEXT_RUNS = {"deploy": _deploy, "report": _report}

PIPELINE: tuple[Stage, ...] = (PREPARE, PRETRAIN, FINETUNE, SCRATCH, TUNE, ENSEMBLE, DISTILL, COMPRESS, DEPLOY,
                               REPORT)
STAGES = tuple(st.name for st in PIPELINE)


def _check_stage(name: Optional[str], what: str) -> None:
    if name is not None and name not in STAGES:
        raise PipelineError(f"{what} names unknown stage {name!r}; stages: {', '.join(STAGES)}")


def query(url: str, cfg: Config, n: int = 4) -> dict[str, Any]:
    """Send ``n`` test images to the live endpoint; return its answer, latency and agreement with the labels."""
    import json
    import urllib.request

    from transfuse.data import read_split_numpy

    images, labels, ids = read_split_numpy(PREPARE.dir(cfg), "test")
    body = json.dumps({"instances": images[:n].tolist()}).encode()
    req = urllib.request.Request(f"{url}:predict", data=body, headers={"content-type": "application/json"})
    if cfg.serve.api_key:
        req.add_header("Authorization", f"Bearer {cfg.serve.api_key}")
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as resp:
        answer = json.loads(resp.read())
    latency = time.perf_counter() - t
    preds = answer["predictions"]
    return {"ids": [str(i) for i in ids[:n]], "labels": [int(x) for x in labels[:n]],
            "predicted": [p["label"] for p in preds], "predicted_ids": [p["class_id"] for p in preds],
            "latency_ms": round(latency * 1000, 1)}


def _run(stage: Stage, cfg: Config, ctx: RunContext) -> Any:
    if stage.name in _CONTEXT_RUNS:
        return _CONTEXT_RUNS[stage.name](cfg, ctx)
    return stage.entry("run")(cfg, force=ctx.force)


def run_pipeline(cfg: Config, *, force: tuple[str, ...] = (), until: Optional[str] = None,
                 skip: tuple[str, ...] = (), deploy: Optional[Callable[..., str]] = None,
                 echo: Callable[[str], None] = print, console: Optional[Console] = None) -> list[StageResult]:
    """Run every stage up to ``until``; ``force`` names stages to rerun even when complete; ``skip`` names stages
    not to run (reported "off"; a benchmark that needs no scratch baseline skips it).

    A line per stage start and end goes to ``console`` (else ``echo``); with a console, the long stages also
    draw a progress bar read from their files (``Stage.watch``)."""
    for f in force:
        _check_stage(f, "--force")
    for f in skip:
        _check_stage(f, "skip")
    _check_stage(until, "--until")
    say = console.line if console else echo
    stop = STAGES.index(until) if until else len(STAGES) - 1
    results: list[StageResult] = []
    t0 = time.time()
    for i, stage in enumerate(PIPELINE[: stop + 1]):
        name = stage.name
        tag = f"[{i + 1}/{stop + 1}] {name:<9}"
        if name in skip or not stage.enabled(cfg) or (stage is DEPLOY and deploy is None):
            results.append(StageResult(name, 0.0, "off"))
            say(f"{tag} off")
            continue
        say(f"{tag} started")
        before = stage.manifest(cfg) if stage.folder else None
        t = time.time()
        with StageProgress(console, name, stage.watch(cfg)) if console else contextlib.nullcontext():
            out = _run(stage, cfg, RunContext(name in force, deploy, results))
        seconds = time.time() - t
        after = stage.manifest(cfg) if before is not None else None
        status = "skipped (complete)" if before and after and before.get("created") == after.get("created") \
            else "ran"
        detail = out if stage.folder is None and isinstance(out, dict) else {}
        results.append(StageResult(name, seconds, status, detail))
        say(f"{tag} {status} in {seconds:.1f}s (total {time.time() - t0:.1f}s)")
    return results
