"""The Ray Serve application: the compressed bundle behind a batched, validated, hot-swappable API.

``build_app(AppArgs)`` is the builder named by ``serve/config.yaml`` (``import_path: serve.app:build_app``).
This module holds the routes; ``serve.replica`` what every route shares: the bundle, its hot swap, batching,
timeouts and the request checks.

Protocols, each parsed by its own module (the routes here only route, batch and answer):

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

import base64
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import tfserving, v2
from serve.inputs import ApiError, decode_image, input_shape, parse_uploads, read_body
from serve.replica import AppArgs, Replica
from transfuse import environment
from transfuse.config import ALL_INTERFACES, ConfigError, ServeConfig
from transfuse.inference import load_bundle

logger = logging.getLogger("ray.serve")

INLINE_PARSE_BYTES = 8192  # bodies up to this size are parsed on the event loop; larger ones (images) in a thread
PAGE = (Path(__file__).with_name("page.html")).read_text()


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


# ------------------------------------------------------------------------------------------ deployment


class TransfuseReplica(Replica):
    """One replica's routes: each parses its protocol (``serve.tfserving``, ``serve.v2``), then classifies
    through ``Replica``.

    A plain class (the deployment ``TransfuseModel`` below wraps it with the FastAPI ingress), so its
    lifecycle methods can also be exercised directly.
    """

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
