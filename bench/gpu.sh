#!/usr/bin/env bash
# GPU check for the fine-tuning path (run on a machine with one GPU; self-contained: needs only TensorFlow).
# VGG16 without its top at 224x224 (the seed's input size), random weights, synthetic images:
#   1. frozen-base forward images/s, float32 vs mixed_float16 (what the cache pass costs per image)
#   2. naive epoch (seed recipe: base frozen but recomputed, head trained) images/s, float32 vs mixed
#   3. cached epoch (head trained on precomputed base activations) images/s, and the time for E epochs
#      naive vs cached (cache once + E head epochs)
# Usage: bash bench/gpu.sh [N_IMAGES=2048] [EPOCHS=5] [BATCH=64]
# Prints one line per measurement; exits 3 when TensorFlow sees no GPU (numbers would be meaningless;
# ALLOW_CPU=1 runs it anyway as a dry run of the script).
set -euo pipefail
N="${1:-2048}"; EPOCHS="${2:-5}"; BATCH="${3:-64}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import tensorflow" 2>/dev/null; then PY=.venv/bin/python
  else PY=python3; fi
fi
export TF_USE_LEGACY_KERAS="${TF_USE_LEGACY_KERAS:-1}" TF_CPP_MIN_LOG_LEVEL=2
if ! "$PY" -c "import tf_keras" 2>/dev/null; then export TF_USE_LEGACY_KERAS=0; fi  # Keras 3 then
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" - "$N" "$EPOCHS" "$BATCH" <<'EOF'
import os, sys, time
import numpy as np
import tensorflow as tf

n, epochs, batch = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
gpus = tf.config.list_physical_devices("GPU")
print(f"tensorflow {tf.__version__}, keras {tf.keras.__name__}, GPUs: {[g.name for g in gpus]}")
if not gpus and os.environ.get("ALLOW_CPU") != "1":
    print("no GPU visible to TensorFlow: stopping (ALLOW_CPU=1 runs it anyway, as a dry run)"); sys.exit(3)
for g in gpus:
    tf.config.experimental.set_memory_growth(g, True)
keras = tf.keras
rng = np.random.default_rng(0)
x = rng.uniform(-120, 130, (n, 224, 224, 3)).astype(np.float32)  # VGG16 "caffe" input range
y = rng.integers(0, 10, n).astype(np.int64)

def matmul_peak(dtype):
    m = 8192 if gpus else 1024
    a = tf.random.normal((m, m), dtype=dtype); b = tf.random.normal((m, m), dtype=dtype)
    tf.linalg.matmul(a, b).numpy(); best = 1e9
    for _ in range(10):
        t = time.perf_counter(); tf.linalg.matmul(a, b).numpy(); best = min(best, time.perf_counter() - t)
    return 2 * m ** 3 / best / 1e12

print(f"matmul peak: float32 {matmul_peak(tf.float32):.1f} TFLOP/s, float16 {matmul_peak(tf.float16):.1f} TFLOP/s")

def build(policy):
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

def timed(fn, reps=1):
    fn()  # warm-up (graph building, autotuning)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps

# VGG16 conv FLOPs per 224x224 image: 15.47 GMAC -> 30.9 GFLOP
FLOPS = 30.9e9
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
    naive_total = epochs * t_naive
    cached_total = t_fwd + epochs * t_head
    print(f"{policy:14s} {epochs} epochs on {n} images: naive {naive_total:.2f} s, cached {cached_total:.2f} s "
          f"(cache {t_fwd:.2f} s + head), speed-up {naive_total / cached_total:.1f}x")
f32, mp = results["float32"], results["mixed_float16"]
print(f"mixed_float16 vs float32: base forward {f32[0] / mp[0]:.2f}x, naive epoch {f32[1] / mp[1]:.2f}x")
EOF
