"""The Serve app end to end: a real local Ray, serve.run on 127.0.0.1, real HTTP, a tiny real bundle.

The bundle: a small tf_keras CNN trained on scikit-learn's digits, converted to .tflite and written with
``transfuse.bundle.write_bundle`` (bench.serve.write_demo_bundle). Each check compares what comes over HTTP with
what the bundle predicts offline for the same images.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from transfuse import runtime  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow is imported)

ROOT = Path(__file__).resolve().parent.parent
MODEL = "digits"
MAX_INSTANCES = 16  # small limits so the limit cases stay small
MAX_BYTES = 200_000
API_KEY = "s3cret-key"

httpx = pytest.importorskip("httpx")


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from bench.serve import digits_uint8

    x, y, _ = digits_uint8()
    return x, y


def _member_file(bundle_dir: Path) -> str:
    """The first CNN member's model file, as the bundle's manifest names it."""
    return json.loads((bundle_dir / "manifest.json").read_text())["cnn_members"][0]["file"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, str]:
    """v1 and v2 (different weights, versions "1" and "2"), and v2 with one model byte flipped."""
    from bench.serve import write_demo_bundle

    d = tmp_path_factory.mktemp("bundles")
    write_demo_bundle(str(d / "v1"), members=1, epochs=2, version="1")
    write_demo_bundle(str(d / "v2"), members=1, epochs=1, version="2")
    shutil.copytree(d / "v2", d / "tampered")
    f = d / "tampered" / _member_file(d / "tampered")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return {"v1": str(d / "v1"), "v2": str(d / "v2"), "tampered": str(d / "tampered")}


@pytest.fixture(scope="module")
def offline(bundles):
    from transfuse.bundle import load_bundle

    return {k: load_bundle(bundles[k]) for k in ("v1", "v2")}


def _free_port() -> int:
    from bench.serve import free_port

    return free_port()


def _args(bundle: str, **kw):
    from serve.app import AppArgs

    base = dict(bundle=bundle, name=MODEL, num_cpus=0.25, min_replicas=1, max_replicas=1, max_batch_size=8,
                batch_wait_timeout_s=0.005, max_instances=MAX_INSTANCES, max_request_bytes=MAX_BYTES)
    base.update(kw)
    return AppArgs(**base)


@pytest.fixture(scope="module")
def server(ray_cluster, bundles):
    """Two apps on one proxy: the open one at /, one with an API key at /secure."""
    from ray import serve

    from serve.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(_args(bundles["v1"])), name="open", route_prefix="/")
    serve.run(build_app(_args(bundles["v1"], api_key=API_KEY)), name="secure", route_prefix="/secure")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _probs(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.array([p["probabilities"] for p in resp.json()["predictions"]], dtype=np.float32)


def _png(img: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- unit level


def test_app_args_validate_and_name_the_field():
    from pydantic import ValidationError

    from serve.app import AppArgs, build_app

    with pytest.raises(ValidationError, match="bundle"):
        build_app({"name": "x"})
    with pytest.raises(ValidationError, match="min_replicas"):
        AppArgs(bundle="b", min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError, match="unexpected|extra"):
        AppArgs(bundle="b", max_batchsize=3)


def test_config_yaml_is_a_valid_serve_config():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve.app import AppArgs

    doc = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    cfg = ServeDeploySchema.model_validate(doc)
    app = cfg.applications[0]
    assert app.import_path == "serve.app:build_app"
    AppArgs.model_validate(app.args)
    assert app.deployments[0].name == "TransfuseModel"
    assert set(app.deployments[0].user_config) == {"bundle"}


def test_replica_import_path_has_no_tensorflow(bundles):
    """What a replica imports (the app module, the bundle loader, a prediction) does not pull in TensorFlow."""
    code = ("import sys, numpy as np; import serve.app; from transfuse.bundle import load_bundle; "
            f"b = load_bundle({bundles['v1']!r}); b.predict_proba(np.zeros((2, 8, 8, 1), np.uint8)); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


# ------------------------------------------------------------------------------------ predictions


def test_predict_equals_offline_bundle(server, digits, offline):
    x, _ = digits
    b = offline["v1"]
    sample = x[:13]  # 13 > max_batch_size 8: the request is split into two batches and put back in order
    r = httpx.post(f"{server}/v1/models/{MODEL}:predict", json={"instances": sample.tolist()})
    got = _probs(r)
    want = b.predict_proba(sample)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    preds = r.json()["predictions"]
    assert [p["class_id"] for p in preds] == want.argmax(1).tolist()
    assert [p["label"] for p in preds] == [b.class_names[k] for k in want.argmax(1)]
    assert r.json()["model_version"] == "1"
    # floats in [0, 1], and H x W without the channel axis, are the same images
    f = (sample[..., 0] / 255.0).tolist()
    got_f = _probs(httpx.post(f"{server}/v1/models/{MODEL}:predict", json={"instances": f}))
    np.testing.assert_allclose(got_f, b.predict_proba(sample[..., 0] / 255.0), rtol=0, atol=1e-6)


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, digits, offline):
    x, _ = digits
    want = offline["v1"].predict_proba(x[:24])
    got: dict[int, np.ndarray] = {}

    def one(i: int) -> None:
        got[i] = _probs(httpx.post(f"{server}/v1/models/{MODEL}:predict", json={"instances": x[i:i + 1].tolist()},
                                   timeout=60))[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_allclose(np.stack([got[i] for i in range(24)]), want, rtol=0, atol=1e-5)
    assert [int(got[i].argmax()) for i in range(24)] == want.argmax(1).tolist()


def test_uploaded_images_any_size(server, digits, offline):
    from PIL import Image

    x, _ = digits
    b = offline["v1"]
    exact = _png(x[0, ..., 0])  # 8 x 8 grey: no resize, so it must equal the JSON route on x[0]
    big = np.kron(x[1, ..., 0], np.ones((40, 30), np.uint8))  # 320 x 240 grey
    big_rgb = np.repeat(big[..., None], 3, axis=-1)
    files = [("files", ("exact.png", exact, "image/png")),
             ("files", ("big.jpg", _png(big_rgb, "JPEG"), "image/jpeg")),
             ("files", ("big.png", _png(big), "image/png"))]
    r = httpx.post(f"{server}/v1/models/{MODEL}/images", files=files)
    got = _probs(r)
    assert [p["filename"] for p in r.json()["predictions"]] == ["exact.png", "big.jpg", "big.png"]
    np.testing.assert_allclose(got[0], b.predict_proba(x[:1])[0], rtol=0, atol=1e-6)
    # the large ones are resized to the bundle's raw 8 x 8 as the manifest says, then predicted
    for i, data in ((1, files[1][1][1]), (2, files[2][1][1])):
        small = np.asarray(Image.open(io.BytesIO(data)).convert("L").resize((8, 8), Image.Resampling.BILINEAR))
        np.testing.assert_allclose(got[i], b.predict_proba(small[None, ..., None])[0], rtol=0, atol=1e-6)
    assert int(got[2].argmax()) == int(b.predict_proba(x[1:2]).argmax())


def test_metadata_and_health(server, offline):
    b = offline["v1"]
    m = httpx.get(f"{server}/v1/models/{MODEL}").json()
    assert m["class_names"] == b.class_names
    assert m["input_shape"] == [8, 8, 1] and m["input_spec"] == b.input_spec
    assert m["bundle"]["version"] == "1" and m["bundle"]["checksum"] == b.checksum
    assert m["metrics"] == b.manifest["metrics"] and "accuracy" in m["metrics"]["train_float32"]
    h = httpx.get(f"{server}/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    spec = httpx.get(f"{server}/openapi.json").json()
    assert {"/v1/models/{name}:predict", "/v1/models/{name}/images", "/v1/models/{name}", "/healthz"} <= set(
        spec["paths"])
    assert httpx.get(f"{server}/docs").status_code == 200


# -------------------------------------------------------------------------------------- bad input

_IMG = [[0] * 8 for _ in range(8)]


def _json(obj) -> dict:
    return {"content": json.dumps(obj).encode(), "headers": {"content-type": "application/json"}}


PREDICT = f"/v1/models/{MODEL}:predict"
IMAGES = f"/v1/models/{MODEL}/images"
MULTIPART = {"content-type": "multipart/form-data; boundary=xx"}
BAD = [  # (case, method, path, request kwargs, status, error pattern)
    ("not_json", "POST", PREDICT, {"content": b"{instances: nope"}, 400, "not valid JSON"),
    ("empty_body", "POST", PREDICT, {"content": b""}, 400, "empty body"),
    ("not_an_object", "POST", PREDICT, _json([_IMG]), 400, "JSON object"),
    ("unknown_key", "POST", PREDICT, _json({"inputs": [_IMG]}), 400, "unknown key.*inputs"),
    ("instances_not_list", "POST", PREDICT, _json({"instances": "abc"}), 400, "must be a list"),
    ("empty_list", "POST", PREDICT, _json({"instances": []}), 400, "empty"),
    ("too_many_instances", "POST", PREDICT, _json({"instances": [_IMG] * (MAX_INSTANCES + 1)}), 413,
     f"too many instances.*{MAX_INSTANCES}"),
    ("too_many_bytes", "POST", PREDICT, {"content": b'{"instances": [' + b" " * MAX_BYTES + b"]}"}, 413,
     f"{MAX_BYTES} bytes"),
    ("wrong_shape", "POST", PREDICT, _json({"instances": [[[0] * 8] * 7]}), 422, "8 x 8 x 1.*got 7 x 8"),
    ("rgb_for_grey_model", "POST", PREDICT, _json({"instances": [[[[0, 0, 0]] * 8] * 8]}), 422, "8 x 8 x 1"),
    ("flat_vector", "POST", PREDICT, _json({"instances": [0] * 10}), 422, "got a scalar"),
    ("ragged", "POST", PREDICT, _json({"instances": [_IMG, [[0, 1]]]}), 422, "ragged"),
    ("strings", "POST", PREDICT, _json({"instances": [[["a"] * 8] * 8]}), 422, "strings"),
    ("nulls", "POST", PREDICT, _json({"instances": [[[None] * 8] * 8]}), 422, "numbers"),
    ("booleans", "POST", PREDICT, _json({"instances": [[[True] * 8] * 8]}), 422, "booleans"),
    ("int_out_of_range", "POST", PREDICT, _json({"instances": [[[300] * 8] * 8]}), 422, "0..255"),
    ("float_out_of_range", "POST", PREDICT, _json({"instances": [[[-0.5] * 8] * 8]}), 422, r"\[0, 1\]"),
    ("nan", "POST", PREDICT, {"content": ('{"instances": [[' + ",".join(["[NaN" + ",0.5" * 7 + "]"] * 8)
                                          + "]]}").encode()}, 422, "NaN or infinite"),
    ("infinity", "POST", PREDICT, {"content": ('{"instances": [[' + ",".join(["[Infinity" + ",0.5" * 7 + "]"] * 8)
                                               + "]]}").encode()}, 422, "NaN or infinite"),
    ("unknown_model", "POST", "/v1/models/nope:predict", _json({"instances": [_IMG]}), 404, "unknown model 'nope'"),
    ("unknown_model_meta", "GET", "/v1/models/nope", {}, 404, "unknown model"),
    ("unknown_route", "GET", "/v2/whatever", {}, 404, "Not Found"),
    ("not_an_image", "POST", IMAGES, {"files": [("files", ("x.png", b"not an image at all", "image/png"))]}, 415,
     "x.png: not an image"),
    ("gif", "POST", IMAGES, {"files": [("files", ("x.gif", "GIF", "image/gif"))]}, 415, "GIF.*allowed: PNG, JPEG"),
    ("truncated_png", "POST", IMAGES, {"files": [("files", ("t.png", "TRUNC", "image/png"))]}, 415, "t.png"),
    ("not_multipart", "POST", IMAGES, _json({"instances": [_IMG]}), 415, "multipart/form-data"),
    ("no_files", "POST", IMAGES, {"content": b"--xx--\r\n", "headers": MULTIPART}, 400, "no image files"),
    ("only_a_field", "POST", IMAGES, {"content": b'--xx\r\nContent-Disposition: form-data; name="a"\r\n\r\nb\r\n'
                                                 b"--xx--\r\n", "headers": MULTIPART}, 400, "'a' is not a file"),
    ("text_field", "POST", IMAGES, {"data": {"note": "hi"}, "files": [("files", ("a.png", "PNG", "image/png"))]},
     400, "'note' is not a file"),
    ("too_many_files", "POST", IMAGES, {"files": [("files", (f"{i}.png", "PNG", "image/png"))
                                                  for i in range(MAX_INSTANCES + 1)]}, 413, "too many files"),
    ("images_unknown_model", "POST", "/v1/models/nope/images", {"files": [("files", ("a.png", "PNG", "image/png"))]},
     404, "unknown model"),
]


def _materialize(kwargs: dict, digits_x: np.ndarray) -> dict:
    """Placeholders in the table become real image bytes (made here, once the digits are loaded)."""
    from PIL import Image

    if "files" not in kwargs:
        return kwargs
    files = []
    for field, (name, data, ctype) in kwargs["files"]:
        if data == "PNG":
            data = _png(digits_x[0, ..., 0])
        elif data == "GIF":
            buf = io.BytesIO()
            Image.fromarray(digits_x[0, ..., 0]).save(buf, "GIF")
            data = buf.getvalue()
        elif data == "TRUNC":
            data = _png(digits_x[0, ..., 0])[:40]
        files.append((field, (name, data, ctype)))
    return {**kwargs, "files": files}


@pytest.mark.parametrize("case,method,path,kwargs,status,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_4xx_json_error(server, digits, case, method, path, kwargs, status, pattern):
    import re

    r = httpx.request(method, server + path, timeout=60, **_materialize(kwargs, digits[0]))
    assert r.status_code == status, (case, r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and re.search(pattern, body["error"]), (case, body)


def test_replica_survives_bad_input(server, digits, offline):
    """After every bad request above (and a burst of them at once), the same replica still answers."""
    before = httpx.get(f"{server}/healthz").json()["replica"]
    bad = [b'{"instances": [[[NaN]]]}', b"\xff\xfe", b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}"]
    threads = [threading.Thread(target=httpx.post, args=(f"{server}{PREDICT}",), kwargs={"content": c, "timeout": 60})
               for c in bad * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r = httpx.post(f"{server}{PREDICT}", content=bad[2])
    assert r.status_code == 400 and "error" in r.json()
    after = httpx.get(f"{server}/healthz").json()["replica"]
    assert before == after
    np.testing.assert_allclose(_probs(httpx.post(f"{server}{PREDICT}", json={"instances": digits[0][:2].tolist()})),
                               offline["v1"].predict_proba(digits[0][:2]), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def broken_bundle(bundles, tmp_path_factory) -> str:
    """A bundle that verifies (intact checksums) but cannot predict: its preprocess spec resizes to 20 x 20,
    which the 32 x 32 model's Flatten -> Dense cannot take."""
    from transfuse.bundle import CNNMember, write_bundle
    from transfuse.preprocess import PreprocessSpec

    data = (Path(bundles["v1"]) / _member_file(Path(bundles["v1"]))).read_bytes()
    out = str(tmp_path_factory.mktemp("broken") / "bundle")
    write_bundle(out, name="broken", version="b", class_names=[str(i) for i in range(10)], input_shape=(8, 8, 1),
                 preprocess_spec=PreprocessSpec(20, "unit"), cnn_members=[CNNMember("cnn0", data, input="image")])
    return out


