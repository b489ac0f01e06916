"""Prune and quantize the ensemble's CNN members, export a shared trunk once, and measure every variant.

- Pruning: TensorFlow Model Optimization magnitude pruning (tf_keras only) of a member's Conv2D/Dense kernels
  (scope ``trainable``: only the layers the member fine-tuned, so the frozen shared trunk stays dense and shared;
  ``all``: every layer), a short fine-tune at the target sparsity, ``strip_pruning``, then the sparsity reached
  is MEASURED per pruned layer and a layer short of the target raises ``PruningError`` (TFMOT's schedules prune
  nothing on short runs unless ``frequency`` is low: such a run must fail, not pass). Every configured sparsity
  is its own variant (``pruned50``, ``pruned80_int8``, ...).
- Quantization: the TFLite converter, run with LiteRT: float32, float16, dynamic-range int8 and full-integer
  int8 (a representative dataset from the train split, preprocessed with the one preprocessing function;
  float input/output, int8 inside).
- Shared trunk: members fine-tuned from the same backbone share the frozen layers below the lowest cut. The
  trunk (image -> activations at that layer) is exported once and each member's top (activations -> logits,
  embedding) separately, so a request runs the trunk once. Sharing is checked on the weights, never assumed.
- Dead members: a member whose stacker columns are all exactly zero (the log-linear pool gives w_m = 0 to
  members that do not help) cannot change a prediction, so no variant carries it (``drop_zero_weight_members``):
  lossless, and it shrinks float32 and int8 alike.
- Variant table: each variant is written as a full bundle, loaded back with ``load_bundle`` and measured:
  file size raw and gzip, latency at batch 1 (p50, p99), throughput at batch 32, test accuracy / NLL / ECE.
"""

from __future__ import annotations

import gzip
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import numpy as np

from transfuse import runtime  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)
from transfuse import metrics as _metrics
from transfuse import stacking
from transfuse.bundle import (CNNMember, SklearnMember, Stacker, example_images, load_bundle, softmax,
                              write_bundle)
from transfuse.config import GoalsConfig, expand_variants
from transfuse.errors import TransfuseError
from transfuse.preprocess import PreprocessSpec, preprocess

log = logging.getLogger(__name__)

VARIANTS = ("float32", "pruned", "int8", "pruned_int8", "float16", "dynamic_int8")  # kinds (config.variants)
QUANT_MODES = ("float32", "float16", "dynamic_int8", "int8")
# what TFMOT's magnitude pruning prunes, and the weight it prunes (its prune_registry). It registers
# DepthwiseConv2D with no weight to prune: EfficientNet-Lite's and MobileNetV2's depthwise kernels stay dense,
# and counting them here made every such member fail the sparsity check (0.1-0.5 % zeros).
PRUNED_WEIGHT = {"Conv2D": "kernel", "Dense": "kernel", "SeparableConv2D": "pointwise_kernel"}
PRUNABLE = tuple(PRUNED_WEIGHT)
PRUNE_SCOPES = ("trainable", "all")


class PruningError(TransfuseError, RuntimeError):
    """Pruning did not reach the target sparsity on some layer."""


class CompressError(TransfuseError, ValueError):
    """Members cannot be compressed or exported as asked."""


def _tf() -> Any:
    import tensorflow as tf

    return tf


@dataclass
class Member:
    """A CNN member: its tf_keras model and its model_spec (cut_layer, backbone_layers, preprocess, ...)."""

    name: str
    model: Any
    spec: dict


# --------------------------------------------------------------------------------------------- pruning
def _prunable(layer: Any) -> bool:
    return type(layer).__name__ in PRUNABLE


def _kernel(layer: Any) -> Optional[np.ndarray]:
    w = getattr(layer, PRUNED_WEIGHT[type(layer).__name__], None)
    return None if w is None else np.asarray(w.numpy())


def _walk(model: Any) -> list[Any]:
    """Every leaf layer, nested models included (in order)."""
    out = []
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            out.extend(_walk(layer))
        else:
            out.append(layer)
    return out


def measure_sparsity(model: Any, layers: Optional[set[str]] = None) -> dict[str, float]:
    """Fraction of exactly-zero kernel weights per prunable layer (nested backbones included; only ``layers`` when
    given)."""
    out = {}
    for layer in _walk(model):
        if _prunable(layer) and (layers is None or layer.name in layers):
            k = _kernel(layer)
            if k is not None:
                out[layer.name] = float(np.mean(k == 0.0))
    return out


def check_sparsity(sparsity: dict[str, float], target: float, tolerance: float) -> None:
    """Raise PruningError naming every prunable layer below ``target - tolerance``."""
    if not sparsity:
        raise PruningError("no prunable layers (Conv2D/Dense) found: nothing was pruned")
    short = {k: round(v, 4) for k, v in sparsity.items() if v < target - tolerance}
    if short:
        raise PruningError(
            f"pruning did not reach the target sparsity {target} (tolerance {tolerance}) on {len(short)} of "
            f"{len(sparsity)} layers: {short}. The schedule pruned too little: lower compress.prune_frequency "
            f"(steps between mask updates) or raise compress.prune_epochs so a mask update happens at the target")
    log.info("sparsity reached: %s", {k: round(v, 3) for k, v in sparsity.items()})


def _copy_model(model: Any) -> Any:
    """A tf_keras model with fresh layers, the same weights and the same trainable flags (nested included)."""
    tf = _tf()
    c = tf.keras.models.clone_model(model)
    c.set_weights(model.get_weights())
    for a, b in zip(_walk(model), _walk(c)):
        b.trainable = a.trainable
    for a, b in zip(model.layers, c.layers):  # nested models: their own flag, after their layers'
        if hasattr(a, "layers"):
            b.trainable = a.trainable
            for x, y in zip(_walk(a), _walk(b)):
                y.trainable = x.trainable
    return c


def prune_layers(model: Any, scope: str) -> list[str]:
    """Names of the prunable layers of a member in ``scope``: ``trainable`` (what the member fine-tuned: backbone
    layers above its cut and the head) or ``all``."""
    if scope not in PRUNE_SCOPES:
        raise CompressError(f"compress.prune_scope must be one of {PRUNE_SCOPES}, got {scope!r}")
    return [l.name for l in _walk(model) if _prunable(l) and (scope == "all" or l.trainable)]


def _wrap_for_pruning(model: Any, names: set[str], sched: Any) -> Any:
    """A clone of a functional model whose layers in ``names`` are wrapped by TFMOT (the others are the same
    layer objects, as TFMOT itself does)."""
    import tensorflow_model_optimization as tfmot

    tf = _tf()

    def wrap(layer: Any) -> Any:
        if layer.name in names:
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=sched)
        return layer

    return tf.keras.models.clone_model(model, clone_function=wrap)


