"""The terminal of a dcv command, and the log file that takes everything else once Ray starts.

    with Console(verbose=False) as console:
        ...                                                # checks: errors print as usual
        console.start_log(storage / "logs", "run")         # just before ray.init
        console.line("[1/8 base] started")                 # terminal and log
        console.progress("patching: 3/8 items done, ETA 40 s")  # one live line per stage
        console.line(console.log_line())                   # "log: <storage>/logs/run-<time>-<pid>.log"

Once the log is started the terminal gets dcv's own lines only: each stage's start and done lines, one
progress line per stage, warnings raised in dcv's code, errors, and the closing summary. Everything else
the process writes goes to the log file: Ray's streamed worker output (``ray.init`` keeps
``log_to_driver`` on, so the log holds every worker's stdout and stderr, from every node), Ray Tune's
status tables, Ray Data's output, the raylet's and the C++ core worker's lines, other libraries'
warnings. It works by pointing the process's file descriptors 1 and 2 at the file (``os.dup2``), so
output from C and C++ code lands there too, which no Python-level redirect would catch; the console
writes to copies of the original descriptors. With ``verbose=True`` nothing is redirected: everything is
on the terminal, as it was, and no log file is written.

Progress: on a terminal (a TTY) a stage's progress line is rewritten in place, and the stage's done line
replaces it. Elsewhere (a pipe, ``| tee``, CI) the first progress line of a stage is printed, later ones
at most every ``PROGRESS_EVERY_S``, so a long stage still shows that it moves; the log has them all.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

PROGRESS_EVERY_S = 60.0
PACKAGE = Path(__file__).resolve().parent
_ERASE = "\x1b[K"  # erase to the end of the line


def log_file_path(log_dir: Path, command: str) -> Path:
    """``<log_dir>/<command>-<YYYYmmdd-HHMMSS>-<pid>.log``: one file per run (the pid keeps two runs
    started in the same second apart)."""
    return Path(log_dir) / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


class Console:
    """dcv's lines to the terminal (warnings and errors to its stderr) and, once started, to the log.

    Before ``start_log`` (and always with ``verbose``) it writes to the current ``sys.stdout`` and
    ``sys.stderr``. ``live`` (rewrite progress in place) defaults to whether the terminal is a TTY.
    Used as a context manager, it writes an escaping exception's traceback to the log and stops the log.
    """

    def __init__(
        self, verbose: bool = False, live: bool | None = None, clock: Callable[[], float] = time.monotonic
    ):
        self.verbose = verbose
        self.log_path: Path | None = None
        self._live = live
        self._clock = clock
        self._out: TextIO | None = None  # the terminal while the log runs (None: sys.stdout)
        self._err: TextIO | None = None
        self._log: TextIO | None = None
        self._owned: list[TextIO] = []  # terminal copies this console opened
        self._saved_fds: tuple[int, int] | None = None
        self._showwarning: Callable | None = None
        self._progress_shown_at: float | None = None  # None: no progress line since the last line
        self._progress_open = False  # a live progress line is on the terminal, without its newline

    # What a command prints.

    def line(self, text: str = "") -> None:
        """A line of dcv's own (a stage line, a summary line, a table)."""
        self._end_progress()
        self._write(self.out, text + "\n")
        self._to_log(text)
        self._progress_shown_at = None

    def progress(self, text: str) -> None:
        """The current stage's progress (done / total, ETA): one line per stage on the terminal."""
        self._to_log(text)
        if self.live:
            # Cut to the terminal's width: a wrapped line could not be rewritten in place.
            self._write(self.out, "\r" + text[: self._width() - 1] + _ERASE)
            self._progress_open = True
            return
        now = self._clock()
        if self._progress_shown_at is None or now - self._progress_shown_at >= PROGRESS_EVERY_S:
            self._write(self.out, text + "\n")
            self._progress_shown_at = now

    def warn(self, text: str) -> None:
        """A warning the user has to see."""
        self._end_progress()
        self._write(self.err, f"warning: {text}\n")
        self._to_log(f"warning: {text}")

    def error(self, text: str) -> None:
        """An error, followed by where the full log is (once it runs)."""
        self._end_progress()
        where = f"\n(full log: {self.log_path})" if self.log_path else ""
        self._write(self.err, f"{text}{where}\n")
        self._to_log(text)

    def log_line(self) -> str:
        """The summary's line naming the log file ("" when there is none, as with --verbose)."""
        return f"log: {self.log_path}" if self.log_path else ""

    @property
    def out(self) -> TextIO:
        return sys.stdout if self._out is None else self._out

    @property
    def err(self) -> TextIO:
        return sys.stderr if self._err is None else self._err

    @property
    def live(self) -> bool:
        if self._live is None:
            try:
                self._live = self.out.isatty()
            except (AttributeError, ValueError):
                self._live = False
        return self._live

    # The log.

    def start_log(self, log_dir: Path, command: str) -> Path | None:
        """From now on, everything but this console's lines goes to a new file in ``log_dir`` (nothing
        happens with ``verbose``, or when the log already runs)."""
        if self.verbose or self._log is not None:
            return self.log_path
        path = log_file_path(log_dir, command)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self._out, self._err = self._terminal_copy(sys.stdout, 1), self._terminal_copy(sys.stderr, 2)
        self._saved_fds = os.dup(1), os.dup(2)
        self._log = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed by stop_log)
        os.dup2(self._log.fileno(), 1)
        os.dup2(self._log.fileno(), 2)
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._show_warning
        self.log_path = path
        return path

    def stop_log(self) -> None:
        """Put the process's stdout and stderr back on the terminal (the log file stays)."""
        if self._log is None:
            return
        self._end_progress()
        warnings.showwarning = self._showwarning
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        saved, self._saved_fds = self._saved_fds, None
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        for stream in self._owned:
            stream.close()
        self._owned, self._out, self._err = [], None, None
        self._log.close()
        self._log = None

    def __enter__(self) -> Console:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None or self._log is None:
            self.stop_log()
            return
        self._log.write("".join(traceback.format_exception(kind, value, tb)))
        self.stop_log()
        # The traceback follows on the terminal; the workers' side of it is in the log.
        self._write(sys.stderr, f"(full log, with the workers' output: {self.log_path})\n")

    def _terminal_copy(self, stream: TextIO, fd: int) -> TextIO:
        """A writer to where ``stream`` goes now. A stream on the process's own descriptor ``fd`` gets a
        copy of that descriptor (``fd`` itself is about to point at the log); any other stream (pytest's
        capture, a caller's redirect) is used as it is."""
        try:
            if stream.fileno() != fd:
                return stream
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            return stream
        copy = open(os.dup(fd), "w", buffering=1, encoding=stream.encoding, errors="backslashreplace")  # noqa: SIM115
        self._owned.append(copy)
        return copy

    def _show_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        """Warnings raised by dcv's own code go to the console; other libraries' to the log."""
        if Path(filename).resolve().is_relative_to(PACKAGE):
            self.warn(f"{message} ({category.__name__}, {Path(filename).name}:{lineno})")
        else:
            self._showwarning(message, category, filename, lineno, file, line)

    def _width(self) -> int:
        try:
            return os.get_terminal_size(self.out.fileno()).columns or 80  # 0: a terminal of no set size
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            return 80

    def _end_progress(self) -> None:
        if self._progress_open:
            self._write(self.out, "\r" + _ERASE)
            self._progress_open = False

    @staticmethod
    def _write(stream: TextIO, text: str) -> None:
        stream.write(text)
        stream.flush()

    def _to_log(self, text: str) -> None:
        if self._log is not None:
            stamp = time.strftime("%H:%M:%S")
            self._log.write("".join(f"[dcv {stamp}] {part}\n" for part in text.splitlines() or [""]))
            self._log.flush()
