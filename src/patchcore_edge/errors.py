"""The one shape of a user-facing file error: the path and the problem, in words a user can act on."""

from __future__ import annotations

import os
from typing import Union


class FileProblem(Exception):
    """A file or folder that cannot be used; `str()` is "path: reason", the one line the commands print."""

    def __init__(self, path: Union[str, "os.PathLike[str]"], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
