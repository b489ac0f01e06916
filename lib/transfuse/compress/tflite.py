"""A member's Keras graph to TFLite, with the frozen trunk the members share exported once.

- Shared trunk: members fine-tuned from the same backbone share the frozen layers below the lowest cut. The
  trunk (image -> activations at that layer) is exported once and each member's top (activations -> logits,
  embedding) separately, so a request runs the trunk once. Sharing is checked on the weights, never assumed.
- Quantization: the TFLite converter, run with LiteRT: float32, float16, dynamic-range int8 and full-integer
  int8 (a representative dataset from the train split, preprocessed with the one preprocessing function;
  float input/output, int8 inside).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)
from transfuse.errors import TransfuseError
from transfuse.finetune import KerasMember

log = logging.getLogger(__name__)

QUANT_MODES = ("float32", "float16", "dynamic_int8", "int8")


class CompressError(TransfuseError, ValueError):
    """Members cannot be compressed or exported as asked."""


def _same_weights(models_: list[Any], layer_name: str) -> bool:
    from transfuse import finetune

    ws = [finetune.get_backbone(m).get_layer(layer_name).get_weights() for m in models_]
    return all(len(w) == len(ws[0]) and all(np.array_equal(a, b) for a, b in zip(w, ws[0])) for w in ws[1:])


def shared_cut(members: list[KerasMember]) -> Optional[str]:
    """The deepest backbone layer frozen in every member with identical weights up to it; None if none.

    Members must share the backbone, its input size and width; sharing is checked on the weights, so two
    members pretrained differently share nothing.
    """
    if not members:
        return None
    keys = {(m.spec["backbone"], m.spec["input_size"], m.spec.get("width")) for m in members}
    layers = members[0].spec["backbone_layers"]
    if len(keys) != 1 or any(m.spec["backbone_layers"] != layers for m in members):
        return None
    if any(m.spec.get("cut_layer") is None for m in members):
        return None
    j = min(layers.index(m.spec["cut_layer"]) for m in members)
    models_ = [m.model for m in members]
    last = None
    for i in range(j + 1):
        if not _same_weights(models_, layers[i]):
            break
        last = i
    return None if last is None else layers[last]


def member_graph(model: Any, cut_layer: Optional[str], name: str = "top") -> tuple[Optional[Any], Any]:
    """(trunk, top) Keras models for export: trunk = image -> cut activations (None when ``cut_layer`` is None);
    top = cut activations (or the image) -> outputs ``embedding`` (the last hidden Dense, what the sklearn members
    read) and ``logits`` (pre-softmax; the bundle applies softmax in float, which keeps int8 NLL honest)."""
    import tensorflow as tf

    from transfuse import finetune

    L = tf.keras.layers
    net = finetune.get_backbone(model)
    head = finetune.head_of(model)
    if cut_layer is None:
        inp = L.Input(shape=tuple(model.input.shape[1:]), name="image")
        x = net(inp, training=False)
        trunk = None
    else:
        names = finetune.backbone_layer_names(net)
        cut = net.get_layer(cut_layer)
        inp = L.Input(shape=tuple(cut.output.shape[1:]), name="features")
        x = inp
        if cut_layer != names[-1]:
            try:
                rest = tf.keras.Model(cut.output, net.output, name="backbone_top")
            except ValueError as e:
                raise CompressError(f"cannot cut the backbone at {cut_layer!r}: not a single tensor ({e})") from None
            x = rest(x, training=False)
        trunk = tf.keras.Model(net.input, cut.output, name="trunk")
    emb_name = finetune.embedding_layer_name(model)
    emb = logits = None
    for layer in head:
        if layer.name == "head_out":
            break
        x = layer(x, training=False) if layer.name.startswith("head_dropout") else layer(x)
        if layer.name == emb_name:
            emb = x
        if layer.name == "head_logits":
            logits = x
    if emb is None or logits is None:
        raise CompressError(f"model {model.name} has no head_logits / {emb_name} layer (not a transfuse member)")
    top = tf.keras.Model(inp, [L.Activation("linear", name="embedding")(emb), L.Activation("linear", name="logits")(logits)],
                         name=name)
    return trunk, top


def to_tflite(model: Any, mode: str, representative: Optional[np.ndarray] = None) -> bytes:
    """Convert a tf_keras model with the TFLite converter: float32, float16, dynamic_int8 or int8 (full integer
    inside, float input/output; ``representative``: model inputs for calibration)."""
    import tensorflow as tf

    if mode not in QUANT_MODES:
        raise CompressError(f"quantization mode must be one of {QUANT_MODES}, got {mode!r}")
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode == "float16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif mode == "dynamic_int8":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    elif mode == "int8":
        if representative is None or len(representative) == 0:
            raise CompressError("int8 quantization needs a representative dataset (train examples)")
        rep = np.asarray(representative, dtype=np.float32)

        def gen():
            for i in range(len(rep)):
                yield [rep[i:i + 1]]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = gen
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return conv.convert()


@dataclass
class Exported:
    """The TFLite files of one variant: the trunk (or None) and each member's top, by member name; or, merged,
    one graph image -> every member's outputs ``m<i>_logits``, ``m<i>_embedding`` (``merged``; ``tops`` empty)."""

    mode: str
    cut_layer: Optional[str]
    trunk: Optional[bytes]
    tops: dict[str, bytes] = field(default_factory=dict)
    merged: Optional[bytes] = None