def make_schedule(kind: str, target: float, steps: int, frequency: int, ramp: float = 1.0) -> Any:
    """A TFMOT sparsity schedule that reaches ``target`` within ``steps`` optimizer steps.

    constant: prune to the target at step 0 and keep the mask (the fine-tune repairs the damage).
    polynomial: ramp from 0 to the target over the first ``ramp`` fraction of the steps (the rest trains at the
    target); its last mask update lands on a multiple of ``frequency``.
    """
    import tensorflow_model_optimization as tfmot

    sp = tfmot.sparsity.keras
    if kind == "constant":
        return sp.ConstantSparsity(target, begin_step=0, frequency=frequency)
    if kind == "polynomial":
        end = ((max(1, int(round(steps * ramp))) - 1) // frequency) * frequency
        if end <= 0:
            raise CompressError(f"compress.prune_frequency = {frequency} leaves no mask update after step 0 in a "
                                f"fine-tune of {steps} steps; allowed: a frequency < {steps}, or more prune_epochs")
        return sp.PolynomialDecay(initial_sparsity=0.0, final_sparsity=target, begin_step=0, end_step=end,
                                  frequency=frequency)
    raise CompressError(f"compress.prune_schedule must be 'constant' or 'polynomial', got {kind!r}")


def prune_member(
    member: Member,
    x: np.ndarray,
    y: np.ndarray,
    *,
    sparsity: float,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 3e-4,
    schedule: str = "constant",
    frequency: int = 10,
    tolerance: float = 0.02,
    schedule_obj: Any = None,
    scope: str = "trainable",
    distill: bool = True,
    ramp: float = 1.0,
) -> tuple[Member, dict[str, float]]:
    """Magnitude-prune the Conv2D/Dense kernels in ``scope`` to ``sparsity``, fine-tune, strip, measure. Returns
    the pruned member (same architecture) and the sparsity reached per pruned layer.

    ``x``: preprocessed train images; ``y``: int labels. ``scope="trainable"`` prunes only the layers the member
    fine-tuned and leaves its frozen layers dense and untouched, so the pruned members still share the float
    members' trunk; ``"all"`` also prunes frozen layers (their masks depend only on their identical weights, so
    members keep sharing a (pruned) trunk). Frozen layers stay frozen either way. The nested backbone is wrapped
    as its own functional model, since TFMOT does not descend into nested models.

    ``distill``: the fine-tune fits the float member's embedding (relative MSE) and a 50/50 mix of the labels and
    the float member's probabilities, instead of the labels alone: the sklearn members and the stacker were fitted
    on the float member's embedding and probabilities, and few labels alone cannot repair a pruned member.
    """
    import tensorflow_model_optimization as tfmot

    from transfuse import models

    tf = _tf()
    sp = tfmot.sparsity.keras
    steps = int(np.ceil(len(x) / batch_size)) * epochs
    sched = schedule_obj if schedule_obj is not None else make_schedule(schedule, sparsity, steps, frequency, ramp)
    # TFMOT wraps the model's own layer objects and writes the masks into their kernels: prune a copy, so the
    # member (and every variant exported from it afterwards) stays intact.
    src = _copy_model(member.model)
    names = set(prune_layers(src, scope))
    if not names:
        raise PruningError(f"member {member.name}: no prunable (Conv2D/Dense) layer in scope {scope!r}: nothing "
                           f"would be pruned")
    net = models.get_backbone(src)
    p_net = _wrap_for_pruning(net, names, sched)
    head = [l for l in src.layers if l.name.startswith("head_")]
    h_in = tf.keras.layers.Input(shape=tuple(net.output.shape[1:]), name="head_in")
    dense = [l.name for l in head if l.name.startswith("head_dense")]
    emb_name = dense[-1] if dense else "head_pool"  # what the sklearn members read (as in member_graph)
    h, emb = h_in, None
    for layer in head:
        h = layer(h)
        if layer.name == emb_name:
            emb = h
    p_head = _wrap_for_pruning(tf.keras.Model(h_in, [emb, h] if distill else h, name="head"), names, sched)
    inp = tf.keras.layers.Input(shape=tuple(src.input.shape[1:]), name="image")
    # training follows fit(): the pruning wrappers update their masks only in training mode. Frozen BatchNorm
    # layers (trainable=False) run in inference mode regardless.
    full = tf.keras.Model(inp, p_head(p_net(inp)))
    opt = tf.keras.optimizers.Adam(lr)
    if distill:
        t_emb = models.embedding_model(member.model).predict(x, batch_size=256, verbose=0)
        t_prob = member.model.predict(x, batch_size=256, verbose=0)
        target = 0.5 * np.eye(t_prob.shape[1], dtype=np.float32)[np.asarray(y)] + 0.5 * t_prob
        w_emb = 1.0 / max(float(np.mean(t_emb ** 2)), 1e-8)  # relative MSE: ~1 for an embedding of the wrong scale
        full.compile(optimizer=opt, loss=["mse", "categorical_crossentropy"], loss_weights=[w_emb, 1.0])
        full.fit(x, [t_emb, target], batch_size=batch_size, epochs=epochs, verbose=0, shuffle=True,
                 callbacks=[sp.UpdatePruningStep()])
    else:
        full.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        full.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, shuffle=True,
                 callbacks=[sp.UpdatePruningStep()])
    s_net, s_head = sp.strip_pruning(p_net), sp.strip_pruning(p_head)
    s_net._name = "backbone"  # transfuse.models finds the backbone by this name
    z = inp2 = tf.keras.layers.Input(shape=tuple(src.input.shape[1:]), name="image")
    z = s_net(z, training=False)
    for layer in s_head.layers:  # the head is a chain (the embedding output is an intermediate of it)
        if not isinstance(layer, tf.keras.layers.InputLayer):
            z = layer(z)
    joined = tf.keras.Model(inp2, z, name=f"{src.name}_pruned")
    # The stripped layers also belong to the pruning graphs (two inbound nodes each), so ``layer.output`` is
    # ambiguous and graphs cut at a layer would reach back into the pruning model: clone into fresh layers.
    pruned = _copy_model(joined)
    measured = measure_sparsity(pruned, names)
    check_sparsity(measured, sparsity, tolerance)
    return Member(member.name, pruned, member.spec), measured


# --------------------------------------------------------------------------------------------- shared trunk
def _same_weights(models_: list[Any], layer_name: str) -> bool:
    from transfuse import models

    ws = [models.get_backbone(m).get_layer(layer_name).get_weights() for m in models_]
    return all(len(w) == len(ws[0]) and all(np.array_equal(a, b) for a, b in zip(w, ws[0])) for w in ws[1:])


