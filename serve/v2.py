"""The Open Inference Protocol v2 (KServe, Triton), over HTTP (JSON and binary tensors) and over gRPC.

One input, ``images``: UINT8 or FP32 N x H x W x C (N x H x W for grey models; FP32 in [0, 1]), or BYTES [N]
(or [N, 1]) holding encoded image files (base64 strings in JSON, raw bytes in binary data and gRPC). Three
outputs: ``probabilities`` FP32 [N, K], ``class_id`` INT64 [N], ``label`` BYTES [N]; all three unless the request
names some. Both transports parse into ``InferRequest`` and render from the same output tensors, so a tensor is
checked once whichever way it came. The gRPC messages come from ``tritonclient.grpc.service_pb2`` (imported only
when gRPC is used).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from serve.inputs import ApiError, ImageSpec, check_pixels, decode_base64, decode_image, parse_json, stack_images

INPUT = "images"
GRPC_SERVICER = "serve.v2.add_grpc_servicer"  # Serve's grpc_servicer_functions entry
IMAGE_DATATYPES = ("UINT8", "FP32", "BYTES")
OUTPUTS = {"probabilities": "FP32", "class_id": "INT64", "label": "BYTES"}
DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
          "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_}
HEADER = "Inference-Header-Content-Length"  # the binary tensor extension: JSON length, binary data after it
EXTENSIONS = ["binary_tensor_data"]
REQUEST_PARAMETERS = ("binary_data_output",)
INPUT_PARAMETERS = ("binary_data_size",)
OUTPUT_PARAMETERS = ("binary_data",)
INFER_KEYS = ("id", "parameters", "inputs", "outputs")
TENSOR_KEYS = ("name", "shape", "datatype", "parameters", "data")
GRPC_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 413: "INVALID_ARGUMENT",
              415: "INVALID_ARGUMENT", 422: "INVALID_ARGUMENT", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


@dataclass
class Tensor:
    """A named tensor: numbers as an array of ``shape``, BYTES as a flat list of bytes."""

    name: str
    datatype: str
    shape: list[int]
    data: Union[np.ndarray, list[bytes]]


@dataclass
class InferRequest:
    id: Optional[str]
    inputs: list[Tensor]
    outputs: dict[str, bool] = field(default_factory=dict)  # requested name -> binary; empty: all outputs
    binary_output: bool = False  # the default for outputs not named in the request


# ----------------------------------------------------------------------------------- tensor contents


def _count(shape: list[int], what: str) -> int:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ApiError(400, f"{what}: shape must be a list of non-negative integers, got {shape!r}")
    return math.prod(shape)


def _datatype(datatype: Any, what: str) -> str:
    if datatype not in DTYPES:
        raise ApiError(400, f"{what}: unknown datatype {datatype!r}; allowed: {', '.join(DTYPES)}")
    return datatype


def tensor_from_values(name: str, datatype: str, shape: list[int], values: Any, what: str) -> Tensor:
    """JSON ``data`` (nested or flat, row-major) or gRPC ``contents`` -> a Tensor; counts and kinds checked."""
    n = _count(shape, what)
    if datatype == "BYTES":
        items = list(np.asarray(values, dtype=object).reshape(-1)) if isinstance(values, list) else None
        if items is None or len(items) != n:
            got = len(items) if items is not None else type(values).__name__
            raise ApiError(400, f"{what}: shape {shape} needs {n} BYTES elements, data has {got}")
        return Tensor(name, datatype, shape, [v if isinstance(v, bytes) else decode_base64(v, f"{what}[{i}]")
                                              for i, v in enumerate(items)])
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError, OverflowError):
        raise ApiError(400, f"{what}: data is ragged or mixes kinds; send {n} numbers, nested or flat") from None
    if arr.size != n:
        raise ApiError(400, f"{what}: shape {shape} needs {n} elements, data has {arr.size}")
    kind = arr.dtype.kind
    want_int = datatype.startswith(("UINT", "INT"))
    ok = (kind == "b" if datatype == "BOOL" else kind in "iu" if want_int else kind in "iuf") or arr.size == 0
    if not ok:
        got = {"f": "floats", "U": "strings", "O": "nulls or objects", "b": "booleans"}.get(kind, str(arr.dtype))
        raise ApiError(400, f"{what}: datatype {datatype} needs {'integers' if want_int else 'numbers'}, got {got}")
    if want_int and arr.size:
        info = np.iinfo(DTYPES[datatype])
        if int(arr.min()) < info.min or int(arr.max()) > info.max:
            raise ApiError(400, f"{what}: {datatype} values must be in {info.min}..{info.max}, got "
                                f"{int(arr.min())}..{int(arr.max())}")
    return Tensor(name, datatype, shape, arr.astype(DTYPES[datatype]).reshape(shape))


def tensor_from_bytes(name: str, datatype: str, shape: list[int], raw: bytes, what: str) -> Tensor:
    """Binary data (HTTP extension, gRPC raw contents): little-endian numbers, or 4-byte length-prefixed BYTES."""
    n = _count(shape, what)
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise ApiError(400, f"{what}: BYTES element {len(items)} is cut off in its 4-byte length prefix")
            (size,) = struct.unpack_from("<I", raw, pos)
            if pos + 4 + size > len(raw):
                raise ApiError(400, f"{what}: BYTES element {len(items)} says {size} bytes, only "
                                    f"{len(raw) - pos - 4} left in the binary data")
            items.append(bytes(raw[pos + 4:pos + 4 + size]))
            pos += 4 + size
        if len(items) != n:
            raise ApiError(400, f"{what}: shape {shape} needs {n} BYTES elements, the binary data holds {len(items)}")
        return Tensor(name, datatype, shape, items)
    dtype = np.dtype(DTYPES[datatype]).newbyteorder("<")
    if len(raw) != n * dtype.itemsize:
        raise ApiError(400, f"{what}: shape {shape} of {datatype} needs {n * dtype.itemsize} bytes, the binary data "
                            f"has {len(raw)}")
    return Tensor(name, datatype, shape, np.frombuffer(raw, dtype=dtype).astype(DTYPES[datatype]).reshape(shape))


def tensor_bytes(t: Tensor) -> bytes:
    """A tensor's binary form (the inverse of ``tensor_from_bytes``)."""
    if t.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in t.data)
    return np.ascontiguousarray(t.data, dtype=np.dtype(DTYPES[t.datatype]).newbyteorder("<")).tobytes()


