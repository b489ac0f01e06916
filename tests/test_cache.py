"""The frozen-activation cache (transfuse.finetune.cache): its content key and trunk digest (what makes two runs share a
cache, and what does not), the parquet layout its writers produce and its readers read back in id order, and
ensure_cache on the session's prepared digits, computed in the driver or by Ray Data actors: the activations are
the trunk's outputs, a complete cache is reused, two builders at once build it once, and an incomplete leftover is
replaced (vgg_small width 0.125, in process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow)
from transfuse import storage
from transfuse.config import ModelConfig
from transfuse.data import PREPARE
from transfuse.finetune import CACHE, cache

tf = pytest.importorskip("tensorflow")

CLASSES = ["a", "b", "c"]


def _spec(**model) -> dict:
    from transfuse.finetune import models

    mc = ModelConfig(**{"backbone": "vgg_small", "width": 0.125, "weights": "none", "head": {"dense": [16]}, **model})
    return models.model_spec(mc, len(CLASSES), CLASSES, seed=0)


def test_cache_key_names_the_trunk_and_the_data_not_the_head():
    """Specs that differ only in what sits above the cut (head, classes, unfreeze depth, seed) share a key, so
    trials with different heads reuse one cache; the cut, the trunk's weights, the data, the width, the input size
    and the preprocessing each give a new key."""
    from transfuse.finetune import models

    spec = _spec()
    key = cache.cache_key(spec, "block2_pool", "trunk0", "data0")
    assert key.startswith("vgg_small-block2_pool-32-") and len(key.rsplit("-", 1)[1]) == 16
    assert cache.cache_key(spec, "block2_pool", "trunk0", "data0") == key
    other_top = models.model_spec(ModelConfig(backbone="vgg_small", width=0.125, weights="none", unfreeze=4,
                                              head={"dense": [64, 32], "dropout": 0.5}), 10, list("abcdefghij"),
                                  seed=7)
    assert cache.cache_key(other_top, "block2_pool", "trunk0", "data0") == key
    changed = [cache.cache_key(spec, "block3_pool", "trunk0", "data0"),
               cache.cache_key(spec, "block2_pool", "trunk1", "data0"),
               cache.cache_key(spec, "block2_pool", "trunk0", "data1"),
               cache.cache_key(_spec(width=0.25), "block2_pool", "trunk0", "data0"),
               cache.cache_key(_spec(input_size=48), "block2_pool", "trunk0", "data0"),
               cache.cache_key({**spec, "preprocess": {**spec["preprocess"], "normalization": "caffe"}},
                               "block2_pool", "trunk0", "data0")]
    assert len(set(changed)) == len(changed) and key not in changed


def test_trunk_digest_covers_the_layers_up_to_the_cut_only():
    """A changed weight at or below the cut changes the digest; one above it, or in the head, does not."""
    from transfuse.finetune import models

    model = models.build_model(_spec())
    cut = "block2_conv2"
    digest = cache.trunk_digest(model, cut)
    assert len(digest) == 16 and cache.trunk_digest(model, cut) == digest
    net = models.get_backbone(model)

    def bump(layer) -> None:
        w = layer.get_weights()
        layer.set_weights([w[0] + 0.01, *w[1:]])

    bump(net.get_layer("block3_conv1"))
    bump(next(l for l in model.layers if l.name.startswith("head_") and l.get_weights()))
    assert cache.trunk_digest(model, cut) == digest
    assert cache.trunk_digest(model, "block3_conv1") != cache.trunk_digest(models.build_model(_spec()),
                                                                           "block3_conv1")
    bump(net.get_layer(cut))
    at_cut = cache.trunk_digest(model, cut)
    assert at_cut != digest
    bump(net.get_layer("block1_conv1"))
    assert cache.trunk_digest(model, cut) not in (digest, at_cut)


def test_cache_parts_read_back_per_split_and_cut_in_id_order(tmp_path):
    """The writers' layout (one parquet file per batch, split and cut: x tensor, label, id) read back by
    read_cache_numpy: each split's rows of each cut, sorted by id across batches, float32 and int64."""
    from transfuse.finetune.cache import read_cache_numpy, write_parts

    rng = np.random.default_rng(0)
    ids = np.array(["r07", "r02", "r11", "r05", "r01", "r09"])
    splits = np.array(["train", "val", "train", "train", "val", "train"])
    x0 = rng.normal(size=(6, 2, 2, 3)).astype(np.float32)
    x1 = rng.normal(size=(6, 5)).astype(np.float32)
    labels = np.array([3, 1, 0, 2, 2, 1], dtype=np.int64)
    dirs = [str(tmp_path / "cut0"), str(tmp_path / "cut1")]
    for batch in (slice(0, 3), slice(3, 6)):
        write_parts(dirs, {"out0": x0[batch], "out1": x1[batch], "label": labels[batch], "id": ids[batch],
                            "split": splits[batch]})
    assert len(list((tmp_path / "cut0" / "train").glob("part-*.parquet"))) == 2
    for split in ("train", "val"):
        rows = [i for i in np.argsort(ids) if splits[i] == split]
        for d, want in zip(dirs, (x0, x1)):
            x, y = read_cache_numpy(d, split)
            assert x.dtype == np.float32 and y.dtype == np.int64
            np.testing.assert_array_equal(x, want[rows])
            np.testing.assert_array_equal(y, labels[rows])
    assert cache.cache_fingerprint(dirs[0]) is None  # no manifest yet


