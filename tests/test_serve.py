"""The Serve app end to end: a real local Ray, serve.run on 127.0.0.1, real HTTP and gRPC, a tiny real bundle.

The bundle: a small tf_keras CNN trained on scikit-learn's digits, converted to .tflite and written with
``transfuse.inference.bundle_writer.write_bundle`` (bench.serve.write_demo_bundle). Each check compares what comes over
the wire with what the bundle predicts offline for the same images. The Open Inference Protocol is spoken by the real
``tritonclient`` (HTTP and gRPC); TensorFlow Serving's by bodies shaped like its example client's.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from transfuse import environment  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow is imported)
from serve.app import undeploy

ROOT = Path(__file__).resolve().parent.parent
MODEL = "digits"
MAX_INSTANCES = 16  # small limits so the limit cases stay small
MAX_BYTES = 200_000
API_KEY = "s3cret-key"
GRPC: dict[str, str] = {}  # the gRPC proxy's address, set by the server fixture

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
    from transfuse.inference.bundle import load_bundle

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

    from serve.app import build_app, proxy_options
    from transfuse.config import ServeConfig

    port, gport = _free_port(), _free_port()
    serve.start(**proxy_options(ServeConfig(host="127.0.0.1", port=port, grpc_port=gport)))
    GRPC["url"] = f"127.0.0.1:{gport}"
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
    code = ("import sys, numpy as np; import serve.app; from transfuse.inference.bundle import load_bundle; "
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
    before = httpx.get(f"{server}/v1/models/{MODEL}").json()["batching"]  # one replica: its batches since start

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
    after = httpx.get(f"{server}/v1/models/{MODEL}").json()["batching"]
    assert after["size_total"] - before["size_total"] == 24  # every image went through the batcher once
    assert 1 <= after["batches"] - before["batches"] <= 24 and 1 <= after["size_largest"] <= 8  # max_batch_size 8


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
    # the large ones are resized to the bundle's raw 8 x 8 as the manifest says (a bundle without an image policy:
    # stretched), then predicted; the PNG exactly as Pillow's own bilinear resize
    png = files[2][1][1]
    small = np.asarray(Image.open(io.BytesIO(png)).convert("L").resize((8, 8), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(got[2], b.predict_proba(small[None, ..., None])[0], rtol=0, atol=1e-6)
    assert int(got[2].argmax()) == int(b.predict_proba(x[1:2]).argmax())
    # a JPEG is decoded at a reduced DCT scale first (transfuse.images: still >= 8 x 8): the same pixels as the
    # one decoder gives, and within a few grey levels of a full-size decode
    from transfuse import images

    jpg = images.decode(files[1][1][1], b.image_policy)
    np.testing.assert_allclose(got[1], b.predict_proba(jpg[None])[0], rtol=0, atol=1e-6)
    full = np.asarray(Image.open(io.BytesIO(files[1][1][1])).convert("L").resize((8, 8), Image.Resampling.BILINEAR))
    assert np.abs(jpg[..., 0].astype(int) - full.astype(int)).mean() < 8


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
    ("unknown_key", "POST", PREDICT, _json({"images": [_IMG]}), 400, "unknown key.*images.*allowed: signature_name"),
    ("both_formats", "POST", PREDICT, _json({"instances": [_IMG], "inputs": [_IMG]}), 400, "exactly one.*both"),
    ("neither_format", "POST", PREDICT, _json({"signature_name": "serving_default"}), 400, "exactly one.*neither"),
    ("other_signature", "POST", PREDICT, _json({"signature_name": "predict_images", "instances": [_IMG]}), 400,
     "unknown signature_name 'predict_images'.*'serving_default'"),
    ("bad_base64", "POST", PREDICT, _json({"instances": [{"b64": "not base64!"}]}), 400, r"instances\[0\].*base64"),
    ("b64_not_an_image", "POST", PREDICT, _json({"instances": [{"b64": "aGVsbG8="}]}), 415, "not an image"),
    ("instance_unknown_key", "POST", PREDICT, _json({"instances": [{"png": "x"}]}), 400, "unknown key.*png"),
    ("columnar_unknown_input", "POST", PREDICT, _json({"inputs": {"x": [_IMG]}}), 400, "one: 'images'"),
    ("columnar_wrong_shape", "POST", PREDICT, _json({"inputs": [[[0] * 8] * 7]}), 422, "8 x 8 x 1.*got 7 x 8"),
    ("unknown_version", "POST", f"/v1/models/{MODEL}/versions/9:predict", _json({"instances": [_IMG]}), 404,
     "no version '9'.*serving version '1'"),
    ("unknown_label", "POST", f"/v1/models/{MODEL}/labels/canary:predict", _json({"instances": [_IMG]}), 404,
     "no version label 'canary'; labels: latest"),
    ("metadata_unknown_version", "GET", f"/v1/models/{MODEL}/versions/2/metadata", {}, 404, "no version '2'"),
    ("instances_not_list", "POST", PREDICT, _json({"instances": "abc"}), 400, "must be a list"),
    ("empty_list", "POST", PREDICT, _json({"instances": []}), 400, "no instances.*send 1 to"),
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
    ("unknown_route", "GET", "/v3/whatever", {}, 404, "Not Found"),
    ("not_an_image", "POST", IMAGES, {"files": [("files", ("x.png", b"not an image at all", "image/png"))]}, 415,
     "x.png: not an image"),
    ("ppm", "POST", IMAGES, {"files": [("files", ("x.ppm", "PPM", "image/x-portable-pixmap"))]}, 415,
     "x.ppm: image format PPM is not allowed; allowed: JPEG, PNG, WEBP, BMP, GIF, TIFF"),
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


def _v2(doc: dict, binary: bytes = b"", header: object = "auto") -> dict:
    """An Open Inference Protocol body: JSON, then ``binary`` with Inference-Header-Content-Length (or ``header``)."""
    head = json.dumps(doc).encode()
    headers = {"content-type": "application/octet-stream" if binary else "application/json"}
    if header == "auto" and binary:
        headers["Inference-Header-Content-Length"] = str(len(head))
    elif header not in ("auto", None):
        headers["Inference-Header-Content-Length"] = str(header)
    return {"content": head + binary, "headers": headers}


def _t(shape: list, datatype: str = "UINT8", data: object = None, name: str = "images", **extra) -> dict:
    n = int(np.prod(shape))
    return {"name": name, "shape": shape, "datatype": datatype, "data": [0] * n if data is None else data, **extra}


def _bin(shape: list, size: int, datatype: str = "UINT8") -> dict:
    return {"name": "images", "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": size}}


INFER = f"/v2/models/{MODEL}/infer"
ONE = [1, 8, 8, 1]
BAD += [  # the Open Inference Protocol v2 over HTTP
    ("v2_not_json", "POST", INFER, {"content": b"{"}, 400, "not valid JSON"),
    ("v2_unknown_key", "POST", INFER, _v2({"inputs": [_t(ONE)], "model": "x"}), 400, r"unknown key.*'model'"),
    ("v2_no_inputs", "POST", INFER, _v2({"inputs": []}), 400, "non-empty list"),
    ("v2_tensor_missing_key", "POST", INFER, _v2({"inputs": [{"name": "images", "data": [0]}]}), 400,
     r"missing \['shape', 'datatype'\]"),
    ("v2_wrong_input_name", "POST", INFER, _v2({"inputs": [_t(ONE, name="x")]}), 400, "one input, 'images'"),
    ("v2_two_inputs", "POST", INFER, _v2({"inputs": [_t(ONE), _t(ONE)]}), 400, "one input, 'images'"),
    ("v2_wrong_datatype", "POST", INFER, _v2({"inputs": [_t(ONE, "INT64")]}), 400,
     "datatype INT64 is not accepted; allowed: UINT8, FP32, BYTES"),
    ("v2_unknown_datatype", "POST", INFER, _v2({"inputs": [_t(ONE, "UINT9")]}), 400, "unknown datatype 'UINT9'"),
    ("v2_shape_data_mismatch", "POST", INFER, _v2({"inputs": [_t(ONE, data=[0] * 10)]}), 400,
     r"shape \[1, 8, 8, 1\] needs 64 elements, data has 10"),
    ("v2_bad_shape", "POST", INFER, _v2({"inputs": [_t([1, -8, 8, 1], data=[0])]}), 400, "non-negative integers"),
    ("v2_wrong_image_shape", "POST", INFER, _v2({"inputs": [_t([1, 7, 8, 1])]}), 422, "8 x 8 x 1.*got 7 x 8 x 1"),
    ("v2_uint8_out_of_range", "POST", INFER, _v2({"inputs": [_t(ONE, data=[300] * 64)]}), 400,
     "UINT8 values must be in 0..255"),
    ("v2_uint8_given_floats", "POST", INFER, _v2({"inputs": [_t(ONE, data=[0.5] * 64)]}), 400,
     "UINT8 needs integers, got floats"),
    ("v2_strings_as_numbers", "POST", INFER, _v2({"inputs": [_t(ONE, "FP32", data=["a"] * 64)]}), 400,
     "FP32 needs numbers, got strings"),
    ("v2_fp32_out_of_range", "POST", INFER, _v2({"inputs": [_t(ONE, "FP32", data=[2.0] * 64)]}), 422,
     r"\[0, 1\]"),
    ("v2_too_many_images", "POST", INFER, _v2({"inputs": [_t([MAX_INSTANCES + 1, 8, 8, 1])]}), 413,
     f"at most {MAX_INSTANCES}"),
    ("v2_unknown_output", "POST", INFER, _v2({"inputs": [_t(ONE)], "outputs": [{"name": "logits"}]}), 400,
     "unknown output 'logits'; this model has probabilities, class_id, label"),
    ("v2_output_twice", "POST", INFER, _v2({"inputs": [_t(ONE)], "outputs": [{"name": "label"}] * 2}), 400,
     "requested twice"),
    ("v2_unsupported_parameter", "POST", INFER,
     _v2({"inputs": [_t(ONE)], "outputs": [{"name": "label", "parameters": {"classification": 3}}]}), 400,
     r"\['classification'\] are not supported; allowed: binary_data"),
    ("v2_request_parameter", "POST", INFER, _v2({"inputs": [_t(ONE)], "parameters": {"priority": 1}}), 400,
     "not supported; allowed: binary_data_output"),
    ("v2_id_not_string", "POST", INFER, _v2({"id": 5, "inputs": [_t(ONE)]}), 400, '"id" must be a string'),
    ("v2_bad_base64", "POST", INFER, _v2({"inputs": [_t([1], "BYTES", data=["!!"])]}), 400, "base64"),
    ("v2_bytes_wrong_shape", "POST", INFER, _v2({"inputs": [_t([1, 2], "BYTES", data=["aGk=", "aGk="])]}), 400,
     r"\[N\] or \[N, 1\]"),
    ("v2_bytes_not_an_image", "POST", INFER, _v2({"inputs": [_t([1], "BYTES", data=["aGk="])]}), 415,
     "not an image"),
    ("v2_binary_size_too_big", "POST", INFER, _v2({"inputs": [_bin(ONE, 100)]}, bytes(64)), 400,
     "binary_data_size 100 runs past the binary data"),
    ("v2_binary_leftover", "POST", INFER, _v2({"inputs": [_bin(ONE, 64)]}, bytes(74)), 400,
     "10 bytes of binary data that no input"),
    ("v2_binary_wrong_size", "POST", INFER, _v2({"inputs": [_bin(ONE, 32)]}, bytes(32)), 400,
     "needs 64 bytes, the binary data has 32"),
    ("v2_binary_fp32_wrong_size", "POST", INFER, _v2({"inputs": [_bin(ONE, 64, "FP32")]}, bytes(64)), 400,
     "needs 256 bytes"),
    ("v2_header_not_int", "POST", INFER, _v2({"inputs": [_bin(ONE, 64)]}, bytes(64), header="abc"), 400,
     "must be an integer"),
    ("v2_header_past_body", "POST", INFER, _v2({"inputs": [_bin(ONE, 64)]}, bytes(64), header=10**6), 400,
     "between 1 and the body's length"),
    ("v2_binary_without_header", "POST", INFER, _v2({"inputs": [_bin(ONE, 64)]}, bytes(64), header=None), 400,
     "without the Inference-Header-Content-Length"),
    ("v2_data_and_binary", "POST", INFER, _v2({"inputs": [{**_bin(ONE, 64), "data": [0] * 64}]}, bytes(64)), 400,
     "both data and binary_data_size"),
    ("v2_bytes_prefix_lies", "POST", INFER, _v2({"inputs": [_bin([1], 8, "BYTES")]}, b"\xe8\x03\x00\x00abcd"), 400,
     "says 1000 bytes, only 4 left"),
    ("v2_bytes_count_lies", "POST", INFER, _v2({"inputs": [_bin([2], 8, "BYTES")]}, b"\x04\x00\x00\x00abcd"), 400,
     "needs 2 BYTES elements, the binary data holds 1"),
    ("v2_unknown_model", "POST", "/v2/models/nope/infer", _v2({"inputs": [_t(ONE)]}), 404, "unknown model 'nope'"),
    ("v2_unknown_version", "POST", f"/v2/models/{MODEL}/versions/3/infer", _v2({"inputs": [_t(ONE)]}), 404,
     "no version '3'"),
    ("v2_metadata_unknown_model", "GET", "/v2/models/nope", {}, 404, "unknown model"),
    ("v2_ready_unknown_model", "GET", "/v2/models/nope/ready", {}, 404, "unknown model"),
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
        elif data == "PPM":
            buf = io.BytesIO()
            Image.fromarray(digits_x[0, ..., 0]).save(buf, "PPM")
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
    from transfuse.inference.bundle_writer import BundleCnn, write_bundle
    from transfuse.inference.preprocessing import PreprocessSpec

    data = (Path(bundles["v1"]) / _member_file(Path(bundles["v1"]))).read_bytes()
    out = str(tmp_path_factory.mktemp("broken") / "bundle")
    write_bundle(out, name="broken", version="b", class_names=[str(i) for i in range(10)], input_shape=(8, 8, 1),
                 preprocess_spec=PreprocessSpec(20, "unit"), cnn_members=[BundleCnn("cnn0", data, input="image")])
    return out


def test_health_check_and_swap_refuse_a_bundle_that_cannot_predict(bundles, broken_bundle):
    """The deployment class itself (no Serve): startup, reconfigure and check_health all probe the model."""
    import asyncio

    from serve.app import TransfuseReplica as cls
    from transfuse.inference.bundle import BundleError, load_bundle

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
        assert m._batcher.max_size == 4
        await m.reconfigure({"bundle": bundles["v2"], "max_batch_size": 0})
        assert "max_batch_size" in m._last_refused["error"] and m._batcher.max_size == 4
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

    from transfuse.inference.bundle import BundleError, load_bundle

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
    from jobs.deploy import _args as deploy_args, _run
    from jobs._cli import main

    port = server.rsplit(":", 1)[1]
    common = ["--config", str(ROOT / "configs" / "smoke.yaml"), "--set", f"serve.port={port}",
              "--set", "serve.num_cpus=0.25", "--set", f"serve.name={MODEL}", "--app-name", "job",
              "--route-prefix", "/job"]
    # a BundleError is the library's: the job runner prints it and exits 2, no traceback
    assert main("deploy", _run, extra=deploy_args, argv=[*common, "--bundle", bundles["tampered"]]) == 2
    # Ray streams its workers' log lines ("(ServeReplica:... pid=N) ...") to this process's stderr at any time;
    # the job's own output is every other line
    ours = [ln for ln in capsys.readouterr().err.splitlines() if not re.match(r"(\x1b\[[0-9;]*m)?\(\w", ln)]
    assert ours and ours[0].startswith("error: ") and "altered" in ours[0], ours
    assert not any("Traceback" in ln for ln in ours), ours
    # a config naming another ingress than the one the cluster's nodes started Serve with is refused, naming both
    from transfuse.environment import serve_ingress

    used = serve_ingress()  # the test cluster's `ray start` inherits this process's environment
    other = "proxy" if used == "haproxy" else "haproxy"
    assert main("deploy", _run, extra=deploy_args, argv=[*common, "--bundle", bundles["v1"], "--set",
                                                          f"serve.ingress={other}", "--set", "serve.host=0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert f"serve.ingress is '{other}' but this Ray cluster's nodes run Serve with '{used}'" in err, err
    try:
        assert main("deploy", _run, extra=deploy_args, argv=[*common, "--bundle", bundles["v1"]]) == 0
        url = capsys.readouterr().out.split(": ", 1)[1].split()[0]
        assert url == f"{server}/job/v1/models/{MODEL}"
        x = digits[0][:3]
        np.testing.assert_allclose(_probs(httpx.post(f"{url}:predict", json={"instances": x.tolist()})),
                                   offline["v1"].predict_proba(x), rtol=0, atol=1e-6)
    finally:
        undeploy("job")


# ------------------------------------------------------------------------- TensorFlow Serving REST


def _b64(img: np.ndarray, fmt: str = "PNG") -> str:
    import base64

    return base64.b64encode(_png(img, fmt)).decode()


def test_tfserving_example_client_body_and_columnar_inputs(server, digits, offline):
    """The body TensorFlow Serving's resnet_client.py sends (signature_name + b64), the row and columnar formats,
    the named-input form, and the version and label paths: all equal the bundle's offline predictions."""
    x, _ = digits
    b = offline["v1"]
    want = b.predict_proba(x[:3])
    body = {"signature_name": "serving_default", "instances": [{"b64": _b64(x[i, ..., 0])} for i in range(3)]}
    r = httpx.post(f"{server}{PREDICT}", json=body)
    np.testing.assert_allclose(_probs(r), want, rtol=0, atol=1e-6)
    assert [p["label"] for p in r.json()["predictions"]] == [b.class_names[k] for k in want.argmax(1)]
    # JPEG bytes, as the example client sends: decoded the same way the upload route decodes them
    from serve.inputs import ImageSpec, decode_image

    jpeg = _png(x[0, ..., 0], "JPEG")
    r = httpx.post(f"{server}{PREDICT}", json={"instances": [{"b64": _b64(x[0, ..., 0], "JPEG")}]})
    np.testing.assert_allclose(_probs(r), b.predict_proba(decode_image(jpeg, ImageSpec((8, 8, 1), 1, 100))[None]),
                               rtol=0, atol=1e-6)
    # columnar: answered with "outputs", one list per output
    for inputs in (x[:3].tolist(), {"images": x[:3].tolist()}, [{"b64": _b64(x[i, ..., 0])} for i in range(3)]):
        out = httpx.post(f"{server}{PREDICT}", json={"signature_name": "serving_default", "inputs": inputs})
        assert out.status_code == 200, out.text
        o = out.json()["outputs"]
        np.testing.assert_allclose(np.array(o["probabilities"]), want, rtol=0, atol=1e-6)
        assert o["class_id"] == want.argmax(1).tolist()
        assert o["label"] == [b.class_names[k] for k in want.argmax(1)]
    # named instances, mixing arrays and b64, float and integer pixels
    mixed = [{"images": x[0].tolist()}, {"images": {"b64": _b64(x[1, ..., 0])}}, (x[2] / 255.0).tolist()]
    np.testing.assert_allclose(_probs(httpx.post(f"{server}{PREDICT}", json={"instances": mixed})), want,
                               rtol=0, atol=1e-5)
    for path in (f"/v1/models/{MODEL}/versions/1:predict", f"/v1/models/{MODEL}/labels/latest:predict"):
        np.testing.assert_allclose(_probs(httpx.post(server + path, json={"instances": x[:3].tolist()})), want,
                                   rtol=0, atol=1e-6)