def test_health_check_and_swap_refuse_a_bundle_that_cannot_predict(bundles, broken_bundle):
    """The deployment class itself (no Serve): startup, reconfigure and check_health all probe the model."""
    import asyncio

    from serve.app import TransfuseReplica as cls
    from transfuse.bundle import BundleError, load_bundle

    with pytest.raises(BundleError, match="cannot predict"):
        cls(_args(broken_bundle))
    m = cls(_args(bundles["v1"]))

    async def scenario() -> None:
        await m.check_health()
        await m.reconfigure({"bundle": bundles["v1"]})  # Serve's first call after __init__: nothing to reload
        await m.reconfigure({"bundle": broken_bundle})
        assert "cannot predict" in m._last_refused["error"] and m._bundle.version == "1"
        await m.check_health()
        await m.reconfigure({"bundle": bundles["v2"], "max_batch_size": 4})
        assert m._bundle.version == "2" and m._last_refused is None
        assert m._max_batch_size == 4
        await m.reconfigure({"bundle": bundles["v2"], "max_batch_size": 0})
        assert "max_batch_size" in m._last_refused["error"] and m._max_batch_size == 4
        m._bundle = load_bundle(broken_bundle)  # a model that stops predicting must fail the health check
        with pytest.raises(BundleError, match="cannot predict"):
            await m.check_health()

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------------- API key


