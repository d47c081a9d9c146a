"""The feature pass and the partitioned coreset on a real Dask LocalCluster (2 worker processes) give the
in-process results."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from test_coreset import gaussian_clusters

pytest.importorskip("dask.distributed")

from patchcore_edge.export.coreset_cells import partitioned_greedy  # noqa: E402
from patchcore_edge.export.distributed import dask_client, dask_runner, extract_on_dask  # noqa: E402


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with dask_client("local", workers=2) as connected:
        yield connected


@pytest.mark.slow
def test_local_cluster_selection_equals_in_process(client: Any) -> None:
    features = gaussian_clusters(20_000, 16, 30, seed=11)
    in_process = partitioned_greedy(features, 800, seed=2, cells=8)
    seen = []
    workers = client.scheduler_info()["workers"]
    assert len(workers) == 2 and all(w["nthreads"] == 1 for w in workers.values())
    on_dask = partitioned_greedy(features, 800, seed=2, cells=8, runner=dask_runner(client),
                                 progress=lambda done, total: seen.append((done, total)))
    np.testing.assert_array_equal(on_dask.indices, in_process.indices)
    assert on_dask.radius_bound == in_process.radius_bound
    assert seen and seen[-1][0] == seen[-1][1]


@pytest.mark.slow
def test_feature_pass_on_the_cluster_equals_in_process(client: Any, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch
    from conftest import make_nominal_folder

    from patchcore_edge.export.features import build_extractor
    from patchcore_edge.export.pipeline import extract_outputs
    from patchcore_edge.imageio import list_images
    from patchcore_edge.preprocess import InputSpec

    folder = make_nominal_folder(tmp_path / "good", count=11, size=72)
    (folder / "broken.png").write_bytes(b"not an image")
    paths, _ = list_images(folder)
    spec = InputSpec(resize=72, crop=64)
    network, _ = build_extractor("mobilenet_v2", None, spec)
    network.eval()
    torch.set_num_threads(1)
    local = extract_outputs(network, ["features"], paths, spec, 2, "cpu", lambda *a: None)
    seen = []
    remote = extract_on_dask(client, extract_outputs, network, ["features"], paths, spec, 2,
                             lambda stage, done, total: seen.append((stage, done, total)))
    assert remote[1] == local[1] and remote[2] == local[2]  # the same images used, in order, same sha256
    assert [e.path for e in remote[3]] == [e.path for e in local[3]] and len(local[3]) == 1  # the broken file
    assert remote[0]["features"].shape == local[0]["features"].shape == (11, 8, 8, local[0]["features"].shape[-1])
    np.testing.assert_allclose(remote[0]["features"], local[0]["features"], rtol=1e-5, atol=1e-6)
    assert len(remote[4]) == len(local[4]) and all(np.array_equal(a, b) for a, b in zip(remote[4], local[4]))
    assert seen and seen[-1] == ("features", len(paths), len(paths))
    assert remote[5] == local[5] == [1] * 11  # one network input per image (no tiles)
