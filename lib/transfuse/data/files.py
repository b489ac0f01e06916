"""A user's image files as a source: a folder with one subfolder per class, or a table (CSV or parquet) of
(path or URI, label) rows; local or on ``s3://`` / ``gs://`` through pyarrow's filesystems.

``list_files`` finds the labelled files without decoding anything (hidden files and other extensions are skipped
and counted, a table's missing files are bad rows); ``inspect`` reads each file's header and last bytes, which is
what ``transfuse plan`` shows before Ray starts; ``load_files_source`` decodes every file with
``transfuse.images.decode`` in Ray Data tasks, each error kept as a row for the prepare stage to report.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Optional

import numpy as np

from transfuse import images, storage
from transfuse.config import DataConfig
from transfuse.data.sources import DataError, Source

TEST_PREFIX = "test:"  # ids of a separate test set (data.test_path) start with this
PATH_COLUMNS = ("path", "file", "filename", "image", "uri", "url")
LABEL_COLUMNS = ("label", "class", "category", "target")
_ROWS_PER_TASK = 256  # files one Ray Data task reads and decodes
# a user's files whose decoded pixels fit in this many bytes are decoded by plain Ray tasks of _FILES_PER_TASK files
# each and come back to the driver as arrays, which the prepare stage writes with pyarrow: Ray Data's passes cost
# more than decoding a few thousand photos. Larger sets stream through Ray Data's map_batches.
DRIVER_DECODE_BYTES = 1 << 30
_FILES_PER_TASK = 500
_THREADS = 4  # per task: reading from object storage waits on the network, and Pillow decodes outside the GIL


@dataclass
class Listing:
    """The labelled files of a source: (URI or absolute path, id, class name) rows, the class names in label
    order, the files skipped (hidden, not an image) and the rows that name no readable file."""

    files: list[tuple[str, str, str]]
    classes: list[str]
    ignored: list[dict[str, str]] = field(default_factory=list)
    bad: list[dict[str, str]] = field(default_factory=list)

    def class_counts(self) -> dict[str, int]:
        counts = {c: 0 for c in self.classes}
        for _, _, c in self.files:
            counts[c] += 1
        return counts


def _uri(fs: Any, path: str, template: str) -> str:
    """A path inside ``fs`` as the URI (or local path) a user would write, for ids and errors."""
    if storage.is_uri(template) and not template.startswith("file://"):
        scheme = template.split("://", 1)[0]
        return f"{scheme}://{path}"
    return path


def skip_reason(name: str, extensions: tuple[str, ...]) -> Optional[str]:
    """Why a file is not a labelled image (hidden, another extension), or None."""
    if images.is_hidden(name):
        return "hidden file"
    if not name.lower().endswith(extensions):
        return f"not an image file (extensions: {' '.join(extensions)}, any case)"
    return None


def list_folder(root: str, extensions: list[str]) -> Listing:
    """One subfolder per class (its name, spaces and all, is the class name), images anywhere below it."""
    import pyarrow.fs as pafs

    fs, base = storage.resolve(root)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise DataError(f"image folder not found: {root} (data.path must be a folder with one subfolder per class)")
    exts = tuple(extensions)
    entries = fs.get_file_info(pafs.FileSelector(base, recursive=False))
    ignored = [{"path": _uri(fs, e.path, root), "reason": "file at the top level; images go in one subfolder per "
                "class"} for e in entries if e.type == pafs.FileType.File and not images.is_hidden(e.base_name)]
    ignored += [{"path": _uri(fs, e.path, root), "reason": "hidden file"} for e in entries
                if images.is_hidden(e.base_name)]
    classes = sorted(e.base_name for e in entries
                     if e.type == pafs.FileType.Directory and not images.is_hidden(e.base_name))
    files: list[tuple[str, str, str]] = []
    for name in classes:
        found = 0
        for e in fs.get_file_info(pafs.FileSelector(f"{base}/{name}", recursive=True)):
            rel = e.path[len(base):].lstrip("/")
            if e.type != pafs.FileType.File or any(images.is_hidden(p) for p in rel.split("/")[1:-1]):
                continue
            reason = skip_reason(e.base_name, exts)
            if reason:
                ignored.append({"path": _uri(fs, e.path, root), "reason": reason})
                continue
            files.append((_uri(fs, e.path, root), rel, name))
            found += 1
        if found == 0:
            raise DataError(f"class folder {name!r} in {root} holds no image files (extensions {list(exts)}, any "
                            "case); remove it or add images")
    if len(classes) < 2:
        raise DataError(f"image folder {root} must hold one subfolder per class (at least 2), found "
                        f"{classes or 'none'}")
    return Listing(sorted(files), classes, ignored)


def _read_table(path: str) -> Any:
    """A CSV, TSV or parquet file as a pandas frame; a CSV's cells stay text (labels "01" and "1" stay apart)."""
    import pandas as pd
    import pyarrow.parquet as pq

    fs, p = storage.resolve(path)
    lower = path.lower()
    try:
        with fs.open_input_file(p) as f:
            if lower.endswith((".parquet", ".pq")):
                return pq.read_table(f).to_pandas()
            if lower.endswith((".csv", ".tsv")):
                return pd.read_csv(f, sep="\t" if lower.endswith(".tsv") else ",", dtype=str,
                                   keep_default_na=False, skipinitialspace=True)
    except FileNotFoundError:
        raise DataError(f"table not found: {path}") from None
    except Exception as e:  # pyarrow's parse errors have many types
        raise DataError(f"{path}: cannot read the table ({type(e).__name__}: {e})") from None
    raise DataError(f"{path}: a table must be a .csv, .tsv or .parquet file")


