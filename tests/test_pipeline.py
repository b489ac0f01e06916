"""The pipeline as users run it: submitted through the Ray Jobs API to a running cluster, ending with a query
against the live Serve endpoint; a quiet console (a line per stage, the summary and the verdict; Ray's own output
in the run's log file); its report opened in headless Chromium; stages skipped when complete; bad stage names
refused."""

from __future__ import annotations

import sys
import time

import pytest

import _report_helpers as H
from tests.conftest import ROOT, _free_port, smoke_config
from transfuse import storage
from transfuse.compress import BUNDLE
from transfuse.ensemble import ENSEMBLE
from transfuse.pipeline import STAGES, PipelineError, run_pipeline
from transfuse.report import REPORT_DIR


@pytest.mark.parametrize("kwargs, pattern", [
    ({"until": "deploi"}, r"--until names unknown stage 'deploi'; stages: prepare, pretrain"),
    ({"force": ("tunes",)}, r"--force names unknown stage 'tunes'"),
])
def test_unknown_stage_names(tmp_path, kwargs, pattern):
    with pytest.raises(PipelineError, match=pattern):
        run_pipeline(smoke_config(tmp_path), **kwargs)


MAX_CONSOLE_LINES = 60  # issue 16's goal for a default run's console


def test_pipeline_submitted_as_ray_job(ray_cluster, browser, tmp_path):
    """`ray job submit`'s API: the smoke pipeline runs on the cluster, deploys, and the endpoint answers."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_cluster.dashboard_url)
    port = _free_port()
    # this interpreter: the one that has transfuse installed, as a cluster's setup commands install it
    entrypoint = (f"{sys.executable} -m jobs.pipeline --config configs/smoke.yaml --set storage={tmp_path} "
                  f"--set run=job --set serve.port={port} --set serve.name=jobtest")
    # env_vars the job's ray.init also sets: Ray refuses to merge the same key twice unless transfuse leaves it
    job = _submit(client, entrypoint=entrypoint,
                  runtime_env={"working_dir": str(ROOT), "env_vars": {"TF_USE_LEGACY_KERAS": "1"}})
    try:
        _check_job(client, job, tmp_path, browser)
    finally:
        # the job left its app (and Serve's proxy on its port) running, as a user's job does; later tests on this
        # cluster start Serve on their own port with an app at the same prefix, so take it down
        from ray import serve

        serve.shutdown()


def _submit(client, **kwargs) -> str:
    """Submit, retrying while the head's job agent has not registered yet (the Jobs API answers 500 "No available
    agent to submit job" for a while after `ray start`, longer on a loaded machine)."""
    deadline = time.time() + 300
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(5)


def _check_job(client, job: str, tmp_path, browser) -> None:
    from ray.job_submission import JobStatus

    deadline = time.time() + 1500
    status = None
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(5)
    logs = client.get_job_logs(job)
    cfg = smoke_config(tmp_path, "job")
    log_file = tmp_path / "job" / "logs" / "pipeline.log"
    assert status == JobStatus.SUCCEEDED, logs[-5000:] + (log_file.read_text()[-5000:] if log_file.exists() else "")
    # the console: a line per stage start and end, the summary, the endpoint's answer, the verdict; nothing of
    # Ray's, TensorFlow's or Ray Data's own (the first run of issue 16 printed 5,772 lines)
    lines = logs.splitlines()
    assert len(lines) <= MAX_CONSOLE_LINES, logs
    for stage in STAGES:
        assert any(line.startswith("[") and f"] {stage}" in line for line in lines), stage
    assert "stacked ensemble" in logs and "endpoint http://127.0.0.1:" in logs and "answered" in logs
    assert any(line.startswith("verdict: ") and "goals met" in line for line in lines), logs
    for noise in ("PlacementGroupCleaner", "absl::InitializeLog", "Running Dataset", "TrainController"):
        assert noise not in logs, noise
    # ...which went to the run's log file, named on the console
    assert f"output: {log_file}" in logs
    text = log_file.read_text()
    assert "transfuse.finetune.cache" in text and "Dataset" in text, text[-3000:]
    for stage in ("data", "finetune", "tune", "ensemble", "compress", "bundle"):
        assert storage.read_manifest(storage.join(storage.run_dir(cfg), stage)), f"{stage} has no manifest"
    # each stage's typed metrics reader reads what the stage wrote
    from transfuse.compress import COMPRESS
    from transfuse.finetune import FINETUNE

    ft, ens, comp = FINETUNE.read(cfg), ENSEMBLE.read(cfg), COMPRESS.read(cfg)
    assert ft.test.accuracy == FINETUNE.metrics(cfg)["test"]["accuracy"] and ft.val.n > 0 and ft.history
    assert ens.mean("stack", "accuracy") == ENSEMBLE.metrics(cfg)["summary"]["stack"]["accuracy"]["mean"]
    assert ens.best_member in ens.summary
    assert comp.served == COMPRESS.metrics(cfg)["served"] and comp.variant(comp.served)["variant"] == comp.served
    # the served bundle ships one test image per class for the page at GET / (not counted as model bytes)
    from transfuse.inference.bundle import load_bundle

    bundle = load_bundle(BUNDLE.dir(cfg))
    shown = bundle.example_images()
    assert [label for label, _ in shown] == bundle.class_names[:6]
    assert all(png.startswith(b"\x89PNG") for _, png in shown)
    # ...and serves the temperature-scaled stacker the ensemble stage fitted (folded into its arrays)
    stacker = storage.read_json(storage.join(ENSEMBLE.dir(cfg), "stacker.json"))
    assert stacker["temperature"] != 1.0 and bundle.manifest["combiner"]["temperature"] == stacker["temperature"]
    index = storage.join(REPORT_DIR.dir(cfg), "index.html")
    assert storage.exists(index)
    # the report as a person opens it: plots loaded, the verdict as the files say and on the first screen
    H.check_report_page(browser, index, cfg)

    # rerun in this process: every stage with a complete manifest is skipped, not recomputed
    results = run_pipeline(cfg, until="compress", echo=lambda s: None)
    assert {r.name: r.status for r in results if r.status != "off"} == {
        s: "skipped (complete)" for s in ("prepare", "finetune", "tune", "ensemble", "compress")}
