"""Bounded HTTP load test of the Serve app against an unbatched float32 Keras baseline, on 127.0.0.1.

(a) the app (serve/app.py) serving an int8 LiteRT bundle with dynamic batching;
(b) a baseline replica that runs the float32 tf_keras members one after another per request, no batching.
Both get the same CPUs per replica and the same load: N client threads, each sending one-image ``:predict``
requests back to back for T seconds. Prints p50/p99 latency, throughput and the ratios (a)/(b).

    python -m bench.serve --clients 8 --seconds 10            # builds a demo bundle on digits first
    python -m bench.serve --bundle RUN/bundle --keras W1.weights.h5 W2.weights.h5 ...   # (demo-built members)

``write_demo_bundle`` (also used by tests/test_serve.py) trains tiny real tf_keras CNNs on scikit-learn's
digits, converts them to .tflite (float32 or full-integer int8) and writes a real bundle with
``transfuse.bundle.write_bundle``.
"""

# No `from __future__ import annotations`: the baseline's FastAPI route needs its `Request` annotation as a
# real class at runtime (string annotations on a serve.ingress method are not resolvable).

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np

from transfuse import runtime  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow is imported)

INPUT_SIZE = 32  # pixels: the CNN input after preprocessing (digits are 8 x 8 grey, upsampled)
NORMALIZATION = "unit"  # x / 255, vgg_small's convention


# ------------------------------------------------------------------------------- a tiny real bundle


def digits_uint8() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's digits as N x 8 x 8 x 1 uint8 (0..16 scaled to 0..255), labels, class names."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, d.target.astype(np.int64), [str(c) for c in d.target_names]


def build_cnn(seed: int, width: int = 8, num_classes: int = 10) -> Any:
    """A small CNN with two outputs, logits and a 32-d embedding (what bundle members export)."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    L = tf.keras.layers
    inp = tf.keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="image")
    h = L.Conv2D(width, 3, padding="same", activation="relu")(inp)
    h = L.MaxPooling2D()(h)
    h = L.Conv2D(2 * width, 3, padding="same", activation="relu")(h)
    h = L.MaxPooling2D()(h)
    h = L.Flatten()(h)
    emb = L.Dense(32, activation="relu", name="embedding")(h)
    logits = L.Dense(num_classes, name="logits")(emb)
    return tf.keras.Model(inp, [logits, emb])


def train_cnn(model: Any, x: np.ndarray, y: np.ndarray, epochs: int) -> float:
    """Fit the logits head with Adam; returns train accuracy (a sanity number, not a result)."""
    import tensorflow as tf

    train = tf.keras.Model(model.input, model.outputs[0])
    train.compile(tf.keras.optimizers.Adam(3e-3),  # lr: fast convergence on 1,797 digits
                  tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    hist = train.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    return float(hist.history["accuracy"][-1])


def to_tflite(model: Any, int8: bool, representative: Optional[np.ndarray] = None) -> bytes:
    """A .tflite with one signature: image -> {logits, embedding}; float I/O (int8 inside when asked)."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, INPUT_SIZE, INPUT_SIZE, 3], tf.float32, name="image")])
    def serving(image):
        logits, emb = model(image, training=False)
        return {"logits": logits, "embedding": emb}

    conv = tf.lite.TFLiteConverter.from_concrete_functions([serving.get_concrete_function()], model)
    if int8:
        rep = representative if representative is not None else np.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), np.float32)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([rep[i:i + 1]] for i in range(len(rep)))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return conv.convert()


def write_demo_bundle(out_dir: str, *, members: int = 1, int8: bool = False, epochs: int = 3,
                      version: str = "1", num_threads: int = 1, keras_dir: Optional[str] = None) -> dict:
    """Train ``members`` tiny CNNs on digits, write them as a real bundle (average combiner) to ``out_dir``.

    With ``keras_dir`` the float32 tf_keras weights are saved there too (``member<i>.weights.h5``), for the
    baseline. Returns the bundle's manifest.
    """
    from transfuse.bundle import CNNMember, write_bundle
    from transfuse.metrics import evaluate
    from transfuse.preprocess import PreprocessSpec, preprocess

    images, labels, names = digits_uint8()
    spec = PreprocessSpec(INPUT_SIZE, NORMALIZATION)
    x = preprocess(images, spec)
    cnn, probs = [], []
    for i in range(members):
        m = build_cnn(seed=i)
        train_cnn(m, x, labels, epochs)
        if keras_dir:
            Path(keras_dir).mkdir(parents=True, exist_ok=True)
            m.save_weights(str(Path(keras_dir) / f"member{i}.weights.h5"))
        logits = m.predict(x, batch_size=256, verbose=0)[0]
        probs.append(np.exp(logits - logits.max(1, keepdims=True)))
        probs[-1] /= probs[-1].sum(1, keepdims=True)
        cnn.append(CNNMember(name=f"cnn{i}", data=to_tflite(m, int8, x[::9][:200]), input="image"))
    metrics = {"train_float32": evaluate(np.mean(probs, 0), labels)}  # digits has no held-out split here
    return write_bundle(out_dir, name="digits-demo", version=version, class_names=names, input_shape=(8, 8, 1),
                        preprocess_spec=spec, cnn_members=cnn, variant="int8" if int8 else "float32",
                        metrics=metrics, num_threads=num_threads, overwrite=True)


# ----------------------------------------------------------------------------------------- baseline


