"""GPU check for the fine-tuning path: VGG16 without its top at 224x224 (the seed's input size), random weights,
synthetic images, written against Keras 3's backend-agnostic API so it runs where TensorFlow is missing (the lent
GPU machines have JAX and PyTorch, no TensorFlow): ``KERAS_BACKEND=tensorflow|jax|torch``.

  1. frozen-base forward images/s, float32 vs mixed_float16 (what the cache pass costs per image)
  2. naive epoch (the seed recipe: base frozen but recomputed every step, head trained), float32 vs mixed
  3. cached epoch (head trained on precomputed base activations), and E epochs naive vs cached (cache once + E
     head epochs)

    KERAS_BACKEND=jax python bench/gpu.py [N_IMAGES=2048] [EPOCHS=5] [BATCH=64]

Exits 3 when the backend sees no GPU (numbers would be meaningless; ALLOW_CPU=1 runs it as a dry run). With the
jax or torch backend these are that backend's kernels, not TensorFlow's: a proxy for the model's arithmetic on
the GPU (the cached/naive ratio and the mixed-precision gain), not for transfuse's tf_keras training loop.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")
import keras  # noqa: E402  (after the backend is chosen)

# VGG16's convolutions per 224x224 image: 15.47 GMAC -> 30.9 GFLOP
FLOPS = 30.9e9


def gpus() -> list[str]:
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return [str(d) for d in jax.devices() if d.platform == "gpu"]
    if backend == "torch":
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    import tensorflow as tf

    found = tf.config.list_physical_devices("GPU")
    for g in found:
        tf.config.experimental.set_memory_growth(g, True)
    return [g.name for g in found]


def matmul_peak(dtype: str, on_gpu: bool) -> float:
    """Best of 10 square matmuls, TFLOP/s (convert_to_numpy of one element waits for the device)."""
    m = 8192 if on_gpu else 1024
    a = keras.random.normal((m, m), dtype=dtype, seed=1)
    b = keras.random.normal((m, m), dtype=dtype, seed=2)
    keras.ops.convert_to_numpy(keras.ops.matmul(a, b)[0, 0])
    best = 1e9
    for _ in range(10):
        t = time.perf_counter()
        keras.ops.convert_to_numpy(keras.ops.matmul(a, b)[0, 0])
        best = min(best, time.perf_counter() - t)
    return 2 * m ** 3 / best / 1e12


def build(policy: str):
    keras.mixed_precision.set_global_policy(policy)
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(224, 224, 3))
    base.trainable = False
    inp = keras.Input((224, 224, 3))
    feats = base(inp, training=False)
    head_in = keras.Input(feats.shape[1:])
    h = keras.layers.Flatten()(head_in)
    h = keras.layers.Dense(256, activation="relu")(h)
    h = keras.layers.Dense(10)(h)
    out = keras.layers.Activation("softmax", dtype="float32")(h)
    head = keras.Model(head_in, out)
    full = keras.Model(inp, head(feats))
    return base, head, full


def timed(fn, reps: int = 1) -> float:
    fn()  # warm-up: compilation, autotuning
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main(n: int, epochs: int, batch: int) -> int:
    found = gpus()
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}, GPUs: {found}")
    if not found and os.environ.get("ALLOW_CPU") != "1":
        print("no GPU visible: stopping (ALLOW_CPU=1 runs it anyway, as a dry run)")
        return 3
    print(f"matmul peak: float32 {matmul_peak('float32', bool(found)):.1f} TFLOP/s, "
          f"float16 {matmul_peak('float16', bool(found)):.1f} TFLOP/s")
    rng = np.random.default_rng(0)
    x = rng.uniform(-120, 130, (n, 224, 224, 3)).astype(np.float32)  # VGG16's "caffe" input range
    y = rng.integers(0, 10, n).astype(np.int64)
    results = {}
    for policy in ("float32", "mixed_float16"):
        base, head, full = build(policy)
        t_fwd = timed(lambda: base.predict(x, batch_size=batch, verbose=0))
        full.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
        t_naive = timed(lambda: full.fit(x, y, batch_size=batch, epochs=1, verbose=0))
        feats = base.predict(x, batch_size=batch, verbose=0)
        head.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
        t_head = timed(lambda: head.fit(feats, y, batch_size=batch, epochs=1, verbose=0))
        results[policy] = (t_fwd, t_naive, t_head)
        print(f"{policy:14s} base forward {n / t_fwd:8.0f} img/s ({n / t_fwd * FLOPS / 1e12:.1f} TFLOP/s) | "
              f"naive epoch {n / t_naive:8.0f} img/s | cached head epoch {n / t_head:9.0f} img/s")
        naive_total, cached_total = epochs * t_naive, t_fwd + epochs * t_head
        print(f"{policy:14s} {epochs} epochs on {n} images: naive {naive_total:.2f} s, cached {cached_total:.2f} s "
              f"(cache {t_fwd:.2f} s + head), speed-up {naive_total / cached_total:.1f}x")
    f32, mp = results["float32"], results["mixed_float16"]
    print(f"mixed_float16 vs float32: base forward {f32[0] / mp[0]:.2f}x, naive epoch {f32[1] / mp[1]:.2f}x")
    return 0


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:4]]
    sys.exit(main(*(args + [2048, 5, 64][len(args):])))
