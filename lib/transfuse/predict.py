"""Predictions without Serve: ``transfuse.load(run_or_bundle).predict(...)`` and ``transfuse predict``.

The served bundle answers here exactly as at the endpoint: the same image decoding (``transfuse.images`` with
the bundle's image policy), the same preprocessing, members and combiner (``transfuse.inference.bundle``). Numpy, Pillow
and the bundle's runtimes only: no TensorFlow, no Ray. ``predict_files_ray`` runs the same on a Ray Data actor
pool, for folders or buckets larger than one machine.
"""

from __future__ import annotations

import csv
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from transfuse import images, storage
from transfuse.compress import BUNDLE
from transfuse.data import DataError
from transfuse.errors import TransfuseError
from transfuse.inference import MANIFEST, Bundle, load_bundle

BATCH = 256  # images decoded and classified together



@dataclass
class Predictions:
    """One row per input: the predicted class name and every class's probability (N x K, the endpoint's)."""

    class_names: list[str]
    probabilities: np.ndarray
    names: list[str]  # each input's name: its path, or "#i"
    errors: list[str]  # "" where the input was classified; else why it was not (its row of probabilities is NaN)

    @property
    def labels(self) -> list[str]:
        return ["" if e else self.class_names[int(i)]
                for e, i in zip(self.errors, np.nan_to_num(self.probabilities, nan=0).argmax(1))]

    def rows(self) -> Iterator[dict[str, Any]]:
        for name, label, p, err in zip(self.names, self.labels, self.probabilities, self.errors):
            yield {"file": name, "class": label, **{c: ("" if err else f"{v:.6f}") for c, v in
                                                    zip(self.class_names, p)}, "error": err}


def bundle_dir(run_or_bundle: str) -> str:
    """A bundle folder as given, or the served bundle of a run folder (``<run>/bundle``)."""
    if storage.exists(storage.join(run_or_bundle, MANIFEST)) and not storage.exists(
            storage.join(run_or_bundle, BUNDLE.folder, MANIFEST)):
        return run_or_bundle
    inner = storage.join(run_or_bundle, BUNDLE.folder)
    if storage.exists(storage.join(inner, MANIFEST)):
        return inner
    raise DataError(f"{run_or_bundle}: neither a bundle (it holds {MANIFEST}) nor a run with a served bundle "
                       f"({inner}/{MANIFEST}); the compress stage writes it")


