"""Connecting to Ray the same way from every job and test: one runtime env, sized local clusters."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

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


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, *, quiet: bool = False,
             **kwargs: Any) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), else start a local cluster with ``num_cpus`` logical CPUs.

    ``quiet``: the workers' output stays in Ray's session logs instead of being copied to this process
    (``log_to_driver``), and Ray Data draws no progress bars here (the console draws the pipeline's own).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env(), log_to_driver=not quiet, **kwargs)
    else:
        # "local": always a new cluster of our own, never one some other `ray start` left on this machine
        ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env(), include_dashboard=False,
                 log_to_driver=not quiet, **kwargs)
    if quiet:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    logging.getLogger(__name__).info("ray: %s", ray.cluster_resources())
