"""Progress on stderr for commands that report `(stage, done, total)`: one bar per stage, in turn.

On a terminal, click's bar (position and ETA). Elsewhere (a log file, CI, a pipe) a click bar prints nothing
until the end, so a line `stage: done/total (pct), elapsed, ETA` is written instead, at most every
`every_s` seconds and when a stage completes.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional, TextIO

import click


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class StageBars:
    """A callable `(stage, done, total)` that opens a new bar whenever the stage changes; `close()` at the end."""

    def __init__(self, label: Callable[[str], str] = str, quiet: bool = False, file: Optional[TextIO] = None,
                 every_s: float = 10.0) -> None:
        self.label = label
        self.quiet = quiet
        self.file = file or sys.stderr
        self.lines = not (hasattr(self.file, "isatty") and self.file.isatty())
        self.every_s = every_s
        self.bar: Any = None
        self.stage: Optional[str] = None
        self.done = 0
        self.started = 0.0
        self.last_line = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if stage != self.stage:
            self.close()
            self.stage, self.done = stage, 0
            self.started, self.last_line = time.monotonic(), float("-inf")  # a stage's first call prints
            if not self.lines:
                self.bar = click.progressbar(length=total, label=self.label(stage), file=self.file,
                                             show_pos=True, show_eta=True)
                self.bar.__enter__()
        if self.lines:
            self._line(done, total)
        else:
            self.bar.length = total  # a stage may learn that it has more to do (coreset cells run again)
            self.bar.update(done - self.done)
        self.done = done

    def _line(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last_line < self.every_s:
            return
        self.last_line = now
        elapsed = now - self.started
        eta = f", ETA {_clock(elapsed * (total - done) / done)}" if 0 < done < total else ""
        percent = 100.0 * done / total if total else 100.0
        self.file.write(f"{self.label(self.stage or '').rstrip()}: {done:,}/{total:,} ({percent:.0f}%), "
                        f"elapsed {_clock(elapsed)}{eta}\n")
        self.file.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
        self.stage = None