def shared_cut(members: list[Member]) -> Optional[str]:
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
    from transfuse import models

    tf = _tf()
    L = tf.keras.layers
    net = models.get_backbone(model)
    head = [l for l in model.layers if l.name.startswith("head_")]
    if cut_layer is None:
        inp = L.Input(shape=tuple(model.input.shape[1:]), name="image")
        x = net(inp, training=False)
        trunk = None
    else:
        names = models.backbone_layer_names(net)
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
    dense = [l.name for l in head if l.name.startswith("head_dense")]
    emb_name = dense[-1] if dense else "head_pool"
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
    tf = _tf()
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


def merged_graph(members: list[Member], cut_layer: Optional[str]) -> Any:
    """One Keras model: image -> the shared trunk (once) -> every member's top. Outputs, in member order:
    ``m<i>_embedding`` and ``m<i>_logits``."""
    tf = _tf()
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


def export_members(members: list[Member], mode: str, representative: Optional[np.ndarray] = None,
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


# --------------------------------------------------------------------------------------------- sklearn ONNX
# Lossless rewrites of the scikit-learn members' ONNX graphs (skl2onnx output). Each is checked by running the old
# and the new graph on the same embeddings; a rewrite whose outputs differ is dropped, never shipped.
def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _set_attrs(node: Any, values: dict[str, Any]) -> None:
    from onnx import helper

    del node.attribute[:]
    for k, v in values.items():
        node.attribute.append(helper.make_attribute(k, v))


def _compact_tree_classifier(node: Any) -> bool:
    """TreeEnsembleClassifier: drop leaf entries of weight 0 (the scores are sums over entries, and a class without
    entries scores 0), hit rates that are all 1 and missing-value flags that are all 0 (both the defaults)."""
    a = _attrs(node)
    if a.get("post_transform", b"NONE") not in (b"NONE", "NONE") or len(a.get("classlabels_int64s", [])) < 3:
        return False  # ORT treats binary classifiers specially: leave them as written
    keep = [i for i, w in enumerate(a["class_weights"]) if w != 0.0]
    changed = len(keep) < len(a["class_weights"])
    for k in ("class_treeids", "class_nodeids", "class_ids", "class_weights"):
        a[k] = [a[k][i] for i in keep]
    if "nodes_hitrates" in a and all(h == 1.0 for h in a["nodes_hitrates"]):
        del a["nodes_hitrates"]
        changed = True
    if "nodes_missing_value_tracks_true" in a and not any(a["nodes_missing_value_tracks_true"]):
        del a["nodes_missing_value_tracks_true"]
        changed = True
    if changed:
        _set_attrs(node, a)
    return changed


def _merge_samme(model: Any) -> bool:
    """skl2onnx's AdaBoost (SAMME) graph runs one TreeEnsembleClassifier per estimator, then ArgMax -> Equal ->
    Where(1, -1/(K-1)) -> Mul(weight) per estimator and a Sum: hundreds of nodes at batch 1. Each estimator's term
    depends only on the leaf reached, so the Sum equals one TreeEnsembleRegressor (aggregate SUM) whose leaf values
    are weight * (1 at the leaf's argmax class, -1/(K-1) elsewhere). Returns True when the pattern was replaced."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    sums = [n for n in g.node if n.op_type == "Sum" and len(n.input) >= 2]
    for total in sums:
        trees, terms = [], []
        for t in total.input:
            mul = prod.get(t)
            if mul is None or mul.op_type != "Mul":
                break
            where = prod.get(mul.input[0])
            w = inits.get(mul.input[1])
            if where is None or where.op_type != "Where" or w is None or w.size != 1:
                break
            eq, sym = prod.get(where.input[0]), inits.get(where.input[2])
            one = prod.get(where.input[1])
            if eq is None or eq.op_type != "Equal" or sym is None or sym.size != 1 or one is None or \
                    one.op_type != "ConstantOfShape" or numpy_helper.to_array(_attrs(one)["value"]).item() != 1.0:
                break
            am, cls = prod.get(eq.input[0]), inits.get(eq.input[1])
            if am is None or am.op_type != "ArgMax" or cls is None or _attrs(am).get("axis", 0) != 1 or \
                    _attrs(am).get("keepdims", 1) != 1 or _attrs(am).get("select_last_index", 0) != 0:
                break
            tree = prod.get(am.input[0])
            if tree is None or tree.op_type != "TreeEnsembleClassifier" or am.input[0] != tree.output[1]:
                break
            ta = _attrs(tree)
            k = len(ta.get("classlabels_int64s", []))
            if ta.get("post_transform", b"NONE") not in (b"NONE", "NONE") or k < 3 or \
                    not np.array_equal(np.asarray(cls).reshape(-1), np.arange(k)) or "base_values" in ta:
                break
            trees.append((tree, ta))
            terms.append((float(w.reshape(-1)[0]), float(sym.reshape(-1)[0]), k, tree.input[0]))
        else:
            if not trees or len({(t[2], t[3]) for t in terms}) != 1:
                continue
            k, x_name = terms[0][2], terms[0][3]
            nodes = {f: [] for f in ("nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_modes",
                                     "nodes_values", "nodes_truenodeids", "nodes_falsenodeids")}
            targets = {f: [] for f in ("target_treeids", "target_nodeids", "target_ids", "target_weights")}
            next_tree = 0
            for (tree, ta), (w, sym, _, _) in zip(trees, terms):
                ids = sorted(set(ta["nodes_treeids"]))
                remap = {t: next_tree + i for i, t in enumerate(ids)}
                next_tree += len(ids)
                for f in nodes:
                    vals = ta[f]
                    nodes[f] += [remap[v] for v in vals] if f == "nodes_treeids" else list(vals)
                leaf_scores: dict[tuple[int, int], np.ndarray] = {}
                for t, n_, c, cw in zip(ta["class_treeids"], ta["class_nodeids"], ta["class_ids"], ta["class_weights"]):
                    leaf_scores.setdefault((t, n_), np.zeros(k, np.float32))[c] += np.float32(cw)
                for t, n_, mode in zip(ta["nodes_treeids"], ta["nodes_nodeids"], ta["nodes_modes"]):
                    if mode not in (b"LEAF", "LEAF"):
                        continue
                    top = int(np.argmax(leaf_scores.get((t, n_), np.zeros(k, np.float32))))  # ArgMax: first max
                    for c in range(k):
                        targets["target_treeids"].append(remap[t])
                        targets["target_nodeids"].append(n_)
                        targets["target_ids"].append(c)
                        targets["target_weights"].append(w * (1.0 if c == top else sym))
            merged = helper.make_node("TreeEnsembleRegressor", [x_name], [total.output[0]], domain="ai.onnx.ml",
                                      name="samme_merged", n_targets=k, aggregate_function="SUM",
                                      post_transform="NONE", **nodes, **targets)
            idx = list(g.node).index(total)
            g.node.insert(idx, merged)
            g.node.remove(total)
            _prune_graph(model)
            return True
    return False


def _prune_graph(model: Any) -> None:
    """Remove nodes and initializers that no graph output depends on."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    keep_ids = {id(n) for n in keep}
    for n in [n for n in g.node if id(n) not in keep_ids]:
        g.node.remove(n)
    for i in [i for i in g.initializer if i.name not in needed]:
        g.initializer.remove(i)


def _run_onnx(data: bytes, x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {name: np.asarray(x, np.float32)})))


