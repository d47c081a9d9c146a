"""Greedy k-center coreset: same as the plain loop, deterministic, covering, linear memory, clear errors."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest

from patchcore_edge.export import coreset
from patchcore_edge.export.coreset import (
    CoresetInputError,
    coreset_size,
    coverage_radius,
    greedy_coreset,
    row_distances,
    selection_points,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BOTTLE_GOOD = DATA / "mvtec_ad" / "bottle" / "train" / "good"


def plain_greedy(points: np.ndarray, start: int, size: int) -> np.ndarray:
    """The reference: one full distance pass per centre, lowest index on ties, selected points excluded."""
    mind = row_distances(points, points[start])
    mind[start] = -np.inf
    chosen = [start]
    for _ in range(size - 1):
        centre = int(np.argmax(mind))
        chosen.append(centre)
        np.minimum(mind, row_distances(points, points[centre]), out=mind)
        mind[centre] = -np.inf
    return np.array(chosen, dtype=np.int64)


def gaussian_clusters(n: int, dim: int, clusters: int, seed: int, offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=4.0, size=(clusters, dim))
    # Unequal spreads, so a uniform random subset leaves the wide clusters poorly covered.
    spreads = rng.uniform(0.1, 1.5, size=clusters)
    labels = rng.integers(clusters, size=n)
    points = means[labels] + rng.normal(size=(n, dim)) * spreads[labels, None] + offset
    return points.astype(np.float32)


def brute_radius(features: np.ndarray, indices: np.ndarray) -> float:
    x = features.astype(np.float64)
    c = x[indices]
    d2 = ((x[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)
    return float(np.sqrt(d2.min(axis=1).max()))


# --------------------------------------------------------------------------------------- the selection rule


def test_first_centre_is_the_seeded_start_and_belongs_to_the_coreset() -> None:
    features = gaussian_clusters(700, 8, 5, seed=1)
    for seed in (0, 3, 11):
        indices = greedy_coreset(features, 40, seed=seed)
        expected_start = int(np.random.default_rng(seed).integers(len(features)))
        assert indices[0] == expected_start
        assert indices.dtype == np.int64 and indices.shape == (40,)
        assert len(np.unique(indices)) == 40


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pruned_selection_equals_plain_loop_without_projection(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    kinds: List[np.ndarray] = [
        rng.standard_normal((1500, 12)).astype(np.float32),
        gaussian_clusters(1500, 24, 9, seed=seed, offset=30.0),  # offset: large norms, small distances
    ]
    for features in kinds:
        size = 300
        indices = greedy_coreset(features, size, projection_dim=128, seed=seed)
        np.testing.assert_array_equal(indices, plain_greedy(features, int(indices[0]), size))


def test_pruned_selection_equals_plain_loop_with_projection() -> None:
    rng = np.random.default_rng(7)
    features = rng.standard_normal((1200, 200)).astype(np.float32) * rng.uniform(0.5, 3.0, size=200)
    for seed in (0, 5):
        points, start = selection_points(features, projection_dim=16, seed=seed)
        assert points.shape == (1200, 16)
        indices = greedy_coreset(features, 250, projection_dim=16, seed=seed)
        np.testing.assert_array_equal(indices, plain_greedy(points, start, 250))


def test_pruned_selection_equals_plain_loop_with_ties_and_duplicates() -> None:
    # Integer points on a small grid: many exact ties and duplicates; asking for every point checks that the
    # centres already chosen are never chosen again once everything is covered.
    features = np.random.default_rng(3).integers(0, 3, size=(400, 3)).astype(np.float32)
    indices = greedy_coreset(features, 400, seed=2)
    np.testing.assert_array_equal(indices, plain_greedy(features, int(indices[0]), 400))
    assert sorted(indices.tolist()) == list(range(400))


def test_head_index_path_equals_plain_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # Few head centres, so that small data goes through the head-indexed candidate search too.
    monkeypatch.setattr(coreset, "_head_count", lambda size: 5)
    features = gaussian_clusters(2000, 16, 12, seed=4)
    indices = greedy_coreset(features, 400, seed=9)
    np.testing.assert_array_equal(indices, plain_greedy(features, int(indices[0]), 400))


def test_distance_kernel_is_bit_identical_on_row_subsets() -> None:
    # The exactness of the pruned loop rests on this: a row's distance does not depend on the other rows.
    features = gaussian_clusters(3000, 128, 6, seed=5)
    full = row_distances(features, features[17])
    rng = np.random.default_rng(0)
    for count in (1, 7, 64, 999):
        subset = np.sort(rng.choice(len(features), size=count, replace=False))
        np.testing.assert_array_equal(row_distances(features[subset], features[17]), full[subset])
        np.testing.assert_array_equal(coreset._distances_at(features, subset, features[17]), full[subset])


def test_torch_plain_loop_matches_reference_on_cpu() -> None:
    torch = pytest.importorskip("torch")
    features = gaussian_clusters(800, 10, 6, seed=6)
    start = 123
    indices = coreset._greedy_dense_torch(torch.from_numpy(features), start, 120, None, 1)
    np.testing.assert_array_equal(indices, plain_greedy(features, start, 120))


def test_cuda_selection_agrees_with_cpu() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    features = gaussian_clusters(5000, 256, 20, seed=7)
    cpu = greedy_coreset(features, 300, projection_dim=64, seed=1)
    gpu = greedy_coreset(torch.from_numpy(features).cuda(), 300, projection_dim=64, seed=1, device="cuda")
    assert gpu[0] == cpu[0]
    # GPU matmul/rounding may break near-ties differently; the coverage must be as good.
    assert coverage_radius(features, gpu) <= coverage_radius(features, cpu) * 1.05


def test_cuda_requested_without_gpu_is_a_clear_error() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(CoresetInputError, match="no CUDA GPU"):
        greedy_coreset(np.zeros((10, 3), np.float32), 2, device="cuda")


def test_torch_tensor_input_gives_the_numpy_result() -> None:
    torch = pytest.importorskip("torch")
    features = gaussian_clusters(600, 40, 5, seed=8)
    expected = greedy_coreset(features, 50, projection_dim=16, seed=4)
    np.testing.assert_array_equal(greedy_coreset(torch.from_numpy(features), 50, projection_dim=16, seed=4),
                                  expected)


def test_deterministic_under_seed_and_seed_changes_start() -> None:
    features = gaussian_clusters(3000, 64, 10, seed=9)
    first = greedy_coreset(features, 100, projection_dim=32, seed=0)
    np.testing.assert_array_equal(first, greedy_coreset(features.copy(), 100, projection_dim=32, seed=0))
    other = greedy_coreset(features, 100, projection_dim=32, seed=1)
    assert other[0] != first[0]
    assert not np.array_equal(other, first)


def test_projection_is_skipped_when_features_are_narrow() -> None:
    features = gaussian_clusters(500, 32, 4, seed=10)
    points, _ = selection_points(features, projection_dim=32)
    assert points is features  # the exact greedy runs on the features themselves, no copy
    projected, _ = selection_points(features, projection_dim=8)
    assert projected.shape == (500, 8)


def test_progress_is_reported_until_done() -> None:
    calls: List[Tuple[int, int]] = []
    greedy_coreset(gaussian_clusters(2000, 8, 4, seed=11), 500, progress=lambda d, t: calls.append((d, t)))
    done = [d for d, _ in calls]
    assert calls[-1] == (500, 500)
    assert all(t == 500 for _, t in calls)
    assert done == sorted(done) and 50 <= len(calls) <= 110


# ------------------------------------------------------------------------------------------------- coverage


def test_coverage_radius_matches_brute_force() -> None:
    features = gaussian_clusters(600, 20, 5, seed=12, offset=50.0)
    indices = np.random.default_rng(0).choice(600, size=37, replace=False)
    assert coverage_radius(features, indices, chunk_size=64) == pytest.approx(brute_radius(features, indices),
                                                                             rel=1e-12)
    assert coverage_radius(features, np.arange(600)) == 0.0


def test_greedy_covers_clusters_better_than_a_random_subset() -> None:
    features = gaussian_clusters(4000, 16, 15, seed=13)
    size = 200
    greedy = coverage_radius(features, greedy_coreset(features, size, seed=0))
    randoms = [coverage_radius(features, np.random.default_rng(s).choice(len(features), size, replace=False))
               for s in range(3)]
    assert greedy < min(randoms)
    # Gonzalez' greedy is a 2-approximation: no k-subset can do better than half its radius.
    assert greedy / 2.0 <= min(randoms)


@pytest.mark.shared_data
def test_greedy_covers_real_patch_features_better_than_random() -> None:
    if not BOTTLE_GOOD.is_dir():
        pytest.skip(f"{BOTTLE_GOOD} not present")
    torch = pytest.importorskip("torch")
    try:
        from patchcore_edge.export.features import build_extractor
    except ImportError as error:
        pytest.skip(f"feature extractor not available: {error}")
    from patchcore_edge.imageio import list_images, read_rgb
    from patchcore_edge.preprocess import InputSpec, preprocess

    torch.set_num_threads(2)
    spec = InputSpec()
    extractor, info = build_extractor("mobilenet_v2", None, spec)
    paths = list_images(BOTTLE_GOOD)[0][:3]
    batch = torch.from_numpy(np.stack([preprocess(read_rgb(p), spec) for p in paths]))
    with torch.no_grad():
        features = extractor(batch).reshape(-1, info.feature_dim).numpy()
    size = coreset_size(len(features), ratio=0.1)
    greedy = coverage_radius(features, greedy_coreset(features, size))
    random = coverage_radius(features, np.random.default_rng(0).choice(len(features), size, replace=False))
    assert greedy < random


# --------------------------------------------------------------------------------------------------- memory


def test_memory_stays_linear_in_the_number_of_patches() -> None:
    n, dim, size = 200_000, 32, 300
    features = gaussian_clusters(n, dim, 50, seed=14)
    tracemalloc.start()
    try:
        greedy_coreset(features, size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # By design: a few length-N vectors (mind, cluster buffer of 2N indices, one step's gathers), the centres,
    # and one chunk of rows; an N x size float32 matrix alone would be 240 MB, N x N 160 GB.
    budget = 96 * n + 8 * size * dim + 2 * coreset._ROWS_PER_CHUNK * dim * 4
    assert peak < budget, f"peak {peak / 2**20:.1f} MiB > budget {budget / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------- input checking


def test_coreset_size_from_ratio_or_size() -> None:
    assert coreset_size(163_856, ratio=0.1) == 16_386
    assert coreset_size(10, ratio=1.0) == 10
    assert coreset_size(10, ratio=0.001) == 1
    assert coreset_size(10, size=10) == 10
    cases: List[Tuple[Dict[str, Any], str]] = [
        ({}, "exactly one"), ({"ratio": 0.1, "size": 3}, "exactly one"),
        ({"ratio": 0.0}, r"\(0, 1\]"), ({"ratio": 1.5}, r"\(0, 1\]"), ({"ratio": float("nan")}, r"\(0, 1\]"),
        ({"size": 0}, "between 1 and"), ({"size": 11}, "between 1 and"), ({"size": 2.0}, "integer")]
    for kwargs, message in cases:
        with pytest.raises(CoresetInputError, match=message):
            coreset_size(10, **kwargs)


@pytest.mark.parametrize("features, size, kwargs, message", [
    (np.zeros((10,), np.float32), 2, {}, "2-D"),
    (np.zeros((0, 4), np.float32), 1, {}, "empty"),
    (np.zeros((10, 4), np.float32), 0, {}, "between 1 and the number of patches \\(10\\)"),
    (np.zeros((10, 4), np.float32), 11, {}, "between 1 and"),
    (np.zeros((10, 4), np.float32), 2.5, {}, "integer"),
    (np.zeros((10, 4), np.float32), 2, {"projection_dim": 0}, "projection_dim"),
    (np.zeros((10, 4), np.float32), 2, {"seed": -1}, "seed"),
    (np.zeros((10, 4), dtype=object), 2, {}, "real numbers"),
    (np.zeros((10, 4), np.float32), 2, {"device": "tpu-of-dreams"}, "device"),
])
def test_bad_input_is_a_clear_error(features: np.ndarray, size: Any, kwargs: Dict[str, Any],
                                    message: str) -> None:
    with pytest.raises(CoresetInputError, match=message):
        greedy_coreset(features, size, **kwargs)


def test_non_finite_features_name_the_row() -> None:
    features = np.ones((300, 8), np.float32)
    features[217, 3] = np.nan
    with pytest.raises(CoresetInputError, match="row 217"):
        greedy_coreset(features, 5)
    with pytest.raises(CoresetInputError, match="row 217"):
        greedy_coreset(np.repeat(features, 40, axis=1), 5, projection_dim=16)  # through the projection


def test_coverage_radius_rejects_bad_indices() -> None:
    features = np.zeros((10, 4), np.float32)
    with pytest.raises(CoresetInputError, match=r"\[0, 10\)"):
        coverage_radius(features, [3, 10])
    with pytest.raises(CoresetInputError, match="non-empty 1-D integer"):
        coverage_radius(features, [])
    with pytest.raises(CoresetInputError, match="non-empty 1-D integer"):
        coverage_radius(features, [0.5])