def _column(table: Any, wanted: Optional[str], candidates: tuple[str, ...], what: str, path: str) -> str:
    names = [str(c) for c in table.columns]
    if wanted is not None:
        if wanted not in names:
            raise DataError(f"{path}: data.{what}_column {wanted!r} is not a column; columns: {names}")
        return wanted
    lower = {n.lower(): n for n in names}
    for c in candidates:
        if c in lower:
            return lower[c]
    raise DataError(f"{path}: no {what} column; name one of {list(candidates)} or set data.{what}_column "
                    f"(columns: {names})")


def _table_folder(path: str) -> str:
    return (path if storage.is_uri(path) else storage.resolve(path)[1]).rsplit("/", 1)[0]


def _row_path(p: str, folder: str) -> str:
    """A table row's path: a URI or absolute path as it is, else relative to the table's folder."""
    return p if storage.is_uri(p) or p.startswith("/") else f"{folder}/{p}"


def table_paths(path: str, path_column: Optional[str] = None) -> list[str]:
    """The files a table lists (its path column, resolved as ``list_table`` resolves them), labels or not."""
    table = _read_table(path)
    col = _column(table, path_column, PATH_COLUMNS, "path", path)
    folder = _table_folder(path)
    return [_row_path(str(v).strip(), folder) for v in table[col].tolist() if v is not None and str(v).strip()]


def list_table(path: str, path_column: Optional[str], label_column: Optional[str], extensions: list[str]) -> Listing:
    """Rows of (path or URI, label); relative paths are relative to the table's folder. Rows naming a missing file
    are bad rows; labels are class names (numbers in a CSV are names too: "3")."""
    table = _read_table(path)
    pcol = _column(table, path_column, PATH_COLUMNS, "path", path)
    lcol = _column(table, label_column, LABEL_COLUMNS, "label", path)
    paths = ["" if v is None else str(v).strip() for v in table[pcol].tolist()]
    labels = ["" if v is None else str(v).strip() for v in table[lcol].tolist()]
    folder = _table_folder(path)
    bad: list[dict[str, str]] = []
    rows: list[tuple[str, str, str]] = []
    seen: dict[str, int] = {}
    exts = tuple(extensions)
    ignored: list[dict[str, str]] = []
    for i, (p, label) in enumerate(zip(paths, labels), start=2):  # row 1 is the header
        if not p or not label:
            bad.append({"id": f"{path}:{i}", "reason": f"row {i}: empty {pcol if not p else lcol}"})
            continue
        if p in seen:
            raise DataError(f"{path}: {p!r} is listed twice (rows {seen[p]} and {i}); each image once, with one label")
        seen[p] = i
        reason = skip_reason(PurePosixPath(p).name, exts)
        full = _row_path(p, folder)
        if reason:
            ignored.append({"path": full, "reason": reason})
            continue
        rows.append((full, p, label))
    if rows:
        rows, missing = _existing(rows)
        bad += [{"id": rel, "reason": "file not found"} for _, rel, _ in missing]
    classes = sorted({c for _, _, c in rows})
    if len(classes) < 2:
        raise DataError(f"{path}: the {lcol!r} column names {len(classes)} class(es) {classes}; at least 2 needed")
    return Listing(rows, classes, ignored, bad)