def _check_parameters(params: Any, allowed: tuple[str, ...], what: str) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ApiError(400, f"{what}: parameters must be an object, got {type(params).__name__}")
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ApiError(400, f"{what}: parameter(s) {unknown} are not supported; allowed: {', '.join(allowed)}")
    return params


def _check_outputs(names: list[tuple[str, dict]]) -> dict[str, Optional[bool]]:
    out: dict[str, Optional[bool]] = {}
    for i, (name, params) in enumerate(names):
        if name not in OUTPUTS:
            raise ApiError(400, f"outputs[{i}]: unknown output {name!r}; this model has {', '.join(OUTPUTS)}")
        if name in out:
            raise ApiError(400, f"outputs[{i}]: output {name!r} is requested twice")
        binary = _check_parameters(params, OUTPUT_PARAMETERS, f"outputs[{i}] ({name})").get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise ApiError(400, f"outputs[{i}] ({name}): binary_data must be true or false, got {binary!r}")
        out[name] = binary
    return out


# ------------------------------------------------------------------------------------------ HTTP


def register_grpc_modules() -> bool:
    """tritonclient's generated messages name their module ``grpc_service_pb2`` (the name they were generated
    under), not ``tritonclient.grpc.service_pb2``; Serve pickles requests and responses between its gRPC proxy and
    the replicas, which needs that name importable in both processes. False when tritonclient is absent."""
    import sys

    try:
        from tritonclient.grpc import model_config_pb2, service_pb2
    except ImportError:
        return False
    sys.modules.setdefault("grpc_service_pb2", service_pb2)
    sys.modules.setdefault("model_config_pb2", model_config_pb2)
    return True


def add_grpc_servicer(servicer: Any, server: Any) -> None:
    """What Serve's gRPC proxy calls at start: tritonclient's GRPCInferenceService, its messages registered."""
    from tritonclient.grpc import service_pb2_grpc

    register_grpc_modules()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)


def _no_trailing_bytes(body: bytes) -> None:
    """A JSON object followed by more bytes is a binary-extension request that lost its header: say so."""
    import json

    try:
        _, end = json.JSONDecoder().raw_decode(body.decode("utf-8", errors="replace").lstrip())
    except ValueError:
        return  # not JSON at all: parse_json names that
    if body.decode("utf-8", errors="replace").lstrip()[end:].strip():
        raise ApiError(400, f"the body holds bytes after its JSON object without the {HEADER} header: binary "
                            "tensor data needs it (the length of the JSON part)")


