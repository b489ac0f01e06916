"""Backbones, heads, freezing, and splitting a model at the cut point (tf_keras).

A model is ``Input -> backbone (a nested Keras Model named "backbone") -> head``. The backbone is one of the
Keras applications without its top, or ``vgg_small`` (VGG16's block structure with ``width`` x its filters,
no BatchNorm, for CPUs and tests). The backbone is always called with ``training=False`` in fine-tuning
models, so its BatchNorm layers stay in inference mode however many layers are unfrozen (the Keras
transfer-learning recipe); the pretrain stage builds with ``bn_training=True``.

``unfreeze=k`` makes the last k backbone layers trainable, counted like the seed's
``base_model.layers[-k:]`` with the input layer excluded; with ``unfreeze_unit: blocks`` k counts whole blocks
(``backbone_blocks``: VGG's conv blocks, ResNet's residual blocks, MBConv blocks, stem and head), which the
spec turns into the same layer count, so every cut falls on a block boundary. The *cut layer* is the last frozen
backbone layer;
``split_model`` returns the frozen ``trunk`` (input -> cut) and the trainable ``top`` (cut -> softmax) sharing
the same layer objects, so training ``top`` on cached trunk activations trains the full model.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)
from transfuse import storage
from transfuse.config import BACKBONES, ModelConfig
from transfuse.errors import TransfuseError
from transfuse.inference import PreprocessSpec

SPEC_FILE = "model_spec.json"
WEIGHTS_FILE = "model.weights.h5"
BACKBONE_WEIGHTS = "backbone.weights.h5"  # what the pretrain stage writes under <run>/pretrain/

# VGG16's blocks: (convolutions, filters). vgg_small keeps the shape and scales the filters by `width`.
_VGG16_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


@dataclass
class KerasMember:
    """A CNN member loaded in tf_keras: its name, model and model_spec (cut_layer, backbone_layers, preprocess, ...):
    what the compress stage exports and the distill stage's teacher runs."""

    name: str
    model: Any
    spec: dict


class ModelError(TransfuseError, ValueError):
    """A model spec, weights choice or cut point is invalid."""


def _tf() -> Any:
    import tensorflow as tf

    return tf


def vgg_small(input_shape: tuple[int, int, int], width: float) -> Any:
    """VGG16's 5 blocks (13 conv + 5 max-pool layers, same layer names) with ``width`` x the filters."""
    tf = _tf()
    layers = tf.keras.layers
    inp = layers.Input(shape=input_shape, name="input")
    x = inp
    for b, (convs, filters) in enumerate(_VGG16_BLOCKS, start=1):
        f = max(1, int(round(filters * width)))
        for c in range(1, convs + 1):
            # He init: 13 ReLU convolutions without BatchNorm lose the signal under Keras' default Glorot init
            # (a frozen random vgg_small then gives the head constant features; measured: digits loss stuck at
            # 2.3027 after 2 epochs with Glorot, 2.286 with He)
            x = layers.Conv2D(f, 3, padding="same", activation="relu", kernel_initializer="he_normal",
                              name=f"block{b}_conv{c}")(x)
        x = layers.MaxPooling2D(2, strides=2, name=f"block{b}_pool")(x)
    return tf.keras.Model(inp, x, name="vgg_small")


def _application(name: str, input_shape: tuple[int, int, int], weights: Optional[str]) -> Any:
    tf = _tf()
    apps = tf.keras.applications
    ctor = {"vgg16": apps.VGG16, "resnet50": apps.ResNet50, "mobilenet_v2": apps.MobileNetV2,
            "efficientnet_b0": apps.EfficientNetB0}[name]
    return ctor(include_top=False, weights=weights, input_shape=input_shape)


def _local_copy(path: str) -> tuple[str, Optional[str]]:
    """h5 needs a local file: copy a URI to a temporary file (returned second, to delete)."""
    if not storage.is_uri(path):
        if not os.path.isfile(path):
            raise ModelError(f"weights file not found: {path}")
        return path, None
    if not storage.exists(path):
        raise ModelError(f"weights file not found: {path}")
    fd, tmp = tempfile.mkstemp(suffix=".weights.h5")
    with os.fdopen(fd, "wb") as f:
        f.write(storage.read_bytes(path))
    return tmp, tmp


