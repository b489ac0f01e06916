"""The Ray Serve application: the compressed bundle behind a batched, validated, hot-swappable HTTP API.

``build_app(AppArgs)`` is the builder named by ``serve/config.yaml`` (``import_path: serve.app:build_app``).
Each replica loads the bundle once through ``transfuse.bundle.load_bundle`` (checksums verified) and lets the
bundle apply the one preprocessing function. Requests are split into images and batched across requests with
``@serve.batch`` (the batch size counts images, not requests). A new bundle is rolled out with the deployment's
``user_config`` (``reconfigure``): it is loaded and verified beside the old one, then swapped in with one
reference assignment, so requests in flight finish on the bundle they were validated against; a bundle that
fails verification is refused and the old one keeps serving.

Routes (DESIGN.md's HTTP contract): ``POST /v1/models/{name}:predict``, ``POST /v1/models/{name}/images``,
``GET /v1/models/{name}``, ``GET /healthz``, and FastAPI's ``/docs`` and ``/openapi.json``. Every bad input gets
a 4xx with ``{"error": "..."}``; nothing a client sends can raise a 500 or stop a replica.

The replica's import path is numpy, PIL, FastAPI and the bundle's inference runtime: no TensorFlow.
"""

# No `from __future__ import annotations` here: FastAPI resolves route annotations (Request) at runtime, and
# string annotations on the methods that serve.ingress rewrites are not resolvable (pydantic "not fully defined").

import asyncio
import hmac
import io
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from transfuse.bundle import BundleError, load_bundle
from transfuse.config import ServeConfig

logger = logging.getLogger("ray.serve")

IMAGE_FORMATS = ("PNG", "JPEG")  # what the upload route decodes; anything else is refused with 415
USER_CONFIG_KEYS = ("bundle", "revision", "max_batch_size", "batch_wait_timeout_s")


class AppArgs(ServeConfig):
    """Builder arguments: ServeConfig's fields and defaults plus the bundle to serve.

    ``host`` and ``port`` are the HTTP proxy's (``serve.start`` / the Serve config's ``http_options``); the
    application itself ignores them.
    """

    bundle: str = Field(..., min_length=1)  # bundle directory or URI (s3://..., gs://...)


# --------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A client error: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def _error(status: int, message: str, headers: Optional[dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# ------------------------------------------------------------------------------------ input validation


def input_shape(bundle: Any) -> tuple[int, int, int]:
    """The bundle's raw input (H, W, C) as its input spec says (before the preprocessing resize)."""
    spec = bundle.input_spec
    if not isinstance(spec, dict):
        spec = dict(spec) if hasattr(spec, "keys") else vars(spec)
    if "shape" in spec:
        shape = [int(s) for s in spec["shape"]]
        if len(shape) == 2:
            shape.append(1)
        h, w, c = shape[-3:]
    else:
        h, w = int(spec["height"]), int(spec["width"])
        c = int(spec.get("channels", 1))
    return h, w, c


def _shape_text(shape: tuple[int, ...]) -> str:
    return " x ".join(str(s) for s in shape)


def parse_instances(instances: Any, shape: tuple[int, int, int], max_instances: int) -> np.ndarray:
    """JSON ``instances`` -> N x H x W x C uint8 (integers 0..255) or float32 (floats in [0, 1]).

    Raises ApiError (400/413/422) naming what was wrong and what is allowed.
    """
    h, w, c = shape
    allowed = f"{_shape_text((h, w, c))}" + (f" (or {_shape_text((h, w))})" if c == 1 else "")
    if not isinstance(instances, list):
        raise ApiError(400, f'"instances" must be a list of images, got {type(instances).__name__}')
    if not instances:
        raise ApiError(400, f'"instances" is empty: send 1 to {max_instances} images')
    if len(instances) > max_instances:
        raise ApiError(413, f"too many instances: got {len(instances)}, at most {max_instances} per request")
    try:
        x = np.asarray(instances)
    except (ValueError, TypeError, OverflowError):
        raise ApiError(422, f"instances have ragged or mixed nesting: each must be a {allowed} nested array "
                            "of numbers") from None
    if x.dtype == np.bool_ or x.dtype.kind not in "iuf":
        kind = {"U": "strings", "S": "strings", "O": "non-numbers (null, objects or mixed nesting)",
                "b": "booleans"}.get(x.dtype.kind, str(x.dtype))
        raise ApiError(422, f"instances must hold numbers (integers 0..255 or floats in [0, 1]), got {kind}")
    if x.shape[1:] == (h, w) and c == 1:
        x = x[..., None]
    if x.shape[1:] != (h, w, c):
        got = _shape_text(x.shape[1:]) if x.ndim > 1 else "a scalar"
        raise ApiError(422, f"each instance must be a {allowed} image for this model, got {got}")
    if x.dtype.kind in "iu":
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise ApiError(422, f"integer pixel values must be in 0..255, got values in {lo}..{hi}")
        return x.astype(np.uint8)
    if not np.isfinite(x).all():
        raise ApiError(422, "instances contain NaN or infinite values; pixels must be finite")
    lo_f, hi_f = float(x.min()), float(x.max())
    if lo_f < 0.0 or hi_f > 1.0:
        raise ApiError(422, f"float pixel values must be in [0, 1] (or send integers 0..255), "
                            f"got values in [{lo_f:g}, {hi_f:g}]")
    return x.astype(np.float32)


