"""Running the partitioned coreset's cells on a Dask cluster (`export --dask ADDRESS|local`, extra [dask]).

Dask schedules, ships and retries; this module only turns cell tasks into Dask futures and back. The result
is the in-process one, index for index: each cell's greedy is deterministic and the merge does not depend on
where or in which order the cells ran (export/coreset_cells.py).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, List, Sequence

from .coreset_cells import CellResult, CellRunner, CellTask, cell_greedy


class DaskUnavailable(RuntimeError):
    """--dask asked for, but dask.distributed is missing or the scheduler cannot be reached."""


@contextlib.contextmanager
def dask_client(address: str, workers: int = 2) -> Iterator[Any]:
    """A connected dask.distributed Client: to the scheduler at `address`, or, for "local", to a LocalCluster
    of `workers` single-threaded worker processes started here and closed on exit."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise DaskUnavailable("--dask needs dask.distributed: pip install 'patchcore-edge[dask]'") from None
    if address == "local":
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) \
                as cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(address, timeout="20s")
    except (OSError, TimeoutError) as error:
        raise DaskUnavailable(f"cannot reach the Dask scheduler at {address}: {error}") from None
    with client:
        yield client


def dask_runner(client: Any) -> CellRunner:
    """A CellRunner that submits every cell to `client` and gathers the results in task order."""
    from dask.distributed import as_completed

    def run(tasks: Sequence[Callable[[], CellTask]], done: Callable[[int], None]) -> List[CellResult]:
        futures = []
        for make in tasks:
            points, cap, start = make()
            futures.append(client.submit(cell_greedy, points, cap, start, pure=False))
            del points
        position = {future.key: i for i, future in enumerate(futures)}
        for future in as_completed(futures):
            done(position[future.key])
        return [future.result() for future in futures]

    return run