def resolve_weights(weights: str, run_dir: Optional[str] = None) -> Optional[str]:
    """``imagenet`` -> "imagenet"; ``none`` -> None; ``pretrain`` -> <run>/pretrain/backbone.weights.h5; else a path."""
    if weights == "imagenet":
        return "imagenet"
    if weights == "none":
        return None
    if weights == "pretrain":
        if run_dir is None:
            raise ModelError("weights: pretrain needs the run directory (<storage>/<run>) to find pretrain/")
        from transfuse.finetune import PRETRAIN

        path = storage.join(run_dir, PRETRAIN.folder, BACKBONE_WEIGHTS)
        if not storage.exists(path):
            raise ModelError(f"weights: pretrain, but {path} does not exist: run `python -m jobs.pretrain` first")
        return path
    return weights


def build_backbone(backbone: str, input_size: int, width: float = 0.25, weights: Optional[str] = None) -> Any:
    """The backbone without its top. ``weights``: None (random), "imagenet", or a ``.weights.h5`` path."""
    if backbone not in BACKBONES:
        raise ModelError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    shape = (input_size, input_size, 3)
    if backbone == "vgg_small":
        if weights == "imagenet":
            raise ModelError("vgg_small has no ImageNet weights: use weights none, pretrain or a file path")
        net = vgg_small(shape, width)
    elif backbone.startswith("efficientnet_lite"):
        from transfuse.finetune import efficientnet_lite

        torch_file = weights if weights is not None and weights.endswith(".pth") else None
        net = efficientnet_lite.backbone(backbone, shape, "imagenet" if weights == "imagenet" else torch_file)
        if torch_file:
            weights = None  # converted and loaded above
    else:
        net = _application(backbone, shape, "imagenet" if weights == "imagenet" else None)
    if weights not in (None, "imagenet"):
        local, tmp = _local_copy(weights)
        try:
            net.load_weights(local)
        except (ValueError, OSError) as e:
            raise ModelError(f"cannot load backbone weights {weights} into {backbone} "
                             f"(input {input_size}, width {width}): {e}") from None
        finally:
            if tmp:
                os.unlink(tmp)
    net._name = "backbone"  # a fixed name, so every model finds it the same way
    return net


def backbone_layer_names(backbone: Any) -> list[str]:
    """Backbone layers as the seed's ``base_model.layers`` counts them, the input layer excluded."""
    tf = _tf()
    return [l.name for l in backbone.layers if not isinstance(l, tf.keras.layers.InputLayer)]


def cut_layer_for(layer_names: list[str], unfreeze: int) -> Optional[str]:
    """The last frozen backbone layer when the last ``unfreeze`` layers train; None when all of them train."""
    if unfreeze < 0:
        raise ModelError(f"unfreeze must be >= 0, got {unfreeze}")
    if unfreeze >= len(layer_names):
        return None
    return layer_names[len(layer_names) - unfreeze - 1]


# block of a backbone layer, by name: (pattern, block) in order, the first match wins; a layer that matches none
# belongs to the block of the layer before it (the stem when it comes first)
_BLOCK_PATTERNS = (
    (r"^(block\d+[a-z]?)_", r"\1"),  # VGG (block3_conv1), EfficientNet-Lite (block7_dwconv), B0 (block2a_)
    (r"^(conv\d_block\d+)_", r"\1"),  # ResNet50's residual blocks (conv4_block2_out)
    (r"^(block_\d+)_", r"\1"),  # MobileNetV2 (block_5_expand)
    (r"^expanded_conv_", "block_0"),  # MobileNetV2's first inverted residual
    (r"^(stem_|conv1_|pool1_|Conv1|bn_Conv1)", "stem"),
    (r"^(top_|Conv_1|out_relu)", "top"),
)