def parse_predict_body(body: bytes, shape: tuple[int, int, int], max_instances: int) -> np.ndarray:
    """A ``:predict`` body (``{"instances": [...]}``) -> the image batch."""
    if not body:
        raise ApiError(400, 'empty body: send JSON {"instances": [...]}')
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f'body is not valid JSON ({e}); send {{"instances": [...]}}') from None
    except RecursionError:
        raise ApiError(400, "body JSON is nested too deeply; images are 2 or 3 levels deep") from None
    if not isinstance(doc, dict):
        raise ApiError(400, f'body must be a JSON object {{"instances": [...]}}, got {type(doc).__name__}')
    unknown = sorted(set(doc) - {"instances"})
    if unknown:
        raise ApiError(400, f"unknown key(s) {unknown} in the body; allowed: instances")
    if "instances" not in doc:
        raise ApiError(400, 'missing "instances": send {"instances": [...]}')
    return parse_instances(doc["instances"], shape, max_instances)


def decode_image(data: bytes, shape: tuple[int, int, int], filename: str = "upload") -> np.ndarray:
    """PNG/JPEG bytes of any size -> H x W x C uint8: the bundle's channels, resized to its raw input size."""
    from PIL import Image, UnidentifiedImageError

    h, w, c = shape
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            if fmt not in IMAGE_FORMATS:
                raise ApiError(415, f"{filename}: image format {fmt} is not supported; allowed: PNG, JPEG")
            img = img.convert("L" if c == 1 else "RGB")
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            x = np.asarray(img, dtype=np.uint8)
    except ApiError:
        raise
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"{filename}: image too large to decode ({e})") from None
    except UnidentifiedImageError:
        raise ApiError(415, f"{filename}: not an image PIL can identify; allowed: PNG, JPEG") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data inside a PNG/JPEG header
        raise ApiError(415, f"{filename}: not a readable PNG or JPEG image ({type(e).__name__}: {e})") from None
    return x[..., None] if x.ndim == 2 else x


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (never read whole first)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError(413, f"request body is {int(declared)} bytes; at most {limit} bytes allowed")
        except ValueError:
            raise ApiError(400, f"bad Content-Length header {declared!r}") from None
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes, the most allowed")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_uploads(request: Request, body: bytes, max_files: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) of every file in a multipart/form-data body, in upload order."""
    from starlette.formparsers import MultiPartException, MultiPartParser
    from starlette.datastructures import UploadFile

    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise ApiError(415, f"Content-Type must be multipart/form-data with image files, got {ctype or 'none'!r}")

    async def stream():  # the parser reads an async stream; the body is already bounded
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=max_files, max_fields=16,
                                     max_part_size=64 * 1024).parse()
    except MultiPartException as e:
        if e.message.startswith("Too many files"):
            raise ApiError(413, f"too many files: at most {max_files} per request") from None
        raise ApiError(400, f"bad multipart body: {e.message}") from None
    files = []
    try:
        for key, value in form.multi_items():
            if not isinstance(value, UploadFile):
                raise ApiError(400, f"form field {key!r} is not a file; send images as file parts")
            files.append((value.filename or key, await value.read()))
    finally:
        await form.close()
    if not files:
        raise ApiError(400, "no image files in the upload; send one or more PNG/JPEG files")
    if len(files) > max_files:
        raise ApiError(413, f"too many files: got {len(files)}, at most {max_files} per request")
    return files


