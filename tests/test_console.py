"""The pipeline's console without Ray: progress read (by each stage's reader) from checkpoint files as Ray Train names
them, bars on a terminal and at a few fractions elsewhere, and quiet mode in a real child process (file descriptors 1
and 2 into the log file, the console on the original stdout)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, smoke_config
from transfuse import console as con


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (65.4, "1:05"), (3723, "1:02:03")])
def test_clock(seconds, text):
    assert con.clock(seconds) == text


def test_bar_text_eta_from_the_rate_so_far():
    line = con.bar_text("finetune", 2, 8, "epochs", 30.0)  # 15 s per epoch so far: 6 left -> 1:30
    assert line.strip().startswith("finetune") and "[######" in line and "2/8 epochs  0:30, ETA 1:30" in line
    assert "ETA" not in con.bar_text("finetune", 8, 8, "epochs", 30.0)
    assert "ETA" not in con.bar_text("finetune", 0, 8, "epochs", 3.0)  # no rate yet


def _checkpoint(member_dir: Path, stamp: str, epoch: int) -> None:
    """A Ray Train checkpoint dir as transfuse.finetune.stage writes it:
    <member>/.ray_train/checkpoint_<time>/state.json."""
    from transfuse.finetune.stage import TRAIN_DIR
    from transfuse.finetune.loop import STATE_FILE

    d = member_dir / TRAIN_DIR / f"checkpoint_2026-12-01_21-26-{stamp}"
    d.mkdir(parents=True)
    (d / STATE_FILE).write_text(json.dumps({"epoch": epoch, "phase": 0}))


def _watch(cfg, name):
    """The named stage's progress reader, as the pipeline starts it (``Stage.watch``)."""
    from transfuse.pipeline import PIPELINE

    return next(st for st in PIPELINE if st.name == name).watch(cfg)


def test_watch_reads_epochs_and_variants_from_the_stage_files(tmp_path):
    cfg = smoke_config(tmp_path)
    epochs = cfg.train.epochs_frozen + cfg.train.epochs_unfrozen
    finetune = _watch(cfg, "finetune")
    assert finetune() == (0, epochs, "epochs")  # nothing written yet
    ft = tmp_path / "smoke" / "finetune"
    _checkpoint(ft, "21.421623", 1)
    _checkpoint(ft, "24.429340", 2)  # the newest checkpoint holds the newest epoch
    assert finetune() == (2, epochs, "epochs")

    tune = _watch(cfg, "tune")
    assert tune() == (0, cfg.tune.num_samples * epochs, "trial epochs")
    _checkpoint(tmp_path / "smoke" / "tune" / "trials" / "e0a35_00000", "01.0", 3)
    _checkpoint(tmp_path / "smoke" / "tune" / "trials" / "e0a35_00001", "02.0", 1)
    assert tune() == (4, cfg.tune.num_samples * epochs, "trial epochs")

    compress = _watch(cfg, "compress")
    names = cfg.compress.variant_names()
    assert compress() == (0, len(names), "variants")
    (tmp_path / "smoke" / "compress" / names[0]).mkdir(parents=True)
    (tmp_path / "smoke" / "compress" / names[0] / "manifest.json").write_text("{}")  # a bundle's manifest: last
    assert compress() == (1, len(names), "variants")

    ensemble = _watch(cfg, "ensemble")
    assert ensemble() is None  # no task finished yet (or the member search still runs)
    (tmp_path / "smoke" / "ensemble").mkdir(parents=True)
    (tmp_path / "smoke" / "ensemble" / "progress.json").write_text(json.dumps({"done": 7, "total": 45}))
    assert ensemble() == (7, 45, "member fits")
    assert _watch(cfg, "prepare") is None