def optimize_sklearn_onnx(data: bytes, probe: np.ndarray, *, atol: float = 1e-5) -> tuple[bytes, dict[str, Any]]:
    """Lossless rewrites of one skl2onnx graph (AdaBoost SAMME merged into one tree ensemble; tree classifiers
    without zero leaf entries and default attributes), checked on ``probe`` (embeddings): every output equal within
    ``atol`` and the same labels, or the original bytes are returned. Returns (bytes, info)."""
    import onnx

    model = onnx.load_from_string(data)
    applied = []
    info: dict[str, Any] = {"bytes_before": len(data), "applied": applied}
    try:  # a graph of a shape these rewrites do not know is shipped as written
        if _merge_samme(model):
            applied.append("samme_merged")
        n_compact = sum(_compact_tree_classifier(n) for n in model.graph.node
                        if n.op_type == "TreeEnsembleClassifier")
    except Exception as e:  # onnx raises assorted errors on unexpected attributes
        log.warning("sklearn ONNX rewrite not applied: %s", e)
        return data, {**info, "applied": [], "dropped": f"{type(e).__name__}: {e}", "bytes_after": len(data)}
    if n_compact:
        applied.append(f"tree_compact x{n_compact}")
    if not applied:
        return data, {**info, "bytes_after": len(data)}
    new = model.SerializeToString()
    try:
        onnx.checker.check_model(model)
        old_out, new_out = _run_onnx(data, probe), _run_onnx(new, probe)
        worst = 0.0
        for k, v in old_out.items():
            w = new_out[k]
            if v.dtype.kind in "iu" or v.dtype == object:
                if not np.array_equal(v, w):
                    raise ValueError(f"output {k} differs on {int(np.sum(v != w))} of {len(v)} probe rows")
            else:
                worst = max(worst, float(np.max(np.abs(v.astype(np.float64) - w))))
        if worst > atol:
            raise ValueError(f"outputs differ by up to {worst:.3g} > {atol}")
    except Exception as e:  # any failure keeps the graph as the ensemble stage wrote it
        log.warning("sklearn ONNX rewrite %s dropped: %s", applied, e)
        return data, {**info, "applied": [], "dropped": str(e), "bytes_after": len(data)}
    return new, {**info, "bytes_after": len(new), "max_abs_diff": worst, "probe_rows": int(len(probe))}


# --------------------------------------------------------------------------------------------- ensemble
@dataclass
class EnsembleParts:
    """What the bundle needs besides the CNNs: sklearn members (ONNX bytes) and the stacker (None: average)."""

    sklearn: list[SklearnMember] = field(default_factory=list)
    stacker: Optional[Stacker] = None


def optimize_parts(parts: EnsembleParts, members: list[Member], raw: np.ndarray) -> tuple[EnsembleParts, dict]:
    """``optimize_sklearn_onnx`` on every sklearn member, checked on what it reads for ``raw`` (train images as
    prepared): its CNN member's embeddings or the pixel features, plus those with each column shuffled. The same
    members, equal outputs: used by every variant alike."""
    import dataclasses

    from transfuse import models

    x = preprocess(raw, PreprocessSpec(**members[0].spec["preprocess"]))
    emb: dict[str, np.ndarray] = {}
    out, info = [], {}
    for sk in parts.sklearn:
        if sk.features == "embedding" and sk.embedding_of not in emb:
            m = next((m for m in members if m.name == sk.embedding_of), None)
            if m is None:
                raise CompressError(f"sklearn member {sk.name} reads {sk.embedding_of!r}, not a CNN member "
                                    f"{[m.name for m in members]}")
            emb[sk.embedding_of] = models.embedding_model(m.model).predict(x, batch_size=256, verbose=0)
        v = sk.inputs(raw, emb)
        # plus the same values with every column shuffled on its own: feature combinations the real rows lack
        rng = np.random.default_rng(0)
        mixed = np.stack([rng.permutation(c) for c in v.T], axis=1) if len(v) > 1 else v
        data, info[sk.name] = optimize_sklearn_onnx(sk.data, np.concatenate([v, mixed]).astype(np.float32))
        out.append(dataclasses.replace(sk, data=data))
        log.info("sklearn member %s: %s", sk.name, info[sk.name])
    return EnsembleParts(out, parts.stacker), info


def write_variant(directory: str, exported: Exported, members: list[Member], parts: EnsembleParts, *,
                  name: str, version: str, class_names: list[str], input_shape: tuple[int, int, int],
                  num_threads: int = 1, metrics: Optional[dict] = None, extra: Optional[dict] = None,
                  examples: Optional[list[tuple[str, bytes]]] = None, overwrite: bool = True) -> dict:
    spec = members[0].spec
    if exported.merged is not None:
        cnn = [CNNMember(name=m.name, data=exported.merged, format="tflite", input="image",
                         logits_output=f"m{i}_logits", embedding_output=f"m{i}_embedding")
               for i, m in enumerate(members)]
    else:
        cnn = [CNNMember(name=m.name, data=exported.tops[m.name], format="tflite",
                         input="trunk" if exported.trunk is not None else "image") for m in members]
    return write_bundle(
        directory, name=name, version=version, class_names=class_names, input_shape=input_shape,
        preprocess_spec=PreprocessSpec(**spec["preprocess"]), cnn_members=cnn, trunk=exported.trunk,
        sklearn_members=parts.sklearn, stacker=parts.stacker, variant=exported.mode, metrics=metrics,
        num_threads=num_threads, examples=examples, overwrite=overwrite,
        extra={"shared_trunk": {"cut_layer": exported.cut_layer}, **(extra or {})})


def model_bytes(directory: str) -> tuple[int, int]:
    """(raw, gzip) bytes of a bundle's model files (the manifest and the example images excluded): what the
    model costs a deployment."""
    from pathlib import Path

    root = Path(directory)
    raw = gz = 0
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "manifest.json" and p.relative_to(root).parts[0] != "examples":
            b = p.read_bytes()
            raw += len(b)
            gz += len(gzip.compress(b, compresslevel=9))
    return raw, gz