@pytest.mark.parametrize("headers,status", [
    ({}, 401),
    ({"Authorization": "Bearer wrong"}, 401),
    ({"x-api-key": "wrong"}, 401),
    ({"Authorization": f"Basic {API_KEY}"}, 401),
    ({"Authorization": f"Bearer {API_KEY}"}, 200),
    ({"x-api-key": API_KEY}, 200),
], ids=["none", "wrong_bearer", "wrong_header", "not_bearer", "bearer", "x_api_key"])
def test_api_key(server, headers, status):
    r = httpx.post(f"{server}/secure{PREDICT}", json={"instances": [_IMG]}, headers=headers)
    assert r.status_code == status, r.text
    m = httpx.get(f"{server}/secure/v1/models/{MODEL}", headers=headers)
    assert m.status_code == status
    if status == 401:
        assert "API key" in r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server}/secure/healthz").status_code == 200  # liveness stays open
    assert httpx.post(f"{server}{PREDICT}", json={"instances": [_IMG]}).status_code == 200  # other app: no key


# --------------------------------------------------------------------------------------- hot swap


def _wait(pred, what: str, timeout_s: float = 120.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_hot_swap_under_load_loses_no_request_and_refuses_a_tampered_bundle(server, bundles, digits, offline):
    """The Serve config path (what `serve run/deploy serve/config.yaml` use): only user_config changes, so the
    running replica reconfigures in place while 4 clients keep sending."""
    from ray.serve import delete
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    from transfuse.bundle import BundleError, load_bundle

    with pytest.raises(BundleError, match="altered"):
        load_bundle(bundles["tampered"])
    x, _ = digits
    base = f"{server}/swap"

    def config(bundle: str) -> ServeDeploySchema:
        args = _args(bundles["v1"]).model_dump()
        return ServeDeploySchema.model_validate({"applications": [{
            "name": "swap", "route_prefix": "/swap", "import_path": "serve.app:build_app", "args": args,
            "runtime_env": {"env_vars": {"PYTHONPATH": str(ROOT)}},
            "deployments": [{"name": "TransfuseModel", "user_config": {"bundle": bundle}}]}]})

    client = serve_api.serve_start()
    client.deploy_apps(config(bundles["v1"]), _blocking=True)
    replica = httpx.get(f"{base}/healthz").json()["replica"]

    stop = threading.Event()
    results: list[tuple[int, int, str, np.ndarray]] = []  # (image index, status, version, probs)
    sent = [0]
    lock = threading.Lock()

    def client_loop(k: int) -> None:
        with httpx.Client(timeout=120) as c:
            i = k
            while not stop.is_set():
                with lock:
                    sent[0] += 1
                r = c.post(f"{base}{PREDICT}", json={"instances": x[i % 64:i % 64 + 1].tolist()})
                body = r.json()
                probs = np.array(body["predictions"][0]["probabilities"], np.float32) if r.status_code == 200 else None
                with lock:
                    results.append((i % 64, r.status_code, body.get("model_version", ""), probs))
                i += 4

    def count(version: str) -> int:
        with lock:
            return sum(1 for _, s, v, _ in results if v == version)

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: count("1") >= 20, "20 answers from v1")
        client.deploy_apps(config(bundles["v2"]))
        _wait(lambda: httpx.get(f"{base}/v1/models/{MODEL}").json()["bundle"]["version"] == "2", "the swap to v2")
        _wait(lambda: count("2") >= 20, "20 answers from v2")
        client.deploy_apps(config(bundles["tampered"]))
        meta = _wait(lambda: (m := httpx.get(f"{base}/v1/models/{MODEL}").json())["last_refused_bundle"] and m,
                     "the tampered bundle to be refused")
        assert "altered" in meta["last_refused_bundle"]["error"]
        assert meta["bundle"]["version"] == "2" and meta["bundle"]["checksum"] == offline["v2"].checksum
        n2 = count("2")
        _wait(lambda: count("2") >= n2 + 20, "20 more answers from v2 after the refusal")
        h = httpx.get(f"{base}/healthz").json()
        assert h["status"] == "ok" and h["replica"] == replica  # swapped in place, never restarted
    finally:
        stop.set()
        for t in threads:
            t.join()
        delete("swap")
    assert len(results) == sent[0]
    assert all(s == 200 for _, s, _, _ in results), [(s, v) for _, s, v, _ in results if s != 200][:5]
    assert {v for _, _, v, _ in results} == {"1", "2"}
    # every answer is wholly from the bundle it names: no request saw a half-swapped model
    for version in ("1", "2"):
        rows = [(i, p) for i, _, v, p in results if v == version]
        want = offline[f"v{version}"].predict_proba(x[[i for i, _ in rows]])
        np.testing.assert_allclose(np.stack([p for _, p in rows]), want, rtol=0, atol=1e-5)