def test_watch_ignores_files_an_earlier_run_left_behind(tmp_path):
    """A forced or resumed rerun: until the stage writes again, the last run's checkpoints, bundle manifests and
    task counts are not its progress (a forced scratch rerun had shown the old run's 27/45 epochs)."""
    cfg = smoke_config(tmp_path)
    stale = time.time() - 3600
    ft = tmp_path / "smoke" / "finetune"
    _checkpoint(ft, "21.421623", 4)
    comp = tmp_path / "smoke" / "compress" / cfg.compress.variant_names()[0]
    comp.mkdir(parents=True)
    (comp / "manifest.json").write_text("{}")
    ens = tmp_path / "smoke" / "ensemble"
    ens.mkdir(parents=True)
    (ens / "progress.json").write_text(json.dumps({"done": 45, "total": 45}))
    for f in (*ft.rglob("state.json"), comp / "manifest.json", ens / "progress.json"):
        os.utime(f, (stale, stale))
    finetune, compress, ensemble = (_watch(cfg, s) for s in ("finetune", "compress", "ensemble"))
    assert finetune()[0] == 0 and compress()[0] == 0 and ensemble() is None
    _checkpoint(ft, "29.000001", 1)  # the rerun's first epoch
    (ens / "progress.json").write_text(json.dumps({"done": 2, "total": 45}))
    assert finetune()[0] == 1 and ensemble() == (2, 45, "member fits")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_redraws_one_line():
    out = _Terminal()
    c = con.Console(out)
    readings = iter([(1, 4, "epochs"), (2, 4, "epochs")])
    p = con.StageProgress(c, "finetune", lambda: next(readings))
    p.tick(10.0)
    p.tick(20.0)
    c.line("[3/9] finetune  ran in 40.0s")
    text = out.getvalue()
    assert text.count("\n") == 1 and text.count("\r") == 3  # two redraws, one clear before the line
    assert "1/4 epochs  0:10, ETA 0:30" in text and "2/4 epochs  0:20, ETA 0:20" in text
    assert text.endswith("\r\x1b[K[3/9] finetune  ran in 40.0s\n")


def test_progress_without_a_terminal_prints_the_marks_only():
    out = io.StringIO()
    c = con.Console(out)
    assert not c.tty
    values = [0, 1, 2, 3, 5, 6, 7, 8, 10, 10]  # of 10
    readings = iter([(v, 10, "trial epochs") for v in values])
    p = con.StageProgress(c, "tune", lambda: next(readings))
    for i in range(len(values)):
        p.tick(float(i))
    lines = out.getvalue().splitlines()
    assert con.NON_TTY_MARKS == (0.5,)
    assert [line.split()[2] for line in lines] == ["5/10"]  # crossing 50%; none at 100% (the end line follows)


def test_a_reader_that_fails_keeps_the_last_reading():
    out = _Terminal()
    p = con.StageProgress(con.Console(out), "compress", lambda: json.loads("{half-written"))
    p.tick(1.0)
    assert p.last is None and "compress  0:01" in out.getvalue()  # elapsed time only


CHILD = textwrap.dedent("""
    import logging, os, sys
    from transfuse import console
    c = console.quiet(sys.argv[1])
    print("a library's print")
    os.write(2, b"C++ noise on fd 2\\n")
    subprocess_out = os.system("echo a child process")
    logging.getLogger("ray.data").info("Ray Data progress")
    logging.getLogger("ray.tune").warning("a Ray warning")
    logging.getLogger("transfuse.ensemble.stage").warning("member px dropped")
    c.line("[1/9] prepare   ran in 1.0s")
    raise KeyError("a bug")
""")


def test_quiet_sends_everything_but_the_console_to_the_log(tmp_path):
    log = tmp_path / "run" / "logs" / "pipeline.log"
    res = subprocess.run([sys.executable, "-c", CHILD, str(log)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1
    console_lines = res.stdout.splitlines()
    assert console_lines[:2] == ["warning: member px dropped", "[1/9] prepare   ran in 1.0s"]
    assert "KeyError: 'a bug'" in res.stdout and str(log) in res.stdout  # a crash is shown, with where to look
    assert res.stderr == ""
    text = log.read_text()
    for noise in ("a library's print", "C++ noise on fd 2", "a child process", "Ray Data progress",
                  "a Ray warning", "member px dropped", "KeyError: 'a bug'"):
        assert noise in text, noise
    for noise in ("a library's print", "C++ noise", "a child process", "Ray Data progress", "a Ray warning"):
        assert noise not in res.stdout, noise


def test_log_path_is_under_the_run_folder(tmp_path):
    cfg = smoke_config(tmp_path, "logs")
    assert con.log_path(cfg) == str(tmp_path / "logs" / "logs" / "pipeline.log")
