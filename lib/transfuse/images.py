"""One owner for turning an image file into model pixels: decode, orient, convert the mode, resize.

The prepare stage (a user's folder or table of files), the Serve app (uploads, ``b64`` and BYTES tensors) and
``transfuse predict`` all call ``decode`` with the same ``ImagePolicy``, which the bundle's manifest carries, so a
photo gives the same pixels, and the same answer, whichever way it reaches the model. Pillow and numpy only.

Formats: JPEG, PNG, WebP, BMP, GIF (first frame), TIFF. Modes: every mode a photo folder holds (1, L, LA, P with or
without transparency, RGB, RGBA, CMYK, YCbCr, I;16 and 32-bit integer or float grey) becomes the model's channels
through ``to_channels``: alpha composited on white, 16-bit grey scaled by 1/257 (not clipped). EXIF orientation is
applied before resizing, so a phone photo stored sideways comes out upright.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, Optional, Union

import numpy as np

from transfuse.errors import TransfuseError

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # Pillow's format names
EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # compared lower-cased
# keep the aspect ratio and pad the short side (nothing of the photo is cut off or distorted); centre-crop the long
# side to a square (the object fills the frame, its edges may go); stretch to the square (Keras's default)
RESIZE_POLICIES = ("pad", "crop", "stretch")
BACKGROUND = 255  # transparent pixels are composited on white: a cut-out product or logo on white, as printed
PAD_VALUE = 0  # the padding around a "pad"-resized photo (tf.image.resize_with_pad's and Keras's pad value)


class ImageError(TransfuseError, ValueError):
    """A file that is not a decodable image of an allowed format; the message names the file and the problem."""


class ImageFormatError(ImageError):
    """A readable file in a format that is not allowed (``FORMATS``), or not an image at all."""


class ImageTooLargeError(ImageError):
    """An image whose header declares more pixels than allowed: refused before its pixels are decoded."""


@dataclass(frozen=True)
class ImagePolicy:
    """How any image file becomes an H x W x C uint8 array: ``size`` x ``size`` pixels, ``channels`` 1 (grey) or 3
    (RGB), ``resize`` one of ``RESIZE_POLICIES``; ``max_pixels`` bounds the decoded image (width x height).
    ``width``: a non-square target (``size`` is then its height), only stretched: a dataset prepared from
    same-sized arrays (the built-in sources, canonical parquet) serves images of its own shape."""

    size: int
    channels: int = 3
    resize: str = "pad"
    max_pixels: int = 100_000_000
    width: Optional[int] = None

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_POLICIES:
            raise ImageError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        if self.channels not in (1, 3):
            raise ImageError(f"channels must be 1 (grey) or 3 (RGB), got {self.channels}")
        if self.size < 1 or (self.width is not None and self.width < 1):
            raise ImageError(f"size must be >= 1 pixel, got {self.size} x {self.width or self.size}")
        if self.width not in (None, self.size) and self.resize != "stretch":
            raise ImageError(f"a non-square target ({self.size} x {self.width}) is only stretched, not {self.resize}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.size, self.width or self.size, self.channels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImagePolicy":
        return cls(**{k: d[k] for k in ("size", "channels", "resize", "max_pixels", "width") if k in d})


def has_image_extension(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS)


def is_hidden(name: str) -> bool:
    """A dot file (``.DS_Store``, ``._IMG_1.jpg`` from macOS, ``.thumbnails``): never a user's labelled image."""
    return name.startswith(".")


@dataclass(frozen=True)
class Header:
    """What an image's header says, read without decoding its pixels."""

    format: str
    mode: str
    width: int
    height: int