# ------------------------------------------------------------------------------------------ responses


class Prediction(BaseModel):
    class_id: int
    label: str
    probabilities: list[float]
    filename: Optional[str] = None


class PredictResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    predictions: list[Prediction]
    model: str
    model_version: str


PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {
            "type": "object", "required": ["instances"], "additionalProperties": False,
            "properties": {"instances": {
                "type": "array", "minItems": 1,
                "description": "images as nested arrays H x W (x C): integers 0..255 or floats in [0, 1]",
                "items": {"type": "array", "items": {}},
            }},
        }}},
    }
}
IMAGES_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
        }}},
    }
}

api = FastAPI(
    title="transfuse",
    description="A fine-tuned, stacked, compressed image classifier served by Ray Serve.",
    version="1",
)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return _error(422, "; ".join(parts) or "invalid request")


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return _error(500, f"internal error ({type(exc).__name__}); the replica keeps serving")


def _probe(bundle: Any) -> None:
    """One blank image through the bundle; raises unless it returns 1 x K finite probabilities."""
    h, w, c = input_shape(bundle)
    try:
        probs = np.asarray(bundle.predict_proba(np.zeros((1, h, w, c), np.uint8)))
    except Exception as e:  # the runtimes raise RuntimeError/ValueError of their own kinds
        raise BundleError(f"bundle {bundle.name} {bundle.version} cannot predict: {type(e).__name__}: {e}") from None
    k = len(bundle.class_names)
    if probs.shape != (1, k) or not np.isfinite(probs).all():
        raise BundleError(f"bundle {bundle.name} {bundle.version} returned {probs.shape} (expected (1, {k})) "
                          "or non-finite probabilities")


def _total_images(items: list[tuple[Any, np.ndarray]]) -> int:
    """@serve.batch's size of a batch: images, not requests."""
    return sum(len(x) for _, x in items)


# ------------------------------------------------------------------------------------------ deployment


