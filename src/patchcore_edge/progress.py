"""Progress bars on stderr for commands that report `(stage, done, total)`: one bar per stage, in turn."""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import click


class StageBars:
    """A callable `(stage, done, total)` that opens a new bar whenever the stage changes; `close()` at the end."""

    def __init__(self, label: Callable[[str], str] = str, quiet: bool = False) -> None:
        self.label = label
        self.quiet = quiet
        self.bar: Any = None
        self.stage: Optional[str] = None
        self.done = 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if stage != self.stage:
            self.close()
            self.bar = click.progressbar(length=total, label=self.label(stage), file=sys.stderr, show_pos=True,
                                         show_eta=True)
            self.bar.__enter__()
            self.stage, self.done = stage, 0
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
            self.stage = None