def backbone_blocks(layer_names: list[str]) -> list[tuple[str, list[str]]]:
    """The backbone's layers grouped into whole blocks, in order: [(block, [layer, ...]), ...]."""
    blocks: list[tuple[str, list[str]]] = []
    for name in layer_names:
        key = next((re.sub(pat + ".*", rep, name) for pat, rep in _BLOCK_PATTERNS if re.match(pat, name)), None)
        if key is None:
            key = blocks[-1][0] if blocks else "stem"
        if blocks and blocks[-1][0] == key:
            blocks[-1][1].append(name)
        elif any(b == key for b, _ in blocks):
            raise ModelError(f"layer {name} belongs to block {key}, which ended earlier: blocks are not contiguous")
        else:
            blocks.append((key, [name]))
    return blocks


def unfreeze_units(mcfg: ModelConfig) -> int:
    """How many units ``model.unfreeze`` can count: backbone layers, or blocks (``model.unfreeze_unit``)."""
    names = layer_names_of(mcfg.backbone, mcfg.input_size, mcfg.width)
    return len(names) if mcfg.unfreeze_unit == "layers" else len(backbone_blocks(names))


def model_spec(mcfg: ModelConfig, num_classes: int, class_names: list[str], seed: int = 0,
               unfreeze: Optional[int] = None) -> dict[str, Any]:
    """The architecture as plain JSON (model_spec.json): enough to rebuild the model without running code.

    ``unfreeze`` (default ``mcfg.unfreeze``) counts ``mcfg.unfreeze_unit``; the spec's ``unfreeze`` is always the
    number of backbone layers it makes trainable (with ``unfreeze_blocks`` and the block names beside it)."""
    unfreeze = mcfg.unfreeze if unfreeze is None else unfreeze
    names = layer_names_of(mcfg.backbone, mcfg.input_size, mcfg.width)
    extra: dict[str, Any] = {"unfreeze_unit": mcfg.unfreeze_unit}
    if mcfg.unfreeze_unit == "blocks":
        blocks = backbone_blocks(names)
        if unfreeze > len(blocks):
            raise ModelError(f"model.unfreeze = {unfreeze} blocks, but {mcfg.backbone} has only {len(blocks)} blocks "
                             f"({blocks[0][0]} .. {blocks[-1][0]}); allowed: 0..{len(blocks)}")
        chosen = blocks[len(blocks) - unfreeze:] if unfreeze else []
        extra.update(unfreeze_blocks=unfreeze, trainable_blocks=[b for b, _ in chosen])
        unfreeze = sum(len(layers) for _, layers in chosen)
    elif unfreeze > len(names):
        raise ModelError(f"model.unfreeze = {unfreeze}, but {mcfg.backbone} has only {len(names)} backbone layers "
                         f"(input excluded); allowed: 0..{len(names)}")
    return {
        "backbone": mcfg.backbone, "width": mcfg.width, "input_size": mcfg.input_size,
        "head": mcfg.head.model_dump(mode="json"), "unfreeze": unfreeze, "num_classes": int(num_classes),
        "class_names": list(class_names),
        "preprocess": PreprocessSpec.for_model(mcfg.backbone, mcfg.input_size).to_dict(),
        "cut_layer": cut_layer_for(names, unfreeze), "backbone_layers": names, "seed": seed, **extra,
    }


_NAMES_CACHE: dict[tuple[str, int, float], list[str]] = {}


def layer_names_of(backbone: str, input_size: int, width: float) -> list[str]:
    key = (backbone, input_size, width if backbone == "vgg_small" else 0.0)
    if key not in _NAMES_CACHE:
        _NAMES_CACHE[key] = backbone_layer_names(build_backbone(backbone, input_size, width, None))
    return _NAMES_CACHE[key]


