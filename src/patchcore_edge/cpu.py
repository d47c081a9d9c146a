"""The CPU cores this process may use: the one default for every thread pool of the runtime.

`os.cpu_count()` counts the machine's cores; under `taskset`, a container's cpuset or a systemd CPUAffinity the
process may run on fewer, and pools sized by the machine then oversubscribe those few and spin against each
other (issue 13: 7 threads on 2 cores).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

_helper: Optional[ThreadPoolExecutor] = None
_helper_lock = threading.Lock()


def available_cores() -> int:
    """Cores in this process's CPU affinity mask (at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def helper_thread() -> ThreadPoolExecutor:
    """The runtime's one second thread (pre-processing's lower band, a share of the cells' probed cells): the
    caller does its own half meanwhile, so two cores are used without a pool per stage; an idle worker waits on a
    queue (nothing spins). Tasks never wait on each other, so sharing it cannot deadlock."""
    global _helper
    with _helper_lock:
        if _helper is None:
            _helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="patchcore-helper")
        return _helper


def _forget_helper() -> None:
    # A forked child has the executor object but not its thread: work handed to it would never run.
    global _helper, _helper_lock
    _helper, _helper_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_helper)
