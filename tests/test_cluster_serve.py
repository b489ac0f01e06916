"""Serve across nodes: two replicas on two nodes, one node SIGKILLed under a bounded load from 127.0.0.1.

A 0-CPU head runs Serve's controller and its one HTTP proxy (``proxy_location="HeadOnly"``: on this machine
every node has the same address, so one proxy on the head is the stable entry point); each replica asks for 1
CPU, so the two replicas sit on two of the three 1-CPU nodes and the third is where the lost one is replaced.
CLIENTS threads post predictions back to back; the load is bounded in requests and in time and stops itself.
The only requests allowed to fail are those in flight when the node died (at most one per client); every answer
must equal the bundle's own prediction offline.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from serve.app import undeploy
from tests._cluster import actor_nodes, free_port, wait_for
from tests._cluster import cluster  # noqa: F401  (the module's fixture)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]  # one test = whole runs of a stage on a loaded 2-core VM
httpx = pytest.importorskip("httpx")

MODEL = "digits"
CLIENTS = 4
MAX_REQUESTS = 6000  # the load's bounds: whichever comes first
MAX_SECONDS = 240
AFTER_REPLACEMENT = 200  # requests answered after the replica was replaced, before the load stops
WAIT_S = 300


@dataclass
class Call:
    start: float
    end: float
    status: int  # 0: no HTTP answer (connection error, timeout)
    ok: bool  # 200 and the bundle's offline prediction


@pytest.fixture(scope="module")
def served(cluster, tmp_path_factory):
    from ray import serve

    from bench.serve import digits_uint8, write_demo_bundle
    from serve.app import AppArgs, build_app
    from transfuse.inference.bundle import load_bundle

    bundle = str(tmp_path_factory.mktemp("bundle") / "b")
    write_demo_bundle(bundle, members=1, epochs=1)
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    args = AppArgs(bundle=bundle, name=MODEL, num_cpus=1, min_replicas=2, max_replicas=2, max_batch_size=8,
                   batch_wait_timeout_s=0.005)
    serve.run(build_app(args), name="cluster", route_prefix="/")
    x, _, _ = digits_uint8()
    x = x[:32]
    expected = load_bundle(bundle).predict(x)
    yield f"http://127.0.0.1:{port}/v1/models/{MODEL}:predict", x, expected
    undeploy("cluster")


def _replicas() -> list[str]:
    return sorted(n for _, n in actor_nodes("TransfuseModel"))


def _running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get("cluster")
    if app is None:
        return 0
    return app.deployments["TransfuseModel"].replica_states.get("RUNNING", 0)


def test_replicas_on_two_nodes_survive_a_node_kill_under_load(cluster, served):
    url, x, expected = served
    nodes = _replicas()
    assert len(nodes) == 2 and len(set(nodes)) == 2, f"replicas on {nodes}"

    calls: list[Call] = []
    lock = threading.Lock()
    stop = threading.Event()
    t_end = time.monotonic() + MAX_SECONDS

    def client(k: int):
        with httpx.Client(timeout=30) as http:
            i = k
            while not stop.is_set() and time.monotonic() < t_end:
                with lock:
                    if len(calls) >= MAX_REQUESTS:
                        return
                j = i % len(x)
                t0 = time.time()
                try:
                    r = http.post(url, json={"instances": x[j:j + 1].tolist()})
                    status = r.status_code
                    ok = status == 200 and r.json()["predictions"][0]["class_id"] == int(expected[j])
                except httpx.HTTPError:
                    status, ok = 0, False
                with lock:
                    calls.append(Call(t0, time.time(), status, ok))
                i += CLIENTS

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        wait_for("100 answers before the kill", lambda: sum(c.ok for c in calls) >= 100, WAIT_S, 0.1)
        victim = nodes[-1]
        kill_time = time.time()
        killed = cluster.kill(victim)
        wait_for("the lost replica replaced on another node",
                 lambda: _running_replicas() == 2 and len(_replicas()) == 2 and victim not in _replicas(), WAIT_S)
        replaced_at = time.time()
        with lock:
            n_at_replacement = len(calls)
        wait_for(f"{AFTER_REPLACEMENT} requests after the replacement",
                 lambda: len(calls) >= n_at_replacement + AFTER_REPLACEMENT or time.monotonic() > t_end, WAIT_S, 0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)

    failed = [c for c in calls if not c.ok]
    in_flight = [c for c in failed if c.start <= kill_time <= c.end]
    # a request sent after the kill can still be routed to the dead replica until Serve's router drops it (CI on
    # 43013be: one such request, sent after the kill, got a 500); none may fail once the replica is replaced
    routed_to_dead = [c for c in failed if kill_time < c.start <= replaced_at]
    statuses = sorted({c.status for c in failed})
    answered = sum(c.ok for c in calls) / len(calls)
    print(f"node {killed} killed; replica replaced {replaced_at - kill_time:.1f} s later; {len(calls)} requests, "
          f"{len(failed)} failed (statuses {statuses}): {len(in_flight)} in flight at the kill, "
          f"{len(routed_to_dead)} sent before the replacement; answered {answered:.2%}")
    assert any(c.ok for c in calls if c.start > replaced_at), "no request answered after the replacement"
    assert [c for c in failed if c.start < kill_time and c.end < kill_time] == [], "failures before the kill"
    assert [c for c in failed if c.start > replaced_at] == [], "requests failed after the replica was replaced"
    assert len(failed) <= CLIENTS  # at most one request in flight per client
    assert answered >= 0.99
