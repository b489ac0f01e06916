"""Autoscaling from cluster.yaml's node types: Ray's fake_multinode provider starts real raylets on this machine.

The head is started as on a cluster (``ray start --head --autoscaling-config=...``, here with
``RAY_FAKE_CLUSTER=1``) from a config whose node types are cluster.yaml's: the same type names and resource kinds
(a 0-CPU head, GPU workers, CPU workers), with small numbers, GPUs faked, no minimum workers and a 6 s idle
timeout. Two stages are submitted through the Jobs API as users submit them: prepare (Ray Data: CPU tasks) and
fine-tune with ``train.use_gpu=true`` (a GPU cache actor and a GPU Train worker). The test asserts on the live
node list: the CPU stage brings up CPU workers and no GPU worker, the GPU stage a GPU worker within 60 s, and idle
nodes are removed after the idle timeout.

Ray 2.60's ``ray.cluster_utils.AutoscalingCluster`` cannot be used: it reads
``autoscaler/_private/fake_multi_node/example.yaml``, which the wheel does not ship (FileNotFoundError); the
whole config is written here instead. Fake nodes are started by the autoscaler with no reaper, so they outlive
the head: the teardown kills every process whose command line names this test's own Ray temp dir, by PID.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests._cluster import AUTH_MODE, free_port, wait_for
from tests.conftest import ROOT
from transfuse import environment

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]  # one test = whole runs of a stage on a loaded 2-core VM

NODE_OBJECT_STORE = 80 * 2**20
IDLE_TIMEOUT_MIN = 0.1  # 6 s
SCALE_UP_S = 60  # goal: a node of the type a stage asks for within 60 s of its demand
SCALE_DOWN_S = 120  # idle timeout + the autoscaler's update interval + a raylet's shutdown, on a loaded machine
JOB_S = 900


def fake_config(cluster_yaml: Path, gcs_address: str) -> dict:
    """cluster.yaml's node types with small numbers for the fake_multinode provider."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE

    src = yaml.safe_load(cluster_yaml.read_text())
    types = {}
    for name, t in src["available_node_types"].items():
        # the provider names the head it runs in "ray.head.default": under cluster.yaml's own head name the
        # autoscaler saw no head of that type and kept launching and removing one
        name = FAKE_HEAD_NODE_TYPE if name == src["head_node_type"] else name
        kinds = t.get("resources", {})
        resources = {"CPU": 1 if kinds.get("CPU", 0) else 0, "object_store_memory": NODE_OBJECT_STORE}
        if kinds.get("GPU"):
            resources["GPU"] = 1  # faked: the node advertises it, nothing checks for a device
        head = name == FAKE_HEAD_NODE_TYPE
        entry = {"resources": resources, "node_config": {},
                 "max_workers": 0 if head else min(2, int(t.get("max_workers", 1)))}
        if not head:
            entry["min_workers"] = 0
        types[name] = entry
    empty_lists = ("cluster_synced_files", "initialization_commands", "setup_commands", "head_setup_commands",
                   "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "rsync_exclude",
                   "rsync_filter")
    return {
        "cluster_name": "transfuse-fake", "max_workers": 3, "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN, "head_node_type": FAKE_HEAD_NODE_TYPE,
        "available_node_types": types,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {}, "docker": {}, "file_mounts": {}, "file_mounts_sync_continuously": False,
        **{k: [] for k in empty_lists},
    }


def _kill_processes_under(marker: str) -> None:
    """SIGKILL every process whose command line contains ``marker`` (this test's unique Ray temp dir)."""
    import psutil

    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.info["pid"] != me and marker in " ".join(p.info["cmdline"] or []):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@pytest.fixture(scope="module")
