"""Where stage outputs live, and the manifest that says they are complete.

Every stage writes to ``<storage>/<run>/<stage>/`` on a local folder or an object store (``s3://``, ``gs://``)
through pyarrow's filesystems, and finishes by writing ``manifest.json``: the effective config, its
fingerprint, counts, metrics, versions, the git commit and the sha256 of every file. A stage whose manifest is
complete for the same fingerprint is not rerun unless asked.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Optional

import pyarrow.fs as pafs

from transfuse import __version__

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


_BUCKET_SCHEMES = ("s3", "gs", "gcs")  # the path inside the filesystem is "bucket/key"


@functools.lru_cache(maxsize=32)
def _bucket_filesystem(root: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(root)[0]


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it; local paths are made absolute. A bucket's filesystem is made
    once per process (building an S3 client per file would cost more than reading it), and its keys are taken as
    written, spaces and all (pyarrow's URI parser refuses an unescaped space, common in class folder names)."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    if is_uri(path):
        scheme, _, rest = path.partition("://")
        if scheme in _BUCKET_SCHEMES and "?" not in rest:
            bucket, _, key = rest.partition("/")
            return _bucket_filesystem(f"{scheme}://{bucket}"), f"{bucket}/{key}".rstrip("/")
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).absolute())


def read_parquet(paths: Any, filesystem: pafs.FileSystem, **kwargs: Any) -> Any:
    """Parquet files (a path or a list) as a lazy Ray Dataset, every reader in transfuse through this one: Ray
    Data's first parquet datasource, not 2.60's default ListFiles -> ReadFiles plan, which read a split in a
    single task and let the store run past Ray Data's memory limit. Measured with bench/data_scale.py (80 MiB
    store, 200 MiB of rows, 2 CPUs): the streamed training iterator 1,612 rows/s with a 39 MiB peak against 824
    rows/s and 74 MiB, the cache pass 846 against 626 rows/s."""
    import ray.data
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved, ctx.use_datasource_v2 = ctx.use_datasource_v2, False  # read when the plan is built: scoped to this call
    try:
        return ray.data.read_parquet(paths, filesystem=filesystem, **kwargs)
    finally:
        ctx.use_datasource_v2 = saved


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base).absolute().joinpath(*parts))


def run_dir(cfg: Any) -> str:
    return join(cfg.storage, cfg.run)


def makedirs(path: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def written_since(path: str, since: float) -> bool:
    """``path`` is a file last written at or after ``since`` (a ``time.time()``; a filesystem that keeps no
    modification time counts as yes)."""
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    return info.type == pafs.FileType.File and (info.mtime is None or info.mtime.timestamp() >= since)


def write_bytes(path: str, data: bytes) -> None:
    fs, p = resolve(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p, compression=None) as f:
        f.write(data)


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p, compression=None) as f:  # raw bytes: no decompression by extension
        return f.read()


def json_bytes(obj: Any) -> bytes:
    """``obj`` as the JSON every transfuse file uses (indented, sorted keys; numpy values and paths as plain)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default).encode()


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, json_bytes(obj))


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256(path: str, chunk: int = 1 << 20) -> str:
    fs, p = resolve(path)
    h = hashlib.sha256()
    with fs.open_input_stream(p, compression=None) as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def list_files(path: str) -> list[str]:
    """Files under ``path``, relative to it, sorted; the manifest itself excluded."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    rel = [i.path[len(p):].lstrip("/") for i in infos if i.type == pafs.FileType.File]
    # dot-folders hold working state (Ray Train checkpoints, initial weights), not outputs
    return sorted(r for r in rel if r != MANIFEST and not any(part.startswith(".") for part in r.split("/")))


def list_dirs(path: str) -> list[str]:
    """The folders directly under ``path``, by name, sorted ([] when ``path`` is not a folder)."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(p)) if i.type == pafs.FileType.Directory)


def clear_dir(path: str) -> None:
    """Delete everything under ``path`` (the folder stays; a missing folder is fine)."""
    fs, p = resolve(path)
    fs.delete_dir_contents(p, missing_dir_ok=True)


def clear_outputs(directory: str) -> None:
    """Delete a stage's outputs and its manifest before it writes new ones, keeping its dot-folders: working state
    (Ray Train checkpoints, a search's trials) that a rerun resumes from."""
    for rel in list_files(directory) + [MANIFEST]:
        delete(join(directory, rel))


def delete(path: str) -> None:
    """Delete a file or a whole folder; nothing when it does not exist."""
    fs, p = resolve(path)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif kind != pafs.FileType.NotFound:
        fs.delete_file(p)


def checksums(path: str, files: Optional[list[str]] = None) -> dict[str, str]:
    files = list_files(path) if files is None else files
    return {f: sha256(join(path, f)) for f in files}


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
            timeout=5,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"transfuse": __version__}
    for pkg in ("ray", "tensorflow", "tf-keras", "scikit-learn", "numpy", "pyarrow", "ai-edge-litert"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_manifest(directory: str, cfg: Any, stage: str, fingerprint: str, **fields: Any) -> dict:
    """Write the stage's manifest last, so its presence means the outputs beside it are complete."""
    manifest = {
        "stage": stage,
        "complete": True,
        "fingerprint": fingerprint,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.model_dump(mode="json"),
        "versions": versions(),
        "git_commit": git_commit(),
        "host": os.uname().nodename,
        **fields,
    }
    manifest["files"] = checksums(directory)
    write_json(join(directory, MANIFEST), manifest)
    return manifest


def read_manifest(directory: str) -> Optional[dict]:
    path = join(directory, MANIFEST)
    if not exists(path):
        return None
    return read_json(path)


def is_complete(directory: str, fingerprint: str) -> bool:
    m = read_manifest(directory)
    return bool(m and m.get("complete") and m.get("fingerprint") == fingerprint)


def skip_complete(directory: str, fingerprint: str, stage: str, force: bool = False) -> bool:
    """Every stage's first step: True (and a log line) when ``directory`` holds a complete run of ``stage`` with
    this fingerprint and the caller was not forced, so the stage returns its saved outputs without running.
    What a stage that does run keeps of an earlier attempt is its own rule: Train and Tune resume from their
    working state, the others clear their folder before writing."""
    if force or not is_complete(directory, fingerprint):
        return False
    log.info("%s: %s is complete (fingerprint %s), skipping", stage, directory, fingerprint)
    return True
