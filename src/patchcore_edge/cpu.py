"""The CPU cores this process may use: the one default for every thread pool of the runtime.

`os.cpu_count()` counts the machine's cores; under `taskset`, a container's cpuset or a systemd CPUAffinity the
process may run on fewer, and pools sized by the machine then oversubscribe those few and spin against each
other (issue 13: 7 threads on 2 cores).
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores in this process's CPU affinity mask (at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)
