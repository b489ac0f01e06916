"""Small real members for the bundle and compression tests: tf_keras vgg_small members on scikit-learn's digits.

A "pretrained" backbone is trained once; two members copy it and fine-tune their tops at different unfreeze
depths, so their frozen layers are identical (a shared trunk) and their tops differ, as after jobs.tune.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS=1 first)
from transfuse.inference.preprocessing import PreprocessSpec, preprocess

CLASS_NAMES = [str(i) for i in range(10)]


@dataclass
class Digits:
    x_train: np.ndarray  # uint8 N x 8 x 8 x 1
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits(seed: int = 0) -> Digits:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * 16, 0, 255).astype(np.uint8)[..., None]  # 0..16 -> 0..255
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(images))
    n_test = 400
    te, tr = idx[:n_test], idx[n_test:]
    return Digits(images[tr], d.target[tr].astype(np.int64), images[te], d.target[te].astype(np.int64))


BACKBONE_LAYERS = ["block1_conv1", "block1_pool", "block2_conv1", "block2_pool", "block3_conv1", "block3_pool"]


def tiny_backbone():
    """A 3-block conv net in transfuse.finetune.models' shape (a nested Model named "backbone"): trains in seconds on
    digits, where vgg_small at width 0.125 stays at chance for the first epochs."""
    import tensorflow as tf

    L = tf.keras.layers
    inp = L.Input((32, 32, 3), name="input")
    x = inp
    for b, f in enumerate((8, 16, 32), start=1):
        x = L.Conv2D(f, 3, padding="same", activation="relu", name=f"block{b}_conv1")(x)
        x = L.MaxPooling2D(2, name=f"block{b}_pool")(x)
    net = tf.keras.Model(inp, x)
    net._name = "backbone"
    return net


def spec_for(unfreeze: int, seed: int = 0) -> dict:
    """A model_spec.json as transfuse.finetune.models writes it, for the tiny backbone."""
    names = BACKBONE_LAYERS
    return {"backbone": "tiny_test", "width": 1.0, "input_size": 32, "head": {"dense": [32], "dropout": 0.0,
            "pooling": "flatten"}, "unfreeze": unfreeze, "num_classes": 10, "class_names": CLASS_NAMES,
            "preprocess": PreprocessSpec(32, "unit").to_dict(),
            "cut_layer": names[len(names) - unfreeze - 1] if unfreeze < len(names) else None,
            "backbone_layers": names, "seed": seed}


def build(spec: dict, backbone_weights=None):
    from transfuse.finetune import models

    import tensorflow as tf

    tf.keras.utils.set_random_seed(spec["seed"])
    net = tiny_backbone()
    if backbone_weights is not None:
        net.set_weights(backbone_weights)
    m = models.build_model({**spec, "seed": None}, backbone=net)
    return m


@functools.lru_cache(maxsize=None)
def trained() -> tuple[Digits, list]:
    """Digits and two trained members, once per test process (both test modules use them)."""
    d = digits()
    return d, train_members(d)


def train_members(data: Digits, unfreezes: tuple[int, ...] = (2, 4), epochs: int = 2) -> list:
    """Members (``KerasMember``) sharing a backbone trained once; tops fine-tuned per depth.

    Trained well above chance (base 5 epochs, tops ``epochs``): int8 top-1 agreement is only meaningful on
    members with real margins, not on near-chance ones."""
    import tensorflow as tf

    from transfuse.finetune import models
    from transfuse.finetune.models import KerasMember

    x = preprocess(data.x_train, PreprocessSpec(32, "unit"))
    base = build(spec_for(len(BACKBONE_LAYERS)))  # all trainable: the "pretrained" backbone
    base.compile(tf.keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    base.fit(x, data.y_train, batch_size=32, epochs=5, verbose=0)  # batch 32: more steps per second of tracing
    out = []
    for i, k in enumerate(unfreezes):
        spec = spec_for(k, seed=i + 1)  # different head initialisations
        m = build(spec, models.get_backbone(base).get_weights())
        m.compile(tf.keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy")
        m.fit(x, data.y_train, batch_size=32, epochs=epochs, verbose=0)
        out.append(KerasMember(f"cnn{i}", m, spec))
    return out
