"""The partitioned coreset on a real Dask LocalCluster (2 worker processes) gives the in-process result."""

from __future__ import annotations

import numpy as np
import pytest
from test_coreset import gaussian_clusters

pytest.importorskip("dask.distributed")

from patchcore_edge.export.coreset_cells import partitioned_greedy  # noqa: E402
from patchcore_edge.export.distributed import dask_client, dask_runner  # noqa: E402


@pytest.mark.slow
def test_local_cluster_selection_equals_in_process() -> None:
    features = gaussian_clusters(20_000, 16, 30, seed=11)
    in_process = partitioned_greedy(features, 800, seed=2, cells=8)
    seen = []
    with dask_client("local", workers=2) as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 2 and all(w["nthreads"] == 1 for w in workers.values())
        on_dask = partitioned_greedy(features, 800, seed=2, cells=8, runner=dask_runner(client),
                                     progress=lambda done, total: seen.append((done, total)))
    np.testing.assert_array_equal(on_dask.indices, in_process.indices)
    assert on_dask.radius_bound == in_process.radius_bound
    assert seen and seen[-1][0] == seen[-1][1]
