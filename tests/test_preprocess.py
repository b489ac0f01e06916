"""The one preprocessing function (numpy only) against TensorFlow's own references."""

from __future__ import annotations

import numpy as np
import pytest

from transfuse.inference.preprocessing import (PreprocessError, PreprocessSpec, pixel_features, preprocess,
                                               resize_bilinear)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(4, 28, 28, 1), dtype=np.uint8)


def test_grey_becomes_rgb_and_resized(images):
    out = preprocess(images, PreprocessSpec(32, "unit"))
    assert out.shape == (4, 32, 32, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    assert preprocess(images[..., 0], PreprocessSpec(32, "unit")).shape == (4, 32, 32, 3)


def test_float_input_matches_uint8(images):
    a = preprocess(images, PreprocessSpec(28, "tf"))
    b = preprocess(images.astype(np.float32) / 255.0, PreprocessSpec(28, "tf"))
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_matches_keras_reference(images):
    import tensorflow as tf

    rgb = np.repeat(images, 3, axis=-1).astype(np.float32)
    ours = preprocess(images, PreprocessSpec(28, "caffe"))
    ref = tf.keras.applications.vgg16.preprocess_input(rgb.copy())
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    ours = preprocess(images, PreprocessSpec(28, "tf"))
    ref = tf.keras.applications.mobilenet_v2.preprocess_input(rgb.copy())
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    resized = resize_bilinear(rgb, 64)
    ref = tf.image.resize(rgb, (64, 64), method="bilinear").numpy()
    np.testing.assert_allclose(resized, ref, atol=1e-3)


def test_pixel_features_keep_channels_and_scale(images):
    """The pixel view: [0, 1], grey stays one channel, uint8 and float inputs agree, optional resize."""
    f = pixel_features(images)
    assert f.shape == (4, 28 * 28) and f.dtype == np.float32
    np.testing.assert_allclose(f, images.reshape(4, -1) / 255.0, atol=1e-7)
    np.testing.assert_allclose(pixel_features(images.astype(np.float32) / 255.0), f, atol=1e-6)
    assert pixel_features(images[..., 0]).shape == (4, 784)  # N x H x W grey
    small = pixel_features(images, 7)
    assert small.shape == (4, 49) and 0.0 <= small.min() and small.max() <= 1.0
    np.testing.assert_allclose(small, resize_bilinear(images.astype(np.float32), 7).reshape(4, -1) / 255.0,
                               atol=1e-6)
    rgb = np.repeat(images, 3, axis=-1)
    assert pixel_features(rgb).shape == (4, 28 * 28 * 3)
    with pytest.raises(ValueError, match=r"got dtype int32"):
        pixel_features(images.astype(np.int32))


@pytest.mark.parametrize("bad, pattern", [
    (np.zeros((2, 8, 8, 4), np.uint8), r"got shape \(2, 8, 8, 4\)"),
    (np.zeros((8, 8), np.uint8), r"got shape \(8, 8\)"),
    (np.zeros((2, 8, 8), np.int32), r"got dtype int32"),
])
def test_bad_input_named(bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        preprocess(bad, PreprocessSpec(32, "unit"))


def test_augmentation_changes_images_not_shapes(images):
    rng = np.random.default_rng(1)
    plain = preprocess(images, PreprocessSpec(32, "unit"))
    aug = preprocess(images, PreprocessSpec(32, "unit"), rng=rng, flip=True, pad_crop=4)
    assert aug.shape == plain.shape
    assert not np.allclose(aug, plain)


@pytest.mark.parametrize("shape, dtype", [((2500, 28, 28), np.uint8), ((2100, 20, 20, 3), np.float32)])
def test_many_images_go_through_in_chunks_with_the_same_values(shape, dtype, monkeypatch):
    """More than CHUNK images are preprocessed chunk by chunk into one array: bit-equal to one pass over all."""
    import transfuse.inference.preprocessing as pp

    rng = np.random.default_rng(0)
    images = (rng.random(shape) * (255 if dtype == np.uint8 else 1)).astype(dtype)
    spec = PreprocessSpec(32, "lite")
    chunked = preprocess(images, spec)
    monkeypatch.setattr(pp, "CHUNK", len(images))
    whole = preprocess(images, spec)
    assert chunked.shape == whole.shape == (len(images), 32, 32, 3) and chunked.dtype == np.float32
    np.testing.assert_array_equal(chunked, whole)
    with pytest.raises(PreprocessError, match="shape"):  # bad input is named whichever path it takes
        preprocess(np.zeros((2500, 8, 8, 2), np.uint8), spec)
