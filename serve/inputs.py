"""What every protocol of the Serve app shares: client errors, the image checks, image decoding, bounded bodies.

Each wire format (``serve.tfserving``, ``serve.v2``, the upload route) turns its request into one N x H x W x C
array with the functions here, so a pixel is validated the same way whichever protocol carried it. Nothing here
imports TensorFlow or knows about Ray Serve.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np

from transfuse import images


class ApiError(Exception):
    """A client error (or a refusal such as a timeout): answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@dataclass(frozen=True)
class ImageSpec:
    """What one request may carry: the bundle's raw image shape, how an encoded image becomes it, and the server's
    per-request limits."""

    shape: tuple[int, int, int]  # H, W, C before the bundle's preprocessing
    max_instances: int  # images per request
    max_pixels: int  # pixels per encoded image, checked from its header before it is decoded
    policy: Optional[images.ImagePolicy] = None  # the bundle's (Bundle.image_policy); None: stretch to shape

    def image_policy(self) -> images.ImagePolicy:
        h, w, c = self.shape
        base = self.policy or images.ImagePolicy(size=h, width=None if w == h else w, channels=c, resize="stretch")
        return replace(base, max_pixels=self.max_pixels)

    @property
    def allowed(self) -> str:
        h, w, c = self.shape
        return shape_text((h, w, c)) + (f" (or {shape_text((h, w))})" if c == 1 else "")

    def check_count(self, n: int, what: str = "images") -> None:
        if n < 1:
            raise ApiError(400, f"no {what} in the request: send 1 to {self.max_instances}")
        if n > self.max_instances:
            raise ApiError(413, f"too many {what}: got {n}, at most {self.max_instances} per request")


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


def shape_text(shape: tuple[int, ...]) -> str:
    return " x ".join(str(s) for s in shape)


# ------------------------------------------------------------------------------------ pixel arrays


def check_pixels(x: np.ndarray, spec: ImageSpec, what: str = "each image") -> np.ndarray:
    """An N x H x W (x C) numeric array -> N x H x W x C uint8 (integers 0..255) or float32 (floats in [0, 1]).

    Raises ApiError 422 naming what was wrong and what is allowed.
    """
    h, w, c = spec.shape
    if x.dtype == np.bool_ or x.dtype.kind not in "iuf":
        kind = {"U": "strings", "S": "strings", "O": "non-numbers (null, objects or mixed nesting)",
                "b": "booleans"}.get(x.dtype.kind, str(x.dtype))
        raise ApiError(422, f"pixels must be numbers (integers 0..255 or floats in [0, 1]), got {kind}")
    if x.shape[1:] == (h, w) and c == 1:
        x = x[..., None]
    if x.shape[1:] != (h, w, c):
        got = shape_text(x.shape[1:]) if x.ndim > 1 else "a scalar"
        raise ApiError(422, f"{what} must be a {spec.allowed} image for this model, got {got}")
    if x.dtype.kind in "iu":
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise ApiError(422, f"integer pixel values must be in 0..255, got values in {lo}..{hi}")
        return x.astype(np.uint8)
    if not np.isfinite(x).all():
        raise ApiError(422, "pixels contain NaN or infinite values; pixels must be finite")
    lo_f, hi_f = float(x.min()), float(x.max())
    if lo_f < 0.0 or hi_f > 1.0:
        raise ApiError(422, f"float pixel values must be in [0, 1] (or send integers 0..255), "
                            f"got values in [{lo_f:g}, {hi_f:g}]")
    return x.astype(np.float32)


def nested_pixels(images: Any, spec: ImageSpec, what: str = "instances") -> np.ndarray:
    """A JSON list of images as nested arrays -> the checked batch (``check_pixels``)."""
    if not isinstance(images, list):
        raise ApiError(400, f'"{what}" must be a list of images, got {type(images).__name__}')
    spec.check_count(len(images), what)
    try:
        x = np.asarray(images)
    except (ValueError, TypeError, OverflowError):
        raise ApiError(422, f"{what} have ragged or mixed nesting: each must be a {spec.allowed} nested array "
                            "of numbers") from None
    return check_pixels(x, spec, f"each of the {what}")


def stack_images(images: list[np.ndarray]) -> np.ndarray:
    """Images checked one by one -> one batch; uint8 ones become floats in [0, 1] when the others are floats."""
    if len({x.dtype for x in images}) > 1:
        images = [x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x for x in images]
    return np.stack(images)


# ------------------------------------------------------------------------------------ encoded images


def decode_image(data: bytes, spec: ImageSpec, filename: str = "image") -> np.ndarray:
    """Encoded image bytes -> H x W x C uint8 by the bundle's image policy (``transfuse.images.decode``: the same
    pixels as the prepared data and ``transfuse predict``). The pixel count is read from the header and refused
    (413) before any pixel is decoded, so a small file that declares a huge image costs nothing; a file that is
    not an allowed image, or is truncated or corrupt, is refused with 415."""
    try:
        return images.decode(data, spec.image_policy(), filename)
    except images.ImageTooLargeError as e:
        raise ApiError(413, str(e)) from None
    except images.ImageError as e:
        raise ApiError(415, str(e)) from None


def decode_base64(text: Any, what: str) -> bytes:
    """Standard base64 (RFC 4648, padded) -> bytes, or 400 naming ``what``."""
    import base64
    import binascii

    if not isinstance(text, str):
        raise ApiError(400, f"{what}: base64 data must be a string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{what}: not valid base64 ({e}); send standard padded base64 of an image file's "
                            "bytes") from None


# ------------------------------------------------------------------------------------ request bodies


async def read_body(request: Any, limit: int) -> bytes:
    """A Starlette request's body, refused with 413 as soon as it passes ``limit`` bytes (never read whole first)."""
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


async def parse_uploads(request: Any, body: bytes, max_files: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) of every file in a multipart/form-data body, in upload order."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

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
        raise ApiError(400, f"no image files in the upload; send one or more image files "
                            f"({', '.join(images.FORMATS)})")
    if len(files) > max_files:
        raise ApiError(413, f"too many files: got {len(files)}, at most {max_files} per request")
    return files


def parse_json(body: bytes, hint: str) -> dict:
    """A JSON object body, or 400 saying what was wrong and (``hint``) what to send."""
    import json

    if not body:
        raise ApiError(400, f"empty body: send JSON {hint}")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"body is not valid JSON ({e}); send {hint}") from None
    except RecursionError:
        raise ApiError(400, "body JSON is nested too deeply; images are 2 or 3 levels deep") from None
    if not isinstance(doc, dict):
        raise ApiError(400, f"body must be a JSON object {hint}, got {type(doc).__name__}")
    return doc