def time_calls(fn: Callable[[], Any], runs: int, warmup: int = 3) -> np.ndarray:
    """Seconds per call of ``fn`` over ``runs`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = np.empty(runs)
    for i in range(runs):
        t = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t
    return out


def measure_predictor(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, labels: np.ndarray, *,
                      latency_runs: int = 50, throughput_runs: int = 5, batch: int = 32) -> dict[str, float]:
    """Accuracy / NLL / ECE on (images, labels); latency at batch 1 (p50, p99 ms); throughput at ``batch``."""
    probs = predict(images)
    row = {k: v for k, v in _metrics.evaluate(probs, labels).items()}
    one = images[:1]
    lat = time_calls(lambda: predict(one), latency_runs)
    xb = images[:batch] if len(images) >= batch else np.concatenate([images] * (batch // len(images) + 1))[:batch]
    thr = time_calls(lambda: predict(xb), throughput_runs)
    row.update({**_latency_ms(lat), f"throughput_b{batch}": float(batch / np.median(thr))})
    return row


def _latency_ms(seconds: np.ndarray) -> dict[str, float]:
    """p50 and p99 of batch-1 call times, in milliseconds."""
    return {"p50_ms_b1": float(np.percentile(seconds, 50) * 1e3), "p99_ms_b1": float(np.percentile(seconds, 99) * 1e3)}


def variant_row(directory: str, images: np.ndarray, labels: np.ndarray, *, num_threads: int = 1,
                latency_runs: int = 50, throughput_runs: int = 5) -> dict[str, Any]:
    """Load a written variant bundle (verified) and measure it."""
    b = load_bundle(directory, num_threads=num_threads)
    raw, gz = model_bytes(directory)
    row = {"variant": b.manifest["variant"], "size_bytes": raw, "size_gzip_bytes": gz}
    row.update(measure_predictor(b.predict_proba, images, labels, latency_runs=latency_runs,
                                 throughput_runs=throughput_runs))
    return row


def interleaved_latency(directories: dict[str, str], images: np.ndarray, *, num_threads: int = 1, runs: int = 100,
                        warmup: int = 5) -> dict[str, dict[str, float]]:
    """Batch-1 latency of several bundles timed in turns (A B C, C B A, ...) rather than one after another, so
    that load from other processes on a shared machine falls on every variant alike and the ratios between them
    hold. Returns {name: {p50_ms_b1, p99_ms_b1}}."""
    bundles = {k: load_bundle(d, num_threads=num_threads) for k, d in directories.items()}
    one = np.asarray(images[:1])
    for b in bundles.values():
        for _ in range(warmup):
            b.predict_proba(one)
    order = list(bundles)
    t = {k: np.empty(runs) for k in order}
    for i in range(runs):
        for k in (order if i % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            bundles[k].predict_proba(one)
            t[k][i] = time.perf_counter() - t0
    return {k: _latency_ms(v) for k, v in t.items()}


def component_breakdown(directory: str, images: np.ndarray, *, num_threads: int = 1,
                        runs: int = 200) -> list[dict[str, Any]]:
    """Where a bundle's batch-1 latency and bytes go: validation + preprocessing, the trunk, each CNN top (members
    exported as one graph: the first pays for it), each sklearn member and the combiner, timed IN PIPELINE ORDER
    on the first image (p50 ms of each part over ``runs`` passes, through ``Bundle.batch_probs``), then the whole
    ``predict_proba`` in the same passes and what is left of it (Python glue). Timing a part alone in a tight loop
    reads 2-10x lower (its weights and code stay in cache); in order they pay the cold caches that a real request
    pays."""
    from pathlib import Path

    b = load_bundle(directory, num_threads=num_threads)
    m, root = b.manifest, Path(b.path)
    one = np.asarray(images[:1])
    files: dict[str, Optional[str]] = {"preprocess": None}
    if b._trunk is not None:
        files["trunk"] = m["trunk"]["file"]
    files.update({f"cnn {meta['name']}": meta["file"] for meta, _ in b._cnn})
    files.update({f"sklearn {meta['name']}": meta["file"] for meta, _ in b._sk})
    combiner = f"combiner ({m['combiner']['kind']})"
    files[combiner] = m["combiner"].get("file")
    t: dict[str, list[float]] = {k: [] for k in [*files, "predict_proba (total)"]}

    def one_pass() -> None:
        last = [time.perf_counter()]

        def tick(part: str) -> None:
            now = time.perf_counter()
            t[part].append(now - last[0])
            last[0] = now

        b.combine(b.batch_probs(b.validate(one), tick))
        tick(combiner)
        t0 = time.perf_counter()
        b.predict_proba(one)
        t["predict_proba (total)"].append(time.perf_counter() - t0)

    for _ in range(3):
        one_pass()
    for v in t.values():
        v.clear()
    for _ in range(runs):
        one_pass()
    seen: set[str] = set()  # a graph several CNN members share counts once (with the first of them)
    rows = []
    for k, f in files.items():
        rows.append({"component": k, "file": f, "bytes": (root / f).stat().st_size if f and f not in seen else 0,
                     "p50_ms_b1": float(np.median(t[k]) * 1e3)})
        seen.add(f)
    parts = sum(r["p50_ms_b1"] for r in rows)
    total = float(np.median(t["predict_proba (total)"]) * 1e3)
    rows.append({"component": "predict_proba (total)", "file": None, "bytes": sum(r["bytes"] for r in rows),
                 "p50_ms_b1": total})
    rows.append({"component": "glue (total - parts)", "file": None, "bytes": 0, "p50_ms_b1": total - parts})
    return rows


def format_breakdown(rows: list[dict[str, Any]]) -> str:
    total = next(r for r in rows if r["component"].startswith("predict_proba"))
    lines = [f"{'component':<28}{'bytes':>10}{'%bytes':>8}{'p50 ms':>9}{'%time':>7}"]
    for r in rows:
        lines.append(f"{r['component'][:28]:<28}{r['bytes']:>10}{100 * r['bytes'] / max(total['bytes'], 1):>7.1f}%"
                     f"{r['p50_ms_b1']:>9.3f}{100 * r['p50_ms_b1'] / total['p50_ms_b1']:>6.1f}%")
    return "\n".join(lines)


def with_ratios(rows: list[dict], base: str = "float32") -> list[dict]:
    """Add speed-up, size ratio and accuracy change against the ``base`` row (all measured in this run)."""
    ref = next((r for r in rows if r["variant"] == base), None)
    if ref is None:
        return rows
    for r in rows:
        r["speedup_b1"] = ref["p50_ms_b1"] / r["p50_ms_b1"]
        r["smaller_raw"] = ref["size_bytes"] / r["size_bytes"] if r.get("size_bytes") else float("nan")
        r["smaller_gzip"] = ref["size_gzip_bytes"] / r["size_gzip_bytes"] if r.get("size_gzip_bytes") else float("nan")
        r["accuracy_delta_points"] = 100.0 * (r["accuracy"] - ref["accuracy"])
    return rows


def goals(rows: list[dict], g: GoalsConfig, variant: str = "int8", base: str = "float32") -> dict[str, Any]:
    """``variant`` against ``base`` judged by the config's goals (``goals.served_faster``, ``served_smaller``,
    ``served_accuracy_points``): each ratio as measured, its goal, and whether it was met."""
    r = next((x for x in rows if x["variant"] == variant), None)
    if r is None or "speedup_b1" not in r:
        return {}
    delta = r["accuracy_delta_points"]
    return {"variant": variant, "against": base,
            "speedup_b1": r["speedup_b1"], "faster_goal": g.served_faster, "faster": r["speedup_b1"] >= g.served_faster,
            "smaller_raw": r["smaller_raw"], "smaller_goal": g.served_smaller,
            "smaller": r["smaller_raw"] >= g.served_smaller,
            "accuracy_delta_points": delta, "accuracy_goal_points": g.served_accuracy_points,
            "accuracy_kept": round(delta, 6) >= g.served_accuracy_points}  # rounded: points, not float noise


def goals_line(g: Mapping[str, Any]) -> str:
    """One sentence for a ``goals`` record (the report, jobs/compress.py and bench/compress.py print it)."""
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    return (f"{g['variant']} vs {g['against']}: {g['speedup_b1']:.2f}x faster at batch 1 (goal {g['faster_goal']:g}x: "
            f"{met(g['faster'])}), {g['smaller_raw']:.2f}x smaller (goal {g['smaller_goal']:g}x: {met(g['smaller'])}), "
            f"accuracy {g['accuracy_delta_points']:+.2f} points (goal >= {g['accuracy_goal_points']:+g}: "
            f"{met(g['accuracy_kept'])})")


def format_table(rows: list[dict]) -> str:
    cols = [("variant", "{:<14}"), ("size_bytes", "{:>10}"), ("size_gzip_bytes", "{:>10}"), ("p50_ms_b1", "{:>8.2f}"),
            ("p99_ms_b1", "{:>8.2f}"), ("throughput_b32", "{:>9.1f}"), ("accuracy", "{:>7.4f}"), ("nll", "{:>7.4f}"),
            ("ece", "{:>7.4f}"), ("speedup_b1", "{:>6.2f}"), ("smaller_raw", "{:>6.2f}"), ("smaller_gzip", "{:>6.2f}"),
            ("accuracy_delta_points", "{:>7.2f}")]
    head = ["variant", "bytes", "gzip", "p50ms", "p99ms", "img/s@32", "acc", "nll", "ece", "xfast", "xsmall", "xsm_gz",
            "dacc_pt"]
    widths = [len(f.format(0 if k != "variant" else "")) for k, f in cols]
    lines = [" ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    for r in rows:
        cells = []
        for k, f in cols:
            v = r.get(k)
            cells.append(f.format(v) if v is not None else "-".rjust(len(f.format(0 if k != "variant" else ""))))
        lines.append(" ".join(cells))
    return "\n".join(lines)


def representative_raw(images: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` train images drawn at random (seeded), as prepared (what a client sends); through ``preprocess``
    they are the int8 calibration set, as they are the sklearn rewrites' probe."""
    rng = np.random.default_rng(seed)
    return images[np.sort(rng.choice(len(images), size=min(n, len(images)), replace=False))]


