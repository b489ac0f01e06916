"""Writing the served bundle: what ``transfuse.inference.bundle`` reads, in the format it owns.

``write_bundle`` takes the members as model bytes (``BundleCnn``, ``BundleSklearn``), checks them and their wiring
and the stacker's arrays, builds the manifest, stores the model files (``coding``: as written, or gzip) and writes
the manifest last, so a directory with a manifest holds a whole bundle. The format's constants and the checks the
loader shares come from ``transfuse.inference.bundle``, which describes the layout and the codings.

Like the loader, this module imports no TensorFlow, scikit-learn or Ray; Pillow is imported when an example image
is encoded.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import hashlib
import io
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from transfuse import storage
from transfuse.inference.bundle import (CODINGS, FEATURES, FORMAT, FORMAT_VERSION, MANIFEST, BundleError,
                                        check_sklearn_features, input_image_policy, sklearn_inputs)
from transfuse.inference.combine import Stacker
from transfuse.inference.preprocessing import PreprocessSpec
from transfuse.inference.runtimes import MODEL_FORMATS


@dataclass
class BundleCnn:
    """A CNN member's top (or whole model when there is no shared trunk) as model bytes.

    ``input``: "trunk" (the trunk's output) or "image" (the preprocessed image). Outputs are named signature
    outputs of the .tflite (or ONNX output names): ``logits`` (pre-softmax, N x K) and optionally
    ``embedding`` (N x D, the penultimate layer the sklearn members read).
    """

    name: str
    data: bytes
    format: str = "tflite"
    input: str = "trunk"
    logits_output: str = "logits"
    embedding_output: Optional[str] = "embedding"


@dataclass
class BundleSklearn:
    """A scikit-learn member exported to ONNX (skl2onnx, ``zipmap=False``), fed ``embedding_of``'s embedding
    (``features="embedding"``) or the images' ``pixel_features`` at ``pixel_size`` (``features="pixels"``)."""

    name: str
    data: bytes
    embedding_of: Optional[str] = None
    probabilities_output: str = "probabilities"
    features: str = "embedding"
    pixel_size: Optional[int] = None

    def inputs(self, images: np.ndarray, embeddings: dict[str, np.ndarray]) -> np.ndarray:
        return sklearn_inputs(self.features, self.pixel_size, self.embedding_of, images, embeddings)



def png_bytes(image: np.ndarray) -> bytes:
    """One H x W (x 1 or 3) uint8 image as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image).save(buf, "PNG")
    return buf.getvalue()


def example_images(images: np.ndarray, labels: np.ndarray, names: list[str], n: int = 6) -> list[tuple[str, bytes]]:
    """The first image of each of the first ``n`` classes, as (true label, PNG bytes): what a bundle ships as
    ``examples`` (the page at the endpoint's ``GET /`` offers them)."""
    firsts = [int(np.flatnonzero(labels == k)[0]) for k in range(min(n, len(names))) if (labels == k).any()]
    return [(names[int(labels[i])], png_bytes(images[i])) for i in firsts]


def encode(data: bytes, coding: str) -> bytes:
    """A model file's bytes as stored under ``coding`` (gzip: level 9, no timestamp, so the same bytes every time)."""
    if coding == "gzip":
        return gzip.compress(data, compresslevel=9, mtime=0)
    return data


def _file_safe(name: str) -> str:
    """A member name as part of a file name (the manifest keeps the real name)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:64]


def write_bundle(
    directory: str,
    *,
    name: str,
    version: str,
    class_names: list[str],
    input_shape: tuple[int, int, int],
    preprocess_spec: Union[PreprocessSpec, dict],
    cnn_members: list[BundleCnn],
    trunk: Optional[bytes] = None,
    trunk_format: str = "tflite",
    sklearn_members: Optional[list[BundleSklearn]] = None,
    stacker: Optional[Stacker] = None,
    variant: str = "float32",
    metrics: Optional[dict] = None,
    num_threads: int = 1,
    extra: Optional[dict] = None,
    examples: Optional[list[tuple[str, bytes]]] = None,
    overwrite: bool = False,
    coding: str = "none",
    image_policy: Optional[dict] = None,
) -> dict:
    """Write a bundle to ``directory`` (local or URI); the manifest goes last. Returns the manifest.

    ``coding``: how the model files (trunk, CNN members, scikit-learn members) are stored, one of ``CODINGS``.
    ``image_policy``: how an image file becomes the input pixels (``transfuse.images.ImagePolicy``, from the
    prepared data); None: stretched to ``input_shape``.

    A non-empty target is refused unless ``overwrite`` (then its contents are deleted first), since files left
    over from an earlier bundle would make the loader refuse this one. ``examples``: a few (true label, PNG bytes)
    test images shipped for people to try the served model with (``Bundle.example_images``).
    """
    sklearn_members = list(sklearn_members or [])
    names = _check_members(cnn_members, sklearn_members, trunk, class_names, input_shape, coding)
    files: dict[str, bytes] = {}
    manifest = _manifest_head(name, version, variant, class_names, input_shape, preprocess_spec, num_threads,
                              image_policy)
    _add_model_files(manifest, files, cnn_members, sklearn_members, trunk, trunk_format, coding)
    manifest["combiner"] = _combiner(stacker, names, len(class_names), files)
    manifest["examples"] = []
    for i, (label, png) in enumerate(examples or []):
        files[f"examples/{i:02d}.png"] = png
        manifest["examples"].append({"file": f"examples/{i:02d}.png", "label": str(label)})
    manifest["metrics"] = metrics or {}
    manifest["versions"] = storage.versions()
    manifest["git_commit"] = storage.git_commit()
    manifest.update(extra or {})
    manifest["files"] = {rel: hashlib.sha256(b).hexdigest() for rel, b in sorted(files.items())}
    _write_files(directory, files, manifest, overwrite)
    return manifest


def _check_members(cnn_members: list[BundleCnn], sklearn_members: list[BundleSklearn], trunk: Optional[bytes],
                   class_names: list[str], input_shape: tuple[int, int, int], coding: str) -> list[str]:
    """``BundleError`` for anything the loader would refuse in what ``write_bundle`` was given (the coding, the
    classes, the input shape, the members and their wiring); else every member's name, CNN members first."""
    if coding not in CODINGS:
        raise BundleError(f"coding must be one of {CODINGS}, got {coding!r}")
    if not cnn_members:
        raise BundleError("a bundle needs at least one CNN member")
    if len(class_names) < 2:
        raise BundleError(f"class_names must name at least 2 classes, got {class_names}")
    if len(input_shape) != 3 or input_shape[2] not in (1, 3):
        raise BundleError(f"input_shape must be (H, W, C) with C in (1, 3), got {tuple(input_shape)}")
    names = [m.name for m in cnn_members] + [m.name for m in sklearn_members]
    if not all(isinstance(n, str) and n for n in names):
        raise BundleError(f"member names must be non-empty strings, got {names}")
    if len(set(names)) != len(names):
        raise BundleError(f"member names must be unique, got {names}")
    for m in cnn_members:
        if m.format not in MODEL_FORMATS:
            raise BundleError(f"member {m.name}: format must be one of {MODEL_FORMATS}, got {m.format!r}")
        if m.input not in ("trunk", "image"):
            raise BundleError(f"member {m.name}: input must be 'trunk' or 'image', got {m.input!r}")
        if m.input == "trunk" and trunk is None:
            raise BundleError(f"member {m.name} reads the trunk but no trunk was given")
    cnn_names = {m.name for m in cnn_members}
    for s in sklearn_members:
        check_sklearn_features(s.features, s.pixel_size, f"sklearn member {s.name}")
        if s.features == "pixels":
            continue
        if s.embedding_of not in cnn_names:
            raise BundleError(f"sklearn member {s.name}: embedding_of must be one of {sorted(cnn_names)}, "
                              f"got {s.embedding_of!r}")
        src = next(m for m in cnn_members if m.name == s.embedding_of)
        if not src.embedding_output:
            raise BundleError(f"sklearn member {s.name} reads {src.name}'s embedding, which it does not output")
    return names


def _manifest_head(name: str, version: str, variant: str, class_names: list[str],
                   input_shape: tuple[int, int, int], preprocess_spec: Union[PreprocessSpec, dict], num_threads: int,
                   image_policy: Optional[dict]) -> dict[str, Any]:
    """The manifest's description of the bundle (what it is, its input, preprocessing and runtime), with empty
    model entries for ``_add_model_files`` to fill."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": str(version),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "variant": variant,
        "class_names": list(class_names),
        "input_spec": {"shape": [int(d) for d in input_shape], "dtype": ["uint8", "float32"],
                       "range": {"uint8": [0, 255], "float32": [0.0, 1.0]}, "layout": "NHWC",
                       "image_policy": input_image_policy(image_policy, input_shape).to_dict()},
        "preprocess": preprocess_spec.to_dict() if isinstance(preprocess_spec, PreprocessSpec)
        else dict(preprocess_spec),
        "runtime": {"num_threads": int(num_threads)},
        "trunk": None,
        "cnn_members": [],
        "sklearn_members": [],
    }


def _add_model_files(manifest: dict[str, Any], files: dict[str, bytes], cnn_members: list[BundleCnn],
                     sklearn_members: list[BundleSklearn], trunk: Optional[bytes], trunk_format: str,
                     coding: str) -> None:
    """The trunk, CNN member and scikit-learn member files (stored under ``coding``) into ``files``, and their
    entries into ``manifest``. CNN members exported as one graph (the same bytes) share one file."""
    suffix = ".gz" if coding == "gzip" else ""
    if trunk is not None:
        rel = f"trunk.{trunk_format}{suffix}"
        files[rel] = encode(trunk, coding)
        manifest["trunk"] = {"file": rel, "format": trunk_format, "coding": coding}
    digests = [hashlib.sha256(m.data).hexdigest() for m in cnn_members]
    shared: dict[str, str] = {}  # sha256 -> file
    for i, (m, digest) in enumerate(zip(cnn_members, digests)):
        if digests.count(digest) > 1:
            rel = shared.setdefault(digest, f"members/{len(shared):02d}_merged.{m.format}{suffix}")
        else:
            rel = f"members/{i:02d}_{_file_safe(m.name)}.{m.format}{suffix}"
        if rel not in files:
            files[rel] = encode(m.data, coding)
        manifest["cnn_members"].append({"name": m.name, "file": rel, "format": m.format, "coding": coding,
                                        "input": m.input,
                                        "outputs": {"logits": m.logits_output, "embedding": m.embedding_output}})
    for i, s in enumerate(sklearn_members):
        rel = f"sklearn/{i:02d}_{_file_safe(s.name)}.onnx{suffix}"
        files[rel] = encode(s.data, coding)
        src = ({"embedding_of": s.embedding_of} if s.features == "embedding" else {"pixel_size": s.pixel_size})
        manifest["sklearn_members"].append({"name": s.name, "file": rel, "format": "onnx", "coding": coding,
                                            "features": s.features,
                                            **src, "outputs": {"probabilities": s.probabilities_output}})


def _combiner(stacker: Optional[Stacker], names: list[str], k: int, files: dict[str, bytes]) -> dict[str, Any]:
    """The manifest's combiner entry: the average of every member, or the stacker, whose checked arrays go into
    ``files`` as ``stacker.npz`` (plain arrays: loaded with ``allow_pickle=False``)."""
    if stacker is None:
        return {"kind": "average", "members": names}
    if sorted(stacker.members) != sorted(names):
        raise BundleError(f"stacker.members must list every member once, got {stacker.members}, "
                          f"members are {names}")
    if stacker.features not in FEATURES:
        raise BundleError(f"stacker.features must be one of {FEATURES}, got {stacker.features!r}")
    if stacker.coef_ is None:
        raise BundleError("the stacker is not fitted")
    coef = np.asarray(stacker.coef_, dtype=np.float64)
    intercept = np.asarray(stacker.intercept_, dtype=np.float64).reshape(-1)
    n_feat = k * len(names)
    if coef.shape not in ((k, n_feat), (1, n_feat)) or intercept.shape != (coef.shape[0],):
        raise BundleError(f"stacker coef must be {k} x {n_feat} (or 1 x {n_feat} for binary) with a matching "
                          f"intercept, got coef {coef.shape}, intercept {intercept.shape}")
    buf = io.BytesIO()
    np.savez(buf, coef=coef, intercept=intercept)
    files["stacker.npz"] = buf.getvalue()
    return {"kind": "stacker", "file": "stacker.npz", "members": list(stacker.members),
            "features": stacker.features, "eps": float(stacker.eps), "temperature": float(stacker.temperature)}


def _write_files(directory: str, files: dict[str, bytes], manifest: dict[str, Any], overwrite: bool) -> None:
    """Every file, then the manifest: a directory with a manifest holds a whole bundle. A non-empty ``directory``
    is refused unless ``overwrite`` (then cleared first)."""
    if storage.exists(directory) and (storage.list_files(directory)
                                      or storage.exists(storage.join(directory, MANIFEST))):
        if not overwrite:
            raise BundleError(f"{directory} is not empty; pass overwrite=True to replace the bundle there")
        storage.clear_dir(directory)
    storage.makedirs(directory)
    for rel, b in files.items():
        storage.write_bytes(storage.join(directory, *rel.split("/")), b)
    storage.write_bytes(storage.join(directory, MANIFEST), storage.json_bytes(manifest))


__all__ = ["BundleCnn", "BundleSklearn", "encode", "example_images", "png_bytes", "write_bundle"]
