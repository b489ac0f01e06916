"""The served bundle: one directory, a manifest with the sha256 of every file, model files that run no code.

Layout (format_version 1)::

    manifest.json           what is below, how to wire it, metrics, versions, sha256 of every other file
    trunk.tflite            shared frozen layers of the CNN members (absent when the members share none)
    members/<i>_<name>.tflite each CNN member's top: trunk features (or the image) -> logits, embedding
    sklearn/<i>_<name>.onnx scikit-learn members on one CNN member's embedding, or on the image's pixels
                            (``transfuse.inference.preprocessing.pixel_features``) -> probabilities
    stacker.npz             logistic meta-learner on the members' probabilities (absent: plain averaging)

Model files may be stored coded (``coding``, per file in the manifest: ``gzip`` adds ``.gz`` to the name): the
bytes a deployment stores and fetches. The loader checks the stored bytes' sha256, decodes in memory and hands
the model to its runtime; ``gunzip`` restores the plain file for other tools.

Loading needs numpy, LiteRT (``ai_edge_litert``) and onnxruntime only: no TensorFlow, no pickle
(``np.load(allow_pickle=False)``, JSON). ``load_bundle`` verifies every checksum before anything is parsed
and refuses a bundle whose files are missing, altered, unlisted or of another format version.

This module owns the format (its constants and the checks writer and loader share) and its reading: fetching,
verifying, loading. ``transfuse.inference.bundle_writer`` writes it, from ``BundleCnn`` and ``BundleSklearn``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
import threading
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional, Union

import numpy as np

from transfuse import storage
from transfuse.errors import TransfuseError
from transfuse.images import ImagePolicy
from transfuse.inference.combine import Stacker, combine_probs, softmax
from transfuse.inference.preprocessing import PreprocessSpec, pixel_features, preprocess
from transfuse.inference.runtimes import LiteRTRunner, ModelLoadError, OnnxRunner, load_runner

FORMAT = "transfuse.bundle"
FORMAT_VERSION = 1
MANIFEST = storage.MANIFEST
FEATURES = ("probs", "log_probs")  # what the stacker reads from each member
MAX_BATCH = 256  # images per interpreter call: bounds peak memory for large requests
# how a model file is stored: as written, or gzip-compressed (level 9, no timestamp: the same bytes every time)
CODINGS = ("none", "gzip")
MAX_DECODED_BYTES = 2 << 30  # a decoded model file larger than this is refused (a gzip bomb, not a model)


class BundleError(TransfuseError):
    """A bundle is missing, altered, unlisted, malformed or of an incompatible format version."""


class BundleInputError(TransfuseError, ValueError):
    """Images given to ``Bundle.predict_proba`` do not match the bundle's input spec."""


# ------------------------------------------------------------------------------------------ shared by writer and loader
SKLEARN_FEATURES = ("embedding", "pixels")


def check_sklearn_features(features: Any, pixel_size: Any, what: str) -> None:
    """A sklearn member's ``features`` and (for pixels) ``pixel_size``, as written and as loaded (``BundleError``)."""
    if features not in SKLEARN_FEATURES:
        raise BundleError(f"{what}: features must be one of {SKLEARN_FEATURES}, got {features!r}")
    if features == "pixels" and pixel_size is not None and (not isinstance(pixel_size, int) or pixel_size < 1):
        raise BundleError(f"{what}: pixel_size must be a positive int or None, got {pixel_size!r}")


def sklearn_inputs(features: str, pixel_size: Optional[int], embedding_of: Optional[str], images: np.ndarray,
                   embeddings: dict[str, np.ndarray]) -> np.ndarray:
    """What one sklearn member reads: its CNN member's embedding, or the raw images' pixel features."""
    if features == "pixels":
        return pixel_features(images, pixel_size)
    return embeddings[embedding_of]


def _safe_rel(rel: str) -> str:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel in ("", MANIFEST) or "\\" in rel:
        raise BundleError(f"bundle file name {rel!r} must be a relative path inside the bundle (no '..')")
    return rel


def input_image_policy(d: Optional[dict], shape: Any) -> ImagePolicy:
    """The bundle's image policy; one written without one stretches any image to its input shape."""
    h, w, c = (int(v) for v in shape)
    if d:
        policy = ImagePolicy.from_dict(d)
        if policy.shape != (h, w, c):
            raise BundleError(f"image_policy makes {policy.shape} images, the input shape is {(h, w, c)}")
        return policy
    return ImagePolicy(size=h, width=None if w == h else w, channels=c, resize="stretch")