# --------------------------------------------------------------------------------------------- the stage
STAGE = "compress"


@dataclass
class EnsembleSource:
    """The ensemble to compress, as read from ``<run>/ensemble/`` (or from the member dirs alone)."""

    members: list[tuple[str, str]]  # (name, member dir) of the CNN members, in order
    parts: EnsembleParts
    source: str  # "ensemble" (stacker + sklearn members) or "members" (plain averaging)
    fingerprint: str


def read_ensemble(cfg: Any) -> EnsembleSource:
    """The CNN member dirs, sklearn members (ONNX) and stacker written by ``jobs.ensemble``
    (``ensemble.json``, format transfuse.ensemble/v1). Without an ensemble stage: the members chosen by Tune
    (``tune/members.json``) or the single ``finetune/`` model, combined by plain averaging."""
    import hashlib
    import json

    from transfuse import storage

    h = hashlib.sha256(cfg.fingerprint("compress", "data").encode())
    ens_dir = storage.stage_dir(cfg, "ensemble")
    desc_path = storage.join(ens_dir, "ensemble.json")
    if storage.exists(desc_path):
        desc = storage.read_json(desc_path)
        if desc.get("format") != "transfuse.ensemble/v1":
            raise CompressError(f"{desc_path}: format {desc.get('format')!r}, expected 'transfuse.ensemble/v1'")
        members = [(str(m["name"]), str(m["dir"])) for m in desc["cnn_members"]]
        sk = []
        for e in desc.get("sklearn_members", []):
            features = e.get("features", "embedding")
            sk.append(SklearnMember(name=str(e["name"]), data=storage.read_bytes(storage.join(ens_dir, e["file"])),
                                    embedding_of=str(e["embedding_source"]) if features == "embedding" else None,
                                    probabilities_output=e.get("output", "probabilities"), features=features,
                                    pixel_size=e.get("pixel_size")))
        # stacker.json through its one reader (format and shapes checked there)
        st = stacking.Stacker.from_arrays(json.loads(storage.read_bytes(storage.join(ens_dir,
                                                                                     desc["stacker"]["file"]))))
        stacker = Stacker(coef=st.coef_, intercept=st.intercept_, members=st.members, features=st.features,
                          eps=st.eps, temperature=st.temperature)
        man = storage.join(ens_dir, storage.MANIFEST)
        h.update((storage.sha256(man) if storage.exists(man) else storage.sha256(desc_path)).encode())
        return EnsembleSource(members, EnsembleParts(sk, stacker), "ensemble", h.hexdigest()[:16])
    listing = storage.join(storage.stage_dir(cfg, "tune"), "members.json")
    if storage.exists(listing):
        tune_dir = storage.stage_dir(cfg, "tune")
        members = []
        for e in storage.read_json(listing).get("members") or []:
            d = str(e["dir"])
            members.append((str(e["name"]), d if (storage.is_uri(d) or d.startswith("/")) else storage.join(tune_dir, d)))
    else:
        ft = storage.stage_dir(cfg, "finetune")
        if not storage.exists(storage.join(ft, "model_spec.json")):
            raise CompressError(f"nothing to compress: no {desc_path} (jobs.ensemble), no {listing} (jobs.tune) and "
                                f"no {ft}/model_spec.json (jobs.finetune); run one of them first")
        members = [("finetune", ft)]
    for _, d in members:
        man = storage.join(d, storage.MANIFEST)
        h.update((storage.sha256(man) if storage.exists(man) else d).encode())
    log.warning("no ensemble stage output at %s: compressing the CNN members with plain averaging", ens_dir)
    return EnsembleSource(members, EnsembleParts(), "members", h.hexdigest()[:16])


