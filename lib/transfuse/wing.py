"""A wing's public face: the names other wings import from its package, each imported from its module on first use
(so ``import transfuse.finetune`` imports no TensorFlow until a name that needs it is asked for)."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def public_face(package: str, face: Mapping[str, str]) -> Callable[[str], Any]:
    """The package's module ``__getattr__``: ``face`` maps each public name to the module that defines it."""

    def __getattr__(name: str) -> Any:
        if name in face:
            return getattr(importlib.import_module(face[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


__all__ = ["public_face"]
