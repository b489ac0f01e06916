#!/usr/bin/env bash
# GPU check for the fine-tuning path (one GPU): bench/gpu.py with Keras 3 on TensorFlow where TensorFlow sees a
# GPU, else on JAX (the lent GPU machines have JAX, not TensorFlow). See bench/gpu.py for what it measures.
# Usage: bash bench/gpu.sh [N_IMAGES=2048] [EPOCHS=5] [BATCH=64]
set -euo pipefail
PY="${PYTHON:-python3}"
if [ -z "${KERAS_BACKEND:-}" ]; then
  if "$PY" -c "import tensorflow as tf, sys; sys.exit(not tf.config.list_physical_devices('GPU'))" 2>/dev/null; then
    export KERAS_BACKEND=tensorflow
  else
    export KERAS_BACKEND=jax
  fi
fi
export TF_USE_LEGACY_KERAS=0 TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" "$(dirname "$0")/gpu.py" "$@"