def test_tfserving_status_and_metadata_shapes(server, offline):
    b = offline["v1"]
    for path in (f"/v1/models/{MODEL}", f"/v1/models/{MODEL}/versions/1", f"/v1/models/{MODEL}/labels/latest"):
        st = httpx.get(server + path).json()
        assert st["model_version_status"] == [{"version": "1", "state": "AVAILABLE",
                                               "status": {"error_code": "OK", "error_message": ""}}]
        assert st["class_names"] == b.class_names  # today's fields beside it
    m = httpx.get(f"{server}/v1/models/{MODEL}/metadata").json()
    assert m["model_spec"] == {"name": MODEL, "signature_name": "", "version": "1"}
    sig = m["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["method_name"] == "tensorflow/serving/predict"
    dims = lambda t: [int(d["size"]) for d in t["tensor_shape"]["dim"]]  # noqa: E731
    assert list(sig["inputs"]) == ["images"] and sig["inputs"]["images"]["dtype"] == "DT_UINT8"
    assert dims(sig["inputs"]["images"]) == [-1, 8, 8, 1]
    assert {k: (v["dtype"], dims(v)) for k, v in sig["outputs"].items()} == {
        "probabilities": ("DT_FLOAT", [-1, 10]), "class_id": ("DT_INT64", [-1]), "label": ("DT_STRING", [-1])}
    assert httpx.get(f"{server}/v1/models/{MODEL}/versions/1/metadata").json() == m


# ---------------------------------------------------------------- Open Inference Protocol v2 (tritonclient)


def _triton_inputs(mod, x: np.ndarray, kind: str, binary: bool):
    """tritonclient InferInput 'images' holding ``x`` as UINT8, FP32 (x / 255) or BYTES (PNG files)."""
    if kind == "BYTES":
        data = np.array([_png(img[..., 0]) for img in x], dtype=np.object_)
    else:
        data = x if kind == "UINT8" else (x / 255.0).astype(np.float32)
    inp = mod.InferInput("images", list(data.shape), kind)
    if mod.__name__.endswith("http"):
        inp.set_data_from_numpy(data, binary_data=binary)
    else:
        inp.set_data_from_numpy(data)
    return [inp]


def test_v2_http_with_tritonclient(server, digits, offline):
    import tritonclient.http as th

    x, _ = digits
    b = offline["v1"]
    c = th.InferenceServerClient(server.split("//", 1)[1])
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(MODEL) and c.is_model_ready(MODEL, "1")
    assert c.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    meta = c.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 8, 8, 1]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("probabilities", "FP32", [-1, 10]), ("class_id", "INT64", [-1]), ("label", "BYTES", [-1])]
    assert not c.is_model_ready("nope")
    sample = x[:5]
    want = b.predict_proba(sample)
    for kind in ("UINT8", "FP32", "BYTES"):
        for binary in (True, False):
            if kind == "BYTES" and not binary:
                continue  # tritonclient.http sends JSON BYTES as UTF-8 text, which PNG files are not: base64 below
            outs = [th.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "class_id", "label")]
            res = c.infer(MODEL, _triton_inputs(th, sample, kind, binary), outputs=outs, request_id=f"r-{kind}")
            resp = res.get_response()
            assert resp["model_name"] == MODEL and resp["model_version"] == "1" and resp["id"] == f"r-{kind}"
            np.testing.assert_allclose(res.as_numpy("probabilities"), want, rtol=0, atol=1e-5, err_msg=kind)
            assert res.as_numpy("class_id").tolist() == want.argmax(1).tolist()
            assert [v.decode() if isinstance(v, bytes) else v for v in res.as_numpy("label")] == [
                b.class_names[k] for k in want.argmax(1)]
    # no outputs named: all three, in binary (what tritonclient asks for then); one output named: only that one
    res = c.infer(MODEL, _triton_inputs(th, sample, "UINT8", True), model_version="1")
    assert [o["name"] for o in res.get_response()["outputs"]] == ["probabilities", "class_id", "label"]
    res = c.infer(MODEL, _triton_inputs(th, sample, "UINT8", True), outputs=[th.InferRequestedOutput("class_id")])
    assert [o["name"] for o in res.get_response()["outputs"]] == ["class_id"]
    assert res.as_numpy("class_id").tolist() == want.argmax(1).tolist()
    c.close()
    # BYTES in JSON: base64 strings of the PNG files
    r = httpx.post(f"{server}{INFER}", **_v2({"id": "j", "inputs": [_t([len(sample)], "BYTES", data=[
        _b64(img[..., 0]) for img in sample])]}))
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["id"] == "j" and out["probabilities"]["shape"] == [5, 10]
    np.testing.assert_allclose(np.array(out["probabilities"]["data"]).reshape(5, 10), want, rtol=0, atol=1e-5)
    assert out["label"]["data"] == [b.class_names[k] for k in want.argmax(1)]
    # the bodies as the protocol spells them
    assert httpx.get(f"{server}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{server}/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
    assert set(httpx.get(f"{server}/v2").json()) == {"name", "version", "extensions"}


def test_v2_grpc_with_tritonclient(server, digits, offline):
    """The same protocol through Serve's gRPC proxy (tritonclient's GRPCInferenceService stubs)."""
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    x, _ = digits
    b = offline["v1"]
    app = {"application": "open"}  # Serve's gRPC proxy routes by this metadata when several apps run
    c = tg.InferenceServerClient(GRPC["url"])
    assert c.is_server_live(headers=app) and c.is_server_ready(headers=app)
    assert c.is_model_ready(MODEL, headers=app) and not c.is_model_ready(MODEL, "7", headers=app)
    assert c.get_server_metadata(headers=app).extensions == ["binary_tensor_data"]
    meta = c.get_model_metadata(MODEL, headers=app, as_json=True)
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": ["-1", "8", "8", "1"]}]
    sample = x[5:12]
    want = b.predict_proba(sample)
    for kind in ("UINT8", "FP32", "BYTES"):
        res = c.infer(MODEL, _triton_inputs(tg, sample, kind, True), request_id="g1", headers=app,
                      outputs=[tg.InferRequestedOutput(n) for n in ("probabilities", "class_id", "label")])
        r = res.get_response()
        assert r.model_name == MODEL and r.id == "g1" and r.model_version == "1"
        np.testing.assert_allclose(res.as_numpy("probabilities"), want, rtol=0, atol=1e-5, err_msg=kind)
        assert res.as_numpy("class_id").tolist() == want.argmax(1).tolist()
        assert [v.decode() for v in res.as_numpy("label")] == [b.class_names[k] for k in want.argmax(1)]
    int64 = tg.InferInput("images", [1, 8, 8, 1], "INT64")
    int64.set_data_from_numpy(np.zeros((1, 8, 8, 1), np.int64))
    named = tg.InferInput("x", [1, 8, 8, 1], "UINT8")
    named.set_data_from_numpy(np.zeros((1, 8, 8, 1), np.uint8))
    bad = [  # (inputs, outputs, status, message): the HTTP path's checks, as gRPC status codes
        ([int64], None, "StatusCode.INVALID_ARGUMENT", "INT64 is not accepted"),
        ([named], None, "StatusCode.INVALID_ARGUMENT", "one input, 'images'"),
        (_triton_inputs(tg, sample[:1, :7], "UINT8", True), None, "StatusCode.INVALID_ARGUMENT", "got 7 x 8 x 1"),
        (_triton_inputs(tg, sample[:1], "UINT8", True), [tg.InferRequestedOutput("logits")],
         "StatusCode.INVALID_ARGUMENT", "unknown output 'logits'"),
    ]
    for inputs, outputs, status, message in bad:
        with pytest.raises(InferenceServerException) as e:
            c.infer(MODEL, inputs, outputs=outputs, headers=app)
        assert e.value.status() == status and message in e.value.message(), (status, e.value)
    # raw contents that lie about their size
    from tritonclient.grpc import service_pb2 as pb

    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="images", datatype="UINT8", shape=[1, 8, 8, 1])
    req.raw_input_contents.append(bytes(10))
    import grpc

    with pytest.raises(grpc.RpcError) as e:
        c._client_stub.ModelInfer(req, metadata=tuple(app.items()))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs 64 bytes" in e.value.details()
    with pytest.raises(InferenceServerException) as e:
        c.get_model_metadata("nope", headers=app)
    assert e.value.status() == "StatusCode.NOT_FOUND"
    c.close()


