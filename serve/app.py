"""The Ray Serve application: the compressed bundle behind a batched, validated, hot-swappable API.

``build_app(AppArgs)`` is the builder named by ``serve/config.yaml`` (``import_path: serve.app:build_app``).
Each replica loads the bundle once through ``transfuse.inference.bundle.load_bundle`` (checksums verified) and lets the
bundle apply the one preprocessing function. Requests are turned into images by the protocol modules, then
batched across requests and protocols by ``serve.batching.Batcher`` (each batch formed when the model is free;
its size counts images, not requests). A new bundle is rolled out with the deployment's ``user_config``
(``reconfigure``): it is loaded and verified beside the old one, then swapped in with one reference assignment, so
requests in flight finish on the bundle they were validated against; a bundle that fails verification is refused
and the old one keeps serving.

Protocols, each parsed by its own module (this class only routes, batches and answers):

- TensorFlow Serving REST (``serve.tfserving``): ``POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict``,
  ``GET /v1/models/{name}[...]`` (status, with ``model_version_status``), ``GET .../metadata``.
- Uploads: ``POST /v1/models/{name}/images`` (multipart image files: JPEG, PNG, WebP, BMP, GIF, TIFF, any size).
- Open Inference Protocol v2 (``serve.v2``): ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``,
  ``/v2/models/{name}[/versions/{v}][/ready]``, ``POST /v2/models/{name}[/versions/{v}]/infer`` (JSON and binary
  tensors), and the same over Serve's gRPC proxy (``GRPCInferenceService``: the methods named like its RPCs).
- ``GET /`` a page to try the model in a browser (``serve/page.html``), ``GET /healthz``, FastAPI's ``/docs``.

Every client error gets a 4xx with ``{"error": "..."}``; a request past ``request_timeout_s`` gets 504; a full
queue (``max_queued_requests``) gets Serve's 503 with ``Retry-After``. Nothing a client sends can raise a 500 or
stop a replica. The replica's import path is numpy, PIL, FastAPI and the bundle's runtime: no TensorFlow.
"""

# No `from __future__ import annotations` here: FastAPI resolves route annotations (Request) at runtime, and
# string annotations on the methods that serve.ingress rewrites are not resolvable (pydantic "not fully defined").

import asyncio
import base64
import hmac
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from pydantic import Field
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import tfserving, v2
from serve.batching import Batcher
from serve.inputs import ApiError, ImageSpec, decode_image, input_shape, parse_uploads, read_body
from transfuse import environment
from transfuse.inference.bundle import BundleError, load_bundle
from transfuse.config import ALL_INTERFACES, ConfigError, ServeConfig

logger = logging.getLogger("ray.serve")

USER_CONFIG_KEYS = ("bundle", "revision", "max_batch_size", "batch_wait_timeout_s")
INLINE_PARSE_BYTES = 8192  # bodies up to this size are parsed on the event loop; larger ones (images) in a thread
PAGE = (Path(__file__).with_name("page.html")).read_text()



class AppArgs(ServeConfig):
    """Builder arguments: ServeConfig's fields and defaults plus the bundle to serve.

    ``host``, ``port`` and ``grpc_port`` are the proxies' (``serve.start`` / the Serve config's ``http_options``
    and ``grpc_options``), ``ingress`` the cluster's (``environment.init_ray``); the application itself ignores them.
    """

    bundle: str = Field(..., min_length=1)  # bundle directory or URI (s3://..., gs://...)


def _json(doc: Any, status: int = 200, headers: Optional[dict[str, str]] = None) -> Response:
    return Response(json.dumps(doc, separators=(",", ":")).encode(), status_code=status, headers=headers,
                    media_type="application/json")


def _error(status: int, message: str, headers: Optional[dict[str, str]] = None) -> Response:
    return _json({"error": message}, status, headers)


PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "signature_name": {"type": "string", "enum": [tfserving.SIGNATURE]},
                "instances": {"type": "array", "minItems": 1, "description": "row format: images as nested arrays "
                              "H x W (x C) (integers 0..255 or floats in [0, 1]) or {\"b64\": an encoded image}"},
                "inputs": {"description": "columnar format: the same list, or {\"images\": list}"},
            },
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
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "description": "Open Inference Protocol v2 request"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                            "description": f"JSON ({v2.HEADER} bytes) then binary tensor data"}}}}}

api = FastAPI(
    title="transfuse",
    description="A fine-tuned, stacked, compressed image classifier served by Ray Serve.",
    version="1",
)


def _tf_routes(method: str, suffix: str, **kwargs: Any) -> Callable:
    """One handler on ``/v1/models/{name}``, ``.../versions/{version}`` and ``.../labels/{label}`` + ``suffix``
    (TensorFlow Serving's three ways to name a model); only the first is listed in the OpenAPI schema."""
    bases = ("/v1/models/{name}", "/v1/models/{name}/versions/{version}", "/v1/models/{name}/labels/{label}")

    def register(fn: Callable) -> Callable:
        for i, base in enumerate(bases):
            getattr(api, method)(base + suffix, include_in_schema=i == 0, **kwargs)(fn)
        return fn

    return register


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> Response:
    return _error(exc.status, exc.message, exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return _error(422, "; ".join(parts) or "invalid request")


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> Response:
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


def _images(item: tuple[Any, np.ndarray]) -> int:
    """The batcher's size of an item: images, not requests."""
    return len(item[1])


# ------------------------------------------------------------------------------------------ deployment


class TransfuseReplica:
    """One replica: one verified bundle (swappable), batched inference on one dedicated thread.

    A plain class (the deployment ``TransfuseModel`` below wraps it with the FastAPI ingress), so its
    lifecycle methods can also be exercised directly.
    """

    def __init__(self, args: Union[AppArgs, dict]) -> None:
        self._args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
        v2.register_grpc_modules()  # gRPC requests arrive pickled under the stubs' generated module names
        # One inference thread: batches and health probes never run the interpreter concurrently, and the
        # event loop stays free to read, validate and answer requests while a batch runs. Large bodies (encoded
        # images) are parsed and decoded on a second thread, so a big upload never stalls the event loop.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transfuse-predict")
        self._decode_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transfuse-decode")
        self._swap_lock = asyncio.Lock()
        self._bundle = self._load(self._args.bundle)
        self._bundle_path = self._args.bundle
        self._from_init = True  # the first reconfigure with the same bundle does not load it again
        self._last_refused: Optional[dict[str, str]] = None
        self._batcher = Batcher(self._predict_batch, self._args.max_batch_size, self._args.batch_wait_timeout_s,
                                size=_images)
        logger.info("serving bundle %s version %s (%s)", self._bundle.name, self._bundle.version,
                    self._bundle.checksum)

    @staticmethod
    def _load(path: str) -> Any:
        """Load and verify (checksums, then one probe prediction): a bundle that cannot predict is refused."""
        bundle = load_bundle(path)
        _probe(bundle)
        return bundle

    # ---- configuration and hot swap

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
            self._batcher.configure(cfg.get("max_batch_size", self._batcher.max_size),
                                    cfg.get("batch_wait_timeout_s", self._batcher.wait_s))
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

    async def _predict_batch(self, items: list[tuple[Any, np.ndarray]]) -> list[Union[np.ndarray, Exception]]:
        """One model call per (bundle, dtype) group in the batch; results split back per item.

        When a group's call fails, its items are run one by one, so a request that breaks the model fails alone
        and its batch mates still get their answers.
        """
        loop = asyncio.get_running_loop()
        out: list[Union[np.ndarray, Exception, None]] = [None] * len(items)
        groups: dict[tuple[int, str], list[int]] = {}
        for i, (bundle, x) in enumerate(items):
            groups.setdefault((id(bundle), x.dtype.str), []).append(i)
        for idx in groups.values():
            bundle = items[idx[0]][0]
            x = np.concatenate([items[i][1] for i in idx]) if len(idx) > 1 else items[idx[0]][1]
            try:
                probs = await loop.run_in_executor(self._pool, bundle.predict_proba, x)
            except Exception as e:  # the runtimes raise their own kinds
                if len(idx) == 1:
                    out[idx[0]] = e
                    continue
                for i in idx:
                    try:
                        out[i] = await loop.run_in_executor(self._pool, bundle.predict_proba, items[i][1])
                    except Exception as e1:
                        out[i] = e1
                continue
            start = 0
            for i in idx:
                n = len(items[i][1])
                out[i] = np.asarray(probs[start:start + n], dtype=np.float32)
                start += n
        return out  # type: ignore[return-value]

    async def _infer(self, bundle: Any, x: np.ndarray) -> np.ndarray:
        """Chunks of at most max_batch_size images go through the batcher; results in request order."""
        size = self._batcher.max_size
        if len(x) <= size:  # the common case: one chunk, no gather task around it
            return await self._batcher.submit((bundle, x))
        return np.concatenate(await asyncio.gather(*[self._batcher.submit((bundle, x[i:i + size]))
                                                     for i in range(0, len(x), size)]))

    async def _classify(self, bundle: Any, parse: Callable[[], np.ndarray], big: bool) -> np.ndarray:
        """Parse (in the decode thread when ``big``) and predict, within ``request_timeout_s`` (else 504)."""
        timeout = self._args.request_timeout_s
        try:
            async with asyncio.timeout(timeout):  # no task of its own, unlike asyncio.wait_for
                x = await asyncio.get_running_loop().run_in_executor(self._decode_pool, parse) if big else parse()
                return await self._infer(bundle, x)
        except TimeoutError:
            raise ApiError(504, f"the request did not finish within request_timeout_s={timeout:g} s; the server is "
                                "overloaded or the request too large: retry later or send fewer images") from None

    def _spec(self, bundle: Any) -> ImageSpec:
        return ImageSpec(input_shape(bundle), self._args.max_instances, self._args.max_pixels, bundle.image_policy)

    # ---- request checks

    def _authorize(self, headers: Any) -> None:
        """``headers``: an HTTP request's headers, or a gRPC call's invocation metadata as a dict."""
        key = self._args.api_key
        if not key:
            return
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
        if not given or not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                           headers={"WWW-Authenticate": "Bearer"})

    def _model(self, name: str, version: Optional[str] = None, label: Optional[str] = None) -> Any:
        """The bundle behind ``name`` (and ``version`` or version ``label``), or 404 saying what is served."""
        bundle = self._bundle
        if name != self._args.name:
            raise ApiError(404, f"unknown model {name!r}; this server serves {self._args.name!r}")
        if version not in (None, "", str(bundle.version)):
            raise ApiError(404, f"model {name!r} has no version {version!r}; serving version {bundle.version!r}")
        if label is not None and label not in tfserving.LABELS:
            raise ApiError(404, f"model {name!r} has no version label {label!r}; labels: {', '.join(tfserving.LABELS)}")
        return bundle

    # ---- TensorFlow Serving REST

    @_tf_routes("post", ":predict", openapi_extra=PREDICT_BODY,
                summary="Classify images sent as JSON (TensorFlow Serving REST: instances or inputs, b64 images)")
    async def predict(self, name: str, request: Request, version: Optional[str] = None,
                      label: Optional[str] = None) -> Response:
        self._authorize(request.headers)
        bundle = self._model(name, version, label)
        body = await read_body(request, self._args.max_request_bytes)
        spec, parsed = self._spec(bundle), {}

        def parse() -> np.ndarray:
            x, parsed["columnar"] = tfserving.parse_predict(body, spec)
            return x

        probs = await self._classify(bundle, parse, len(body) > INLINE_PARSE_BYTES)
        return _json(tfserving.predict_response(probs, bundle.class_names, parsed["columnar"], self._args.name,
                                                str(bundle.version)))

    @api.post("/v1/models/{name}/images", openapi_extra=IMAGES_BODY,
              summary="Classify uploaded image files (JPEG, PNG, WebP, BMP, GIF, TIFF) of any size")
    async def images(self, name: str, request: Request) -> Response:
        self._authorize(request.headers)
        bundle = self._model(name)
        body = await read_body(request, self._args.max_request_bytes)
        files = await parse_uploads(request, body, self._args.max_instances)
        spec = self._spec(bundle)
        probs = await self._classify(bundle, lambda: np.stack([decode_image(d, spec, f) for f, d in files]), True)
        return _json(tfserving.predict_response(probs, bundle.class_names, False, self._args.name,
                                                str(bundle.version), [f for f, _ in files]))

    @_tf_routes("get", "", summary="Model status (TensorFlow Serving) and metadata: classes, input, metrics")
    async def status(self, name: str, request: Request, version: Optional[str] = None,
                     label: Optional[str] = None) -> Response:
        self._authorize(request.headers)
        bundle = self._model(name, version, label)
        h, w, c = input_shape(bundle)
        manifest = bundle.manifest or {}
        return _json({
            **tfserving.version_status(str(bundle.version)),
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
                       "max_pixels": self._args.max_pixels, "request_timeout_s": self._args.request_timeout_s,
                       "max_batch_size": self._batcher.max_size, "batch_wait_timeout_s": self._batcher.wait_s},
            "batching": self._batcher.stats(),  # this replica's, since it started; sizes in images
        })

    @_tf_routes("get", "/metadata", summary="The signature (TensorFlow Serving metadata)")
    async def tf_metadata(self, name: str, request: Request, version: Optional[str] = None,
                          label: Optional[str] = None) -> Response:
        self._authorize(request.headers)
        bundle = self._model(name, version, label)
        return _json(tfserving.metadata(self._args.name, str(bundle.version), input_shape(bundle),
                                        len(bundle.class_names)))

    @api.get("/v1/models/{name}/examples", summary="The test images the bundle ships (base64 PNG, true label)")
    async def examples(self, name: str, request: Request) -> Response:
        self._authorize(request.headers)
        bundle = self._model(name)
        return _json({"examples": [{"label": label, "b64": base64.b64encode(png).decode()}
                                   for label, png in bundle.example_images()]})

    # ---- Open Inference Protocol v2 over HTTP

    @api.get("/v2", summary="Server metadata (Open Inference Protocol v2)")
    async def v2_server(self) -> Response:
        return _json(v2.server_metadata(str(self._bundle.version)))

    @api.get("/v2/health/live", summary="Liveness (v2)")
    async def v2_live(self) -> Response:
        return _json({"live": True})

    async def _ready(self) -> Optional[str]:
        """None when the replica's bundle predicts one image now, else why not."""
        try:
            await self.check_health()
            return None
        except BundleError as e:
            return str(e)

    @api.get("/v2/health/ready", summary="Readiness (v2): the replica predicts one image now")
    async def v2_ready(self) -> Response:
        why = await self._ready()
        return _json({"ready": True} if why is None else {"ready": False, "error": why}, 200 if why is None else 503)

    @api.get("/v2/models/{name}/ready", summary="Model readiness (v2)")
    @api.get("/v2/models/{name}/versions/{version}/ready", include_in_schema=False)
    async def v2_model_ready(self, name: str, version: Optional[str] = None) -> Response:
        self._model(name, version)
        why = await self._ready()
        doc = {"name": name, "ready": why is None, **({} if why is None else {"error": why})}
        return _json(doc, 200 if why is None else 503)

    @api.get("/v2/models/{name}", summary="Model metadata (v2): the input and outputs")
    @api.get("/v2/models/{name}/versions/{version}", include_in_schema=False)
    async def v2_model(self, name: str, request: Request, version: Optional[str] = None) -> Response:
        self._authorize(request.headers)
        bundle = self._model(name, version)
        return _json(v2.model_metadata(self._args.name, str(bundle.version), input_shape(bundle),
                                       len(bundle.class_names)))

    @api.post("/v2/models/{name}/infer", openapi_extra=INFER_BODY,
              summary="Classify tensors (v2: UINT8/FP32 pixels or BYTES files; JSON or binary tensor data)")
    @api.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=INFER_BODY, include_in_schema=False)
    async def v2_infer(self, name: str, request: Request, version: Optional[str] = None) -> Response:
        self._authorize(request.headers)
        bundle = self._model(name, version)
        body = await read_body(request, self._args.max_request_bytes)
        spec, parsed = self._spec(bundle), {}

        def parse() -> np.ndarray:
            parsed["req"] = v2.parse_http(body, request.headers.get(v2.HEADER))
            return v2.images(parsed["req"], spec)

        probs = await self._classify(bundle, parse, len(body) > INLINE_PARSE_BYTES)
        req = parsed["req"]
        content, headers = v2.render_http(self._args.name, str(bundle.version), req,
                                          v2.output_tensors(probs, bundle.class_names, req))
        return Response(content, headers=headers)

    # ---- Open Inference Protocol v2 over gRPC (Serve's gRPC proxy calls the method named like the RPC)

    async def _grpc(self, grpc_context: Any, answer: Callable[[], Any], empty: Callable[[], Any]) -> Any:
        """Run ``answer``; a client error becomes its gRPC status code and message instead of a response."""
        import grpc

        try:
            return await answer()
        except ApiError as e:
            grpc_context.set_code(getattr(grpc.StatusCode, v2.GRPC_CODES.get(e.status, "INTERNAL")))
            grpc_context.set_details(e.message)
            return empty()

    async def ServerLive(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802 (the RPC's name)
        from tritonclient.grpc import service_pb2 as pb

        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        from tritonclient.grpc import service_pb2 as pb

        return pb.ServerReadyResponse(ready=await self._ready() is None)

    async def ServerMetadata(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        from tritonclient.grpc import service_pb2 as pb

        return pb.ServerMetadataResponse(**v2.server_metadata(str(self._bundle.version)))

    async def ModelReady(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        from tritonclient.grpc import service_pb2 as pb

        try:  # an unknown model or version is not ready (as the HTTP route's 404 reads to tritonclient.http)
            self._model(request.name, request.version)
        except ApiError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=await self._ready() is None)

    async def ModelMetadata(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        from tritonclient.grpc import service_pb2 as pb

        async def answer() -> Any:
            self._authorize(dict(grpc_context.invocation_metadata()) if grpc_context else {})
            bundle = self._model(request.name, request.version)
            return v2.grpc_model_metadata(v2.model_metadata(self._args.name, str(bundle.version),
                                                            input_shape(bundle), len(bundle.class_names)))

        return await self._grpc(grpc_context, answer, pb.ModelMetadataResponse)

    async def ModelInfer(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        from tritonclient.grpc import service_pb2 as pb

        async def answer() -> Any:
            self._authorize(dict(grpc_context.invocation_metadata()) if grpc_context else {})
            bundle = self._model(request.model_name, request.model_version)
            spec, parsed = self._spec(bundle), {}

            def parse() -> np.ndarray:
                parsed["req"] = v2.parse_grpc(request)
                return v2.images(parsed["req"], spec)

            big = sum(len(r) for r in request.raw_input_contents) > INLINE_PARSE_BYTES
            probs = await self._classify(bundle, parse, big)
            req = parsed["req"]
            return v2.render_grpc(self._args.name, str(bundle.version), req,
                                  v2.output_tensors(probs, bundle.class_names, req))

        return await self._grpc(grpc_context, answer, pb.ModelInferResponse)

    # ---- the page and liveness

    @api.get("/", response_class=HTMLResponse, summary="A page to try the model: upload or pick an image")
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE.replace("{{MODEL}}", json.dumps(self._args.name)))

    @api.get("/healthz", summary="Liveness: the replica is up and holds a bundle")
    async def healthz(self) -> Response:
        b = self._bundle
        return _json({"status": "ok", "model": self._args.name, "model_version": str(b.version),
                      "checksum": b.checksum, "replica": serve.get_replica_context().replica_id.unique_id})


TransfuseModel = serve.deployment(name="TransfuseModel", health_check_period_s=10, health_check_timeout_s=30)(
    serve.ingress(api)(TransfuseReplica))


def build_app(args: Union[AppArgs, dict]) -> Application:
    """The Serve application for ``args`` (a dict from a Serve config's ``args`` is validated here).

    Autoscaling, request and queue limits and CPUs per replica come from the args; the bundle path travels as
    the deployment's ``user_config`` so a new bundle rolls out with ``serve deploy`` (or ``serve.run``) in place.
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
        max_queued_requests=args.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": args.retry_after_s},
        ray_actor_options={"num_cpus": args.num_cpus},
        user_config={"bundle": args.bundle},
    )
    return deployment.bind(args)


def proxy_options(cfg: ServeConfig) -> dict[str, Any]:
    """``serve.start`` keyword arguments for ``cfg``: the HTTP proxy, and the gRPC proxy when ``grpc_port``."""
    opts: dict[str, Any] = {"http_options": {"host": cfg.host, "port": cfg.port}}
    if cfg.grpc_port:
        opts["grpc_options"] = {"port": cfg.grpc_port, "grpc_servicer_functions": [v2.GRPC_SERVICER]}
    return opts


def cluster_ingress() -> str:
    """The Serve ingress of the connected Ray cluster ('haproxy' or 'proxy'), read where Ray runs a task: from
    the node's environment, which Serve's processes read when they start."""
    import ray

    return ray.get(ray.remote(num_cpus=0)(environment.serve_ingress).remote())


def undeploy(app_name: str = "transfuse", timeout_s: float = 120.0) -> None:
    """Delete a Serve app and wait until Serve no longer lists it, on the monotonic clock: ``serve.delete`` waits
    60 s by ``time.time()``, and a wall-clock step on a CI VM made it time out while the deletion took seconds."""
    import time

    serve.delete(app_name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while app_name in serve.status().applications:
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve still lists app {app_name!r} {timeout_s:.0f} s after it was asked to delete it")
        time.sleep(1.0)


def deploy(cfg: ServeConfig, bundle: str, *, app_name: str = "transfuse", route_prefix: str = "/") -> str:
    """Start Serve's proxies (HTTP on ``cfg.host:cfg.port``, gRPC on ``cfg.grpc_port`` when set) and run the app
    for ``bundle`` on the connected Ray cluster; returns the model's base URL. Re-running it with a new bundle
    rolls replicas over without dropping requests (for an in-place swap, change the Serve config's
    ``user_config`` instead: serve/config.yaml).
    """
    load_bundle(bundle)  # refuse a bad bundle here, with its error, before any replica tries
    if cfg.ingress and cfg.ingress != (used := cluster_ingress()):
        raise ConfigError(f"serve.ingress is {cfg.ingress!r} but this Ray cluster's nodes run Serve with {used!r} "
                          "(set when the nodes start: RAY_SERVE_ENABLE_HA_PROXY=1 and RAY_SERVE_THROUGHPUT_OPTIMIZED=1 "
                          "in their environment for 'haproxy', as cluster.yaml does); set serve.ingress to "
                          f"{used!r} or leave it unset to use the cluster's")
    args = AppArgs(bundle=bundle, **cfg.model_dump())
    serve.start(**proxy_options(cfg))
    serve.run(build_app(args), name=app_name, route_prefix=route_prefix)
    host = "127.0.0.1" if cfg.host in ALL_INTERFACES else cfg.host
    return f"http://{host}:{cfg.port}{route_prefix.rstrip('/')}/v1/models/{cfg.name}"
