"""Backbones, freezing, weights files and the cut-point split (tf_keras, in process; no Ray needed)."""

from __future__ import annotations

import numpy as np
import pytest

from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow)
from transfuse.finetune import models
from transfuse.config import ModelConfig

tf = pytest.importorskip("tensorflow")

CLASSES = ["a", "b", "c"]


def _spec(unfreeze: int = 4, backbone: str = "vgg_small", **head) -> dict:
    mc = ModelConfig(backbone=backbone, width=0.125, weights="none", head={"dense": [16], **head})
    return models.model_spec(mc, len(CLASSES), CLASSES, seed=0, unfreeze=unfreeze)


def _images(n: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 32, 32, 3)).astype(np.float32)


@pytest.mark.parametrize("k", [0, 1, 4, 13, 18])
def test_exactly_the_last_k_backbone_layers_train(k):
    model = models.build_model(_spec(unfreeze=k))
    net = models.get_backbone(model)
    names = models.backbone_layer_names(net)
    assert len(names) == 18  # VGG16's 13 conv + 5 pool layers (input excluded), as base_model.layers[1:]
    trainable = [l.name for l in net.layers if l.trainable and l.name in names and net.trainable]
    assert trainable == names[len(names) - k:] if k else trainable == []
    assert all(l.trainable for l in model.layers if l.name.startswith("head_"))
    # the trainable weights are exactly those layers' kernels and biases plus the head's
    n_head = sum(len(l.trainable_weights) for l in model.layers if l.name.startswith("head_"))
    n_conv = sum(1 for n in names[len(names) - k:] if "conv" in n) if k else 0
    assert len(model.trainable_weights) == n_head + 2 * n_conv


def test_batchnorm_of_a_partly_frozen_backbone_stays_in_inference_mode():
    """MobileNetV2 with its last 10 layers (BatchNorm among them) unfrozen: a training step updates their
    gamma/beta but never the moving statistics, because the backbone is called with training=False."""
    mc = ModelConfig(backbone="mobilenet_v2", weights="none", input_size=32, head={"dense": [8]})
    spec = models.model_spec(mc, 3, CLASSES, unfreeze=10)
    model = models.build_model(spec)
    net = models.get_backbone(model)
    bns = [l for l in net.layers if isinstance(l, tf.keras.layers.BatchNormalization) and l.trainable]
    assert bns, "the unfrozen layers should include a BatchNorm layer"
    before = [(l.moving_mean.numpy().copy(), l.gamma.numpy().copy()) for l in bns]
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    x = _images(16) * 2.0 - 1.0  # MobileNetV2's own input range ([-1, 1]): relu6 does not saturate
    model.fit(x, np.arange(16) % 3, epochs=1, batch_size=8, verbose=0)
    changed = 0
    for l, (mean, gamma) in zip(bns, before):
        np.testing.assert_array_equal(l.moving_mean.numpy(), mean)
        changed += not np.array_equal(l.gamma.numpy(), gamma)
    assert changed >= 1  # unfrozen BatchNorm scales did train


def test_vgg16_loads_a_local_weights_file(tmp_path):
    """The real ImageNet path differs from this only by Keras' download."""
    src = tf.keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = str(tmp_path / "vgg16.weights.h5")
    src.save_weights(path)
    mc = ModelConfig(backbone="vgg16", weights=path, head={"dense": [8]})
    spec = models.model_spec(mc, 3, CLASSES, unfreeze=4)
    model = models.build_model(spec, models.resolve_weights(mc.weights))
    got = models.get_backbone(model).get_weights()
    assert len(got) == len(src.get_weights()) == 26
    for a, b in zip(got, src.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_split_trunk_then_top_equals_the_full_model():
    spec = _spec(unfreeze=4)
    model = models.build_model(spec)
    trunk, top = models.split_model(model, spec["cut_layer"])
    assert spec["cut_layer"] == "block4_pool"
    x = _images(8)
    np.testing.assert_allclose(top.predict(trunk.predict(x, verbose=0), verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


def test_cut_inside_a_resnet_block_is_refused_and_between_blocks_works():
    mc = ModelConfig(backbone="resnet50", weights="none", head={"dense": [8]})
    spec = models.model_spec(mc, 3, CLASSES, unfreeze=3)
    model = models.build_model(spec)
    with pytest.raises(models.ModelError, match="not a single tensor"):
        models.split_model(model, spec["cut_layer"])  # conv5_block3_3_conv: the residual skips it
    trunk, top = models.split_model(model, "conv5_block2_out")
    x = _images(2) * 255.0
    np.testing.assert_allclose(top.predict(trunk.predict(x, verbose=0), verbose=0), model.predict(x, verbose=0),
                               rtol=1e-4, atol=1e-6)


def test_training_on_cached_activations_equals_training_the_full_model():
    """Same initial weights, same batches: the top trained on cached trunk outputs and the full model with
    that trunk frozen end with the same predictions."""
    spec = _spec(unfreeze=4)
    x, y = _images(48, 1), np.arange(48) % 3
    full = models.build_model(spec)
    cached = models.build_model(spec)
    cached.set_weights(full.get_weights())
    models.set_unfreeze(full, 4)
    trunk, top = models.split_model(cached, spec["cut_layer"])
    features = trunk.predict(x, verbose=0)  # computed once
    for m, inputs in ((full, x), (top, features)):
        m.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
        m.fit(inputs, y, epochs=3, batch_size=16, shuffle=False, verbose=0)
    before = models.build_model(spec).predict(x, verbose=0)
    after_full, after_cached = full.predict(x, verbose=0), cached.predict(x, verbose=0)
    assert np.abs(after_full - before).max() > 1e-4  # training changed the model
    np.testing.assert_allclose(after_cached, after_full, rtol=1e-4, atol=1e-5)


def test_member_round_trip(tmp_path):
    spec = _spec(unfreeze=4, dropout=0.2)
    model = models.build_model(spec)
    models.save_member(model, spec, str(tmp_path))
    loaded, spec2 = models.load_member(str(tmp_path))
    assert spec2 == spec
    x = _images(4)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    emb = models.embedding_model(loaded).predict(x, verbose=0)
    assert emb.shape == (4, 16)


@pytest.mark.parametrize("backbone, weights, unfreeze, pattern", [
    ("vgg_small", "imagenet", 0, "no ImageNet weights"),
    ("vgg_small", "/nonexistent/w.weights.h5", 0, "weights file not found"),
    ("vgg_small", "none", 19, "only 18 backbone layers"),
])
def test_bad_model_input_gets_a_clear_error(backbone, weights, unfreeze, pattern):
    mc = ModelConfig(backbone=backbone, weights=weights, width=0.125)
    with pytest.raises(models.ModelError, match=pattern):
        spec = models.model_spec(mc, 3, CLASSES, unfreeze=unfreeze)
        models.build_model(spec, models.resolve_weights(mc.weights))


def test_pretrain_weights_need_the_pretrain_stage(tmp_path):
    with pytest.raises(models.ModelError, match="jobs.pretrain"):
        models.resolve_weights("pretrain", str(tmp_path))