def parse_http(body: bytes, header_length: Optional[str]) -> InferRequest:
    """An ``/infer`` body (JSON, or JSON + binary data with ``Inference-Header-Content-Length``)."""
    binary = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ApiError(400, f"{HEADER} must be an integer, got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise ApiError(400, f"{HEADER} is {n}, but the body has {len(body)} bytes; it must be the length of the "
                                "JSON part, between 1 and the body's length")
        body, binary = body[:n], body[n:]
    else:
        _no_trailing_bytes(body)
    doc = parse_json(body, '{"inputs": [{"name", "shape", "datatype", "data"}]}')
    unknown = sorted(set(doc) - set(INFER_KEYS))
    if unknown:
        raise ApiError(400, f"unknown key(s) {unknown} in the request; allowed: {', '.join(INFER_KEYS)}")
    params = _check_parameters(doc.get("parameters"), REQUEST_PARAMETERS, "request")
    binary_output = params.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise ApiError(400, f"binary_data_output must be true or false, got {binary_output!r}")
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise ApiError(400, f'"id" must be a string, got {type(rid).__name__}')
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ApiError(400, '"inputs" must be a non-empty list of tensors {"name", "shape", "datatype", "data"}')
    tensors, pos = [], 0
    for i, t in enumerate(inputs):
        what = f"inputs[{i}]"
        if not isinstance(t, dict):
            raise ApiError(400, f"{what} must be an object, got {type(t).__name__}")
        unknown = sorted(set(t) - set(TENSOR_KEYS))
        missing = [k for k in ("name", "shape", "datatype") if k not in t]
        if unknown or missing:
            raise ApiError(400, f"{what}: unknown key(s) {unknown}, missing {missing}; a tensor has "
                                f"{', '.join(TENSOR_KEYS)}")
        what = f"{what} ({t['name']})"
        dt = _datatype(t["datatype"], what)
        size = _check_parameters(t.get("parameters"), INPUT_PARAMETERS, what).get("binary_data_size")
        if size is None:
            if "data" not in t:
                raise ApiError(400, f"{what}: no data and no binary_data_size parameter")
            tensors.append(tensor_from_values(t["name"], dt, t["shape"], t["data"], what))
            continue
        if "data" in t:
            raise ApiError(400, f"{what}: has both data and binary_data_size; send one")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ApiError(400, f"{what}: binary_data_size must be a non-negative integer, got {size!r}")
        if header_length is None:
            raise ApiError(400, f"{what}: binary_data_size given without the {HEADER} header")
        if pos + size > len(binary):
            raise ApiError(400, f"{what}: binary_data_size {size} runs past the binary data ({len(binary) - pos} "
                                "bytes left)")
        tensors.append(tensor_from_bytes(t["name"], dt, t["shape"], binary[pos:pos + size], what))
        pos += size
    if pos != len(binary):
        raise ApiError(400, f"the body has {len(binary) - pos} bytes of binary data that no input's "
                            "binary_data_size accounts for")
    outputs = doc.get("outputs")
    if outputs is not None and not isinstance(outputs, list):
        raise ApiError(400, '"outputs" must be a list of {"name", "parameters"}')
    named = []
    for i, o in enumerate(outputs or []):
        if not isinstance(o, dict) or "name" not in o or sorted(set(o) - {"name", "parameters"}):
            raise ApiError(400, f'outputs[{i}] must be {{"name": ..., "parameters": {{...}}}}, got {o!r}')
        named.append((o["name"], o.get("parameters")))
    wanted = _check_outputs(named)
    return InferRequest(rid, tensors, {k: binary_output if v is None else v for k, v in wanted.items()}, binary_output)


def render_http(model: str, version: str, req: InferRequest, outputs: list[Tensor]) -> tuple[bytes, dict[str, str]]:
    """The ``/infer`` answer: JSON, with binary data appended for the outputs asked for in binary."""
    doc: dict[str, Any] = {"model_name": model, "model_version": str(version)}
    if req.id is not None:
        doc["id"] = req.id
    doc["outputs"], blobs = [], []
    for t in outputs:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if req.outputs.get(t.name, req.binary_output):
            blob = tensor_bytes(t)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif t.datatype == "BYTES":
            entry["data"] = [b.decode("utf-8") for b in t.data]
        else:
            entry["data"] = np.asarray(t.data).reshape(-1).tolist()
        doc["outputs"].append(entry)
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER: str(len(head))}


# ------------------------------------------------------------------------------------------ gRPC


def _grpc_params(params: Any) -> dict:
    """A protobuf map<string, InferParameter> -> plain values."""
    return {k: getattr(v, v.WhichOneof("parameter_choice")) if v.WhichOneof("parameter_choice") else None
            for k, v in params.items()}


_CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
             "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "FP16": None, "FP32": "fp32_contents", "FP64": "fp64_contents",
             "BYTES": "bytes_contents"}