def _existing(rows: list[tuple[str, str, str]]) -> tuple[list, list]:
    """Rows whose file exists, and those whose file does not (one metadata call per filesystem)."""
    import pyarrow.fs as pafs

    by_fs: dict[str, tuple[Any, list[int], list[str]]] = {}
    for i, (full, _, _) in enumerate(rows):
        fs, p = storage.resolve(full)
        key = full.split("://", 1)[0] if storage.is_uri(full) else "local"
        by_fs.setdefault(key, (fs, [], []))[1].append(i)
        by_fs[key][2].append(p)
    found = [False] * len(rows)
    for fs, idx, ps in by_fs.values():
        for i, info in zip(idx, fs.get_file_info(ps)):
            found[i] = info.type == pafs.FileType.File
    return [r for r, ok in zip(rows, found) if ok], [r for r, ok in zip(rows, found) if not ok]


def _list_one(cfg: DataConfig, path: str) -> Listing:
    if cfg.source == "image_folder":
        return list_folder(path, cfg.image_extensions)
    return list_table(path, cfg.path_column, cfg.label_column, cfg.image_extensions)


def list_files(cfg: DataConfig) -> Listing:
    """The labelled files of ``data.path`` and, with ``data.test_path``, of the test set (ids ``test:...``), whose
    classes must all be among data.path's."""
    if not cfg.path:
        what = "a folder with one subfolder per class" if cfg.source == "image_folder" else \
            "a CSV or parquet table of (path, label) rows"
        raise DataError(f"data.source={cfg.source} needs data.path: {what}")
    main = _list_one(cfg, cfg.path)
    if cfg.test_path is None:
        return main
    test = _list_one(cfg, cfg.test_path)
    extra = sorted(set(test.classes) - set(main.classes))
    if extra:
        raise DataError(f"data.test_path {cfg.test_path} has classes {extra} that data.path {cfg.path} lacks "
                        f"(its classes: {main.classes}); a test image's class must be one the models learn")
    tag = lambda rows: [(f, TEST_PREFIX + i, c) for f, i, c in rows]  # noqa: E731
    return Listing(main.files + tag(test.files), main.classes, main.ignored + test.ignored,
                   main.bad + [{**b, "id": TEST_PREFIX + b["id"]} for b in test.bad])


# ---------------------------------------------------------------- headers (the plan)


_TAILS = {"JPEG": (b"\xff\xd9",), "PNG": (b"IEND\xaeB`\x82",), "GIF": (b";",)}  # how a complete file ends
_HEAD_BYTES = 1 << 16


def inspect(path: str, size_limit: int) -> dict[str, Any]:
    """Format, mode and size from one file's header, and whether it ends as a complete file of its format; the
    pixels are never decoded (``error`` says what was wrong)."""
    fs, p = storage.resolve(path)
    try:
        with fs.open_input_file(p) as f:
            n = f.size()
            if n == 0:
                return {"error": "empty file (0 bytes)"}
            head = f.read(min(n, _HEAD_BYTES))
            tail = head[-16:] if n <= _HEAD_BYTES else f.read_at(16, n - 16)
    except OSError as e:
        return {"error": f"cannot read ({e})"}
    try:
        h = images.header(head, path)
    except images.ImageError as e:
        return {"error": str(e).removeprefix(f"{path}: ")}
    out = {"format": h.format, "mode": h.mode, "width": h.width, "height": h.height, "bytes": n}
    if h.width * h.height > size_limit:
        out["error"] = (f"{h.width} x {h.height} = {h.width * h.height / 1e6:.1f} megapixels; at most "
                        f"{size_limit / 1e6:g} (data.max_pixels)")
        return out
    ends = _TAILS.get(h.format)
    if ends and not tail.rstrip(b"\x00\r\n ").endswith(ends):
        # no end marker: truncated, or a camera's trailer after it; decoding the file tells which
        try:
            with fs.open_input_file(p) as f:
                images.decode(f.read(), images.ImagePolicy(size=8, max_pixels=size_limit), path)
        except images.ImageError as e:
            out["error"] = str(e).removeprefix(f"{path}: ")
    return out


