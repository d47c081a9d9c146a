"""Partitioned greedy coreset: radius near the exact greedy's, seeded, cap-independent, linear memory; the
selection policy and the device size cap."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from test_coreset import gaussian_clusters, plain_greedy

from patchcore_edge.export import coreset_cells, coreset_select
from patchcore_edge.export.coreset import CoresetInputError, coverage_radius, greedy_coreset
from patchcore_edge.export.coreset_cells import cell_greedy, cell_start, partitioned_greedy
from patchcore_edge.export.coreset_select import bank_size_limit, choose_method, select_coreset


@pytest.mark.parametrize("seed", [0, 3])
def test_radius_stays_near_the_exact_greedy_and_the_bound_holds(seed: int) -> None:
    features = gaussian_clusters(12_000, 16, 40, seed=seed)
    size = 600
    exact = coverage_radius(features, greedy_coreset(features, size, seed=seed))
    selection = partitioned_greedy(features, size, seed=seed, cells=12)
    radius = coverage_radius(features, selection.indices)
    assert selection.cells == 12 and selection.indices.size == size
    assert np.unique(selection.indices).size == size
    # The own-cell bound is a true upper bound of the radius (float32 rounding aside) ...
    assert radius <= selection.radius_bound * (1 + 1e-5)
    # ... and on clustered data the partition costs little against the exact greedy (measured: a few %).
    assert radius <= 1.15 * exact, (radius, exact)


def test_one_cell_is_the_plain_greedy_from_the_cell_start() -> None:
    features = gaussian_clusters(3_000, 12, 10, seed=5)
    selection = partitioned_greedy(features, 80, seed=7, cells=1)
    expected = plain_greedy(features, cell_start(len(features), 7, 0), 80)
    np.testing.assert_array_equal(selection.indices, expected)
    assert selection.reruns == 0


def test_cell_keys_are_the_radii_at_selection_and_non_increasing() -> None:
    points = gaussian_clusters(2_000, 8, 5, seed=2)
    chosen, keys = cell_greedy(points, 50, 0)
    assert np.isinf(keys[0])
    assert np.all(np.diff(keys[1:]) <= 1e-6)
    for step in (1, 10, 49):  # key = the coverage radius of the centres before it
        assert keys[step] == pytest.approx(coverage_radius(points, chosen[:step]), rel=1e-4)


def _one_centre_per_pass(points: np.ndarray, cap: int, start: int) -> tuple:
    """The cell greedy's rule, written as the plain loop: one full distance pass per centre."""
    centred = points - points.mean(axis=0, dtype=np.float64).astype(np.float32)
    norms = np.einsum("ij,ij->i", centred, centred)
    mind2 = np.full(len(points), np.inf, dtype=np.float32)
    chosen, keys, centre = [int(start)], [np.inf], int(start)
    while True:
        mind2 = np.minimum(mind2, norms + norms[centre] - 2.0 * (centred @ centred[centre]))
        mind2[chosen] = -np.inf
        if len(chosen) == cap:
            return np.array(chosen), np.array(keys, dtype=np.float32)
        centre = int(np.argmax(mind2))
        chosen.append(centre)
        keys.append(np.sqrt(max(float(mind2[centre]), 0.0)))


