"""A pipeline stage as everything outside it sees it.

Each wing declares its stages in its package ``__init__`` (``transfuse.finetune.FINETUNE``,
``transfuse.ensemble.ENSEMBLE``, ...): the name the pipeline, ``--until``/``--force`` and the console use, the folder
under ``<storage>/<run>/`` it writes, the stages it reads, the files it writes there, and where its entry point,
progress reader, plan and typed metrics reader live. The pipeline, the console, ``transfuse plan`` and the
report read these objects; no stage folder or metrics file is spelled as a string outside its stage.

These are named as ``"module:function"`` (``"module:Class"`` for the reader) and imported on first use, so
declaring every stage imports no TensorFlow, Ray or scikit-learn.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from transfuse import storage

METRICS = "metrics.json"  # every stage's summary, beside its manifest


def read_metrics(directory: str) -> Optional[dict[str, Any]]:
    """The ``metrics.json`` in ``directory`` (a stage's folder or a member dir), or None before it is written."""
    path = storage.join(directory, METRICS)
    return storage.read_json(path) if storage.exists(path) else None


def _always(cfg: Any) -> bool:
    return True


@dataclass(frozen=True)
class Folder:
    """A folder under ``<storage>/<run>/`` that a stage writes besides its own (the bundle, the pretraining data,
    the frozen-activation cache)."""

    folder: str

    def dir(self, cfg: Any) -> str:
        return storage.join(cfg.storage, cfg.run, self.folder)

    def path(self, cfg: Any, *parts: str) -> str:
        return storage.join(self.dir(cfg), *parts)


@dataclass(frozen=True)
class Stage(Folder):
    """One stage: ``folder`` holds its manifest (complete when present), its ``metrics.json`` and ``outputs``.

    ``run(cfg, force=...)`` does the work; ``progress(cfg, since)`` returns a reader of ``(done, total, unit)``
    from the files the stage writes as it goes (None for a stage that writes none); ``plan(cfg)`` says what it
    would do without doing it and raises the stage's error where the config cannot work; ``reader`` is the class
    whose ``from_json`` types its ``metrics.json`` (``read``; ``metrics`` gives the file as written);
    ``enabled(cfg)`` is its config switch."""

    name: str = ""
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    run: str = ""
    progress: str = ""
    plan: str = ""
    reader: str = ""
    enabled: Callable[[Any], bool] = field(default=_always, compare=False)

    def metrics_path(self, cfg: Any) -> str:
        return self.path(cfg, METRICS)

    def metrics(self, cfg: Any) -> Optional[dict[str, Any]]:
        """Its ``metrics.json``, or None before it has written one."""
        return read_metrics(self.dir(cfg))

    def read(self, cfg: Any) -> Any:
        """Its ``metrics.json`` typed by ``reader`` (None before it has written one)."""
        d = self.metrics(cfg)
        return None if d is None else self.entry("reader").from_json(d)

    def manifest(self, cfg: Any) -> Optional[dict[str, Any]]:
        return storage.read_manifest(self.dir(cfg))

    def complete(self, cfg: Any) -> bool:
        return self.manifest(cfg) is not None

    def entry(self, which: str) -> Optional[Callable[..., Any]]:
        """What ``run``, ``progress``, ``plan`` or ``reader`` names, imported now (None when the stage has none)."""
        spec = getattr(self, which)
        if not spec:
            return None
        module, _, name = spec.partition(":")
        return getattr(importlib.import_module(module), name)

    def watch(self, cfg: Any) -> Optional[Callable[[], Any]]:
        """A reader of this stage's progress from the files it writes from now on (None: it writes none)."""
        reader = self.entry("progress")
        since = time.time() - 1.0  # file times come from a coarser clock than time.time()
        return reader(cfg, since) if reader else None


__all__ = ["METRICS", "Folder", "Stage", "read_metrics"]