def _open(source: Union[bytes, BinaryIO], name: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source)
    except UnidentifiedImageError:
        raise ImageFormatError(f"{name}: not an image (allowed: {', '.join(FORMATS)})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"{name}: unreadable image header ({type(e).__name__}: {e})") from None
    if img.format not in FORMATS:
        img.close()
        raise ImageFormatError(f"{name}: image format {img.format} is not allowed; allowed: {', '.join(FORMATS)}")
    return img


def header(source: Union[bytes, BinaryIO], name: str = "image") -> Header:
    """Format, mode and size from the header alone (``transfuse plan`` reads folders this way)."""
    with _open(source, name) as img:
        return Header(img.format, img.mode, img.width, img.height)


def to_channels(img: Any, channels: int) -> Any:
    """Any Pillow mode -> "L" (channels 1) or "RGB" (channels 3): alpha on white, 16-bit grey / 257."""
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        # 16-bit grey spans 0..65535 (Pillow opens it as I;16 or I): scaled, not clipped; 8-bit data in an I or F
        # image (a float TIFF of 0..255) stays as it is
        if a.max(initial=0) > 255 or mode.startswith("I;16"):
            a = a / 257.0
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "1":
        img = img.convert("L")
    if img.mode in ("LA", "La", "PA", "RGBa", "RGBA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (BACKGROUND,) * 3 + (255,))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def _resize(img: Any, policy: ImagePolicy) -> Any:
    from PIL import Image

    th, tw, _ = policy.shape
    s, (w, h) = policy.size, img.size
    bilinear = Image.Resampling.BILINEAR  # antialiased when shrinking (Pillow scales the filter's support)
    if policy.resize == "stretch" or (w == h and th == tw):
        return img if (w, h) == (tw, th) else img.resize((tw, th), bilinear)
    if policy.resize == "crop":
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        return img.resize((s, s), bilinear, box=box)
    scale = s / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new(img.mode, (s, s), PAD_VALUE)
    canvas.paste(img.resize((nw, nh), bilinear), ((s - nw) // 2, (s - nh) // 2))
    return canvas


def decode(source: Union[bytes, BinaryIO], policy: ImagePolicy, name: str = "image") -> np.ndarray:
    """An encoded image -> ``policy.shape`` uint8, upright (EXIF), in the policy's channels and size.

    Raises ``ImageTooLargeError`` from the header before decoding a huge image, ``ImageFormatError`` for a file
    that is not an allowed image, and ``ImageError`` for a truncated or corrupt one; each names ``name``."""
    from PIL import Image, ImageOps

    img = _open(source, name)
    try:
        if img.width * img.height > policy.max_pixels:
            raise ImageTooLargeError(
                f"{name}: image is {img.width} x {img.height} = {img.width * img.height / 1e6:.1f} megapixels; at "
                f"most {policy.max_pixels / 1e6:g} megapixels ({policy.max_pixels} pixels) are allowed")
        if img.format == "JPEG":  # decode at a reduced scale that still leaves >= size pixels on each side
            img.draft("RGB" if img.mode in ("RGB", "YCbCr") else img.mode, policy.shape[1::-1])
        try:
            img.load()  # the first frame of a GIF or a multi-page TIFF
            img = ImageOps.exif_transpose(img) or img
            x = np.asarray(_resize(to_channels(img, policy.channels), policy), dtype=np.uint8)
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(f"{name}: image too large to decode ({e})") from None
        except (OSError, ValueError, SyntaxError, EOFError, IndexError) as e:
            raise ImageError(f"{name}: cannot decode ({type(e).__name__}: {e}); the file may be truncated or "
                             "corrupt") from None
    finally:
        img.close()
    return x[..., None] if x.ndim == 2 else x


def load(image: Any, policy: ImagePolicy, name: str = "image") -> np.ndarray:
    """A path, bytes, an open file or a PIL image -> ``policy.shape`` uint8 (``decode``'s rules for each)."""
    from pathlib import Path

    from PIL import Image, ImageOps

    if isinstance(image, Image.Image):
        img = ImageOps.exif_transpose(image) or image
        x = np.asarray(_resize(to_channels(img, policy.channels), policy), dtype=np.uint8)
        return x[..., None] if x.ndim == 2 else x
    if isinstance(image, (str, Path)):
        try:
            with open(image, "rb") as f:
                return decode(f.read(), policy, str(image))
        except OSError as e:
            raise ImageError(f"{image}: cannot read ({e.strerror or e})") from None
    return decode(image, policy, name)