def drop_zero_weight_members(src: EnsembleSource) -> tuple[EnsembleSource, dict[str, Any]]:
    """``src`` without the members whose stacker coefficients are all exactly zero: the stacker's output does not
    depend on them. A CNN member whose embedding a kept sklearn member reads stays (its weight stays 0). Without a
    stacker (plain averaging) nothing is dropped. Returns the new source and what was dropped and kept."""
    import dataclasses

    st = src.parts.stacker
    if st is None:
        return src, {"dropped": [], "reason": "no stacker (plain averaging): every member counts"}
    k = st.coef.shape[1] // len(st.members)
    coef = np.asarray(st.coef)
    dead = {m for j, m in enumerate(st.members) if not np.any(coef[:, j * k:(j + 1) * k])}
    sk = [s for s in src.parts.sklearn if s.name not in dead]
    needed = {s.embedding_of for s in sk if s.features == "embedding"}
    cnn = [(n, d) for n, d in src.members if n not in dead or n in needed]
    if not cnn:  # a bundle needs a CNN member for its input pipeline: keep the first, weight 0
        cnn = src.members[:1]
    keep = [m for m in st.members if m in {n for n, _ in cnn} | {s.name for s in sk}]
    if len(keep) == len(st.members):
        return src, {"dropped": [], "kept": keep}
    cols = np.concatenate([np.arange(st.members.index(m) * k, (st.members.index(m) + 1) * k) for m in keep])
    stacker = dataclasses.replace(st, coef=coef[:, cols], members=keep)
    info = {"dropped": [m for m in st.members if m not in keep], "kept": keep,
            "kept_at_zero_weight": sorted(dead & set(keep))}
    log.info("members with zero stacker weight left out of every variant: %s", info)
    return EnsembleSource(cnn, EnsembleParts(sk, stacker), src.source, src.fingerprint), info


def ensemble_to_compress(cfg: Any) -> tuple[EnsembleSource, dict[str, Any]]:
    """``read_ensemble``, less the zero-weight members when ``compress.drop_zero_weight_members``: what the stage
    and bench/compress.py compress. Returns (source, what was dropped)."""
    src = read_ensemble(cfg)
    return drop_zero_weight_members(src) if cfg.compress.drop_zero_weight_members else (src, {"dropped": []})


def keras_baseline(members: list[Member], parts: EnsembleParts, spec: PreprocessSpec) -> Callable[[np.ndarray], np.ndarray]:
    """The seed-style float32 ensemble: each tf_keras member's ``model.predict`` one after another (whole model,
    no shared trunk), the same sklearn members (ONNX on the Keras embedding) and the same combiner."""
    from transfuse import models
    from transfuse.bundle import _Onnx

    tf = _tf()
    import tempfile
    from pathlib import Path

    nets = {m.name: tf.keras.Model(m.model.input, [m.model.output, models.embedding_model(m.model).output])
            for m in members}
    tmp = Path(tempfile.mkdtemp(prefix="transfuse-baseline-"))
    sk = []
    for i, s in enumerate(parts.sklearn):
        (tmp / f"{i}.onnx").write_bytes(s.data)
        sk.append((s, _Onnx(tmp / f"{i}.onnx", 1, s.name)))

    def predict(images: np.ndarray) -> np.ndarray:
        x = preprocess(images, spec)
        probs, emb = {}, {}
        for name, net in nets.items():
            p, e = net.predict(x, verbose=0, batch_size=256)
            probs[name], emb[name] = p.astype(np.float64), e
        for s, r in sk:
            probs[s.name] = np.asarray(r(s.inputs(images, emb))[s.probabilities_output], np.float64)
        st = parts.stacker
        if st is None:
            return np.mean(list(probs.values()), axis=0).astype(np.float32)
        f = np.concatenate([probs[n] for n in st.members], axis=1)
        if st.features == "log_probs":
            f = np.log(np.clip(f, st.eps, 1.0))
        return softmax(f @ np.asarray(st.coef).T + np.asarray(st.intercept)).astype(np.float32)

    return predict


def parse_variant(name: str, sparsity: list[float]) -> tuple[Optional[float], str]:
    """(sparsity or None, quantization mode) of a variant name; CompressError listing the allowed names."""
    from transfuse.config import pruned_name

    if name in QUANT_MODES:
        return None, name
    for s in sparsity:
        base = pruned_name(s)
        if name == base:
            return s, "float32"
        if name == base + "_int8":
            return s, "int8"
    allowed = list(QUANT_MODES) + expand_variants(["pruned", "pruned_int8"], sparsity)
    raise CompressError(f"variant {name!r} is not one of {allowed} (kinds {VARIANTS}; pruned variants are named by "
                        f"compress.sparsity {sparsity})")


def build_variants(members: list[Member], variants: list[str], *, rep: np.ndarray, x_train: np.ndarray,
                   y_train: np.ndarray, ccfg: Any) -> tuple[dict[str, Exported], dict[str, Any]]:
    """Exported files per variant (kinds expanded over ``ccfg.sparsity``); the pruned members of each sparsity
    are built once and shared by its float32 and int8 variants. Returns (exported by name, pruning report by
    pruned name -> member -> {target, scope, layers})."""
    names = expand_variants(list(variants), list(ccfg.sparsity))
    plan = [(v, *parse_variant(v, list(ccfg.sparsity))) for v in names]
    exported: dict[str, Exported] = {}
    pruning: dict[str, Any] = {}
    pruned: dict[float, list[Member]] = {}
    scope = getattr(ccfg, "prune_scope", "all")
    distill = bool(getattr(ccfg, "prune_distill", False))
    for v, target, mode in plan:
        if target is None:
            exported[v] = export_members(members, mode, rep, share_trunk=ccfg.share_trunk, merge=ccfg.merge_members)
            continue
        if target not in pruned:
            from transfuse.config import pruned_name

            pruned[target], report = [], {}
            for m in members:
                pm, sp = prune_member(m, x_train, y_train, sparsity=target, epochs=ccfg.prune_epochs,
                                      batch_size=ccfg.prune_batch_size, lr=ccfg.prune_lr,
                                      schedule=ccfg.prune_schedule, frequency=ccfg.prune_frequency,
                                      tolerance=ccfg.sparsity_tolerance, scope=scope, distill=distill,
                                      ramp=float(getattr(ccfg, "prune_ramp", 1.0)))
                pruned[target].append(pm)
                # top-1 agreement with the float member on the train images: how much the member itself moved
                agree = float(np.mean(pm.model.predict(x_train, batch_size=256, verbose=0).argmax(1)
                                      == m.model.predict(x_train, batch_size=256, verbose=0).argmax(1)))
                report[m.name] = {"target": target, "scope": scope, "distill": distill, "layers": sp,
                                  "train_agreement_with_float": agree}
            pruning[pruned_name(target)] = report
        exported[v] = export_members(pruned[target], mode, rep, share_trunk=ccfg.share_trunk,
                                     merge=ccfg.merge_members)
        exported[v].mode = v
    return exported, pruning