def test_cache_computed_in_the_driver_is_the_trunk_output_reused_and_replaces_a_leftover(digits_run, tmp_path):
    """Small data on CPUs: ensure_cache computes in this process. An incomplete leftover in the cache's folder (no
    manifest) is replaced; the manifest names the key, the cut and the rows per split; the activations are the
    trunk's outputs on the preprocessed images; a second call reuses the files without rewriting them (a new pass
    would write new part files)."""
    from transfuse.finetune import models
    from transfuse.data import data_manifest, read_split_numpy
    from transfuse.inference.preprocessing import PreprocessSpec, preprocess

    data_dir = PREPARE.dir(digits_run)
    man = data_manifest(data_dir)
    cfg = digits_run.model_copy(update={"storage": str(tmp_path), "run": "driver"})
    spec = models.model_spec(cfg.model, len(man["class_names"]), man["class_names"], seed=0)
    full = models.build_model(spec)
    init = str(tmp_path / "initial.weights.h5")
    models.save_weights(full, init)
    cut = "block2_pool"
    key = cache.cache_key(spec, cut, cache.trunk_digest(full, cut), man["fingerprint"])
    root = Path(CACHE.dir(cfg))
    (root / key / "train").mkdir(parents=True)
    (root / key / "train" / "part-stale.parquet").write_bytes(b"left by an interrupted pass")

    dirs = cache.ensure_cache(cfg, data_dir, spec, init, {key: cut}, in_driver_max_rows=10**6)
    assert dirs == {cut: str(root / key)} and cache.PROFILE["where"] == "driver"
    assert not (root / key / "train" / "part-stale.parquet").exists()
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
    written = storage.read_manifest(dirs[cut])
    assert (written["key"], written["cut_layer"], written["fingerprint"]) == (key, cut, man["fingerprint"])
    assert written["counts"] == {s: man["totals"][s] for s in ("train", "val")}
    assert cache.cache_fingerprint(dirs[cut]) == key
    images, labels, _ = read_split_numpy(data_dir, "train")
    x, y = cache.read_cache_numpy(dirs[cut], "train")
    np.testing.assert_array_equal(y, labels)
    expect = models.trunk_model(full, cut).predict(preprocess(images, PreprocessSpec(**spec["preprocess"])), verbose=0)
    np.testing.assert_allclose(x, expect, rtol=1e-4, atol=1e-5)

    files = {p: p.stat().st_mtime_ns for p in (root / key).rglob("*") if p.is_file()}
    assert cache.ensure_cache(cfg, data_dir, spec, init, {key: cut}, in_driver_max_rows=10**6) == dirs
    assert {p: p.stat().st_mtime_ns for p in (root / key).rglob("*") if p.is_file()} == files


def test_two_builders_at_once_build_the_cache_once(digits_run, caplog):
    """Two trials asking for the same cut point at the same moment: one computes, the other reuses."""
    import logging
    from concurrent.futures import ThreadPoolExecutor

    from transfuse.finetune import cache

    from transfuse.finetune import models
    from transfuse.data import data_manifest
    from transfuse.finetune.stage import prepare_run

    cfg = digits_run  # test_train's worker settings (workers, rates, batch size) do not reach the cache
    out = storage.join(storage.run_dir(cfg), "cache_race")
    p = prepare_run(cfg.model_copy(update={"train": cfg.train.model_copy(update={"cache_frozen": False})}), out)
    spec, init = p.spec, p.init_weights
    full = models.build_model(spec)
    models.load_weights(full, init)
    cut = "block3_pool"  # a cut no fine-tuning run of the session uses, so nobody built it yet
    data_dir = PREPARE.dir(cfg)
    key = cache.cache_key(spec, cut, cache.trunk_digest(full, cut), data_manifest(data_dir)["fingerprint"])
    caplog.set_level(logging.INFO, logger="transfuse.finetune.cache")
    with ThreadPoolExecutor(2) as pool:
        dirs = list(pool.map(lambda _: cache.ensure_cache(cfg, data_dir, spec, init, {key: cut}), range(2)))
    assert dirs[0] == dirs[1]
    msgs = [r.getMessage() for r in caplog.records if r.name == "transfuse.finetune.cache"]
    assert sum(m.startswith("cache: computing") for m in msgs) == 1
    assert sum(m.startswith("cache: reusing") for m in msgs) == 1
    # the cached activations are the trunk's outputs on the preprocessed images
    from transfuse.data import read_split_numpy
    from transfuse.inference.preprocessing import PreprocessSpec, preprocess

    images, labels, _ = read_split_numpy(data_dir, "val")
    x, y = cache.read_cache_numpy(dirs[0][cut], "val")
    np.testing.assert_array_equal(y, labels)
    expect = models.trunk_model(full, cut).predict(preprocess(images, PreprocessSpec(**spec["preprocess"])), verbose=0)
    np.testing.assert_allclose(x, expect, rtol=1e-4, atol=1e-5)