@pytest.mark.parametrize("seed", [0, 1])
def test_several_centres_per_pass_are_the_one_per_pass_choices(seed: int,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    points = gaussian_clusters(6_000, 16, 25, seed=seed)
    passes = []
    lower = coreset_cells._lower_against
    monkeypatch.setattr(coreset_cells, "_lower_against", lambda *a: (passes.append(a[2].size), lower(*a)))
    chosen, keys = cell_greedy(points, 700, 3)
    reference, reference_keys = _one_centre_per_pass(points, 700, 3)
    np.testing.assert_array_equal(chosen, reference)
    np.testing.assert_allclose(keys[1:], reference_keys[1:], rtol=1e-5)
    assert sum(passes) == 700 and len(passes) < 700 / 8, passes  # many centres per pass over the cell
    # Smaller rounds and smaller row chunks of the pass (one chunk vs many) choose the same centres.
    monkeypatch.setattr(coreset_cells, "_ROUND_CENTRES", 7)
    monkeypatch.setattr(coreset_cells, "_CANDIDATES", 64)
    monkeypatch.setattr(coreset_cells, "_PASS_ROWS", 999)
    np.testing.assert_array_equal(cell_greedy(points, 700, 3)[0], reference)


def test_cell_greedy_on_duplicates_takes_every_point_once_copies_last() -> None:
    base = gaussian_clusters(300, 6, 4, seed=8)
    points = np.concatenate([base, base])  # every point twice
    chosen, keys = cell_greedy(points, 600, 0)
    assert np.unique(chosen).size == 600
    # |x|^2 + |c|^2 - 2 x.c leaves float32 noise of about sqrt(eps |x|^2) where a distance is 0.
    noise = 0.02
    assert np.all(np.diff(keys[1:]) <= noise)
    assert np.all(keys[300:] < noise) and np.all(keys[1:300] > 2 * noise)  # copies come after all originals
    assert np.array_equal(np.sort(chosen[:300] % 300), np.arange(300))


def test_deterministic_under_seed() -> None:
    features = gaussian_clusters(8_000, 16, 20, seed=1)
    first = partitioned_greedy(features, 300, seed=4, cells=8).indices
    np.testing.assert_array_equal(first, partitioned_greedy(features, 300, seed=4, cells=8).indices)
    assert not np.array_equal(first, partitioned_greedy(features, 300, seed=5, cells=8).indices)


def test_result_does_not_depend_on_the_first_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    features = gaussian_clusters(8_000, 16, 20, seed=9)
    reference = partitioned_greedy(features, 400, seed=0, cells=10)
    monkeypatch.setattr(coreset_cells, "_CAP_SLACK", 0.2)  # far too small: most cells must run again
    short = partitioned_greedy(features, 400, seed=0, cells=10)
    assert short.reruns > reference.reruns
    np.testing.assert_array_equal(short.indices, reference.indices)
    assert short.radius_bound == reference.radius_bound


def test_memory_stays_linear_in_the_number_of_patches() -> None:
    n, dim, size = 200_000, 32, 2_000
    features = gaussian_clusters(n, dim, 50, seed=14)
    tracemalloc.start()
    try:
        partitioned_greedy(features, size, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Labels and order (16 B/patch), one cell's points and its vectors, the k-means and pilot samples; the
    # features themselves (25.6 MB) are never copied whole. N x size float32 alone would be 1.6 GB.
    budget = 40 * n + 2 * coreset_cells._PILOT_SAMPLE * dim * 4 + 4 * (n // 24) * dim * 4
    assert peak < budget, f"peak {peak / 2**20:.1f} MiB > budget {budget / 2**20:.1f} MiB"


def test_auto_picks_exact_for_small_work_and_partitioned_beyond(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_method(164_000, 16_400) == "exact"
    assert choose_method(600_000, 60_000) == "partitioned"
    assert choose_method(600_000, 60_000, device="cuda") == "exact"
    features = gaussian_clusters(20_000, 16, 20, seed=3)
    small = select_coreset(features, 200, seed=1)
    # On the CPU the exact greedy is the one-cell greedy: the plain rule from the cell start, its radius free
    # and equal to the measured one.
    assert small.method == "exact" and small.cells == 1
    np.testing.assert_array_equal(small.indices, plain_greedy(features, cell_start(20_000, 1, 0), 200))
    assert small.radius == pytest.approx(coverage_radius(features, small.indices), rel=1e-4)
    monkeypatch.setattr(coreset_select, "EXACT_WORK_LIMIT", 1e5)
    default = select_coreset(features, 200, seed=1)
    assert default.method == "partitioned" and default.cells == coreset_cells.default_cell_count(20_000, 200) == 1
    assert default.radius == default.radius_bound  # one cell: its bound is the radius, at no cost
    big = select_coreset(features, 200, seed=1, cells=4)
    assert big.method == "partitioned" and big.cells == 4
    assert big.radius is None and big.radius_bound is not None and big.seconds > 0
    record = big.to_manifest()
    assert record["selection"] == "partitioned" and record["coverage_radius_bound"] == big.radius_bound
    with pytest.raises(CoresetInputError, match="method"):
        choose_method(10, 2, "fast")


def test_device_profile_caps_the_bank_so_the_bundle_fits() -> None:
    from patchcore_edge.devices.memory import estimate_memory
    from patchcore_edge.devices.profiles import get_profile

    limit, reason = bank_size_limit("jetson-orin-nano", dim=96, grid=(28, 28), crop=224, onnx_bytes=2_200_000,
                                    index_m=16, reweight_neighbours=9)
    assert limit == 30_000 and "coreset_max" in reason  # the profile's own cap is below the memory fit
    tight, why = bank_size_limit("jetson-nano", dim=1024, grid=(28, 28), crop=224, onnx_bytes=100_000_000,
                                 index_m=16, reweight_neighbours=9)
    draft = {"features": {"dim": 1024, "grid": [28, 28]}, "coreset": {"size": tight}, "index": {"M": 16},
             "score": {"reweight_neighbours": 9}, "input": {"crop": 224},
             "files": {"features.onnx": {"bytes": 100_000_000}}, "engines": []}
    profile = get_profile("jetson-nano")
    if "memory budget" in why:
        assert estimate_memory(draft, profile)["fits"]
        draft["coreset"]["size"] = tight + 1
        assert not estimate_memory(draft, profile)["fits"]
    with pytest.raises(CoresetInputError, match="no memory size"):
        bank_size_limit("cpu-only", dim=96, grid=(28, 28), crop=224, onnx_bytes=1, index_m=16,
                        reweight_neighbours=9)


def test_one_cell_reports_progress_every_pass_up_to_the_total() -> None:
    features = gaussian_clusters(6_000, 16, 25, seed=4)
    calls: list = []
    select_coreset(features, 700, method="exact", progress=lambda done, total: calls.append((done, total)))
    assert len(calls) > 3, calls  # not only when the (single) cell has finished
    done = [d for d, _ in calls]
    assert done == sorted(done) and all(t == calls[-1][1] for _, t in calls) and done[-1] == calls[-1][1]
