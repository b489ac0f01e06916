"""Magnitude pruning of a member, with the sparsity reached measured, never assumed.

TensorFlow Model Optimization magnitude pruning (tf_keras only) of a member's Conv2D/Dense kernels (scope
``trainable``: only the layers the member fine-tuned, so the frozen shared trunk stays dense and shared; ``all``:
every layer), a short fine-tune at the target sparsity, ``strip_pruning``, then the sparsity reached is MEASURED
per pruned layer and a layer short of the target raises ``PruningError`` (TFMOT's schedules prune nothing on
short runs unless ``frequency`` is low: such a run must fail, not pass). Every configured sparsity is its own
variant (``pruned50``, ``pruned80_int8``, ...).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np

from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)
from transfuse.compress.tflite import CompressError
from transfuse.errors import TransfuseError
from transfuse.finetune import KerasMember

log = logging.getLogger(__name__)

# what TFMOT's magnitude pruning prunes, and the weight it prunes (its prune_registry). It registers
# DepthwiseConv2D with no weight to prune: EfficientNet-Lite's and MobileNetV2's depthwise kernels stay dense,
# and counting them here would fail every such member's sparsity check (they hold almost no zeros).
PRUNED_WEIGHT = {"Conv2D": "kernel", "Dense": "kernel", "SeparableConv2D": "pointwise_kernel"}
PRUNABLE = tuple(PRUNED_WEIGHT)
PRUNE_SCOPES = ("trainable", "all")


class PruningError(TransfuseError, RuntimeError):
    """Pruning did not reach the target sparsity on some layer."""


def _prunable(layer: Any) -> bool:
    return type(layer).__name__ in PRUNABLE


def _kernel(layer: Any) -> Optional[np.ndarray]:
    w = getattr(layer, PRUNED_WEIGHT[type(layer).__name__], None)
    return None if w is None else np.asarray(w.numpy())


def walk_layers(model: Any) -> list[Any]:
    """Every leaf layer, nested models included (in order)."""
    out = []
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            out.extend(walk_layers(layer))
        else:
            out.append(layer)
    return out


def measure_sparsity(model: Any, layers: Optional[set[str]] = None) -> dict[str, float]:
    """Fraction of exactly-zero kernel weights per prunable layer (nested backbones included; only ``layers`` when
    given)."""
    out = {}
    for layer in walk_layers(model):
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
    import tensorflow as tf

    c = tf.keras.models.clone_model(model)
    c.set_weights(model.get_weights())
    for a, b in zip(walk_layers(model), walk_layers(c)):
        b.trainable = a.trainable
    for a, b in zip(model.layers, c.layers):  # nested models: their own flag, after their layers'
        if hasattr(a, "layers"):
            b.trainable = a.trainable
            for x, y in zip(walk_layers(a), walk_layers(b)):
                y.trainable = x.trainable
    return c


def prune_layers(model: Any, scope: str) -> list[str]:
    """Names of the prunable layers of a member in ``scope``: ``trainable`` (what the member fine-tuned: backbone
    layers above its cut and the head) or ``all``."""
    if scope not in PRUNE_SCOPES:
        raise CompressError(f"compress.prune_scope must be one of {PRUNE_SCOPES}, got {scope!r}")
    return [l.name for l in walk_layers(model) if _prunable(l) and (scope == "all" or l.trainable)]


def wrap_for_pruning(model: Any, names: set[str], sched: Any) -> Any:
    """A clone of a functional model whose layers in ``names`` are wrapped by TFMOT (the others are the same
    layer objects, as TFMOT itself does)."""
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

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
    member: KerasMember,
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
) -> tuple[KerasMember, dict[str, float]]:
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
    steps = int(np.ceil(len(x) / batch_size)) * epochs
    sched = schedule_obj if schedule_obj is not None else make_schedule(schedule, sparsity, steps, frequency, ramp)
    # TFMOT wraps the model's own layer objects and writes the masks into their kernels: prune a copy, so the
    # member (and every variant exported from it afterwards) stays intact.
    src = _copy_model(member.model)
    names = set(prune_layers(src, scope))
    if not names:
        raise PruningError(f"member {member.name}: no prunable (Conv2D/Dense) layer in scope {scope!r}: nothing "
                           f"would be pruned")
    full, p_net, p_head = _pruning_model(src, names, sched, distill)
    _fine_tune(full, member, x, y, distill=distill, batch_size=batch_size, epochs=epochs, lr=lr)
    pruned = _stripped(src, p_net, p_head)
    measured = measure_sparsity(pruned, names)
    check_sparsity(measured, sparsity, tolerance)
    return KerasMember(member.name, pruned, member.spec), measured


def _pruning_model(src: Any, names: set[str], sched: Any, distill: bool) -> tuple[Any, Any, Any]:
    """(the model to fine-tune, its wrapped backbone, its wrapped head): ``src``'s backbone and head each cloned
    with the layers in ``names`` wrapped for pruning; with ``distill`` the head also outputs the embedding."""
    import tensorflow as tf

    from transfuse import finetune

    net = finetune.get_backbone(src)
    p_net = wrap_for_pruning(net, names, sched)
    head = finetune.head_of(src)
    h_in = tf.keras.layers.Input(shape=tuple(net.output.shape[1:]), name="head_in")
    emb_name = finetune.embedding_layer_name(src)
    h, emb = h_in, None
    for layer in head:
        h = layer(h)
        if layer.name == emb_name:
            emb = h
    p_head = wrap_for_pruning(tf.keras.Model(h_in, [emb, h] if distill else h, name="head"), names, sched)
    inp = tf.keras.layers.Input(shape=tuple(src.input.shape[1:]), name="image")
    # training follows fit(): the pruning wrappers update their masks only in training mode. Frozen BatchNorm
    # layers (trainable=False) run in inference mode regardless.
    return tf.keras.Model(inp, p_head(p_net(inp))), p_net, p_head


def _fine_tune(full: Any, member: KerasMember, x: np.ndarray, y: np.ndarray, *, distill: bool, batch_size: int,
               epochs: int, lr: float) -> None:
    """The fine-tune at the target sparsity (masks updated every step by ``UpdatePruningStep``): towards the float
    member's embedding and a 50/50 mix of labels and its probabilities (``distill``), or the labels alone."""
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

    from transfuse import finetune

    sp = tfmot.sparsity.keras
    opt = tf.keras.optimizers.Adam(lr)
    if distill:
        t_emb = finetune.embedding_model(member.model).predict(x, batch_size=256, verbose=0)
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


def _stripped(src: Any, p_net: Any, p_head: Any) -> Any:
    """The fine-tuned backbone and head with the pruning wrappers stripped, joined back into one member model
    (image -> probabilities) of fresh layers."""
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

    sp = tfmot.sparsity.keras
    s_net, s_head = sp.strip_pruning(p_net), sp.strip_pruning(p_head)
    s_net._name = "backbone"  # transfuse.finetune.models finds the backbone by this name
    z = inp2 = tf.keras.layers.Input(shape=tuple(src.input.shape[1:]), name="image")
    z = s_net(z, training=False)
    for layer in s_head.layers:  # the head is a chain (the embedding output is an intermediate of it)
        if not isinstance(layer, tf.keras.layers.InputLayer):
            z = layer(z)
    joined = tf.keras.Model(inp2, z, name=f"{src.name}_pruned")
    # The stripped layers also belong to the pruning graphs (two inbound nodes each), so ``layer.output`` is
    # ambiguous and graphs cut at a layer would reach back into the pruning model: clone into fresh layers.
    return _copy_model(joined)
