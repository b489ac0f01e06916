"""Real labelled images written out the way users' photo folders look: every size and aspect, every format and
colour mode, EXIF-rotated phone shots, upper-case extensions, junk and hidden files, a class name with a space,
imbalanced classes, and a truncated and an empty file. The tests, ``bench/ingest.py``, ``bench/predict.py`` and
anyone trying transfuse without photos of their own use it (``python -m transfuse.data.messy OUT``).

The pictures are Fashion-MNIST's (Debian's dataset-fashion-mnist) or scikit-learn's digits: each one scaled up
into a canvas of a random size (20 to 300 pixels a side, rarely square, at most 2:1 like photos) on a tinted
background.
"""

from __future__ import annotations

import argparse
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

# (format, extension, mode) in turn: every format and colour mode transfuse.images decodes
KINDS = [("JPEG", ".jpg", "RGB"), ("PNG", ".png", "RGBA"), ("PNG", ".PNG", "L"), ("WEBP", ".webp", "RGB"),
         ("BMP", ".bmp", "RGB"), ("GIF", ".gif", "P"), ("TIFF", ".tif", "CMYK"), ("PNG", ".png", "I;16"),
         ("PNG", ".png", "LA"), ("JPEG", ".JPEG", "L"), ("TIFF", ".TIFF", "RGB"), ("PNG", ".png", "P")]
FASHION_ODD = {"trouser": 1, "dress": 3, "sandal": 5, "sneaker": 7, "ankle boot": 9}  # the demo's classes
ORIENTATION = 274  # the EXIF tag; 6 = the camera was turned: rotate 90 degrees clockwise to view


@dataclass
class MessyFolder:
    """What was written: the labelled image files by class, the junk (with why it is junk), and the originals
    (the picture as drawn, upright, by file) for tests that check decoding."""

    root: Path
    files: dict[str, list[Path]] = field(default_factory=dict)
    bad: list[Path] = field(default_factory=list)  # truncated / empty: undecodable
    junk: list[Path] = field(default_factory=list)  # hidden and non-image files: skipped
    rotated: Optional[Path] = None  # the EXIF-rotated JPEG
    upright: dict[Path, np.ndarray] = field(default_factory=dict)


