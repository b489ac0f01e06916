"""Ray Tune across nodes: two concurrent trials on two nodes, one of their nodes SIGKILLed mid-search.

A 0-CPU head (the Tune driver) and three 1-CPU nodes. A trial's function asks for 0.25 CPU and its one Train
worker for 0.75, so two workers never share a node: the two trials train on two nodes, the third is spare. After
both trials have checkpointed an epoch, the node of one trial's worker is killed (with whatever trial function
ran there). The search completes with both trials finished, the hit trial resumes from its last checkpoint (no
epoch it had reported is reported again), and the other trial is not rerun.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests._cluster import actor_nodes, checkpoint_epoch, wait_for
from tests._cluster import cluster  # noqa: F401  (the module's fixture)
from tests.conftest import smoke_config
from transfuse import storage
from transfuse.finetune import TUNE

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]  # one test = whole runs of a stage on a loaded 2-core VM

WAIT_S = 900
EPOCHS = 3  # smoke.yaml: 1 frozen + 2 unfrozen


def _reports(tune_dir: str) -> dict[str, list[dict]]:
    """Every report Tune recorded, per trial id (its result.json: one JSON line per report)."""
    out: dict[str, list[dict]] = {}
    for f in Path(tune_dir, "search").glob("*/result.json"):
        for line in f.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                out.setdefault(row["trial_id"], []).append(row)
    return out


def test_search_completes_after_a_node_kill_and_redoes_nothing(cluster, tmp_path):
    from transfuse.data import prepare
    from transfuse.finetune.tune import run_search, trial_dir

    cfg = smoke_config(tmp_path, "search", [
        "tune.num_samples=2", "tune.unfreeze=[13]", "tune.max_concurrent=2", "tune.members=2",
        "tune.scheduler=none", "tune.cpus_per_trial=0.25", "train.num_workers=1", "train.cpus_per_worker=0.75",
        "train.max_failures=2"])
    prepare(cfg)
    tune_dir = TUNE.dir(cfg)
    result: dict = {}
    workers: set[str] = set()

    def run():
        try:
            result["manifest"] = run_search(cfg)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def both_checkpointed():
        workers.update(n for _, n in actor_nodes("RayTrainWorker"))
        trials = [p.name for p in Path(tune_dir, "trials").glob("*") if p.is_dir()]
        epochs = [checkpoint_epoch(trial_dir(cfg, t)) or 0 for t in trials]
        return (len(trials) == 2 and min(epochs) >= 1) or not thread.is_alive()

    wait_for("both trials to checkpoint an epoch", both_checkpointed, WAIT_S, 0.3)
    assert thread.is_alive(), f"the search ended before a node could be killed: {result.get('error')}"
    running = sorted({n for _, n in actor_nodes("RayTrainWorker")})
    assert len(running) == 2, f"two trials' workers should run on two nodes, got {running}"
    victim = running[0]
    kill_time = time.time()
    reported_before = {t: max(r["epoch"] for r in rows) for t, rows in _reports(tune_dir).items()}
    killed = cluster.kill(victim)
    cluster.add_worker(f"{killed}-replacement")
    done = {t: storage.read_manifest(trial_dir(cfg, t)) for t in reported_before}
    done = {t: m["created"] for t, m in done.items() if m and m.get("complete")}
    thread.join(timeout=WAIT_S)
    assert not thread.is_alive(), f"the search did not end within {WAIT_S} s of the kill"
    if "error" in result:
        raise result["error"]
    print(f"killed node {killed}; epochs reported before the kill: {reported_before}")

    assert len(workers) >= 2
    rows = storage.read_json(storage.join(tune_dir, "results.json"))
    assert len(rows) == 2 and all(r["finished"] and r["error"] is None for r in rows), rows
    members = storage.read_json(storage.join(tune_dir, "members.json"))["members"]
    assert len(members) == 2
    for r in rows:
        history = storage.read_json(storage.join(trial_dir(cfg, r["trial_id"]), "metrics.json"))["history"]
        assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1)), r["trial_id"]
    # no epoch reported before the kill was trained and reported again after it: the hit trial resumed from its
    # checkpoint (the kill lands on a trial's worker, so at least one trial was restarted)
    reports = _reports(tune_dir)
    for t, last in reported_before.items():
        again = [r["epoch"] for r in reports[t] if r["timestamp"] > kill_time and r["epoch"] <= last]
        assert not again, f"trial {t} reported epochs {again} again after the kill (it had reported up to {last})"
        assert [r["epoch"] for r in reports[t]] == list(range(1, EPOCHS + 1)) or t not in done
    for t, created in done.items():  # a trial finished before the kill was not rerun
        assert storage.read_manifest(trial_dir(cfg, t))["created"] == created
