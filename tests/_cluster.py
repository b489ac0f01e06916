"""Several real Ray nodes on one machine, for the ``cluster`` test tier (``make test-cluster``).

``LocalCluster`` wraps ``ray.cluster_utils.Cluster`` (the helper behind Ray's own multi-node and failure tests):
a head that offers no CPUs (as in cluster.yaml: nothing heavy lands on it; the driver, Train's controller and
Serve's controller and proxy do) and small worker nodes, each a real raylet with its own object store and
worker processes. Everything is private to one test module: its own temp dir (``RAY_TMPDIR``), free ports,
and an explicit ``RAY_AUTH_MODE`` for every node and the driver. Nodes are stopped through their own handles
(``remove_node``), never with ``ray stop``, which would kill every Ray process on the machine.

All nodes share this machine's disk, so a stage's files are visible to every node as on a cluster with shared
storage (S3, NFS); what the tier shows is that no stage depends on the processes, object store or node-local
state of the node that wrote its inputs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import pytest

from transfuse import environment

NODE_OBJECT_STORE = 80 * 2**20  # bytes per worker node: small, the tests' data are a few MiB
AUTH_MODE = "disabled"  # a private, loopback-only cluster; set for every node and the driver
NODE_ENV = {"RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _retry_start(start: Callable[[], Any], attempts: int = 3) -> Any:
    """``start()``, again after a failed node start, killing what the failed attempt left running.

    Ray 2.60's raylet aborts when its node's dashboard agent has not written its port file within about 15 s
    ("Check failed ... Timed out waiting for file .../metrics_agent_port_<node id>"): on a loaded 2-core machine
    the agent's imports alone can take that long. Another attempt usually starts.
    """
    import psutil

    me = psutil.Process()
    for attempt in range(1, attempts + 1):
        before = {p.pid for p in me.children(recursive=True)}
        try:
            return start()
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception for a node that timed out starting
            if attempt == attempts:
                raise
            for p in me.children(recursive=True):
                if p.pid not in before:
                    try:
                        p.kill()
                    except psutil.NoSuchProcess:
                        pass
            time.sleep(2)


class LocalCluster:
    """A 0-CPU head plus named worker nodes; this process is the driver, connected to the head."""

    def __init__(self, workers: int = 3, *, cpus: float = 1, object_store_memory: int = NODE_OBJECT_STORE):
        import ray
        from ray.cluster_utils import Cluster

        if ray.is_initialized():
            raise RuntimeError("this process is already connected to a Ray cluster: run the cluster tier in its "
                               "own pytest process (make test-cluster, or pytest -m cluster)")
        # short: Ray's unix sockets live under it (108-byte path limit)
        self.tmp = tempfile.mkdtemp(prefix="tfc-", dir="/tmp")
        self._env = {"RAY_TMPDIR": os.environ.get("RAY_TMPDIR"), "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE")}
        os.environ["RAY_TMPDIR"] = self.tmp
        os.environ["RAY_AUTH_MODE"] = AUTH_MODE
        # no idle Python workers started ahead of demand: on 2 cores, four nodes' prestarted workers (a Python
        # process each, ~2 CPU-seconds to import) slow every node's start
        for k, v in NODE_ENV.items():
            self._env[k] = os.environ.get(k)
            os.environ[k] = v
        self.cpus = cpus
        self.object_store_memory = object_store_memory
        self.names: dict[str, Any] = {}  # worker name -> ray._private.node.Node
        self.cluster = _retry_start(lambda: Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args={
            "num_cpus": 0, "gcs_server_port": free_port(), "include_dashboard": False,
            "dashboard_agent_listen_port": free_port(), "object_store_memory": object_store_memory,
            "env_vars": dict(environment.WORKER_ENV)}))
        for i in range(workers):
            self.add_worker(f"w{i}")
        ray.init(address=self.cluster.address, runtime_env=environment.runtime_env(), log_to_driver=False)
        self.head_id = self.cluster.head_node.node_id
        if ray.get_runtime_context().get_node_id() != self.head_id:
            raise RuntimeError("the driver did not attach to the head node")

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_worker(self, name: str) -> Any:
        """A new worker node (started one at a time: raylets started together race for ports)."""
        node = _retry_start(lambda: self.cluster.add_node(
            num_cpus=self.cpus, object_store_memory=self.object_store_memory, resources={f"node_{name}": 1},
            labels={"name": name}, env_vars=dict(environment.WORKER_ENV)))
        self.names[name] = node
        return node

    def node(self, node_id: str) -> Any:
        for n in self.names.values():
            if n.node_id == node_id:
                return n
        raise KeyError(f"node {node_id} is not one of this cluster's live worker nodes")

    def name_of(self, node_id: str) -> str:
        return next((k for k, n in self.names.items() if n.node_id == node_id), "head" if node_id == self.head_id
                    else node_id[:8])

    def kill(self, node_id: str) -> str:
        """SIGKILL every process of that worker node (its raylet, object store and workers); returns its name."""
        node = self.node(node_id)
        name = self.name_of(node_id)
        self.cluster.remove_node(node, allow_graceful=False)
        del self.names[name]
        return name

    def drain(self, node_id: str, *, reason: str = "DRAIN_NODE_REASON_PREEMPTION", deadline_s: int = 10) -> None:
        """Announce that the node goes away (a spot preemption notice), as the cloud's notice would; the node keeps
        running until killed."""
        cmd = [str(Path(sys.executable).parent / "ray"), "drain-node", "--address", self.address, "--node-id",
               node_id, "--reason", reason, "--reason-message", "spot preemption (test)",
               "--deadline-remaining-seconds", str(deadline_s)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ})
        if out.returncode != 0:
            raise RuntimeError(f"ray drain-node failed ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}")

    def alive_nodes(self) -> list[dict[str, Any]]:
        import ray

        return [n for n in ray.nodes() if n["Alive"]]

    def shutdown(self) -> None:
        import ray

        try:
            from ray import serve

            serve.shutdown()
        except Exception:  # noqa: BLE001 - Serve was never started, or its controller is gone
            pass
        ray.shutdown()
        try:
            self.cluster.shutdown()
        except ValueError:  # a thread left running (a test that timed out) reconnected this process: again
            ray.shutdown()
            self.cluster.shutdown()
        for k, v in self._env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    """A 0-CPU head and three 1-CPU worker nodes for one test module (import it there: ``from tests._cluster
    import cluster``)."""
    c = LocalCluster(workers=3)
    yield c
    c.shutdown()


def actor_nodes(class_name: str, *, alive: bool = True) -> list[tuple[str, str]]:
    """(actor id, node id) of every actor of that class (read from the GCS: no dashboard needed)."""
    import ray

    out = []
    for aid, a in ray._private.state.actors().items():
        if a["ActorClassName"].endswith(class_name) and (not alive or a["State"] == "ALIVE"):
            out.append((aid, a["Address"]["NodeID"]))
    return out


def node_processes(node: Any) -> list[int]:
    """PIDs of the processes that node's raylet started (its workers) plus the raylet itself."""
    import psutil
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    try:
        return [raylet, *(c.pid for c in psutil.Process(raylet).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def running_task_nodes(cluster: LocalCluster, function: str) -> list[str]:
    """Names of worker nodes where a worker process is executing ``function`` now (Ray titles the process
    ``ray::<function>`` while it runs a task, ``ray::IDLE`` otherwise)."""
    import psutil

    found = []
    for name, node in list(cluster.names.items()):
        for pid in node_processes(node):
            try:
                title = " ".join(psutil.Process(pid).cmdline())
            except psutil.NoSuchProcess:
                continue
            if title.startswith(f"ray::{function}"):
                found.append(name)
                break
    return found


def digest_mtimes(folder: Path, ranks: Iterable[int] = (0,)) -> dict[int, float]:
    """{global epoch: mtime} of the weights-digest files the train loop's test hook writes after each epoch."""
    out = {}
    for f in folder.glob("epoch*-rank*.txt"):
        epoch, rank = f.stem[len("epoch"):].split("-rank")
        if int(rank) in ranks:
            out[int(epoch)] = max(out.get(int(epoch), 0.0), f.stat().st_mtime)
    return out


def checkpoint_epoch(out_dir: str) -> Optional[int]:
    """The global epoch of the newest Ray Train checkpoint under a member dir (None before the first)."""
    import json

    from transfuse.finetune.stage import latest_checkpoint
    from transfuse.finetune.loop import STATE_FILE

    try:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return int(json.loads((Path(d) / STATE_FILE).read_text())["epoch"])
    except (OSError, ValueError, KeyError):  # a checkpoint being written or rotated away right now
        return None