class Predictor:
    """A loaded bundle that takes image files, bytes, PIL images or pixel arrays."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.policy = bundle.image_policy

    @property
    def class_names(self) -> list[str]:
        return self.bundle.class_names

    def _pixels(self, item: Any, name: str) -> np.ndarray:
        if isinstance(item, np.ndarray) and item.dtype != object:
            return self.bundle.validate(item[None])[0]  # pixels already in the bundle's input shape
        if isinstance(item, str) and storage.is_uri(item):
            try:
                item = storage.read_bytes(item)
            except OSError as e:
                raise images.ImageError(f"{name}: cannot read ({e})") from None
        return images.load(item, self.policy, name)

    def predict(self, inputs: Union[Sequence[Any], np.ndarray], *, names: Optional[Sequence[str]] = None,
                threads: int = 4) -> Predictions:
        """Classify paths, bytes, PIL images or H x W x C arrays (or one N x H x W x C array). An input that
        cannot be decoded gets its error and NaN probabilities; the others are classified. ``names``: what to
        call each input (default: its path, or ``#i``)."""
        if isinstance(inputs, np.ndarray) and inputs.ndim == 4:
            x = self.bundle.validate(inputs)
            return Predictions(self.class_names, self.bundle.predict_proba(x), [f"#{i}" for i in range(len(x))],
                               [""] * len(x))
        items = list(inputs)
        names = list(names) if names is not None else \
            [str(i) if isinstance(i, (str, Path)) else f"#{k}" for k, i in enumerate(items)]
        k = len(self.class_names)
        probs = np.full((len(items), k), np.nan, np.float32)
        errors = [""] * len(items)

        def one(j: int) -> Optional[np.ndarray]:
            try:
                return self._pixels(items[j], names[j])
            except (images.ImageError, TransfuseError) as e:
                errors[j] = str(e).removeprefix(f"{names[j]}: ")
                return None

        chunks = [list(range(s, min(s + BATCH, len(items)))) for s in range(0, len(items), BATCH)]
        # Pillow decodes and the runtimes classify outside the GIL: the next batch is read and decoded while this
        # one is classified
        with ThreadPoolExecutor(threads) as pool:
            pending = [pool.submit(one, j) for j in chunks[0]] if chunks else []
            for c, idx in enumerate(chunks):
                decoded = [f.result() for f in pending]
                pending = [pool.submit(one, j) for j in chunks[c + 1]] if c + 1 < len(chunks) else []
                good = [j for j, x in zip(idx, decoded) if x is not None]
                if good:
                    probs[good] = self.bundle.predict_proba(np.stack([decoded[j - idx[0]] for j in good]))
        return Predictions(self.class_names, probs, names, errors)


def load(run_or_bundle: Union[str, Path], *, num_threads: Optional[int] = None) -> Predictor:
    """A run folder (its served bundle) or a bundle folder or URI, loaded and verified."""
    return Predictor(load_bundle(bundle_dir(str(run_or_bundle)), num_threads=num_threads))


# ---------------------------------------------------------------- inputs given on a command line


def input_files(args: Sequence[str], extensions: Sequence[str] = images.EXTENSIONS
                ) -> tuple[list[str], list[dict[str, str]]]:
    """Files to classify from command-line arguments: image files, folders (searched recursively) and CSV or
    parquet tables with a path column; plus what was skipped in folders (hidden, not an image) and why."""
    from transfuse.data import skip_reason, table_paths

    exts = tuple(e.lower() for e in extensions)
    out: list[str] = []
    skipped: list[dict[str, str]] = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if not f.is_file():
                    continue
                hidden = any(images.is_hidden(part) for part in f.relative_to(p).parts[:-1])
                reason = "hidden file" if hidden else skip_reason(f.name, exts)
                if reason:
                    skipped.append({"path": str(f), "reason": reason})
                else:
                    out.append(str(f))
        elif a.lower().endswith((".csv", ".tsv", ".parquet", ".pq")):
            out += table_paths(a)
        elif storage.is_uri(a) and storage.is_dir(a):
            found, skip = _list_uri(a, exts)
            out += found
            skipped += skip
        elif p.is_file() or storage.is_uri(a):
            out.append(a)
        else:
            raise DataError(f"{a}: no such file or folder (give image files, folders, or a CSV/parquet table "
                               "with a path column)")
    if not out:
        raise DataError(f"no image files found in {list(args)} (extensions: {' '.join(exts)}, any case)")
    return out, skipped


def _list_uri(folder: str, exts: tuple[str, ...]) -> tuple[list[str], list[dict[str, str]]]:
    """Image files under a folder in object storage (``s3://bucket/prefix``), and the others skipped."""
    import pyarrow.fs as pafs

    from transfuse.data import skip_reason

    fs, base = storage.resolve(folder)
    scheme = folder.split("://", 1)[0]
    found, skipped = [], []
    for e in sorted(fs.get_file_info(pafs.FileSelector(base, recursive=True)), key=lambda e: e.path):
        if e.type != pafs.FileType.File:
            continue
        uri = f"{scheme}://{e.path}"
        hidden = any(images.is_hidden(part) for part in e.path[len(base):].split("/")[:-1])
        reason = "hidden file" if hidden else skip_reason(e.base_name, exts)
        if reason:
            skipped.append({"path": uri, "reason": reason})
        else:
            found.append(uri)
    return found, skipped


def predict_files(predictor: Predictor, files: Sequence[str], *, threads: int = 4) -> Predictions:
    """Every file (a local path or a URI), read, decoded and classified in batches of ``BATCH``."""
    return predictor.predict(list(files), names=[str(f) for f in files], threads=threads)


def write_csv(rows: Iterable[dict[str, Any]], out: Union[str, io.TextIOBase], class_names: list[str]) -> int:
    """Rows as CSV (file, class, one probability column per class name, error); returns the rows written."""
    fields = ["file", "class", *class_names, "error"]
    own = isinstance(out, str)
    f = open(out, "w", newline="") if own else out
    try:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        n = 0
        for r in rows:
            w.writerow(r)
            n += 1
        return n
    finally:
        if own:
            f.close()


# ---------------------------------------------------------------- the same on Ray Data


class _BatchPredictor:
    """A Ray Data actor: loads the bundle once, classifies each batch of file paths."""

    def __init__(self, bundle_path: str, num_threads: int) -> None:
        self.predictor = load(bundle_path, num_threads=num_threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        p = predict_files(self.predictor, [str(f) for f in batch["file"]], threads=2)
        return {"file": np.asarray(p.names, dtype=object), "probabilities": p.probabilities,
                "error": np.asarray(p.errors, dtype=object)}


def predict_files_ray(run_or_bundle: str, files: Sequence[str], *, actors: int = 2, batch_size: int = BATCH,
                      num_threads: int = 1) -> Iterator[Predictions]:
    """``predict_files`` on a Ray Data actor pool (``actors`` copies of the bundle), streamed back in batches."""
    import ray.data

    bundle = bundle_dir(run_or_bundle)
    names = load_bundle(bundle).class_names  # verified once here: a broken bundle fails before the pool starts
    ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=max(1, -(-len(files) // batch_size)))
    ds = ds.map_batches(_BatchPredictor, fn_constructor_kwargs={"bundle_path": bundle, "num_threads": num_threads},
                        compute=ray.data.ActorPoolStrategy(size=actors), batch_size=batch_size, batch_format="numpy",
                        num_cpus=1)
    for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield Predictions(names, np.asarray(b["probabilities"], np.float32), [str(f) for f in b["file"]],
                          [str(e) for e in b["error"]])