def run_compress(cfg: Any, *, force: bool = False) -> dict:
    """The compress stage: every variant as a bundle under ``<run>/compress/<variant>/`` with the measured table in
    ``compress/metrics.json``, and the ``compress.serve_variant`` bundle in ``<run>/bundle/``. Returns the compress
    manifest."""
    from transfuse import models, storage
    from transfuse.data import data_manifest, read_split_numpy

    ccfg = cfg.compress
    names = expand_variants(list(ccfg.variants), list(ccfg.sparsity))
    if ccfg.serve_variant not in names:
        raise CompressError(f"compress.serve_variant = {ccfg.serve_variant!r} must be an exported variant: {names}")
    src, dropped = ensemble_to_compress(cfg)
    out, bundle_dir = storage.stage_dir(cfg, STAGE), storage.stage_dir(cfg, "bundle")
    if not force and storage.is_complete(out, src.fingerprint) and storage.exists(storage.join(bundle_dir, "manifest.json")):
        log.info("compress stage complete (fingerprint %s): %s", src.fingerprint, out)
        return storage.read_manifest(out)
    members = []
    for name, d in src.members:
        model, spec = models.load_member(d)
        members.append(Member(name, model, spec))
    pspec = PreprocessSpec(**members[0].spec["preprocess"])
    if any(PreprocessSpec(**m.spec["preprocess"]) != pspec for m in members):
        raise CompressError("CNN members use different preprocessing; one bundle runs one preprocessing function")
    data_dir = storage.stage_dir(cfg, "data")
    dm = data_manifest(data_dir)
    class_names = list(dm["class_names"])
    x_tr, y_tr, _ = read_split_numpy(data_dir, "train")
    x_te, y_te, _ = read_split_numpy(data_dir, "test")
    input_shape = tuple(int(d) for d in x_tr.shape[1:])
    rep_raw = representative_raw(x_tr, ccfg.representative_examples, seed=cfg.seed)
    rep = preprocess(rep_raw, pspec)
    sk_info: dict = {}
    if ccfg.optimize_sklearn and src.parts.sklearn:
        parts, sk_info = optimize_parts(src.parts, members, rep_raw)
        src = EnsembleSource(src.members, parts, src.source, src.fingerprint)
    exported, pruning = build_variants(members, list(ccfg.variants), rep=rep, x_train=preprocess(x_tr, pspec),
                                       y_train=y_tr, ccfg=ccfg)
    storage.makedirs(out)
    fs, p = storage.resolve(out)
    fs.delete_dir_contents(p)  # no stale variants from an earlier run
    common = dict(name=cfg.serve.name, version=src.fingerprint, class_names=class_names, input_shape=input_shape,
                  num_threads=ccfg.num_threads, examples=example_images(x_te, y_te, class_names))
    rows = []
    for v, ex in exported.items():
        vdir = storage.join(out, v)
        write_variant(vdir, ex, members, src.parts, **common, extra={"ensemble_source": src.source})
        local = vdir if not storage.is_uri(vdir) else None
        if local is None:
            from transfuse.bundle import fetch

            local = str(fetch(vdir))
        row = variant_row(local, x_te, y_te, num_threads=ccfg.num_threads, latency_runs=ccfg.latency_runs,
                          throughput_runs=ccfg.throughput_runs)
        row["variant"] = v
        rows.append(row)
        log.info("variant %s: %s", v, {k: round(val, 4) if isinstance(val, float) else val for k, val in row.items()})
    if len(rows) > 1:  # batch-1 latency again, every variant in turn: ratios robust to load from other processes
        from transfuse.bundle import fetch

        dirs = {v: (storage.join(out, v) if not storage.is_uri(out) else str(fetch(storage.join(out, v))))
                for v in exported}
        lat = interleaved_latency(dirs, x_te, num_threads=ccfg.num_threads, runs=ccfg.latency_runs)
        for r in rows:
            r.update(lat[r["variant"]], latency="interleaved")
    rows = with_ratios(rows)
    pruned_int8 = [v for v in exported if v.startswith("pruned") and v.endswith("_int8")]
    report = {"variants": rows, "goals": goals(rows, cfg.goals, "int8") if "int8" in exported else {},
              # the first pruned int8 variant (the report reads this key); every one in goals_by_variant
              "goals_pruned_int8": goals(rows, cfg.goals, pruned_int8[0]) if pruned_int8 else {},
              "goals_by_variant": {v: goals(rows, cfg.goals, v) for v in exported if v != "float32" and "float32" in exported},
              "pruning": pruning, "sklearn_rewrites": sk_info, "ensemble_source": src.source,
              "zero_weight_members": dropped, "num_threads": ccfg.num_threads,
              "test_n": int(len(y_te)), "shared_trunk": {v: ex.cut_layer for v, ex in exported.items()}}
    storage.write_json(storage.join(out, "metrics.json"), report)
    serve_row = next(r for r in rows if r["variant"] == ccfg.serve_variant)
    write_variant(bundle_dir, exported[ccfg.serve_variant], members, src.parts, **common, overwrite=True,
                  metrics={"test": {k: serve_row[k] for k in ("accuracy", "nll", "ece", "n")}, "variants": rows,
                           "goals": report["goals"]},
                  extra={"ensemble_source": src.source, "stage": "bundle", "complete": True,
                         "fingerprint": src.fingerprint, "config": cfg.model_dump(mode="json")})
    return storage.write_manifest(out, cfg, STAGE, src.fingerprint, variants=[r["variant"] for r in rows],
                                  serve_variant=ccfg.serve_variant, bundle=bundle_dir, metrics=report["goals"])