def _baseline_deployment():
    """The baseline: float32 tf_keras members called one after another per request, no batching."""
    from fastapi import FastAPI, Request
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="KerasBaseline", max_ongoing_requests=64)
    @serve.ingress(api)
    class KerasBaseline:
        def __init__(self, weights: list[str], class_names: list[str]) -> None:
            from transfuse.preprocess import PreprocessSpec

            self.models = []
            for w in weights:
                m = build_cnn(seed=0, num_classes=len(class_names))
                m.load_weights(w)
                self.models.append(m)
            self.spec = PreprocessSpec(INPUT_SIZE, NORMALIZATION)
            self.names = class_names
            self.pool = ThreadPoolExecutor(max_workers=1)  # one request at a time: no batching

        def _predict(self, x: np.ndarray) -> np.ndarray:
            from transfuse.preprocess import preprocess

            xb = preprocess(x, self.spec)
            probs = []
            for m in self.models:  # one member after another
                z = m(xb, training=False)[0].numpy()
                e = np.exp(z - z.max(1, keepdims=True))
                probs.append(e / e.sum(1, keepdims=True))
            return np.mean(probs, 0)

        @api.post("/v1/models/{name}:predict")
        async def predict(self, name: str, request: Request) -> dict:
            x = np.asarray((await request.json())["instances"], dtype=np.uint8)
            p = await asyncio.get_running_loop().run_in_executor(self.pool, self._predict, x)
            return {"predictions": [{"class_id": int(r.argmax()), "label": self.names[int(r.argmax())],
                                     "probabilities": r.tolist()} for r in p]}

    return KerasBaseline


# ---------------------------------------------------------------------------------------- load test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_test(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict[str, float]:
    """``clients`` threads post bodies back to back for ``seconds``; latency percentiles and throughput."""
    import httpx

    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker(k: int) -> None:
        mine, bad = [], 0
        with httpx.Client(timeout=60.0) as c:
            i = k
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = c.post(url, content=bodies[i % len(bodies)], headers={"content-type": "application/json"})
                mine.append(time.perf_counter() - t0)
                bad += r.status_code != 200
                i += clients
        with lock:
            lat.extend(mine)
            errors[0] += bad

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    a = np.asarray(lat) * 1000.0
    return {"requests": len(a), "errors": errors[0], "seconds": wall, "throughput_rps": len(a) / wall,
            "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def warm_up(url: str, body: bytes, n: int = 5) -> None:
    import httpx

    for _ in range(n):
        httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=120.0).raise_for_status()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each load phase")
    p.add_argument("--members", type=int, default=3, help="demo: CNN members in the bundle and the baseline")
    p.add_argument("--bundle", help="an existing int8 bundle (else a demo bundle is built)")
    p.add_argument("--keras", nargs="*", default=None, help="baseline weights (build_cnn's architecture)")
    p.add_argument("--workdir", help="demo: build here, or reuse the demo already built here")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica, both sides")
    p.add_argument("--threads", type=int, default=2, help="LiteRT threads per model (demo bundle)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    args = p.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0:
        p.error("--clients must be >= 1 and --seconds > 0")

    from ray import serve

    from serve.app import AppArgs, build_app
    from transfuse.bundle import load_bundle

    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="transfuse-bench-"))
    if args.bundle:
        if not args.keras:
            p.error("--bundle needs --keras weights for the baseline")
        bundle_dir, weights = args.bundle, args.keras
    else:
        bundle_dir, kdir = str(tmp / "bundle"), str(tmp / "keras")
        if not (Path(bundle_dir) / "manifest.json").is_file():
            t0 = time.perf_counter()
            write_demo_bundle(bundle_dir, members=args.members, int8=True, num_threads=args.threads, keras_dir=kdir)
            print(f"demo: {args.members} members trained and converted in {time.perf_counter() - t0:.1f}s")
        weights = sorted(str(w) for w in Path(kdir).glob("*.weights.h5"))
    bundle = load_bundle(bundle_dir)
    images, _, _ = digits_uint8()
    bodies = [json.dumps({"instances": images[i:i + 1].tolist()}).encode() for i in range(256)]

    runtime.init_ray(num_cpus=4)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/models/bench:predict"
    results = {}
    try:
        app = build_app(AppArgs(bundle=bundle_dir, name="bench", max_batch_size=args.max_batch_size,
                                batch_wait_timeout_s=args.batch_wait_ms / 1000.0, min_replicas=1, max_replicas=1,
                                num_cpus=args.num_cpus, max_ongoing_requests=max(64, args.clients * 2)))
        serve.run(app, name="bench", route_prefix="/")
        warm_up(url, bodies[0])
        results["a_int8_batched"] = load_test(url, bodies, args.clients, args.seconds)
        serve.delete("bench")
        base = _baseline_deployment().options(ray_actor_options={"num_cpus": args.num_cpus})
        serve.run(base.bind(weights, bundle.class_names), name="baseline", route_prefix="/")
        warm_up(url, bodies[0])
        results["b_keras_float32_unbatched"] = load_test(url, bodies, args.clients, args.seconds)
        serve.delete("baseline")
    finally:
        serve.shutdown()
    a, b = results["a_int8_batched"], results["b_keras_float32_unbatched"]
    print(f"clients={args.clients} seconds={args.seconds} members={len(weights)} num_cpus/replica={args.num_cpus}")
    for k, r in results.items():
        print(f"{k:28s} n={r['requests']:6d} errors={r['errors']} throughput={r['throughput_rps']:8.1f} req/s "
              f"p50={r['p50_ms']:7.1f} ms p99={r['p99_ms']:7.1f} ms")
    print(f"ratio (a)/(b): throughput x{a['throughput_rps'] / b['throughput_rps']:.2f}, "
          f"p99 x{a['p99_ms'] / b['p99_ms']:.2f} (goal: throughput >= 3x at a lower p99)")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
