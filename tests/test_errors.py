"""One error family: every error class the library defines derives from ``TransfuseError`` (so the job runner
prints its message and exits 2) and keeps its builtin base; anything else escapes with its traceback."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import transfuse
import transfuse.config
from jobs._cli import main
from transfuse.errors import TransfuseError


def _library_errors() -> list[type]:
    found = []
    for info in pkgutil.walk_packages(transfuse.__path__, "transfuse."):
        module = importlib.import_module(info.name)
        found += [c for _, c in inspect.getmembers(module, inspect.isclass)
                  if issubclass(c, BaseException) and c.__module__ == module.__name__]
    return found


def test_every_library_error_is_a_transfuse_error():
    errors = _library_errors()
    names = {c.__name__ for c in errors}
    assert {"ConfigError", "DataError", "BundleError", "EnsembleError", "PreprocessError", "TorchFileError"} <= names
    assert [c.__name__ for c in errors if not issubclass(c, TransfuseError)] == []


@pytest.mark.parametrize("raised, code", [(lambda: transfuse.config.ConfigError("train.epochs_frozen: bad"), 2),
                                          (lambda: KeyError("a bug"), None)], ids=["library error", "bug"])
def test_the_job_runner_prints_library_errors_and_lets_bugs_through(raised, code, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run: x\n")

    def body(cfg, args):
        raise raised()

    if code is None:
        with pytest.raises(KeyError):
            main("test", body, argv=["--config", str(cfg)], needs_ray=False)
    else:
        assert main("test", body, argv=["--config", str(cfg)], needs_ray=False) == code
        err = capsys.readouterr().err
        assert err.strip() == "error: train.epochs_frozen: bad"
