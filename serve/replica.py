"""One replica's state and request handling, whatever the protocol: the bundle, its hot swap, batching, timeouts
and the request checks. ``serve.app`` adds the routes that parse each protocol and answer it.

Each replica loads the bundle once through ``transfuse.inference.bundle.load_bundle`` (checksums verified) and lets the
bundle apply the one preprocessing function. Requests are turned into images by the protocol modules, then
batched across requests and protocols by ``serve.batching.Batcher`` (each batch formed when the model is free;
its size counts images, not requests). A new bundle is rolled out with the deployment's ``user_config``
(``reconfigure``): it is loaded and verified beside the old one, then swapped in with one reference assignment, so
requests in flight finish on the bundle they were validated against; a bundle that fails verification is refused
and the old one keeps serving.
"""

import asyncio
import hmac
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Union

import numpy as np
from pydantic import Field

from serve import tfserving, v2
from serve.batching import Batcher
from serve.inputs import ApiError, ImageSpec, input_shape
from transfuse.config import ServeConfig
from transfuse.inference import BundleError, load_bundle

logger = logging.getLogger("ray.serve")

USER_CONFIG_KEYS = ("bundle", "revision", "max_batch_size", "batch_wait_timeout_s")


class AppArgs(ServeConfig):
    """Builder arguments: ServeConfig's fields and defaults plus the bundle to serve.

    ``host``, ``port`` and ``grpc_port`` are the proxies' (``serve.start`` / the Serve config's ``http_options``
    and ``grpc_options``), ``ingress`` the cluster's (``environment.init_ray``); the application itself ignores them.
    """

    bundle: str = Field(..., min_length=1)  # bundle directory or URI (s3://..., gs://...)


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


class Replica:
    """One replica: one verified bundle (swappable), batched inference on one dedicated thread.

    The routes' class (``serve.app.TransfuseReplica``) inherits it; the deployment wraps that class with the
    FastAPI ingress. A plain class, so its lifecycle methods can also be exercised directly.
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

    async def _ready(self) -> Optional[str]:
        """None when the replica's bundle predicts one image now, else why not."""
        try:
            await self.check_health()
            return None
        except BundleError as e:
            return str(e)
