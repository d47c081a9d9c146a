"""The feature pass and the partitioned coreset's cells on a Dask cluster (`export --dask ADDRESS|local`,
extra [dask]).

Dask schedules, ships and retries; this module only turns work into Dask futures and back. The coreset result
is the in-process one, index for index: each cell's greedy is deterministic and the merge does not depend on
where or in which order the cells ran (export/coreset_cells.py). The feature pass runs contiguous runs of
images, whole batches each, on the workers' CPUs with the same network, and is stitched back in image order:
the same outputs as one process, up to float32 rounding of the convolutions (tests/test_coreset_dask.py
measures it). The workers read the images at the paths given (a shared file system on a real cluster).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np

from ..imageio import ImageReadError
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


# extract_outputs' result: outputs by name, paths used, their sha256, read errors, sample inputs.
# outputs, used paths, their sha256, read errors, parity samples, network inputs (tiles) per used image
Extracted = Tuple[Dict[str, Any], List[Any], List[str], List[Any], List[Any], List[int]]


def _quiet(stage: str, done: int, total: int) -> None:
    pass


class _Network:
    """The network as the workers get it, pickled whole: Dask's own serializer for a torch module rebuilds its
    attributes one by one and turns namedtuples into plain tuples (efficientnet-lite-pytorch's block arguments:
    its blocks then fail in forward)."""

    def __init__(self, module: Any) -> None:
        self.module = module


def _extract_run(extract: Callable[..., Extracted], network: _Network, output_names: Sequence[str],
                 paths: List[Any], spec: Any, batch_size: int) -> Extracted:
    import torch

    torch.set_num_threads(1)  # one thread per Dask worker thread
    outputs, used, hashes, errors, samples, pieces = extract(network.module, output_names, paths, spec, batch_size,
                                                             "cpu", _quiet)
    # Read errors travel as (path, reason): the exception type does not survive pickling.
    return outputs, used, hashes, [(error.path, error.reason) for error in errors], samples, pieces


def extract_on_dask(client: Any, extract: Callable[..., Extracted], network: Any, output_names: Sequence[str],
                    paths: List[Any], spec: Any, batch_size: int,
                    progress: Callable[[str, int, int], None]) -> Extracted:
    """`extract(network, output_names, paths, spec, batch_size, "cpu", progress)` (export/pipeline.py's
    extract_outputs) on the cluster: runs of whole batches of images per task, results in image order."""
    from dask.distributed import as_completed

    workers = max(1, len(client.scheduler_info().get("workers", {})))
    images_per_task = batch_size * max(1, math.ceil(len(paths) / (4 * workers * batch_size)))
    runs = [paths[i:i + images_per_task] for i in range(0, len(paths), images_per_task)]
    shared = client.scatter(_Network(network.cpu()), broadcast=True)  # the weights travel once per worker
    futures = [client.submit(_extract_run, extract, shared, list(output_names), run, spec, batch_size,
                             pure=False) for run in runs]
    size = {future.key: len(run) for future, run in zip(futures, runs)}
    done = 0
    for future in as_completed(futures):
        done += size[future.key]
        progress("features", done, len(paths))
    parts = [future.result() for future in futures]
    outputs = {}
    for name in output_names:
        pieces = [part[0][name] for part in parts if part[0][name].size]
        outputs[name] = np.ascontiguousarray(np.concatenate(pieces), dtype=np.float32) if pieces \
            else np.zeros((0,), np.float32)
    used = [path for part in parts for path in part[1]]
    hashes = [digest for part in parts for digest in part[2]]
    errors = [ImageReadError(path, reason) for part in parts for path, reason in part[3]]
    samples = [sample for part in parts for sample in part[4]][:8]
    pieces_per_image = [count for part in parts for count in part[5]]
    return outputs, used, hashes, errors, samples, pieces_per_image