def load_pictures(source: str = "fashion_mnist") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 N x H x W, labels, class names) of a built-in source, without Ray."""
    if source == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return np.round(d.images * (255 / 16)).astype(np.uint8), d.target, [str(c) for c in d.target_names]
    from transfuse.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIRS, FASHION_MNIST_FILES, read_idx

    folder = next((Path(d).expanduser() for d in FASHION_MNIST_DIRS
                   if (Path(d).expanduser() / FASHION_MNIST_FILES["train"][0]).is_file()), None)
    if folder is None:
        raise FileNotFoundError("Fashion-MNIST not found: install the Debian package dataset-fashion-mnist")
    x, y = (read_idx(str(folder / f)) for f in FASHION_MNIST_FILES["train"])
    return x, y.astype(np.int64), list(FASHION_MNIST_CLASSES)


def picture(small: np.ndarray, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """One grey picture scaled into a (height, width) RGB canvas of a random tint, as a photo of it would be."""
    from PIL import Image

    h, w = size
    side = max(8, int(min(h, w) * rng.uniform(0.7, 1.0)))
    obj = np.asarray(Image.fromarray(small).resize((side, side), Image.Resampling.BILINEAR), np.float32) / 255
    tint = rng.uniform(0.4, 1.0, 3)
    back = rng.uniform(0.0, 0.25, 3)
    canvas = np.empty((h, w, 3), np.float32)
    canvas[:] = back
    y0, x0 = (h - side) // 2, (w - side) // 2
    canvas[y0:y0 + side, x0:x0 + side] = back + obj[..., None] * (tint - back)
    return np.round(canvas * 255).astype(np.uint8)


def encode(rgb: np.ndarray, fmt: str, mode: str) -> bytes:
    """An RGB array saved in ``fmt`` with its pixels in ``mode``."""
    from PIL import Image

    img = Image.fromarray(rgb, "RGB")
    if mode == "I;16":
        grey = np.asarray(img.convert("L"), np.uint16) * 257
        img = Image.fromarray(grey)  # uint16: Pillow's I;16
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    elif mode in ("RGBA", "LA"):
        img = img.convert(mode)
        alpha = np.full(rgb.shape[:2], 255, np.uint8)
        alpha[:2] = 0  # a transparent top edge
        img.putalpha(Image.fromarray(alpha))
    else:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 92} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


def write(root: str | Path, counts: dict[str, int], *, seed: int = 0, source: str = "fashion_mnist",
          classes: Optional[list[int]] = None, offset: int = 0, junk: bool = True,
          sizes: tuple[int, int] = (20, 300), kinds: Optional[list[tuple[str, str, str]]] = None) -> MessyFolder:
    """Write ``counts[name]`` pictures of each class under ``root/name/``. The i-th name takes the source's class
    ``classes[i]`` (default: 1, 3, 5, ... Fashion-MNIST's odd classes); pictures are drawn from the source's
    images from ``offset`` on, so two calls with other offsets share none. With ``junk``: a truncated JPEG, an
    empty PNG, a text file, a hidden file and a macOS ``._`` file beside the images. ``kinds``: the (format,
    extension, mode) cycled through (default ``KINDS``: every format and mode)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    x, y, _ = load_pictures(source)
    root = Path(root)
    ids = classes or list(range(1, 2 * len(counts), 2))
    out = MessyFolder(root)
    k = 0
    for name, cid in zip(counts, ids):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        pool = np.flatnonzero(y == cid)[offset:offset + counts[name]]
        if len(pool) < counts[name]:
            raise ValueError(f"{source} class {cid} has {len(pool)} pictures from {offset}, {counts[name]} asked")
        out.files[name] = []
        for j, i in enumerate(pool):
            fmt, ext, mode = (kinds or KINDS)[k % len(kinds or KINDS)]
            k += 1
            h = int(rng.integers(*sizes))
            w = int(np.clip(round(h * rng.uniform(0.5, 2.0)), *sizes))  # no wider or taller than 2:1
            hw = (h, w) if w != h else (h, w + 1)
            rgb = picture(x[i], rng, hw)
            path = folder / f"img_{j:04d}{ext}"
            path.write_bytes(encode(rgb, fmt, mode))
            out.files[name].append(path)
            out.upright[path] = rgb
    if out.files:
        first = next(iter(out.files))
        rgb = out.upright[out.files[first][0]]
        # a phone photo stored sideways: pixels turned 90 degrees, EXIF orientation 6 turns it back
        turned = Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1)), "RGB")
        exif = Image.Exif()
        exif[ORIENTATION] = 6
        out.rotated = root / first / "phone_rotated.jpg"
        turned.save(out.rotated, "JPEG", quality=95, exif=exif.tobytes())
        out.files[first].append(out.rotated)
        out.upright[out.rotated] = rgb
    if junk and out.files:
        names = list(out.files)
        good = out.files[names[0]][0].read_bytes()
        trunc = root / names[-1] / "truncated.jpg"
        whole = encode(out.upright[out.files[names[0]][0]], "JPEG", "RGB")
        trunc.write_bytes(whole[: len(whole) // 2])  # an interrupted copy: a sound header, half the data
        empty = root / names[0] / "empty.png"
        empty.write_bytes(b"")
        out.bad += [trunc, empty]
        notes = root / names[0] / "notes.txt"
        notes.write_text("not an image\n")
        hidden = root / names[-1] / ".DS_Store"
        hidden.write_bytes(b"\x00\x00\x00\x01Bud1")
        apple = root / names[0] / "._img_0000.jpg"
        apple.write_bytes(good[:64])
        out.junk += [notes, hidden, apple]
    return out


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder to write (one subfolder per class)")
    ap.add_argument("--per-class", type=int, nargs="+", default=[160, 100, 80, 60, 20],
                    help="pictures per class (the default: 8x imbalanced, 420 in all)")
    ap.add_argument("--names", nargs="+", default=list(FASHION_ODD), help="class names (Fashion-MNIST's odd "
                    "classes by default, in that order: trouser 1, dress 3, sandal 5, sneaker 7, ankle boot 9)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    made = write(args.out, dict(zip(args.names, args.per_class)), seed=args.seed)
    n = sum(len(v) for v in made.files.values())
    print(f"wrote {n} images in {len(made.files)} classes, {len(made.bad)} undecodable and {len(made.junk)} junk "
          f"files to {made.root}")


if __name__ == "__main__":
    main()
