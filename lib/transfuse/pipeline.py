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

from transfuse import runtime  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)
from transfuse import storage
from transfuse.config import Config
from transfuse.console import Console, StageProgress, watch
from transfuse.errors import TransfuseError

log = logging.getLogger(__name__)

STAGES = ("prepare", "pretrain", "finetune", "scratch", "tune", "ensemble", "compress", "deploy", "report")
# the folder under <storage>/<run>/ whose manifest says a stage is complete (deploy and report have none)
STAGE_DIRS = {"prepare": "data", "pretrain": "pretrain", "finetune": "finetune", "scratch": "scratch",
              "tune": "tune", "ensemble": "ensemble", "compress": "compress"}


class PipelineError(TransfuseError, ValueError):
    """A pipeline argument names an unknown stage."""


@dataclass
class StageResult:
    name: str
    seconds: float
    status: str  # ran | skipped (complete) | off
    detail: dict[str, Any] = field(default_factory=dict)


def _check_stage(name: Optional[str], what: str) -> None:
    if name is not None and name not in STAGES:
        raise PipelineError(f"{what} names unknown stage {name!r}; stages: {', '.join(STAGES)}")


def _stage_fns(cfg: Config, deploy: Optional[Callable[..., str]]) -> dict[str, Callable[[bool], Any]]:
    from transfuse import compress, ensemble, search, train
    from transfuse.data import prepare

    def pretrain_fn(force: bool) -> Any:
        from transfuse.pretrain import pretrain

        return pretrain(cfg, force=force)

    def scratch_fn(force: bool) -> Any:
        return train.transfer_vs_scratch(cfg, force=force)

    def deploy_fn(force: bool) -> Any:
        if deploy is None:
            return None
        url = deploy(cfg.serve, storage.stage_dir(cfg, "bundle"))
        return {"url": url, **query(url, cfg)}

    return {
        "prepare": lambda force: prepare(cfg, force=force),
        "pretrain": pretrain_fn,
        "finetune": lambda force: train.finetune(cfg, force=force),
        "scratch": scratch_fn,
        "tune": lambda force: search.run_search(cfg, force=force),
        "ensemble": lambda force: ensemble.run_ensemble(cfg, force=force),
        "compress": lambda force: compress.run_compress(cfg, force=force),
        "deploy": deploy_fn,
    }


def _enabled(cfg: Config, name: str, deploy: Optional[Callable[..., str]]) -> bool:
    if name == "pretrain":
        return cfg.model.weights == "pretrain"
    if name == "scratch":  # the transfer baseline only means something when weights were transferred
        return cfg.model.weights != "none"
    if name == "deploy":
        return deploy is not None
    return True


def query(url: str, cfg: Config, n: int = 4) -> dict[str, Any]:
    """Send ``n`` test images to the live endpoint; return its answer, latency and agreement with the labels."""
    import json
    import urllib.request

    from transfuse.data import read_split_numpy

    images, labels, ids = read_split_numpy(storage.stage_dir(cfg, "data"), "test")
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


def run_pipeline(cfg: Config, *, force: tuple[str, ...] = (), until: Optional[str] = None,
                 deploy: Optional[Callable[..., str]] = None, echo: Callable[[str], None] = print,
                 console: Optional[Console] = None) -> list[StageResult]:
    """Run every stage up to ``until``; ``force`` names stages to rerun even when complete.

    A line per stage start and end goes to ``console`` (else ``echo``); with a console, the long stages also
    draw a progress bar read from their files (``transfuse.console.watch``)."""
    for f in force:
        _check_stage(f, "--force")
    _check_stage(until, "--until")
    say = console.line if console else echo
    fns = _stage_fns(cfg, deploy)
    stop = STAGES.index(until) if until else len(STAGES) - 1
    results: list[StageResult] = []
    t0 = time.time()
    for i, name in enumerate(STAGES[: stop + 1]):
        tag = f"[{i + 1}/{stop + 1}] {name:<9}"
        if not _enabled(cfg, name, deploy):
            results.append(StageResult(name, 0.0, "off"))
            say(f"{tag} off")
            continue
        say(f"{tag} started")
        folder = storage.stage_dir(cfg, STAGE_DIRS[name]) if name in STAGE_DIRS else None
        before = storage.read_manifest(folder) if folder else None
        t = time.time()
        with StageProgress(console, name, watch(cfg, name)) if console else contextlib.nullcontext():
            if name == "report":  # the report shows the stage timings so far
                from transfuse.report import write_report

                out = {"path": write_report(cfg, results)}
            else:
                out = fns[name](name in force)
        seconds = time.time() - t
        after = storage.read_manifest(folder) if before is not None else None
        status = "skipped (complete)" if before and after and before.get("created") == after.get("created") \
            else "ran"
        detail = out if name in ("deploy", "report") and isinstance(out, dict) else {}
        results.append(StageResult(name, seconds, status, detail))
        say(f"{tag} {status} in {seconds:.1f}s (total {time.time() - t0:.1f}s)")
    return results


def summary(cfg: Config, results: list[StageResult]) -> list[dict[str, Any]]:
    """Rows of the final table: test accuracy / NLL / ECE of the models that matter, read from their files."""
    rows: list[dict[str, Any]] = []

    def member_row(label: str, d: str) -> None:
        path = storage.join(d, "metrics.json")
        if storage.exists(path):
            m = storage.read_json(path)["test"]
            rows.append({"model": label, **{k: m[k] for k in ("accuracy", "nll", "ece")}})

    member_row(f"seed recipe (unfreeze {cfg.model.unfreeze})", storage.stage_dir(cfg, "finetune"))
    member_row("same network from scratch", storage.stage_dir(cfg, "scratch"))
    members_path = storage.join(storage.stage_dir(cfg, "tune"), "members.json")
    if storage.exists(members_path):
        best = storage.read_json(members_path)["members"][0]
        member_row(f"best tuned ({best['name']})", best["dir"])
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