def merged_graph(members: list[KerasMember], cut_layer: Optional[str]) -> Any:
    """One Keras model: image -> the shared trunk (once) -> every member's top. Outputs, in member order:
    ``m<i>_embedding`` and ``m<i>_logits``."""
    import tensorflow as tf

    L = tf.keras.layers
    inp = L.Input(shape=tuple(members[0].model.input.shape[1:]), name="image")
    trunk, _ = member_graph(members[0].model, cut_layer)
    feats = trunk(inp, training=False) if trunk is not None else inp
    outs = []
    for i, m in enumerate(members):
        emb, logits = member_graph(m.model, cut_layer, name=f"top_{i}")[1](feats, training=False)
        outs += [L.Activation("linear", name=f"m{i}_embedding")(emb),
                 L.Activation("linear", name=f"m{i}_logits")(logits)]
    return tf.keras.Model(inp, outs, name="members")


def export_members(members: list[KerasMember], mode: str, representative: Optional[np.ndarray] = None,
                   share_trunk: bool = True, merge: bool = False) -> Exported:
    """Export the members as one shared trunk + tops (or whole models when nothing is shared, or when there is one
    member: a split buys nothing then and costs a second interpreter call per request). ``merge``: one graph for
    every member instead (the trunk still runs once inside it), so a request makes one interpreter call.

    ``representative``: preprocessed train images (int8 calibration); tops calibrate on the float trunk's output.
    """
    cut = shared_cut(members) if share_trunk and len(members) > 1 else None
    out = Exported(mode=mode, cut_layer=cut, trunk=None)
    if merge and len(members) > 1:
        out.merged = to_tflite(merged_graph(members, cut), mode, representative)
        log.info("exported %d members (%s) as one graph, shared trunk up to %s", len(members), mode, cut)
        return out
    feats = None
    for i, m in enumerate(members):
        trunk, top = member_graph(m.model, cut)
        if i == 0 and trunk is not None:
            out.trunk = to_tflite(trunk, mode, representative)
            if representative is not None:
                feats = trunk.predict(representative, batch_size=64, verbose=0)
        out.tops[m.name] = to_tflite(top, mode, feats if trunk is not None else representative)
    log.info("exported %d members (%s), shared trunk up to %s", len(members), mode, cut)
    return out


def representative_raw(images: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` train images drawn at random (seeded), as prepared (what a client sends); through ``preprocess``
    they are the int8 calibration set, as they are the sklearn rewrites' probe."""
    rng = np.random.default_rng(seed)
    return images[np.sort(rng.choice(len(images), size=min(n, len(images)), replace=False))]
