"""TensorFlow Serving's REST API, as its own clients speak it: the predict body, its answer, status and metadata.

``POST /v1/models/{name}[/versions/{v} | /labels/{l}]:predict`` takes ``{"signature_name": "serving_default",
"instances": [...]}`` (row format, answered with ``predictions``) or ``{"inputs": ...}`` (columnar, answered with
``outputs``), never both. An image is a nested array H x W (x C) of integers 0..255 or floats in [0, 1], or
``{"b64": "<base64 of an image file>"}``; the named form ``{"images": ...}`` is accepted as well. The signature has one
input, ``images``, and three outputs: ``probabilities`` (float, N x K), ``class_id`` (int64, N) and ``label``
(string, N).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from serve.inputs import ApiError, ImageSpec, check_pixels, decode_base64, decode_image, nested_pixels, \
    parse_json, stack_images

SIGNATURE = "serving_default"
INPUT = "images"
OUTPUTS = ("probabilities", "class_id", "label")
LABELS = ("latest",)  # version labels: each names the version being served
BODY_KEYS = ("signature_name", "instances", "inputs")
HINT = '{"instances": [...]} or {"inputs": [...]}'


def _image(value: Any, spec: ImageSpec, what: str) -> np.ndarray:
    """One instance: a nested array, {"b64": ...} or {"images": either}."""
    if isinstance(value, dict):
        keys = sorted(value)
        if keys == ["b64"]:
            return decode_image(decode_base64(value["b64"], what), spec, what)
        if keys == [INPUT]:
            return _image(value[INPUT], spec, what)
        raise ApiError(400, f"{what}: unknown key(s) {keys}; an instance is a nested array, {{\"b64\": ...}} "
                            f"or {{\"{INPUT}\": ...}}")
    try:
        x = np.asarray([value])
    except (ValueError, TypeError, OverflowError):
        raise ApiError(422, f"{what} has ragged or mixed nesting: it must be a {spec.allowed} nested array "
                            "of numbers") from None
    return check_pixels(x, spec, what)[0]


def images(values: Any, spec: ImageSpec, what: str) -> np.ndarray:
    """A list of instances -> the checked batch; arrays only take the fast vectorised path."""
    if not isinstance(values, list):
        raise ApiError(400, f'"{what}" must be a list of images, got {type(values).__name__}')
    spec.check_count(len(values), what)
    if not any(isinstance(v, dict) for v in values):
        return nested_pixels(values, spec, what)
    return stack_images([_image(v, spec, f"{what}[{i}]") for i, v in enumerate(values)])


def parse_predict(body: bytes, spec: ImageSpec) -> tuple[np.ndarray, bool]:
    """A ``:predict`` body -> (images, columnar)."""
    doc = parse_json(body, HINT)
    unknown = sorted(set(doc) - set(BODY_KEYS))
    if unknown:
        raise ApiError(400, f"unknown key(s) {unknown} in the body; allowed: {', '.join(BODY_KEYS)}")
    sig = doc.get("signature_name", SIGNATURE)
    if sig not in ("", SIGNATURE):
        raise ApiError(400, f"unknown signature_name {sig!r}; this model has one signature: {SIGNATURE!r}")
    if ("instances" in doc) == ("inputs" in doc):
        raise ApiError(400, f'send exactly one of "instances" (row format) or "inputs" (columnar), '
                            f'got {"both" if "inputs" in doc else "neither"}')
    if "instances" in doc:
        return images(doc["instances"], spec, "instances"), False
    inputs = doc["inputs"]
    if isinstance(inputs, dict):
        unknown = sorted(set(inputs) - {INPUT})
        if unknown or INPUT not in inputs:
            raise ApiError(400, f'"inputs" names the input(s) {sorted(inputs)}; this model has one: {INPUT!r}')
        inputs = inputs[INPUT]
    return images(inputs, spec, "inputs"), True


def predictions(probs: np.ndarray, class_names: list[str], filenames: Optional[list[str]] = None) -> list[dict]:
    """Row format: one ``{"class_id", "label", "probabilities"}`` per image (and its file name when uploaded)."""
    out = []
    for i, p in enumerate(probs):
        k = int(np.argmax(p))
        row = {"class_id": k, "label": str(class_names[k]), "probabilities": [float(v) for v in p]}
        if filenames is not None:
            row["filename"] = filenames[i]
        out.append(row)
    return out


def predict_response(probs: np.ndarray, class_names: list[str], columnar: bool, model: str, version: str,
                     filenames: Optional[list[str]] = None) -> dict:
    """The answer to ``:predict`` (and to the upload route, which adds file names)."""
    if columnar:
        ids = probs.argmax(axis=1)
        outputs = {"probabilities": probs.astype(float).tolist(), "class_id": [int(k) for k in ids],
                   "label": [str(class_names[k]) for k in ids]}
        return {"outputs": outputs, "model": model, "model_version": version}
    return {"predictions": predictions(probs, class_names, filenames), "model": model, "model_version": version}


def version_status(version: str) -> dict:
    return {"model_version_status": [{"version": str(version), "state": "AVAILABLE",
                                      "status": {"error_code": "OK", "error_message": ""}}]}


def _tensor(dtype: str, dims: list[int], name: str) -> dict:
    return {"dtype": dtype, "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in dims],
                                             "unknown_rank": False}, "name": name}


def metadata(model: str, version: str, shape: tuple[int, int, int], num_classes: int) -> dict:
    """``GET /v1/models/{name}/metadata``: the one signature with its real input and outputs."""
    sig = {
        "inputs": {INPUT: _tensor("DT_UINT8", [-1, *shape], f"{INPUT}:0")},
        "outputs": {"probabilities": _tensor("DT_FLOAT", [-1, num_classes], "probabilities:0"),
                    "class_id": _tensor("DT_INT64", [-1], "class_id:0"),
                    "label": _tensor("DT_STRING", [-1], "label:0")},
        "method_name": "tensorflow/serving/predict",
    }
    return {"model_spec": {"name": model, "signature_name": "", "version": str(version)},
            "metadata": {"signature_def": {"signature_def": {SIGNATURE: sig}}}}
