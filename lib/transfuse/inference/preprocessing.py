"""The one preprocessing function, shared by training (Ray Data ``map_batches``) and serving.

Numpy only, so a Serve replica and a Ray Data worker run it without TensorFlow. Input: a batch of images as
uint8 (0..255) or float in [0, 1], shaped N x H x W, N x H x W x 1 or N x H x W x 3. Output: float32
N x S x S x 3 in the backbone's own input normalisation. ``pixel_features`` is the second view (the image's own
pixels in [0, 1]) that pixel-reading scikit-learn members get, in training and serving alike.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from transfuse.errors import TransfuseError

# Keras applications' "caffe" mode (VGG16, ResNet50): RGB -> BGR, subtract the ImageNet channel means.
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)

NORMALIZATION = {
    "vgg16": "caffe",
    "resnet50": "caffe",
    "mobilenet_v2": "tf",  # x / 127.5 - 1
    "efficientnet_b0": "raw",  # the Keras model rescales internally; it takes 0..255
    # EfficientNet-Lite's ImageNet weights were trained on (x - 127) / 128 (ImageNet mean/std normalisation
    # classified the sample photos worse)
    "efficientnet_lite0": "lite", "efficientnet_lite1": "lite", "efficientnet_lite2": "lite",
    "vgg_small": "unit",  # x / 255
}


class PreprocessError(TransfuseError, ValueError):
    """Images of a shape, dtype or normalization the one preprocessing function does not take."""


@dataclass(frozen=True)
class PreprocessSpec:
    input_size: int
    normalization: str  # caffe | tf | raw | unit | lite

    @classmethod
    def for_model(cls, backbone: str, input_size: int) -> "PreprocessSpec":
        return cls(input_size=input_size, normalization=NORMALIZATION[backbone])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_nhwc_uint8_range(images: np.ndarray) -> np.ndarray:
    """float32 N x H x W x C (C = 1 for grey, 3 for RGB) in 0..255, from uint8 or [0, 1] floats."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise PreprocessError(f"images must be N x H x W, N x H x W x 1 or N x H x W x 3, got shape {x.shape}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32)
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32) * 255.0
    else:
        raise PreprocessError(f"images must be uint8 (0..255) or float in [0, 1], got dtype {x.dtype}")
    return x


@functools.lru_cache(maxsize=64)
def _interpolation_matrix(src: int, size: int) -> np.ndarray:
    """size x src weights of 1-D linear interpolation with half-pixel centres (as tf.image.resize, no antialias)."""
    pos = (np.arange(size, dtype=np.float32) + 0.5) * (src / size) - 0.5
    pos = np.clip(pos, 0, src - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, src - 1)
    w = (pos - lo).astype(np.float32)
    m = np.zeros((size, src), dtype=np.float32)
    np.add.at(m, (np.arange(size), lo), 1.0 - w)
    np.add.at(m, (np.arange(size), hi), w)
    m.setflags(write=False)
    return m


def resize_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of N x H x W x C float32 to N x size x size x C (half-pixel centres, as tf.image): two small
    matrix products per image (rows, then columns), ~10x faster at batch 1 than gathering pixel by pixel."""
    n, h, w, c = x.shape
    if h == size and w == size:
        return x
    rows, cols = _interpolation_matrix(h, size), _interpolation_matrix(w, size)
    out = np.matmul(np.matmul(rows, x.transpose(0, 3, 1, 2)), cols.T)  # N x C x size x size
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1))


def normalize(x: np.ndarray, mode: str) -> np.ndarray:
    if mode == "caffe":
        return x[..., ::-1] - _CAFFE_MEAN_BGR
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "raw":
        return x
    if mode == "unit":
        return x / 255.0
    if mode == "lite":
        return (x - 127.0) / 128.0
    raise PreprocessError(f"unknown normalization {mode!r}; allowed: caffe, tf, raw, unit, lite")


def pixel_features(images: np.ndarray, size: Optional[int] = None) -> np.ndarray:
    """Images -> N x (S * S * C) float32 in [0, 1]: the pixel view that scikit-learn members with
    ``features: pixels`` read, in training (the ensemble stage) and in serving (the bundle) alike. Grey stays one
    channel; ``size``: bilinear resize to size x size first (None: as given)."""
    x = _as_nhwc_uint8_range(images)
    if size is not None:
        x = resize_bilinear(x, int(size))
    return np.ascontiguousarray((x / 255.0).reshape(len(x), -1), dtype=np.float32)


def augment(x: np.ndarray, rng: np.random.Generator, flip: bool, pad_crop: int) -> np.ndarray:
    """Random horizontal flip and pad-and-crop, per image (on 0..255 floats, before normalisation)."""
    if flip:
        mask = rng.random(len(x)) < 0.5
        x = x.copy()
        x[mask] = x[mask, :, ::-1]
    if pad_crop:
        n, h, w, _ = x.shape
        padded = np.pad(x, ((0, 0), (pad_crop, pad_crop), (pad_crop, pad_crop), (0, 0)), mode="reflect")
        dy = rng.integers(0, 2 * pad_crop + 1, n)
        dx = rng.integers(0, 2 * pad_crop + 1, n)
        x = np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    return x


CHUNK = 1024  # images per chunk in preprocess without augmentation


def preprocess(
    images: np.ndarray,
    spec: PreprocessSpec,
    *,
    rng: Optional[np.random.Generator] = None,
    flip: bool = False,
    pad_crop: int = 0,
) -> np.ndarray:
    """Images -> the backbone's float32 input. Augmentation only when ``rng`` is given (training).

    Without augmentation, more than ``CHUNK`` images go through in chunks written into one output array: the same
    values, but the float intermediates (up to 3x the output, as float32 before the grey -> RGB repeat) are a
    chunk's, not the whole split's (the small-data training path preprocesses a whole split at once)."""
    if rng is None and len(images) > CHUNK:
        images = np.asarray(images)
        out = np.empty((len(images), spec.input_size, spec.input_size, 3), np.float32)
        for i in range(0, len(images), CHUNK):
            out[i:i + CHUNK] = preprocess(images[i:i + CHUNK], spec)
        return out
    x = _as_nhwc_uint8_range(images)
    if rng is not None and (flip or pad_crop):
        x = augment(x, rng, flip, pad_crop)
    x = resize_bilinear(x, spec.input_size)
    if x.shape[-1] == 1 and spec.normalization == "caffe":  # a mean per channel: RGB before normalizing
        x = np.repeat(x, 3, axis=-1)
    x = np.ascontiguousarray(normalize(x, spec.normalization), dtype=np.float32)
    # grey -> RGB last for the per-pixel normalizations: the same values, a third of the work before it
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x
