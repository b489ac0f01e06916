"""Runs a user starts on their own data: named after the data, never written over by another config.

``claim`` gives a run its folder ``<storage>/<run>/`` and writes the effective config there (``config.yaml``)
before anything else. The same config claims its own folder again (the pipeline then resumes, skipping complete
stages); another config gets the next free name (``photos-2``), or, when the user named the run, an error.
``open_run`` reads a run's config back for ``transfuse serve|report|predict RUN``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import yaml

from transfuse import storage
from transfuse.config import Config, ConfigError, config_from

RUN_CONFIG = "config.yaml"  # the effective config of a run, written when it is claimed
_MAX_SUFFIX = 1000


class RunError(ConfigError):
    """A run cannot be claimed or found; the message says which folder and what to do."""


def name_for(data: str) -> str:
    """A run name from the data's path: its last folder or file stem, in letters, digits, '-' and '_'."""
    stem = data.rstrip("/").rsplit("/", 1)[-1]
    if "." in stem and not Path(data).is_dir():
        stem = stem.rsplit(".", 1)[0]
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")
    return name or "run"


def _config_text(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _holder(folder: str) -> Optional[dict[str, Any]]:
    """The config that claimed ``folder`` (None: nobody), or an empty dict for a folder with outputs but no claim."""
    path = storage.join(folder, RUN_CONFIG)
    if storage.exists(path):
        return yaml.safe_load(storage.read_bytes(path)) or {}
    return {} if storage.exists(folder) and storage.list_files(folder) else None


def claim(cfg: Config, *, named: bool) -> Config:
    """``cfg`` with the run it may write: its own name when that folder is free or holds this very config, else
    (``named`` False) the first free ``name-2``, ``name-3``, ...; ``named``: the user chose the name, so a
    folder that another config claimed is an error rather than a new name."""
    mine = cfg.model_dump(mode="json")
    base = cfg.run
    for i in range(1, _MAX_SUFFIX):
        name = base if i == 1 else f"{base}-{i}"
        trial = cfg.model_copy(update={"run": name})
        folder = storage.run_dir(trial)
        held = _holder(folder)
        if held is not None and held == {**mine, "run": name}:
            return trial
        if held is None:
            storage.write_bytes(storage.join(folder, RUN_CONFIG), _config_text(trial).encode())
            return trial
        if named:
            raise RunError(f"run {name!r} at {folder} holds another config's outputs; choose another --run name "
                           "(or leave --run out: a new run gets a free name), or delete that folder")
    raise RunError(f"runs {base}-2 .. {base}-{_MAX_SUFFIX - 1} are all taken under {cfg.storage}")


def run_folder(run: str, storage_root: str = "./runs") -> str:
    """A run given as a folder (``runs/photos``) or as a name under ``storage_root``."""
    if storage.exists(storage.join(run, RUN_CONFIG)):
        return run
    folder = storage.join(str(Path(storage_root).expanduser().absolute()), run) if not storage.is_uri(storage_root) \
        else storage.join(storage_root, run)
    if storage.exists(storage.join(folder, RUN_CONFIG)):
        return folder
    raise RunError(f"no run at {run!r} or {folder!r}: give a run folder (it holds {RUN_CONFIG}) or a run name "
                   f"under --storage {storage_root}")


def open_run(run: str, storage_root: str = "./runs", overrides: Optional[list[str]] = None) -> Config:
    """The config a run was made with (``--set`` overrides on top: serving settings, say)."""
    folder = run_folder(run, storage_root)
    data = yaml.safe_load(storage.read_bytes(storage.join(folder, RUN_CONFIG)))
    parent, _, name = folder.rstrip("/").rpartition("/")  # the run is where it was found, moved or not
    return config_from({**data, "storage": parent or "/", "run": name}, overrides, f"{folder}/{RUN_CONFIG}")
