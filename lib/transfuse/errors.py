"""The one base of every error transfuse raises on purpose.

A ``TransfuseError`` says what was wrong (a config value, a file, a member, a bundle) and what is allowed; the
job runner (``jobs/_cli.py``) prints its message and exits 2, without a traceback. Each concrete error also
keeps the builtin it has always been (``ValueError`` for bad input, ``RuntimeError`` for a failed run), so
callers that catch those keep working. Anything else that escapes a job is a bug and keeps its traceback.
"""

from __future__ import annotations


class TransfuseError(Exception):
    """Base of the library's own errors."""