class TransfuseReplica:
    """One replica: one verified bundle (swappable), batched inference on one dedicated thread.

    A plain class (the deployment ``TransfuseModel`` below wraps it with the FastAPI ingress), so its
    lifecycle methods can also be exercised directly.
    """

    def __init__(self, args: Union[AppArgs, dict]) -> None:
        self._args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
        # One inference thread: batches and health probes never run the interpreter concurrently, and the
        # event loop stays free to read, validate and answer requests while a batch runs.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transfuse-predict")
        self._swap_lock = asyncio.Lock()
        self._bundle = self._load(self._args.bundle)
        self._bundle_path = self._args.bundle
        self._from_init = True  # the first reconfigure with the same bundle does not load it again
        self._last_refused: Optional[dict[str, str]] = None
        self._set_batching(self._args.max_batch_size, self._args.batch_wait_timeout_s)
        logger.info("serving bundle %s version %s (%s)", self._bundle.name, self._bundle.version,
                    self._bundle.checksum)

    @staticmethod
    def _load(path: str) -> Any:
        """Load and verify (checksums, then one probe prediction): a bundle that cannot predict is refused."""
        bundle = load_bundle(path)
        _probe(bundle)
        return bundle

    # ---- configuration and hot swap

    def _set_batching(self, max_batch_size: Any, batch_wait_timeout_s: Any) -> None:
        size, wait = int(max_batch_size), float(batch_wait_timeout_s)
        if size < 1 or not (wait >= 0.0 and math.isfinite(wait)):
            raise ValueError(f"max_batch_size must be an integer >= 1 and batch_wait_timeout_s a finite number >= 0, "
                             f"got {max_batch_size!r} and {batch_wait_timeout_s!r}")
        self._predict_batched.set_max_batch_size(size)
        self._predict_batched.set_batch_wait_timeout_s(wait)
        self._max_batch_size, self._batch_wait_timeout_s = size, wait

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply ``user_config`` (bundle, revision, max_batch_size, batch_wait_timeout_s).

        A new bundle is loaded and verified off the event loop, then swapped in atomically. A bundle that fails
        to load is refused: logged and reported by GET /v1/models/{name}, while the old one keeps serving.
        """
        cfg = dict(user_config or {})
        from_init, self._from_init = self._from_init, False
        try:
            unknown = sorted(set(cfg) - set(USER_CONFIG_KEYS))
            if unknown:
                raise ValueError(f"unknown user_config key(s) {unknown}; allowed: {list(USER_CONFIG_KEYS)}")
            self._set_batching(cfg.get("max_batch_size", self._max_batch_size),
                               cfg.get("batch_wait_timeout_s", self._batch_wait_timeout_s))
        except (TypeError, ValueError) as e:
            if from_init:  # a replica never starts on a config it cannot apply
                raise
            self._last_refused = {"user_config": json.dumps(cfg, default=str), "error": str(e)}
            logger.error("refused user_config %s: %s", cfg, e)
            return
        path = cfg.get("bundle")
        if not path or (from_init and path == self._bundle_path):
            return
        async with self._swap_lock:
            try:
                new = await asyncio.get_running_loop().run_in_executor(None, self._load, path)
            except (BundleError, OSError, ValueError, KeyError) as e:
                self._last_refused = {"bundle": str(path), "error": f"{type(e).__name__}: {e}"}
                logger.error("refused bundle %s: %s; still serving %s (%s)", path, e, self._bundle.version,
                             self._bundle.checksum)
                return
            old, self._bundle, self._bundle_path = self._bundle, new, path
            self._last_refused = None
        logger.info("swapped bundle %s (%s) -> %s (%s)", old.version, old.checksum, new.version, new.checksum)

    async def check_health(self) -> None:
        """Fails (raises) when the current bundle cannot predict one blank image."""
        await asyncio.get_running_loop().run_in_executor(self._pool, _probe, self._bundle)

    # ---- inference

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_total_images)
    async def _predict_batched(self, items: list[tuple[Any, np.ndarray]]) -> list[np.ndarray]:
        """One model call per (bundle, dtype) group in the batch; results split back per item."""
        loop = asyncio.get_running_loop()
        out: list[Optional[np.ndarray]] = [None] * len(items)
        groups: dict[tuple[int, str], list[int]] = {}
        for i, (bundle, x) in enumerate(items):
            groups.setdefault((id(bundle), x.dtype.str), []).append(i)
        for idx in groups.values():
            bundle = items[idx[0]][0]
            x = np.concatenate([items[i][1] for i in idx]) if len(idx) > 1 else items[idx[0]][1]
            probs = await loop.run_in_executor(self._pool, bundle.predict_proba, x)
            start = 0
            for i in idx:
                n = len(items[i][1])
                out[i] = np.asarray(probs[start:start + n], dtype=np.float32)
                start += n
        return out  # type: ignore[return-value]

    async def _infer(self, bundle: Any, x: np.ndarray) -> np.ndarray:
        """Chunks of at most max_batch_size images go through the batcher; results in request order."""
        size = self._max_batch_size
        parts = await asyncio.gather(*[self._predict_batched((bundle, x[i:i + size]))
                                       for i in range(0, len(x), size)])
        return np.concatenate(parts)

    def _respond(self, bundle: Any, probs: np.ndarray, filenames: Optional[list[str]] = None) -> dict:
        names = list(bundle.class_names)
        preds = []
        for i, p in enumerate(probs):
            k = int(np.argmax(p))
            pred = {"class_id": k, "label": str(names[k]), "probabilities": [float(v) for v in p]}
            if filenames is not None:
                pred["filename"] = filenames[i]
            preds.append(pred)
        return {"predictions": preds, "model": self._args.name, "model_version": str(bundle.version)}

    # ---- request checks

    def _authorize(self, request: Request) -> None:
        key = self._args.api_key
        if not key:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not given or not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                           headers={"WWW-Authenticate": "Bearer"})

    def _model(self, name: str) -> Any:
        if name != self._args.name:
            raise ApiError(404, f"unknown model {name!r}; this server serves {self._args.name!r}")
        return self._bundle

    # ---- routes

    @api.post("/v1/models/{name}:predict", response_model=PredictResponse, response_model_exclude_none=True,
              openapi_extra=PREDICT_BODY, summary="Classify images sent as JSON arrays (TF Serving REST shape)")
    async def predict(self, name: str, request: Request) -> dict:
        self._authorize(request)
        bundle = self._model(name)
        body = await read_body(request, self._args.max_request_bytes)
        x = parse_predict_body(body, input_shape(bundle), self._args.max_instances)
        return self._respond(bundle, await self._infer(bundle, x))

    @api.post("/v1/models/{name}/images", response_model=PredictResponse, response_model_exclude_none=True,
              openapi_extra=IMAGES_BODY, summary="Classify uploaded PNG/JPEG files of any size")
    async def images(self, name: str, request: Request) -> dict:
        self._authorize(request)
        bundle = self._model(name)
        body = await read_body(request, self._args.max_request_bytes)
        files = await parse_uploads(request, body, self._args.max_instances)
        shape = input_shape(bundle)
        x = np.stack([decode_image(data, shape, fname) for fname, data in files])
        return self._respond(bundle, await self._infer(bundle, x), [f for f, _ in files])

    @api.get("/v1/models/{name}", summary="Model metadata: classes, input spec, bundle version, metrics")
    async def metadata(self, name: str, request: Request) -> dict:
        self._authorize(request)
        bundle = self._model(name)
        h, w, c = input_shape(bundle)
        manifest = bundle.manifest or {}
        return {
            "name": self._args.name,
            "bundle": {"name": bundle.name, "version": str(bundle.version), "checksum": bundle.checksum,
                       "path": self._bundle_path},
            "class_names": list(bundle.class_names),
            "input_spec": bundle.input_spec,
            "input_shape": [h, w, c],
            "preprocess": manifest.get("preprocess"),
            "metrics": manifest.get("metrics"),
            "versions": manifest.get("versions"),
            "last_refused_bundle": self._last_refused,
            "limits": {"max_instances": self._args.max_instances, "max_request_bytes": self._args.max_request_bytes,
                       "max_batch_size": self._max_batch_size, "batch_wait_timeout_s": self._batch_wait_timeout_s},
        }

    @api.get("/healthz", summary="Liveness: the replica is up and holds a bundle")
    async def healthz(self) -> dict:
        b = self._bundle
        return {"status": "ok", "model": self._args.name, "model_version": str(b.version), "checksum": b.checksum,
                "replica": serve.get_replica_context().replica_id.unique_id}


TransfuseModel = serve.deployment(name="TransfuseModel", health_check_period_s=10, health_check_timeout_s=30)(
    serve.ingress(api)(TransfuseReplica))


def build_app(args: Union[AppArgs, dict]) -> Application:
    """The Serve application for ``args`` (a dict from a Serve config's ``args`` is validated here).

    Autoscaling, request limits and CPUs per replica come from the args; the bundle path travels as the
    deployment's ``user_config`` so a new bundle rolls out with ``serve deploy`` (or ``serve.run``) in place.
    """
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args)
    if args.max_ongoing_requests < args.max_batch_size:
        logger.warning("max_ongoing_requests (%d) < max_batch_size (%d): batches of single-image requests never "
                       "fill", args.max_ongoing_requests, args.max_batch_size)
    deployment = TransfuseModel.options(
        autoscaling_config={
            "min_replicas": args.min_replicas,
            "initial_replicas": max(1, args.min_replicas),
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
        },
        max_ongoing_requests=args.max_ongoing_requests,
        ray_actor_options={"num_cpus": args.num_cpus},
        user_config={"bundle": args.bundle},
    )
    return deployment.bind(args)


def deploy(cfg: ServeConfig, bundle: str, *, app_name: str = "transfuse", route_prefix: str = "/") -> str:
    """Start Serve's HTTP proxy on ``cfg.host:cfg.port`` and run the app for ``bundle`` on the connected Ray
    cluster; returns the model's base URL. Re-running it with a new bundle rolls replicas over without dropping
    requests (for an in-place swap, change the Serve config's ``user_config`` instead: serve/config.yaml).
    """
    load_bundle(bundle)  # refuse a bad bundle here, with its error, before any replica tries
    args = AppArgs(bundle=bundle, **cfg.model_dump())
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(args), name=app_name, route_prefix=route_prefix)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}{route_prefix.rstrip('/')}/v1/models/{cfg.name}"