def parse_grpc(request: Any) -> InferRequest:
    """A ``ModelInferRequest`` -> the same InferRequest as HTTP (raw_input_contents are binary data)."""
    _check_parameters(_grpc_params(request.parameters), REQUEST_PARAMETERS, "request")
    if not request.inputs:
        raise ApiError(400, "the request has no inputs")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ApiError(400, f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send one "
                            "per input or none")
    tensors = []
    for i, t in enumerate(request.inputs):
        what = f"inputs[{i}] ({t.name})"
        dt = _datatype(t.datatype, what)
        _check_parameters(_grpc_params(t.parameters), INPUT_PARAMETERS, what)
        shape = [int(d) for d in t.shape]
        if raw:
            tensors.append(tensor_from_bytes(t.name, dt, shape, raw[i], what))
            continue
        attr = _CONTENTS[dt]
        if attr is None:
            raise ApiError(400, f"{what}: {dt} has no typed contents in gRPC; send it in raw_input_contents")
        tensors.append(tensor_from_values(t.name, dt, shape, list(getattr(t.contents, attr)), what))
    wanted = _check_outputs([(o.name, _grpc_params(o.parameters)) for o in request.outputs])
    return InferRequest(request.id or None, tensors, {k: True for k in wanted}, True)


def render_grpc(model: str, version: str, req: InferRequest, outputs: list[Tensor]) -> Any:
    """A ``ModelInferResponse`` with every output in raw_output_contents (what tritonclient reads)."""
    from tritonclient.grpc import service_pb2 as pb

    resp = pb.ModelInferResponse(model_name=model, model_version=str(version), id=req.id or "")
    for t in outputs:
        resp.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        resp.raw_output_contents.append(tensor_bytes(t))
    return resp


# ------------------------------------------------------------------------------------- shared meaning


def images(req: InferRequest, spec: ImageSpec) -> np.ndarray:
    """The request's one ``images`` tensor -> the checked N x H x W x C batch."""
    if len(req.inputs) != 1 or req.inputs[0].name != INPUT:
        raise ApiError(400, f"inputs {[t.name for t in req.inputs]}: this model takes one input, {INPUT!r}")
    t = req.inputs[0]
    what = f"input {INPUT!r}"
    if t.datatype not in IMAGE_DATATYPES:
        raise ApiError(400, f"{what}: datatype {t.datatype} is not accepted; allowed: {', '.join(IMAGE_DATATYPES)} "
                            "(UINT8/FP32 pixels N x H x W x C, BYTES encoded image files [N])")
    if t.datatype == "BYTES":
        if not (len(t.shape) == 1 or (len(t.shape) == 2 and t.shape[1] == 1)):
            raise ApiError(400, f"{what}: BYTES images must be shaped [N] or [N, 1], got {t.shape}")
        spec.check_count(len(t.data))
        return stack_images([decode_image(b, spec, f"{what}[{i}]") for i, b in enumerate(t.data)])
    spec.check_count(t.shape[0] if t.shape else 0)
    return check_pixels(t.data, spec, what)


def output_tensors(probs: np.ndarray, class_names: list[str], req: InferRequest) -> list[Tensor]:
    """The outputs asked for (all, in the model's order, when none are named)."""
    n = len(probs)
    ids = probs.argmax(axis=1).astype(np.int64)
    all_ = {"probabilities": Tensor("probabilities", "FP32", [n, probs.shape[1]], probs.astype(np.float32)),
            "class_id": Tensor("class_id", "INT64", [n], ids),
            "label": Tensor("label", "BYTES", [n], [str(class_names[k]).encode() for k in ids])}
    return [all_[k] for k in (req.outputs or OUTPUTS)]


def server_metadata(version: str) -> dict:
    return {"name": "transfuse", "version": version, "extensions": EXTENSIONS}


def model_metadata(model: str, version: str, shape: tuple[int, int, int], num_classes: int) -> dict:
    return {"name": model, "versions": [str(version)], "platform": "transfuse",
            "inputs": [{"name": INPUT, "datatype": "UINT8", "shape": [-1, *shape]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, num_classes]},
                        {"name": "class_id", "datatype": "INT64", "shape": [-1]},
                        {"name": "label", "datatype": "BYTES", "shape": [-1]}]}


def grpc_model_metadata(meta: dict) -> Any:
    from tritonclient.grpc import service_pb2 as pb

    tensors = lambda ts: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in ts]  # noqa: E731
    return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                    inputs=tensors(meta["inputs"]), outputs=tensors(meta["outputs"]))
