"""The protocol modules without a server: bodies built by the real clients' own request builders
(tritonclient.http / tritonclient.grpc), parsed by serve.v2 and serve.tfserving, and the answers read back by
the clients' own result parsers. Fast tier (no Ray): the over-the-wire checks are in tests/test_serve.py.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from serve import tfserving, v2
from serve.inputs import ApiError, ImageSpec

SPEC = ImageSpec((8, 8, 1), 16, 1_000_000)
NAMES = [str(i) for i in range(10)]
rng = np.random.default_rng(0)
X = rng.integers(0, 256, size=(3, 8, 8, 1), dtype=np.uint8)
PROBS = rng.dirichlet(np.ones(10), size=3).astype(np.float32)


def _png(img: np.ndarray, size: tuple[int, int] | None = None) -> bytes:
    from PIL import Image

    im = Image.fromarray(img[..., 0])
    if size:
        im = im.resize(size)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


# BYTES go binary only: tritonclient.http sends JSON BYTES as UTF-8 text, which PNG bytes are not
@pytest.mark.parametrize("kind,binary", [("UINT8", True), ("UINT8", False), ("FP32", True), ("FP32", False),
                                         ("BYTES", True)])
def test_tritonclient_http_bodies_round_trip(kind, binary):
    th = pytest.importorskip("tritonclient.http")
    from tritonclient.http._infer_result import InferResult
    from tritonclient.http._utils import _get_inference_request

    data = {"UINT8": X, "FP32": (X / 255.0).astype(np.float32),
            "BYTES": np.array([_png(x) for x in X], dtype=np.object_)}[kind]
    inp = th.InferInput("images", list(data.shape), kind)
    inp.set_data_from_numpy(data, binary_data=binary)
    outs = [th.InferRequestedOutput(n, binary_data=binary) for n in v2.OUTPUTS]
    body, json_len = _get_inference_request([inp], "r1", outs, 0, False, False, 0, None, None)
    req = v2.parse_http(body, None if json_len is None else str(json_len))
    images = v2.images(req, SPEC)
    want = X if kind != "FP32" else (X / 255.0).astype(np.float32)
    np.testing.assert_array_equal(images, want)
    content, headers = v2.render_http("m", "1", req, v2.output_tensors(PROBS, NAMES, req))
    length = headers.get(v2.HEADER)
    res = InferResult.from_response_body(content, header_length=None if length is None else int(length))
    assert res.get_response()["id"] == "r1" and res.get_response()["model_name"] == "m"
    np.testing.assert_array_equal(res.as_numpy("probabilities"), PROBS)
    assert res.as_numpy("class_id").tolist() == PROBS.argmax(1).tolist()
    labels = [v.decode() if isinstance(v, bytes) else v for v in res.as_numpy("label")]
    assert labels == [NAMES[k] for k in PROBS.argmax(1)]


def test_tritonclient_grpc_request_round_trip():
    tg = pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc._infer_result import InferResult
    from tritonclient.grpc._utils import _get_inference_request

    inp = tg.InferInput("images", list(X.shape), "UINT8")
    inp.set_data_from_numpy(X)
    pb = _get_inference_request(model_name="m", inputs=[inp], model_version="", request_id="g",
                                outputs=[tg.InferRequestedOutput("label")], sequence_id=0, sequence_start=False,
                                sequence_end=False, priority=0, timeout=None, parameters=None)
    req = v2.parse_grpc(pb)
    np.testing.assert_array_equal(v2.images(req, SPEC), X)
    res = InferResult(v2.render_grpc("m", "1", req, v2.output_tensors(PROBS, NAMES, req)))
    assert [o.name for o in res.get_response().outputs] == ["label"]
    assert [v.decode() for v in res.as_numpy("label")] == [NAMES[k] for k in PROBS.argmax(1)]


def test_tfserving_example_client_body_row_and_columnar():
    b64 = [base64.b64encode(_png(x)).decode() for x in X]
    x, columnar = tfserving.parse_predict(json.dumps(
        {"signature_name": "serving_default", "instances": [{"b64": s} for s in b64]}).encode(), SPEC)
    np.testing.assert_array_equal(x, X)
    assert not columnar
    x, columnar = tfserving.parse_predict(json.dumps({"inputs": {"images": X.tolist()}}).encode(), SPEC)
    np.testing.assert_array_equal(x, X)
    assert columnar
    doc = tfserving.predict_response(PROBS, NAMES, True, "m", "1")
    assert doc["outputs"]["class_id"] == PROBS.argmax(1).tolist()


def test_pixel_limit_is_read_from_the_header():
    big = _png(X[0], (1001, 1000))  # 1.001 megapixels of a 1 megapixel limit
    with pytest.raises(ApiError) as e:
        tfserving.parse_predict(json.dumps({"instances": [{"b64": base64.b64encode(big).decode()}]}).encode(), SPEC)
    assert e.value.status == 413 and "1001 x 1000" in e.value.message