def file_codings(manifest: dict) -> dict[str, str]:
    """Each model file of a manifest (trunk, CNN members, scikit-learn members) -> how it is stored."""
    entries = ([manifest["trunk"]] if manifest.get("trunk") else []) + list(manifest["cnn_members"])
    entries += list(manifest.get("sklearn_members", []))
    return {e["file"]: e.get("coding", "none") for e in entries}


def decode(path: Path, coding: Any, what: str) -> Union[Path, bytes]:
    """A stored model file as its runtime takes it: the path itself (``none``: the runtime maps the file) or the
    decoded bytes. ``BundleError`` for an unknown coding or bytes that do not decode."""
    if coding in (None, "none"):
        return path
    if coding != "gzip":
        raise BundleError(f"{what}: coding must be one of {CODINGS}, got {coding!r}")
    try:
        with gzip.open(path, "rb") as f:
            data = f.read(MAX_DECODED_BYTES + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise BundleError(f"{what}: {path.name} is not valid gzip data: {e}") from None
    if len(data) > MAX_DECODED_BYTES:
        raise BundleError(f"{what}: {path.name} decodes to more than {MAX_DECODED_BYTES:,} bytes; refused")
    return data


# --------------------------------------------------------------------------------------------- fetching
def _cache_root() -> Path:
    return Path(os.environ.get("TRANSFUSE_CACHE", Path.home() / ".cache" / "transfuse")) / "bundles"


def _http_get(url: str, timeout: float = 60.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (http/https only, checked)
            return r.read()
    except OSError as e:
        raise BundleError(f"cannot fetch {url}: {e}") from None


def fetch(uri: str, cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """Copy a remote bundle (s3://, gs://, http(s)://) into a fresh local cache folder; local paths pass through.

    Only the manifest and the files it lists are copied, so the checksums verified next are over exactly what
    runs. Each fetch goes to a new folder (keyed by the manifest's sha256), so a replica never reads a bundle
    half-overwritten by another.
    """
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("", "file"):
        return Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    if scheme in ("http", "https"):
        base = uri.rstrip("/")
        get = lambda rel: _http_get(f"{base}/{rel}")  # noqa: E731
    else:
        try:
            storage.resolve(uri)
        except Exception as e:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError for unknown schemes
            raise BundleError(f"cannot open bundle URI {uri!r}: {e}. Allowed: a local path, http(s)://, s3://, "
                              f"gs:// (pyarrow filesystems)") from None
        get = lambda rel: storage.read_bytes(storage.join(uri, *rel.split("/")))  # noqa: E731
    try:
        raw = get(MANIFEST)
    except BundleError:
        raise
    except Exception as e:
        raise BundleError(f"{uri}: cannot read {MANIFEST}: {e}") from None
    manifest = _parse_manifest(raw, uri)
    root = Path(cache_dir) if cache_dir else _cache_root()
    dest = root / hashlib.sha256(raw).hexdigest()[:32]
    if dest.is_dir():
        return dest  # verified again by load_bundle
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".fetch-"))
    try:
        for rel in manifest["files"]:
            target = tmp / _safe_rel(rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                target.write_bytes(get(rel))
            except BundleError:
                raise
            except Exception as e:
                raise BundleError(f"{uri}: file {rel!r} listed in the manifest cannot be read: {e}") from None
        (tmp / MANIFEST).write_bytes(raw)
        try:
            tmp.rename(dest)
        except OSError:  # another process fetched the same bundle meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# --------------------------------------------------------------------------------------------- loading
def _parse_manifest(raw: bytes, where: str) -> dict:
    try:
        m = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{where}/{MANIFEST} is not valid JSON: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BundleError(f"{where}/{MANIFEST} is not a transfuse bundle manifest (format must be {FORMAT!r}, "
                          f"got {m.get('format') if isinstance(m, dict) else type(m).__name__!r})")
    v = m.get("format_version")
    if v != FORMAT_VERSION:
        raise BundleError(f"{where}/{MANIFEST}: format_version {v!r} is not supported by this loader "
                          f"(supports {FORMAT_VERSION}); re-export the bundle with this transfuse version")
    for key in ("name", "version", "class_names", "input_spec", "preprocess", "cnn_members", "combiner", "files"):
        if key not in m:
            raise BundleError(f"{where}/{MANIFEST}: required field {key!r} is missing")
    if not isinstance(m["files"], dict):
        raise BundleError(f"{where}/{MANIFEST}: 'files' must map file names to sha256 digests")
    return m


def verify(directory: Union[str, Path]) -> tuple[dict, bytes]:
    """Check the manifest and the sha256 of every file; refuse missing, altered and unlisted files."""
    d = Path(directory)
    if not d.is_dir():
        raise BundleError(f"bundle directory {d} does not exist")
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{d}: {MANIFEST} is missing; not a bundle (or an incomplete write)")
    raw = mpath.read_bytes()
    m = _parse_manifest(raw, str(d))
    listed = {_safe_rel(r) for r in m["files"]}
    for rel, digest in sorted(m["files"].items()):
        p = d / rel
        if not p.is_file():
            raise BundleError(f"{d}: file {rel!r} listed in the manifest is missing")
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != digest:
            raise BundleError(f"{d}: file {rel!r} was altered: sha256 {h.hexdigest()[:16]}... does not match "
                              f"the manifest's {str(digest)[:16]}...")
    present = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()} - {MANIFEST}
    extra = sorted(present - listed)
    if extra:
        raise BundleError(f"{d}: files not listed in the manifest: {extra}; a bundle holds only what its manifest "
                          f"checksums (remove them or re-export)")
    referenced = list(file_codings(m))  # the model files, in manifest order
    if m["combiner"].get("file"):
        referenced.append(m["combiner"]["file"])
    for rel in referenced:
        if rel not in listed:
            raise BundleError(f"{d}: model file {rel!r} is used but has no checksum in the manifest")
    return m, raw


def _runner(path: Path, meta: dict, num_threads: int, what: str) -> Union[LiteRTRunner, OnnxRunner]:
    """The runtime adapter for one manifest entry (``file``, ``format``, ``coding``) under the bundle's root."""
    model = decode(path, meta.get("coding", "none"), what)
    try:
        return load_runner(model, meta["format"], num_threads, what)
    except ModelLoadError as e:
        raise BundleError(str(e)) from None


def _need_output(r: Union[LiteRTRunner, OnnxRunner], name: Optional[str], what: str) -> None:
    if name is not None and name not in r.outputs:
        raise BundleError(f"{what}: output {name!r} named in the manifest is not among the model's outputs "
                          f"{r.outputs}")


@dataclass
class Bundle:
    """A verified, loaded bundle. ``predict_proba(images)`` -> N x K float32 (rows sum to 1)."""

    path: Path
    manifest: dict
    checksum: str
    _trunk: Optional[Any] = None
    _trunk_output: str = ""
    _cnn: list[tuple[dict, Any]] = field(default_factory=list)
    _sk: list[tuple[dict, Any]] = field(default_factory=list)
    _stack: Optional[Stacker] = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def input_spec(self) -> dict:
        return self.manifest["input_spec"]

    @property
    def image_policy(self) -> ImagePolicy:
        """How an image file becomes this bundle's input pixels (Serve's decoders and ``transfuse predict``)."""
        return input_image_policy(self.input_spec.get("image_policy"), self.input_spec["shape"])

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        return PreprocessSpec(**self.manifest["preprocess"])

    def validate(self, images: Any) -> np.ndarray:
        """The images as an array, or ``BundleInputError`` saying what was expected and what was got."""
        x = np.asarray(images)
        h, w, c = self.input_spec["shape"]
        if x.dtype == object or not (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating)):
            raise BundleInputError(f"images must be uint8 (0..255) or float (0..1), got dtype {x.dtype}")
        ok = (x.ndim == 4 and x.shape[1:] == (h, w, c)) or (c == 1 and x.ndim == 3 and x.shape[1:] == (h, w))
        if not ok:
            want = f"N x {h} x {w} x {c}" + (f" or N x {h} x {w}" if c == 1 else "")
            raise BundleInputError(f"images must be shaped {want}, got {x.shape}")
        if len(x) == 0:
            raise BundleInputError("images must hold at least one image, got 0")
        if x.dtype != np.uint8:
            if not np.all(np.isfinite(x)):
                raise BundleInputError("float images must be finite (no NaN or inf)")
            lo, hi = float(x.min()), float(x.max())
            if lo < 0.0 or hi > 1.0:
                raise BundleInputError(f"float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
        return x

    def batch_probs(self, raw: np.ndarray, tick: Optional[Callable[[str], None]] = None) -> dict[str, np.ndarray]:
        """Every member's probabilities for one batch of validated images, in pipeline order: preprocess, trunk,
        CNN members (a graph several members share runs once), sklearn members. ``tick(part)`` is called after each
        part (``compress.measure.component_breakdown`` times the parts with it). Not locked: see ``member_probs``."""
        tick = tick or (lambda part: None)
        xb = preprocess(raw, self.preprocess_spec)
        tick("preprocess")
        feats = None
        if self._trunk is not None:
            feats = self._trunk(xb)[self._trunk_output]
            tick("trunk")
        out: dict[str, np.ndarray] = {}
        emb: dict[str, np.ndarray] = {}
        ran: dict[str, dict[str, np.ndarray]] = {}
        for meta, r in self._cnn:
            if meta["file"] not in ran:
                ran[meta["file"]] = r(feats if meta["input"] == "trunk" else xb)
            res = ran[meta["file"]]
            out[meta["name"]] = softmax(res[meta["outputs"]["logits"]])
            if meta["outputs"].get("embedding"):
                emb[meta["name"]] = res[meta["outputs"]["embedding"]]
            tick(f"cnn {meta['name']}")
        for meta, r in self._sk:
            v = sklearn_inputs(meta["features"], meta.get("pixel_size"), meta.get("embedding_of"), raw, emb)
            out[meta["name"]] = np.asarray(r(v)[meta["outputs"]["probabilities"]], dtype=np.float64)
            tick(f"sklearn {meta['name']}")
        return out

    def member_probs(self, images: Any) -> dict[str, np.ndarray]:
        """Each member's N x K probabilities (float64), by member name: what the combiner reads."""
        x = self.validate(images)
        outs: dict[str, list[np.ndarray]] = {}
        with self._lock:  # interpreters are not thread-safe
            for start in range(0, len(x), MAX_BATCH):
                for k, v in self.batch_probs(x[start:start + MAX_BATCH]).items():
                    outs.setdefault(k, []).append(v)
        return {k: np.concatenate(v) for k, v in outs.items()}

    def predict_proba(self, images: Any) -> np.ndarray:
        return self.combine(self.member_probs(images))

    def combine(self, probs: dict[str, np.ndarray]) -> np.ndarray:
        """The combiner (stacker or average) over the members' probabilities -> N x K float32."""
        if self._stack is None:
            p = combine_probs(probs, self.manifest["combiner"]["members"])
        else:
            p = self._stack.predict_proba(probs)
        return np.asarray(p / p.sum(axis=1, keepdims=True), dtype=np.float32)

    def predict(self, images: Any) -> np.ndarray:
        return self.predict_proba(images).argmax(axis=1)

    def example_images(self) -> list[tuple[str, bytes]]:
        """The (true label, PNG bytes) test images the bundle ships (none in bundles written without them)."""
        return [(e["label"], (self.path / _safe_rel(e["file"])).read_bytes()) for e in self.manifest.get("examples", [])]


def load_bundle(path: Union[str, Path], *, num_threads: Optional[int] = None,
                cache_dir: Optional[Union[str, Path]] = None) -> Bundle:
    """Fetch (URIs), verify every checksum, then load the models. Raises ``BundleError`` naming the problem.

    ``num_threads``: LiteRT / ONNX Runtime threads per model (default: the manifest's runtime.num_threads).
    """
    local = fetch(str(path), cache_dir)
    m, raw = verify(local)
    threads = int(num_threads or m.get("runtime", {}).get("num_threads", 1))
    if threads < 1:
        raise BundleError(f"num_threads must be >= 1, got {threads}")
    b = Bundle(path=local, manifest=m, checksum=hashlib.sha256(raw).hexdigest())
    try:
        PreprocessSpec(**m["preprocess"])
    except TypeError as e:
        raise BundleError(f"{local}/{MANIFEST}: preprocess spec {m['preprocess']} is invalid: {e}") from None
    if m.get("trunk"):
        t = m["trunk"]
        b._trunk = _runner(local / t["file"], t, threads, f"trunk ({t['file']})")
        outs = b._trunk.outputs
        if len(outs) != 1:
            raise BundleError(f"trunk ({t['file']}): must have one output, has {outs}")
        b._trunk_output = outs[0]
    names = _load_cnn_members(b, local, threads) | _load_sklearn_members(b, local, threads)
    b._stack = _load_combiner(m, local, names)
    return b


def _load_cnn_members(b: Bundle, local: Path, threads: int) -> set[str]:
    """The manifest's CNN members into ``b._cnn`` (members sharing a file share one runner); their names."""
    names = set()
    runners: dict[str, tuple[dict, Any]] = {}  # file -> (first member's meta, runner): one graph, one interpreter
    for meta in b.manifest["cnn_members"]:
        what = f"member {meta.get('name')} ({meta.get('file')})"
        if meta.get("input") not in ("trunk", "image"):
            raise BundleError(f"{what}: input must be 'trunk' or 'image', got {meta.get('input')!r}")
        if meta["input"] == "trunk" and b._trunk is None:
            raise BundleError(f"{what}: reads the trunk, but the manifest has no trunk")
        if meta["file"] in runners:
            first, r = runners[meta["file"]]
            key = lambda e: (e["input"], e["format"], e.get("coding", "none"))  # noqa: E731
            if key(first) != key(meta):
                raise BundleError(f"{what}: shares its file with member {first['name']} but not its "
                                  f"input/format/coding")
        else:
            r = _runner(local / meta["file"], meta, threads, what)
            runners[meta["file"]] = (meta, r)
        _need_output(r, meta["outputs"]["logits"], what)
        _need_output(r, meta["outputs"].get("embedding"), what)
        b._cnn.append((meta, r))
        names.add(meta["name"])
    return names


def _load_sklearn_members(b: Bundle, local: Path, threads: int) -> set[str]:
    """The manifest's scikit-learn members into ``b._sk`` (after the CNN members whose embeddings they read);
    their names."""
    names = set()
    for meta in b.manifest.get("sklearn_members", []):
        what = f"sklearn member {meta.get('name')} ({meta.get('file')})"
        meta.setdefault("features", "embedding")  # bundles written before pixel members existed
        check_sklearn_features(meta["features"], meta.get("pixel_size"), what)
        src = next((c for c, _ in b._cnn if c["name"] == meta.get("embedding_of")), None)
        if meta["features"] == "embedding" and (src is None or not src["outputs"].get("embedding")):
            raise BundleError(f"{what}: embedding_of {meta.get('embedding_of')!r} is not a CNN member with an "
                              f"embedding output")
        r = _runner(local / meta["file"], {**meta, "format": "onnx"}, threads, what)
        _need_output(r, meta["outputs"]["probabilities"], what)
        b._sk.append((meta, r))
        names.add(meta["name"])
    return names


def _load_combiner(m: dict, local: Path, names: set[str]) -> Optional[Stacker]:
    """The manifest's combiner checked against the loaded members: None for the average, else the stacker read
    from its arrays."""
    k = len(m["class_names"])
    comb = m["combiner"]
    if comb.get("kind") not in ("average", "stacker"):
        raise BundleError(f"{local}/{MANIFEST}: combiner.kind must be 'average' or 'stacker', got {comb.get('kind')!r}")
    if sorted(comb.get("members", [])) != sorted(names):
        raise BundleError(f"{local}/{MANIFEST}: combiner.members {comb.get('members')} must list every member "
                          f"once ({sorted(names)})")
    if comb["kind"] != "stacker":
        return None
    try:
        with np.load(local / comb["file"], allow_pickle=False) as z:
            coef, intercept = np.asarray(z["coef"], np.float64), np.asarray(z["intercept"], np.float64)
    except (ValueError, KeyError, OSError) as e:
        raise BundleError(f"{local}: stacker file {comb['file']!r} cannot be read as "
                          f"coef/intercept arrays: {e}") from None
    f = k * len(names)
    if coef.shape not in ((k, f), (1, f)) or intercept.shape != (coef.shape[0],):
        raise BundleError(f"{local}: stacker coef {coef.shape} / intercept "
                          f"{intercept.shape} do not fit {len(names)} members x {k} classes")
    if comb.get("features") not in FEATURES:
        raise BundleError(f"{local}/{MANIFEST}: combiner.features must be one of {FEATURES}, "
                          f"got {comb.get('features')!r}")
    return Stacker(list(comb["members"]), features=comb["features"], eps=float(comb.get("eps", 1e-6)),
                   coef_=coef, intercept_=intercept, temperature=float(comb.get("temperature", 1.0)))


