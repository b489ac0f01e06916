"""Fine-tuning on Ray Train with two workers on the local Ray cluster (digits, vgg_small width 0.125).

One run serves several checks (it is the slow part): a worker is SIGKILLed once mid-run and the run still
finishes with the right epochs; loss falls; checkpoints, metrics, predictions, embeddings and the manifest are
written; the member reloads. A second call resumes that run with one more epoch.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from transfuse import runtime  # noqa: F401
from transfuse import storage

pytest.importorskip("tensorflow")

OVERRIDES = {"epochs_frozen": 2, "epochs_unfrozen": 1, "unfreeze": 4}  # independent of smoke.yaml


def _cfg(digits_run):
    # two Ray Train workers, 1 logical CPU each; a bit higher phase-1 rate so 2 tiny epochs show a falling loss
    data = digits_run.model_dump(mode="json")
    data["train"].update(num_workers=2, cpus_per_worker=1, max_failures=1, lr_frozen=3e-3, batch_size=64)
    return type(digits_run).model_validate(data)


@pytest.fixture(scope="module")
def finetuned(digits_run, tmp_path_factory):
    from transfuse.train import finetune

    cfg = _cfg(digits_run)
    out = str(tmp_path_factory.mktemp("member"))
    marker = str(tmp_path_factory.mktemp("kill") / "killed")
    # rank 1 kills itself once (SIGKILL) right after global epoch 1 was checkpointed
    metrics = finetune(cfg, out, OVERRIDES, force=True,
                       test_hooks={"kill_at_epoch": {"epoch": 1, "rank": 1, "marker": marker}})
    return cfg, out, metrics, marker


def test_killed_worker_run_finishes_with_the_right_epochs(finetuned):
    _, out, metrics, marker = finetuned
    import os

    assert os.path.exists(marker), "the worker was not killed: the test hook did not fire"
    hist = metrics["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert [h["phase"] for h in hist] == ["frozen", "frozen", "unfrozen"]


def test_loss_falls_and_outputs_are_written(finetuned):
    _, out, metrics, _ = finetuned
    hist = metrics["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    for split in ("val", "test", "holdout"):
        m = metrics[split]
        assert set(m) >= {"accuracy", "nll", "ece", "n"} and m["n"] > 0
        t = pq.read_table(storage.join(out, "predictions", f"{split}.parquet"))
        assert t.num_rows == m["n"] and t.column_names == ["id", "label", "probs"]
        probs = np.stack(t.column("probs").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-4)
    for split in ("train", "val", "test", "holdout"):
        t = pq.read_table(storage.join(out, "embeddings", f"{split}.parquet"))
        assert t.num_rows > 0 and len(t.column("embedding")[0]) == 64  # smoke head: Dense(64)
    ckpts = [f for f in storage.list_files(storage.join(out, ".ray_train")) if f.startswith("checkpoint_")]
    assert any(f.endswith("model.weights.h5") for f in ckpts)
    m = storage.read_manifest(out)
    assert m["complete"] and "model.weights.h5" in m["files"] and "metrics.json" in m["files"]
    spec = storage.read_json(storage.join(out, "model_spec.json"))
    assert spec["cut_layer"] == "block4_pool" and spec["unfreeze"] == 4 and len(spec["backbone_layers"]) == 18


def test_member_reloads_with_the_same_predictions(finetuned, digits_run):
    from transfuse.data import read_split_numpy
    from transfuse.models import load_member
    from transfuse.preprocess import PreprocessSpec, preprocess

    _, out, _, _ = finetuned
    model, spec = load_member(out)
    images, labels, ids = read_split_numpy(storage.stage_dir(digits_run, "data"), "test")
    probs = model.predict(preprocess(images, PreprocessSpec(**spec["preprocess"])), verbose=0)
    t = pq.read_table(storage.join(out, "predictions", "test.parquet"))
    assert list(t.column("id").to_pylist()) == list(ids)
    np.testing.assert_allclose(np.stack(t.column("probs").to_numpy(zero_copy_only=False)), probs, atol=1e-5)


def test_resume_continues_from_the_last_checkpoint(finetuned):
    from transfuse.train import finetune

    cfg, out, first, _ = finetuned
    more = dict(OVERRIDES, epochs_unfrozen=2)
    metrics = finetune(cfg, out, more, resume=True)
    hist = metrics["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]  # only epoch 4 ran
    assert hist[:3] == first["history"]


def test_bad_overrides_are_refused(digits_run):
    from transfuse.train import TrainError, effective

    with pytest.raises(TrainError, match="unknown overrides"):
        effective(digits_run, {"learning_rate": 1.0})


def test_two_builders_at_once_build_the_cache_once(digits_run, caplog):
    """Two trials asking for the same cut point at the same moment: one computes, the other reuses."""
    import logging
    from concurrent.futures import ThreadPoolExecutor

    from transfuse import cache, models
    from transfuse.data import data_manifest
    from transfuse.train import plan

    cfg = _cfg(digits_run)
    out = storage.join(storage.run_dir(cfg), "cache_race")
    p = plan(cfg.model_copy(update={"train": cfg.train.model_copy(update={"cache_frozen": False})}), out)
    spec, init = p["spec"], p["init_weights"]
    full = models.build_model(spec)
    models.load_weights(full, init)
    cut = "block3_pool"  # not used by the fine-tuning run above, so nobody built it yet
    data_dir = storage.stage_dir(cfg, "data")
    key = cache.cache_key(spec, cut, cache.trunk_digest(full, cut), data_manifest(data_dir)["fingerprint"])
    caplog.set_level(logging.INFO, logger="transfuse.cache")
    with ThreadPoolExecutor(2) as pool:
        dirs = list(pool.map(lambda _: cache.ensure_cache(cfg, data_dir, spec, init, {key: cut}), range(2)))
    assert dirs[0] == dirs[1]
    msgs = [r.getMessage() for r in caplog.records if r.name == "transfuse.cache"]
    assert sum(m.startswith("cache: computing") for m in msgs) == 1
    assert sum(m.startswith("cache: reusing") for m in msgs) == 1
    # the cached activations are the trunk's outputs on the preprocessed images
    from transfuse.data import read_split_numpy
    from transfuse.preprocess import PreprocessSpec, preprocess

    images, labels, _ = read_split_numpy(data_dir, "val")
    x, y = cache.read_cache_numpy(dirs[0][cut], "val")
    np.testing.assert_array_equal(y, labels)
    expect = models.trunk_model(full, cut).predict(preprocess(images, PreprocessSpec(**spec["preprocess"])), verbose=0)
    np.testing.assert_allclose(x, expect, rtol=1e-4, atol=1e-5)


def test_overrides_and_scratch_budget(digits_run):
    from transfuse.train import effective, mixed_policy, scratch_overrides

    eff = effective(digits_run, {"unfreeze": 8, "head_dense": 32, "dropout": 0.3, "lr_frozen": 0.01, "seed": 3})
    assert (eff.model.unfreeze, eff.model.head.dense, eff.model.head.dropout) == (8, [32], 0.3)
    assert (eff.train.lr_frozen, eff.train.seed) == (0.01, 3)
    s = scratch_overrides(digits_run)
    assert s["unfreeze"] == 18 and s["epochs_frozen"] == 0
    assert s["epochs_unfrozen"] == digits_run.train.epochs_frozen + digits_run.train.epochs_unfrozen
    assert mixed_policy("auto", True) == "mixed_float16" and mixed_policy("auto", False) == "float32"