# ---------------------------------------------------------------------- limits and backpressure


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """A real 12,000 x 12,000 grey PNG (144 megapixels) of 140 KB: it decodes, at a price."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    w = h = 12_000
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(bytes(w + 1)) for _ in range(h)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_pixel_bomb_refused_from_its_header_on_every_route_and_batch_mates_answered(server, digits, offline, bomb_png):
    import base64

    from PIL import Image

    assert Image.open(io.BytesIO(bomb_png)).size == (12_000, 12_000)
    x, _ = digits
    before = httpx.get(f"{server}/healthz").json()["replica"]
    b64 = base64.b64encode(bomb_png).decode()
    bombs = [
        ("images", lambda: httpx.post(f"{server}{IMAGES}", timeout=60,
                                      files=[("files", ("ok.png", _png(x[0, ..., 0]), "image/png")),
                                             ("files", ("bomb.png", bomb_png, "image/png"))])),
        ("b64", lambda: httpx.post(f"{server}{PREDICT}", json={"instances": [{"b64": b64}]}, timeout=60)),
        ("v2", lambda: httpx.post(f"{server}{INFER}", timeout=60, **_v2(
            {"inputs": [_bin([1], 4 + len(bomb_png), "BYTES")]}, len(bomb_png).to_bytes(4, "little") + bomb_png))),
    ]
    results: dict[str, object] = {}

    def good(i: int) -> None:
        results[f"good{i}"] = httpx.post(f"{server}{PREDICT}", json={"instances": x[i:i + 1].tolist()}, timeout=60)

    threads = [threading.Thread(target=lambda k=k, f=f: results.__setitem__(k, f())) for k, f in bombs]
    threads += [threading.Thread(target=good, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, _ in bombs:
        r = results[k]
        assert r.status_code == 413, (k, r.status_code, r.text)
        assert "12000 x 12000 = 144.0 megapixels; at most 16 megapixels" in r.json()["error"], (k, r.text)
    got = np.stack([_probs(results[f"good{i}"])[0] for i in range(6)])
    np.testing.assert_allclose(got, offline["v1"].predict_proba(x[:6]), rtol=0, atol=1e-5)
    assert httpx.get(f"{server}/healthz").json()["replica"] == before


def test_queue_limit_answers_503_with_retry_after_and_the_replica_stays_healthy(server, bundles, digits):
    """One request in the replica (its batch waits 1 s to fill), one queued; the others are turned away."""
    from ray import serve

    from serve.app import build_app

    serve.run(build_app(_args(bundles["v1"], max_ongoing_requests=1, max_queued_requests=1, retry_after_s=2,
                              batch_wait_timeout_s=1.0)), name="queue", route_prefix="/queue")
    x, _ = digits
    try:
        codes: list = []

        def one(i: int) -> None:
            r = httpx.post(f"{server}/queue{PREDICT}", json={"instances": x[i:i + 1].tolist()}, timeout=60)
            codes.append((r.status_code, r.headers.get("retry-after"), r.text))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(c for c, _, _ in codes)
        assert set(statuses) == {200, 503} and statuses.count(200) >= 1 and statuses.count(503) >= 1, codes
        assert all(ra == "2" and "backpressure" in text for c, ra, text in codes if c == 503), codes
        h = httpx.get(f"{server}/queue/healthz", timeout=60)
        assert h.status_code == 200 and h.json()["status"] == "ok"
        assert httpx.post(f"{server}/queue{PREDICT}", json={"instances": x[:1].tolist()}, timeout=60).status_code == 200
    finally:
        undeploy("queue")


def test_request_timeout_is_a_clean_504_and_the_replica_stays_healthy(server, bundles, digits):
    """A batch that waits 2 s to fill, under a 0.1 s request timeout: 504 with a JSON error, never a hang."""
    from ray import serve

    from serve.app import build_app

    serve.run(build_app(_args(bundles["v1"], request_timeout_s=0.1, batch_wait_timeout_s=2.0)), name="slow",
              route_prefix="/slow")
    x, _ = digits
    try:
        replica = httpx.get(f"{server}/slow/healthz").json()["replica"]
        for path, kwargs in ((PREDICT, {"json": {"instances": x[:1].tolist()}}),
                             (INFER, _v2({"inputs": [_t(ONE, data=x[0].reshape(-1).tolist())]}))):
            r = httpx.post(f"{server}/slow{path}", timeout=60, **kwargs)
            assert r.status_code == 504, r.text
            assert set(r.json()) == {"error"} and "request_timeout_s=0.1" in r.json()["error"]
        assert httpx.get(f"{server}/slow/v2/health/ready").json() == {"ready": True}
        assert httpx.get(f"{server}/slow/healthz").json()["replica"] == replica
    finally:
        undeploy("slow")


def test_a_batch_whose_model_call_fails_answers_its_other_items(bundles, broken_bundle, digits, offline):
    """The deployment class's batch body (what its batcher calls): items from a bundle that cannot predict share a
    batch with good ones; only theirs fail."""
    import asyncio

    from serve.app import TransfuseReplica as cls
    from transfuse.inference.bundle import load_bundle

    m = cls(_args(bundles["v1"], batch_wait_timeout_s=0.2))
    broken = load_bundle(broken_bundle)
    good = m._bundle
    x, _ = digits

    async def scenario() -> list:
        items = [(broken if i % 3 == 0 else good, x[i:i + 1]) for i in range(6)]
        return await m._predict_batch(items)

    out = asyncio.run(scenario())
    for i, r in enumerate(out):
        if i % 3 == 0:
            assert isinstance(r, Exception), (i, r)
        else:
            np.testing.assert_allclose(r, offline["v1"].predict_proba(x[i:i + 1]), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ the page


def test_page_and_shipped_examples(server, offline):
    r = httpx.get(f"{server}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert f'const MODEL = "{MODEL}";' in r.text and "/images" in r.text and ":predict" in r.text
    ex = httpx.get(f"{server}/v1/models/{MODEL}/examples").json()["examples"]
    shipped = offline["v1"].example_images()
    assert len(ex) == len(shipped) >= 2 and [e["label"] for e in ex] == [label for label, _ in shipped]
    r = httpx.post(f"{server}{PREDICT}", json={"instances": [{"b64": e["b64"]} for e in ex]})
    assert r.status_code == 200 and len(r.json()["predictions"]) == len(ex)


def test_api_key_guards_v2_over_http_and_grpc(server, digits):
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    body = _v2({"inputs": [_t(ONE)]})
    r = httpx.post(f"{server}/secure{INFER}", content=body["content"], headers=body["headers"])
    assert r.status_code == 401 and "API key" in r.json()["error"]
    r = httpx.post(f"{server}/secure{INFER}", content=body["content"],
                   headers={**body["headers"], "Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    assert httpx.get(f"{server}/secure/v2/health/ready").status_code == 200  # health stays open
    c = tg.InferenceServerClient(GRPC["url"])
    inputs = _triton_inputs(tg, digits[0][:1], "UINT8", True)
    with pytest.raises(InferenceServerException) as e:
        c.infer(MODEL, inputs, headers={"application": "secure"})
    assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    res = c.infer(MODEL, inputs, headers={"application": "secure", "authorization": f"Bearer {API_KEY}"})
    assert res.as_numpy("class_id").shape == (1,)
    c.close()