def autoscaling_head():
    import ray

    if ray.is_initialized():
        raise RuntimeError("run the cluster tier in its own pytest process (make test-cluster)")
    tmp = tempfile.mkdtemp(prefix="tfa-", dir="/tmp")
    ip = ray._private.services.get_node_ip_address()
    port, dash = free_port(), free_port()
    config = Path(tmp, "fake.yaml")
    config.write_text(yaml.safe_dump(fake_config(ROOT / "cluster.yaml", f"{ip}:{port}")))
    env = {**os.environ, **environment.WORKER_ENV, "RAY_TMPDIR": tmp, "RAY_AUTH_MODE": AUTH_MODE,
           "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    ray_cli = str(Path(sys.executable).parent / "ray")
    cmd = [ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=0", f"--autoscaling-config={config}",
           f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           "--disable-usage-stats"]
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_AUTH_MODE")}
    os.environ.update(RAY_TMPDIR=tmp, RAY_AUTH_MODE=AUTH_MODE)
    head = None
    try:
        # up to 3 starts: on a loaded 2-core machine the head's raylet can abort waiting for its agent (see
        # tests/_cluster.py); what a failed start left is killed before the next
        for attempt in range(3):
            log = open(Path(tmp, f"head-{attempt}.log"), "w")
            head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

            def connect():
                import httpx

                if head.poll() is not None:
                    return "exited"
                try:  # the dashboard answers last: before it, `ray start` may still give up (and ray.init hang)
                    httpx.get(f"http://127.0.0.1:{dash}/api/version", timeout=2).raise_for_status()
                except httpx.HTTPError:
                    return None
                try:
                    ray.init(address=f"{ip}:{port}", log_to_driver=False)
                except (ConnectionError, RuntimeError):  # GCS slow to answer on a loaded machine: again
                    ray.shutdown()
                    return None
                return "up"

            if wait_for("the autoscaling head to accept a driver", connect, 240, 2) == "up":
                break
            _kill_processes_under(tmp)
        else:
            raise RuntimeError(f"ray start --head exited 3 times: {Path(tmp, 'head-2.log').read_text()[-3000:]}")
        yield {"url": f"http://127.0.0.1:{dash}", "env": env, "tmp": tmp}
    finally:
        ray.shutdown()
        if head is not None:
            head.terminate()
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                head.kill()
        _kill_processes_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _workers() -> dict[str, list[str]]:
    """Live worker nodes by kind: {"gpu": [node ids], "cpu": [node ids]} (the head excluded)."""
    import ray

    out: dict[str, list[str]] = {"gpu": [], "cpu": []}
    for n in ray.nodes():
        r = n["Resources"]
        if n["Alive"] and not r.get("node:__internal_head__") and (r.get("GPU") or r.get("CPU")):
            out["gpu" if r.get("GPU") else "cpu"].append(n["NodeID"])
    return out


def _submit(client, entrypoint: str) -> str:
    def submit():
        try:
            return client.submit_job(entrypoint=entrypoint)
        except RuntimeError as e:  # the head's agent registers a while after the dashboard answers
            if "No available agent" in str(e):
                return None
            raise

    return wait_for("the Jobs API to take a job", submit, 180, 2)


def _wait_job(client, job_id: str, seen: list[dict[str, list[str]]]) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + JOB_S
    while time.monotonic() < deadline:
        seen.append(_workers())
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-5000:]
            return client.get_job_logs(job_id)
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not finish within {JOB_S} s: {client.get_job_logs(job_id)[-3000:]}")


def test_stages_scale_up_the_node_type_they_ask_for_and_idle_nodes_go(autoscaling_head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(autoscaling_head["url"])
    assert _workers() == {"gpu": [], "cpu": []}, "no worker nodes before any demand (min_workers 0)"
    common = (f"--config configs/smoke.yaml --set storage={tmp_path} --set run=autoscale "
              "--set train.use_gpu=true --set \"train.mixed_precision='off'\" --set train.num_workers=1 "
              "--set train.cpus_per_worker=1 --set train.gpus_per_worker=1")
    py = sys.executable

    seen: list[dict[str, list[str]]] = []
    t0 = time.monotonic()
    _wait_job(client, _submit(client, f"cd {ROOT} && {py} -m jobs.prepare {common}"), seen)
    print(f"prepare job: {time.monotonic() - t0:.0f} s; worker nodes seen: "
          f"cpu {len({n for s in seen for n in s['cpu']})}, gpu {len({n for s in seen for n in s['gpu']})}")
    assert any(s["cpu"] for s in seen), "the Ray Data stage brought up no CPU worker"
    assert not any(s["gpu"] for s in seen), "a GPU worker came up for a stage that asked for none"

    seen = []
    t1 = time.monotonic()
    job = _submit(client, f"cd {ROOT} && {py} -m jobs.finetune {common} --scratch no")
    gpu = wait_for(f"a GPU worker node within {SCALE_UP_S} s of the GPU stage's submission",
                   lambda: _workers()["gpu"], SCALE_UP_S, 0.5)
    up_s = time.monotonic() - t1
    logs = _wait_job(client, job, seen)
    assert "finetune: " in logs, logs[-3000:]
    print(f"GPU worker up {up_s:.0f} s after the fine-tune job's submission; job took {time.monotonic() - t1:.0f} s")

    t2 = time.monotonic()
    wait_for(f"idle worker nodes removed within {SCALE_DOWN_S} s (idle timeout {IDLE_TIMEOUT_MIN * 60:.0f} s)",
             lambda: _workers() == {"gpu": [], "cpu": []}, SCALE_DOWN_S, 1)
    print(f"idle workers gone {time.monotonic() - t2:.0f} s after the last job ended")
    assert gpu[0] not in _workers()["gpu"]