def build_model(spec: dict[str, Any], weights: Optional[str] = None, *, bn_training: bool = False,
                backbone: Any = None) -> Any:
    """Input -> backbone -> head, from a model spec. ``weights`` as in ``build_backbone`` (backbone only).

    The head: pooling (flatten | avg) -> [Dense(relu) -> Dropout] per ``head.dense`` -> Dense(classes) ->
    softmax in float32 (so mixed precision keeps a float32 output).
    """
    tf = _tf()
    layers = tf.keras.layers
    if backbone is None and spec["backbone"].startswith("efficientnet_lite") and weights is not None \
            and (weights == "imagenet" or weights.endswith(".pth")):
        from transfuse.finetune import efficientnet_lite

        # convert (once; cached) before seeding: the conversion builds a model of its own, and the random draws
        # it takes shifted the head's initial weights, so the run that converted differed from every later one
        # (the default's fine-tune: 0.904 vs 0.9085 test accuracy, same config and seed)
        efficientnet_lite.imagenet_weights(spec["backbone"], None if weights == "imagenet" else weights)
    if spec.get("seed") is not None:
        tf.keras.utils.set_random_seed(int(spec["seed"]))  # same spec + seed -> same initial weights
    net = backbone if backbone is not None else build_backbone(spec["backbone"], spec["input_size"],
                                                               spec.get("width", 0.25), weights)
    if bn_training:
        # short from-scratch runs (a few hundred steps): Keras' default 0.99 would leave the moving statistics
        # mostly at their initial values, and inference would use those
        for layer in net.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = min(layer.momentum, 0.9)
    inp = layers.Input(shape=(spec["input_size"], spec["input_size"], 3), name="image")
    x = net(inp, training=None if bn_training else False)
    for layer in head_layers(spec):
        x = layer(x)
    model = tf.keras.Model(inp, x, name=f"{spec['backbone']}_transfer")
    if not bn_training:
        set_unfreeze(model, spec.get("unfreeze", 0))
    return model


def head_layers(spec: dict[str, Any]) -> list[Any]:
    """Fresh head layers in order (named head_*: ``split_model`` and ``embedding_model`` find them by name)."""
    tf = _tf()
    layers = tf.keras.layers
    head = spec["head"]
    out = [layers.Flatten(name="head_pool") if head.get("pooling", "flatten") == "flatten"
           else layers.GlobalAveragePooling2D(name="head_pool")]
    for i, units in enumerate(head.get("dense", [])):
        out.append(layers.Dense(int(units), activation="relu", name=f"head_dense{i}"))
        if head.get("dropout", 0.0) > 0:
            out.append(layers.Dropout(float(head["dropout"]), name=f"head_dropout{i}"))
    out.append(layers.Dense(int(spec["num_classes"]), name="head_logits"))
    out.append(layers.Activation("softmax", dtype="float32", name="head_out"))
    return out


def get_backbone(model: Any) -> Any:
    return model.get_layer("backbone")


def head_of(model: Any) -> list[Any]:
    """The member's head (``head_*`` layers) in order, above the backbone."""
    return [l for l in model.layers if l.name.startswith("head_")]


def embedding_layer_name(model: Any) -> str:
    """The layer whose output is a member's embedding (what the scikit-learn members read): the head's last
    hidden Dense, or the pooled features when the head has none."""
    dense = [l.name for l in head_of(model) if l.name.startswith("head_dense")]
    return dense[-1] if dense else "head_pool"


def set_unfreeze(model: Any, k: int) -> list[str]:
    """Make exactly the last ``k`` backbone layers (input excluded) trainable, the head always. Returns their names.

    Recompile afterwards: Keras fixes the trainable set at compile time.
    """
    tf = _tf()
    net = get_backbone(model)
    layers = [l for l in net.layers if not isinstance(l, tf.keras.layers.InputLayer)]
    if not 0 <= k <= len(layers):
        raise ModelError(f"unfreeze must be in 0..{len(layers)} for this backbone, got {k}")
    chosen = set(id(l) for l in layers[len(layers) - k:]) if k else set()
    net.trainable = True  # the setter cascades to every sublayer; then narrow it down layer by layer
    for l in layers:
        l.trainable = id(l) in chosen
    if k == 0:
        net.trainable = False
    for l in head_of(model):
        l.trainable = True
    return [l.name for l in layers if id(l) in chosen]


def trunk_model(model: Any, cut_layer: Optional[str]) -> Optional[Any]:
    """Input image -> activations at ``cut_layer`` (None when nothing is frozen)."""
    if cut_layer is None:
        return None
    tf = _tf()
    net = get_backbone(model)
    return tf.keras.Model(net.input, net.get_layer(cut_layer).output, name=f"trunk_{cut_layer}")


