"""What a person sees while the pipeline runs: a line per stage start and end, a progress bar with an ETA for the
long stages, the warnings that matter, the final tables; everything else goes to a log file in the run folder.

Ray, TensorFlow and absl write to the process's file descriptors 1 and 2 from C++ as well as from Python (absl's
"All log messages before absl::InitializeLog() is called are written to STDERR" and TensorFlow's CUDA probe lines
ignore TF_CPP_MIN_LOG_LEVEL; Ray's core worker logs from C++; Tune prints its status tables; Ray Data logs every
dataset pass), and none of that can be switched off from Python alone. So ``quiet`` points descriptors 1 and 2,
which every library and child process writes to, at the log file, and the console writes to a duplicate of the
original terminal. Python's own warnings at WARNING and above from ``transfuse`` (and errors from any logger) are
also shown on the console; a traceback is written to both.

Progress is read from the files a stage writes as it goes, by the stage's own reader (``Stage.watch``):
Ray Train checkpoints carry the epoch (finetune, scratch, every Tune trial, the distilled student), the ensemble
stage counts its member fits, each compressed variant ends with its bundle manifest.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional, TextIO

from transfuse import storage

log = logging.getLogger(__name__)

LOG_DIR = "logs"  # under <storage>/<run>/
LOG_FILE = "pipeline.log"
POLL_S = 1.0  # how often a running stage's files are read for progress
BAR_WIDTH = 24  # characters
# without a terminal (a log, a Ray Job, CI) a progress line, with its ETA, is printed at these fractions only:
# one per long stage keeps a default run's console within issue 16's 60 lines
NON_TTY_MARKS = (0.5,)

# (done, total, unit) of a running stage, or None while nothing can be read yet
Reading = Optional[tuple[int, int, str]]


def clock(seconds: float) -> str:
    """1:05 for 65 s, 1:02:03 past an hour."""
    s = int(round(max(seconds, 0.0)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def bar_text(label: str, done: int, total: int, unit: str, elapsed: float) -> str:
    """``  finetune  [#########...............]  3/8 epochs  0:42, ETA 1:10``: the ETA assumes the rate so far."""
    frac = min(done / total, 1.0) if total > 0 else 0.0
    fill = int(round(frac * BAR_WIDTH))
    eta = f", ETA {clock(elapsed / done * (total - done))}" if 0 < done < total else ""
    return f"  {label:<9} [{'#' * fill}{'.' * (BAR_WIDTH - fill)}] {done}/{total} {unit}  {clock(elapsed)}{eta}"


class Console:
    """Lines for a person. On a terminal the progress bar is redrawn in place; elsewhere it is printed at a few
    fractions only, so a log of the run stays short."""

    def __init__(self, stream: TextIO, *, tty: Optional[bool] = None, bars: bool = True):
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.bars = bars
        self._lock = threading.Lock()
        self._live = False  # a bar is drawn on the current terminal line

    def line(self, text: str = "") -> None:
        with self._lock:
            self._clear()
            self.stream.write(text + "\n")
            self.stream.flush()

    def bar(self, text: str, *, mark: bool = False) -> None:
        """Draw the progress line: in place on a terminal; elsewhere only when ``mark``."""
        if not self.bars:
            return
        with self._lock:
            if self.tty:
                self.stream.write("\r" + text + "\x1b[K")
                self._live = True
            elif mark:
                self.stream.write(text + "\n")
            else:
                return
            self.stream.flush()

    def _clear(self) -> None:
        if self._live:
            self.stream.write("\r\x1b[K")
            self._live = False


class StageProgress:
    """While a stage runs: poll ``read`` every ``POLL_S`` in a thread and draw the bar (or the elapsed time)."""

    def __init__(self, console: Console, label: str, read: Optional[Callable[[], Reading]]):
        self.console, self.label, self.read = console, label, read
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._marks_shown = 0
        self.last: Reading = None

    def __enter__(self) -> "StageProgress":
        if self.console.bars:
            self._t0 = time.time()
            self._thread = threading.Thread(target=self._run, name=f"progress-{self.label}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self.tick(time.time() - self._t0)

    def tick(self, elapsed: float) -> None:
        """Read the stage's progress once and draw it (``elapsed``: seconds since the stage started)."""
        try:
            reading = self.read() if self.read else None
        except Exception as e:  # noqa: BLE001 - a half-written file must never stop the stage it watches
            log.debug("progress of %s: %s", self.label, e)
            reading = self.last
        if reading is None:
            if self.console.tty:  # a stage with nothing to read: its elapsed time, on a terminal only
                self.console.bar(f"  {self.label:<9} {clock(elapsed)}")
            return
        self.last = reading
        done, total, unit = reading
        frac = done / total if total else 0.0
        mark = False
        while self._marks_shown < len(NON_TTY_MARKS) and frac >= NON_TTY_MARKS[self._marks_shown]:
            self._marks_shown += 1
            mark = done < total  # a finished count needs no line: the stage's end line follows
        self.console.bar(bar_text(self.label, done, total, unit, elapsed), mark=mark)


# ------------------------------------------------------------------------------------------------ quiet mode
class _ConsoleFilter(logging.Filter):
    """What reaches the console: ``transfuse`` and ``jobs`` warnings, and errors from any logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        return record.levelno >= logging.WARNING and record.name.split(".")[0] in ("transfuse", "jobs")


class _ConsoleHandler(logging.Handler):
    def __init__(self, console: Console):
        super().__init__(logging.WARNING)
        self.console = console
        self.addFilter(_ConsoleFilter())

    def emit(self, record: logging.LogRecord) -> None:
        try:  # the message alone: a traceback attached to the record goes to the log file
            self.console.line(f"{record.levelname.lower()}: {record.getMessage()}")
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


def log_path(cfg: Any) -> str:
    """``<storage>/<run>/logs/pipeline.log`` for local storage; a local file under the temp dir for a URI."""
    run_dir = storage.run_dir(cfg)  # local storage is an absolute path (config makes it one)
    if storage.is_uri(run_dir):  # descriptors cannot point into object storage
        import tempfile

        return os.path.join(tempfile.gettempdir(), f"transfuse-{cfg.run}", LOG_DIR, LOG_FILE)
    return os.path.join(run_dir, LOG_DIR, LOG_FILE)


def quiet(path: str) -> Console:
    """Send file descriptors 1 and 2 (and with them ``sys.stdout``/``sys.stderr``, Ray's, TensorFlow's and absl's
    output, child processes') to ``path``, appended; return a ``Console`` on the original terminal.

    Python logging goes to the file at INFO; ``transfuse`` warnings and all errors also to the console. An
    uncaught exception's traceback goes to both."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    tty = os.isatty(1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    now = _dt.datetime.now().isoformat(timespec="seconds")
    sys.stderr.write(f"\n===== transfuse {' '.join(sys.argv)} at {now} =====\n")
    sys.stderr.flush()
    con = Console(terminal, tty=tty)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    file_handler = logging.StreamHandler(sys.stderr)  # fd 2: the log file
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root.addHandler(file_handler)
    root.addHandler(_ConsoleHandler(con))
    root.setLevel(logging.INFO)
    for name in ("tensorflow", "absl", "h5py"):  # TF's and absl's Python INFO chatter: not useful even in the file
        logging.getLogger(name).setLevel(logging.WARNING)

    def excepthook(kind: type, value: BaseException, tb: Any) -> None:
        text = "".join(traceback.format_exception(kind, value, tb))
        sys.__excepthook__(kind, value, tb)  # into the log file
        con.line(text.rstrip())
        con.line(f"(Ray's and TensorFlow's output: {path})")

    sys.excepthook = excepthook
    return con


def verbose() -> Console:
    """Everything on the terminal as the libraries print it: stage lines only (no bars among Ray's lines)."""
    return Console(sys.stdout, bars=False)


__all__ = ["Console", "StageProgress", "bar_text", "clock", "log_path", "quiet", "verbose"]