def inspect_all(listing: Listing, size_limit: int, threads: int = 16) -> list[dict[str, Any]]:
    """``inspect`` for every listed file (threads: object stores answer slowly, one file at a time)."""
    with ThreadPoolExecutor(threads) as pool:
        found = list(pool.map(lambda f: inspect(f[0], size_limit), listing.files))
    return [{"id": i, "class": c, **r} for (_, i, c), r in zip(listing.files, found)]


# ---------------------------------------------------------------- decoding (Ray Data)


def _read_file(path: str) -> bytes:
    if storage.is_uri(path):
        return storage.read_bytes(path)
    with open(path, "rb") as f:
        return f.read()


def decode_files(paths: list[str], ids: list[str], policy: images.ImagePolicy, threads: int = _THREADS
                 ) -> tuple[np.ndarray, list[str]]:
    """Each file -> ``policy``'s uint8 image, in threads; a failure leaves a zero image and its error (an empty
    string where the file decoded), so the prepare stage can name every bad file at once."""
    out = np.zeros((len(paths), *policy.shape), np.uint8)
    errors = [""] * len(paths)

    def one(i: int) -> None:
        try:
            out[i] = images.decode(_read_file(paths[i]), policy, ids[i])
        except images.ImageError as e:
            errors[i] = str(e).removeprefix(f"{ids[i]}: ")
        except OSError as e:
            errors[i] = f"cannot read ({e.strerror or e})"

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(len(paths))))
    return out, errors


def decode_batch(batch: dict[str, np.ndarray], policy: dict[str, Any]) -> dict[str, Any]:
    """Ray Data ``map_batches`` body over (path, id, label) rows: ``decode_files`` with ``error`` and ``shape``
    columns for the prepare stage."""
    pol = images.ImagePolicy.from_dict(policy)
    x, errors = decode_files([str(p) for p in batch["path"]], [str(i) for i in batch["id"]], pol, threads=2)
    shape = "x".join(map(str, pol.shape))
    return {"image": x, "label": np.asarray(batch["label"], np.int64),
            "id": np.asarray(batch["id"], dtype=object), "error": np.asarray(errors, dtype=object),
            "shape": np.asarray([shape if not e else "" for e in errors], dtype=object)}


def load_files_source(cfg: DataConfig, policy: images.ImagePolicy) -> Source:
    import ray.data

    listing = list_files(cfg)
    label_of = {c: i for i, c in enumerate(listing.classes)}
    paths, ids = [f for f, _, _ in listing.files], [i for _, i, _ in listing.files]
    labels = np.array([label_of[c] for _, _, c in listing.files], np.int64)
    where = "driver" if len(paths) * int(np.prod(policy.shape)) <= DRIVER_DECODE_BYTES else "ray"
    description = {"source": cfg.source, "path": cfg.path, "test_path": cfg.test_path, "n": len(paths),
                   "image_policy": policy.to_dict(), "decoded_by": where}
    kw = dict(test_prefix=TEST_PREFIX if cfg.test_path else None, bad=listing.bad)
    if where == "driver":
        import ray

        task = ray.remote(num_cpus=1)(decode_files)
        refs = [task.remote(paths[i:i + _FILES_PER_TASK], ids[i:i + _FILES_PER_TASK], policy)
                for i in range(0, len(paths), _FILES_PER_TASK)]
        parts = ray.get(refs)
        x = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, *policy.shape), np.uint8)
        arrays = {"image": x, "label": labels, "id": np.asarray(ids, dtype=object),
                  "error": np.asarray([e for p in parts for e in p[1]], dtype=object)}
        return Source(None, listing.classes, description, listing.ignored, arrays=arrays, **kw)
    rows = [{"path": f, "id": i, "label": int(y)} for f, i, y in zip(paths, ids, labels)]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // _ROWS_PER_TASK)))
    ds = ds.map_batches(decode_batch, fn_kwargs={"policy": policy.to_dict()}, batch_size=_ROWS_PER_TASK,
                        batch_format="numpy")
    return Source(ds, listing.classes, description, listing.ignored, **kw)
