"""Ensemble member fits as Ray tasks on several nodes; a node SIGKILLed while it runs one.

A 0-CPU head (the driver; the shared data are put in its object store once) and three 1-CPU nodes. Every
(member, fold) fit is one task (``RayRunner``, ``max_retries=1``). A node is killed while one of its worker
processes is executing a fit task; the run still returns every fit, and the fitted members equal those of the
sequential in-process run (scikit-learn with fixed seeds is deterministic): the killed task was run again.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tests._cluster import running_task_nodes, wait_for
from tests._cluster import cluster  # noqa: F401  (the module's fixture)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]  # one test = whole runs of a stage on a loaded 2-core VM

WAIT_S = 600


def _inputs():
    """scikit-learn's digits as ensemble inputs: pixels in place of CNN embeddings, a fixed split."""
    from sklearn.datasets import load_digits

    from transfuse.ensemble.inputs import EnsembleInputs

    d = load_digits()
    x, y = d.data.astype(np.float32) / 16.0, d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    parts = {"train": order[:900], "holdout": order[900:1350], "test": order[1350:]}
    return EnsembleInputs(ids={s: np.array([f"{i:05d}" for i in idx]) for s, idx in parts.items()},
                          labels={s: y[idx] for s, idx in parts.items()},
                          embeddings={s: x[idx] for s, idx in parts.items()}, num_classes=10)


def _config():
    from transfuse.config import EnsembleConfig

    # forests big enough that a fit takes a few seconds: a node can be caught in the middle of one
    return EnsembleConfig.model_validate({
        "members": [{"name": "rf", "kind": "random_forest", "params": {"n_estimators": 300}},
                    {"name": "et_like", "kind": "random_forest", "params": {"n_estimators": 300, "max_features": 0.3}},
                    {"name": "logreg", "kind": "logistic_regression", "params": {"C": 1.0, "max_iter": 300}}],
        "folds": 3, "seeds": [0], "parallel": "ray", "cpus_per_task": 1})


def test_node_killed_mid_fit_tasks_retried_members_identical(cluster):
    from transfuse.ensemble.stage import fit_ensemble
    from transfuse.ensemble.learners import LocalRunner, RayRunner

    inp, ecfg = _inputs(), _config()
    result: dict = {}

    def run():
        try:
            result["fit"] = fit_ensemble(inp, ecfg, RayRunner(ecfg.cpus_per_task))
        except BaseException as e:  # noqa: BLE001 - re-raised below
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    busy = wait_for("a worker node executing a fit task",
                    lambda: running_task_nodes(cluster, "_fit_remote") or not thread.is_alive(), WAIT_S, 0.1)
    assert thread.is_alive(), f"the fit ended before a node could be killed: {result.get('error')}"
    killed = cluster.kill(cluster.names[busy[0]].node_id)
    kill_time = time.time()
    cluster.add_worker(f"{killed}-replacement")
    thread.join(timeout=WAIT_S)
    assert not thread.is_alive(), f"the ensemble fit did not end within {WAIT_S} s of the kill"
    if "error" in result:
        raise result["error"]
    fit = result["fit"]
    print(f"killed node {killed} while it ran a fit task; fit ended {time.time() - kill_time:.1f} s later")

    local = fit_ensemble(inp, ecfg, LocalRunner())
    tasks = len(ecfg.members) * (ecfg.folds + 1)
    assert len(fit.data_object_ids) == tasks and len(set(fit.data_object_ids)) == 1  # one shared object
    ray_seed, local_seed = fit.first, local.first
    assert ray_seed.member_order == local_seed.member_order
    for m in ray_seed.member_order:
        np.testing.assert_array_equal(ray_seed.holdout_probs[m], local_seed.holdout_probs[m], err_msg=m)
        np.testing.assert_array_equal(ray_seed.test_probs[m], local_seed.test_probs[m], err_msg=m)
    assert ray_seed.metrics == local_seed.metrics