def split_model(model: Any, cut_layer: Optional[str]) -> tuple[Optional[Any], Any]:
    """(trunk, top): trunk maps images to the cut layer's output; top maps that to probabilities.

    Both share layer objects (and so weights) with ``model``. Raises ModelError when the backbone's graph
    after the cut needs tensors from before it (e.g. a cut inside a ResNet block, where a residual branch
    skips over the cut layer): such a cut is not a single tensor and cannot be cached.
    """
    tf = _tf()
    if cut_layer is None:
        return None, model
    net = get_backbone(model)
    try:
        cut = net.get_layer(cut_layer)
    except ValueError:
        raise ModelError(f"cut layer {cut_layer!r} is not a layer of backbone {net.name}") from None
    names = backbone_layer_names(net)
    inp = tf.keras.layers.Input(shape=tuple(cut.output.shape[1:]), name="cut_input")
    x = inp
    if cut_layer != names[-1]:
        try:
            rest = tf.keras.Model(cut.output, net.output, name="backbone_top")
        except ValueError as e:
            raise ModelError(
                f"cannot cut {net.name} at {cut_layer!r}: the layers above it also need tensors from below it "
                f"(a cut inside a residual/branching block is not a single tensor). Choose an unfreeze depth "
                f"whose cut falls between blocks. ({str(e).splitlines()[0][:200]})") from None
        # every layer above the cut must be inside `rest`, else the cut skipped part of the graph
        inside = {l.name for l in rest.layers}
        missing = [n for n in names[names.index(cut_layer) + 1:] if n not in inside]
        if missing:
            raise ModelError(f"cannot cut {net.name} at {cut_layer!r}: layers {missing[:5]} above it are not "
                             "reachable from its output alone (the cut is not a single tensor)")
        x = rest(x, training=False)
    for layer in head_of(model):
        x = layer(x)
    trunk = tf.keras.Model(net.input, cut.output, name="trunk")
    return trunk, tf.keras.Model(inp, x, name="top")


def embedding_model(model: Any) -> Any:
    """Image -> penultimate-layer output (the last hidden Dense; the pooled features when the head has none)."""
    tf = _tf()
    return tf.keras.Model(model.input, model.get_layer(embedding_layer_name(model)).output, name="embedding")


def weights_digest(model: Any) -> str:
    """sha256 over a model's weight arrays (a content key that does not depend on file bytes)."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(str(w.shape).encode())
        h.update(w.tobytes())
    return h.hexdigest()[:16]


def save_member(model: Any, spec: dict[str, Any], out_dir: str) -> None:
    """model_spec.json + model.weights.h5 into ``out_dir`` (local or URI)."""
    storage.write_json(storage.join(out_dir, SPEC_FILE), spec)
    save_weights(model, storage.join(out_dir, WEIGHTS_FILE))


def save_weights(model: Any, path: str) -> None:
    if storage.is_uri(path):
        with tempfile.TemporaryDirectory() as d:
            local = os.path.join(d, "w.weights.h5")
            model.save_weights(local)
            with open(local, "rb") as f:
                storage.write_bytes(path, f.read())
    else:
        storage.makedirs(os.path.dirname(path))
        model.save_weights(path)


def load_weights(model: Any, path: str) -> None:
    local, tmp = _local_copy(path)
    try:
        model.load_weights(local)
    finally:
        if tmp:
            os.unlink(tmp)


def load_member(member_dir: str) -> tuple[Any, dict[str, Any]]:
    """Rebuild a fine-tuned model from model_spec.json and load model.weights.h5 (no code from files)."""
    spec_path = storage.join(member_dir, SPEC_FILE)
    if not storage.exists(spec_path):
        raise ModelError(f"no {SPEC_FILE} in {member_dir}: not a member directory")
    spec = storage.read_json(spec_path)
    model = build_model(spec, None)
    load_weights(model, storage.join(member_dir, WEIGHTS_FILE))
    return model, spec
