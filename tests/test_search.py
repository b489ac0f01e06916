"""Ray Tune over the fine-tuning runs: depth grid, early stopping, interruption + resume, diverse members."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, smoke_config
from transfuse import storage
from transfuse.finetune import TUNE
from transfuse.finetune.tune import SEARCHED, samples_per_grid, select_members


def _row(trial, unfreeze, acc, seed=0, finished=True, nll=0.5):
    return {"trial_id": trial, "unfreeze": unfreeze, "lr_frozen": 1e-3, "lr_unfrozen": 1e-4, "head_dense": 64,
            "dropout": 0.0, "seed": seed, "finished": finished, "val_accuracy": acc, "val_nll": nll,
            "stopped_early": not finished}


def test_members_are_diverse_and_best_first():
    rows = [_row("a", 4, 0.90, 1), _row("b", 4, 0.89, 2), _row("c", 0, 0.70), _row("d", 8, 0.95, finished=False),
            _row("e", 13, 0.60), _row("f", 4, 0.90, 1)]  # f: a copy of a's configuration
    chosen = select_members(rows, 3)
    assert [r["trial_id"] for r in chosen] == ["a", "c", "e"]  # one per depth before a second of depth 4
    chosen = select_members(rows, 5)
    assert [r["trial_id"] for r in chosen] == ["a", "b", "c", "e"]  # never d (stopped), never f (copy of a)
    assert len({tuple(r[k] for k in SEARCHED) for r in chosen}) == len(chosen)


def test_tied_val_accuracy_goes_to_the_lower_val_nll():
    rows = [_row("a", 1, 0.90, nll=0.1754), _row("b", 4, 0.90, nll=0.1724), _row("c", 7, 0.88, nll=0.10)]
    assert [r["trial_id"] for r in select_members(rows, 3)] == ["b", "a", "c"]


def test_budget_spread_over_depth_grid(tmp_path):
    cfg = smoke_config(tmp_path, overrides=["tune.num_samples=6", "tune.unfreeze=[0, 4, 8]"])
    assert samples_per_grid(cfg) == 2  # 3 depths x 2 = 6 trials
    cfg = smoke_config(tmp_path, overrides=["tune.num_samples=6", "tune.search_alg=optuna"])
    assert samples_per_grid(cfg) == 6


def _tune_cmd(config: str, storage_dir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.tune", "--config", config, "--set", f"storage={storage_dir}",
            "--set", "run=search", "--set", "ray.num_cpus=4", *extra]


# Depth 0 (head only on a frozen random backbone) learns far less than depth 13 in 3 epochs (smoke.yaml).
# Trials run one after another in grid order 13, 0, 13, 0 and ASHA compares them once, after epoch 2 (the
# first unfrozen epoch): a depth-0 trial below the median of those before it is stopped.
SEARCH = ["--set", "tune.num_samples=4", "--set", "tune.unfreeze=[13, 0]", "--set", "tune.max_concurrent=1",
          "--set", "tune.members=2", "--set", "tune.grace_period=2"]


@pytest.mark.slow  # about 8 minutes on 2 cores; the default suite's pipeline job test runs a 2-trial search
def test_search_interrupted_then_resumed(tmp_path):
    """4 sequential trials over depths 0 and 13; SIGINT once the first trial has written its member dir; rerun
    with --resume: the finished trial is not rerun, the rest complete, ASHA stopped at least one trial, and the
    member set holds 2 distinct configurations."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cfg = smoke_config(tmp_path, "search")
    trials = storage.join(TUNE.dir(cfg), "trials")
    config = str(ROOT / "configs" / "smoke.yaml")
    prep = subprocess.run([sys.executable, "-m", "jobs.prepare", *_tune_cmd(config, str(tmp_path))[3:]], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert prep.returncode == 0, prep.stderr[-3000:]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_tune_cmd(config, str(tmp_path), *SEARCH), cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    first = None
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and first is None:
        time.sleep(2)
        for t in storage.list_files(trials):
            if t.endswith("/manifest.json"):
                first = t.split("/")[0]
    assert first, f"no trial finished before the deadline; log: {(tmp_path / 'first.log').read_text()[-3000:]}"
    created = storage.read_manifest(storage.join(trials, first))["created"]
    proc.send_signal(signal.SIGINT)  # Tune saves the experiment state and stops
    proc.wait(timeout=300)
    assert not storage.exists(storage.join(TUNE.dir(cfg), "manifest.json"))

    out = subprocess.run(_tune_cmd(config, str(tmp_path), *SEARCH, "--resume"), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert storage.read_manifest(storage.join(trials, first))["created"] == created  # not rerun

    tune_dir = TUNE.dir(cfg)
    rows = storage.read_json(storage.join(tune_dir, "results.json"))
    assert len(rows) == 4 and sorted(r["unfreeze"] for r in rows) == [0, 0, 13, 13]
    assert any(r["stopped_early"] for r in rows), rows  # ASHA cut at least one weak trial
    members = storage.read_json(storage.join(tune_dir, "members.json"))["members"]
    assert len(members) == 2 and len({tuple(sorted(m["config"].items())) for m in members}) == 2
    for m in members:
        assert storage.read_manifest(m["dir"])["complete"]
        assert storage.exists(storage.join(m["dir"], "predictions", "holdout.parquet"))
    assert storage.exists(storage.join(tune_dir, "val_accuracy_vs_depth.png"))
    summary = storage.read_json(storage.join(tune_dir, "summary.json"))
    assert summary["trials"] == 4 and summary["best"]["unfreeze"] == 13