def test_client_cli(server, digits, tmp_path, capsys):
    from serve.client import main

    x, _ = digits
    png = tmp_path / "digit.png"
    png.write_bytes(_png(np.kron(x[3, ..., 0], np.ones((5, 5), np.uint8))))
    inst = tmp_path / "batch.json"
    inst.write_text(json.dumps({"instances": x[:2].tolist()}))
    assert main(["--url", server, "--model", MODEL, str(png), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "digit.png:" in out and "version 1" in out
    assert main(["--url", server, "--model", MODEL, "--instances", str(inst)]) == 0
    assert "instance 1:" in capsys.readouterr().out
    assert main(["--url", server, "--model", "nope", str(png)]) == 1
    assert "unknown model" in capsys.readouterr().err


def test_jobs_deploy(server, bundles, digits, offline, tmp_path, capsys):
    """python -m jobs.deploy on the running cluster (the test's Serve proxy), then a real request to its URL."""
    from ray import serve

    from jobs.deploy import _args as deploy_args, _run
    from jobs._cli import main

    port = server.rsplit(":", 1)[1]
    common = ["--config", str(ROOT / "configs" / "smoke.yaml"), "--set", f"serve.port={port}",
              "--set", "serve.num_cpus=0.25", "--set", f"serve.name={MODEL}", "--app-name", "job",
              "--route-prefix", "/job"]
    with pytest.raises(SystemExit, match="altered"):
        main("deploy", _run, extra=deploy_args, argv=[*common, "--bundle", bundles["tampered"]])
    try:
        assert main("deploy", _run, extra=deploy_args, argv=[*common, "--bundle", bundles["v1"]]) == 0
        url = capsys.readouterr().out.split(": ", 1)[1].split()[0]
        assert url == f"{server}/job/v1/models/{MODEL}"
        x = digits[0][:3]
        np.testing.assert_allclose(_probs(httpx.post(f"{url}:predict", json={"instances": x.tolist()})),
                                   offline["v1"].predict_proba(x), rtol=0, atol=1e-6)
    finally:
        serve.delete("job")
