"""patchcore_edge.scoring: exact image score through re-ranking, PatchCore re-weighting, anomaly map."""

from __future__ import annotations

from decimal import Decimal, localcontext
from typing import Tuple

import numpy as np
import pytest

from patchcore_edge.scoring import (
    PatchScores,
    image_score,
    image_scores,
    reweight,
)
from patchcore_edge.maps import anomaly_map, gaussian_kernel_size
from patchcore_edge.search import PatchSearch, bank_neighbours, build_index


def clustered(rng: np.random.Generator, count: int, dim: int, centres: np.ndarray, spread: float) -> np.ndarray:
    picks = centres[rng.integers(0, len(centres), count)]
    return (picks + rng.normal(scale=spread, size=(count, dim))).astype(np.float32)


def paper_weight(distances: np.ndarray) -> float:
    """w = 1 - exp(d_0) / sum_j exp(d_j), evaluated literally with 50-digit decimals (no overflow)."""
    with localcontext() as context:
        context.prec = 50
        exps = [Decimal(float(d)).exp() for d in distances]
        return float(1 - exps[0] / sum(exps))


def brute_force(features: np.ndarray, search: PatchSearch, neighbours: np.ndarray) -> Tuple[float, float, int, int]:
    """Exact search of every patch, then the paper's formula: (score, s*, argmax, m*)."""
    dist, idx = search.exact_nearest(features)
    p = int(dist.argmax())
    m = int(idx[p])
    support = neighbours[m]
    d = np.sqrt(((features[p].astype(np.float64) - search.bank[support].astype(np.float64)) ** 2).sum(1))
    d[0] = dist[p]
    weight = 1.0 if len(support) == 1 else paper_weight(d)
    return weight * float(dist[p]), float(dist[p]), p, m


@pytest.fixture(scope="module")
def world() -> Tuple[np.ndarray, np.ndarray, np.random.Generator]:
    rng = np.random.default_rng(2024)
    centres = rng.normal(scale=3.0, size=(12, 16))
    bank = clustered(rng, 2000, 16, centres, 0.6)
    return bank, centres, rng


def test_rerank_makes_a_poor_index_exact(world: Tuple[np.ndarray, np.ndarray, np.random.Generator]) -> None:
    bank, centres, rng = world
    # A deliberately poor graph (M=4, ef_construction=8) searched with ef=2: hnswlib often stops in a
    # local minimum (recall@1 about 0.3 here) and over-estimates nearest distances.
    search = PatchSearch(bank, build_index(bank, m=4, ef_construction=8), ef=2, threads=1)
    neighbours = bank_neighbours(bank, 5)
    overestimated_max = extended = not_extended = 0
    for _ in range(150):
        features = clustered(rng, 64, 16, centres, float(rng.uniform(0.5, 1.5)))
        result = image_score(features, search, neighbours, rerank=4)
        score, s_star, p_star, m_star = brute_force(features, search, neighbours)
        assert result.max_distance == s_star
        assert result.argmax == p_star and result.nearest_bank_index == m_star
        assert result.score == pytest.approx(score, rel=1e-6)
        exact, _ = search.exact_nearest(features)
        assert np.all(result.patch_distances >= exact)
        approx, _ = search.nearest(features)
        overestimated_max += int(approx.max() > s_star)
        extended += int(result.reranked > 4)
        not_extended += int(result.reranked == 4)
    # The trials must really exercise the guarantee: a plain approximate score would have been wrong,
    # and the loop had to grow the re-ranked set, while easy images stop after the first round.
    assert overestimated_max >= 10
    assert extended >= 10
    assert not_extended >= 1


def test_index_of_another_bank_still_gives_exact_scores(
        world: Tuple[np.ndarray, np.ndarray, np.random.Generator]) -> None:
    bank, centres, rng = world
    stranger = np.random.default_rng(5).normal(size=bank.shape).astype(np.float32)
    # hnswlib answers with rows found in a different bank: approximate distances are wild over-estimates
    # of bank distances, but still distances to real bank rows, so the guarantee holds.
    search = PatchSearch(bank, build_index(stranger, m=8, ef_construction=32), ef=8, threads=1)
    neighbours = bank_neighbours(bank, 3)
    for _ in range(10):
        features = clustered(rng, 49, 16, centres, 1.0)
        result = image_score(features, search, neighbours, rerank=2)
        score, s_star, p_star, _ = brute_force(features, search, neighbours)
        assert (result.max_distance, result.argmax) == (s_star, p_star)
        assert result.score == pytest.approx(score, rel=1e-6)


def test_reranked_patches_are_exact_and_others_upper_bounds(
        world: Tuple[np.ndarray, np.ndarray, np.random.Generator]) -> None:
    bank, centres, rng = world
    search = PatchSearch.from_bank(bank, m=8, ef_construction=64, ef=16, threads=1)
    neighbours = bank_neighbours(bank, 4)
    features = clustered(rng, 100, 16, centres, 1.0)
    result = image_score(features, search, neighbours, rerank=8)
    exact, _ = search.exact_nearest(features)
    approx, _ = search.nearest(features)
    assert result.patch_distances.dtype == np.float32 and result.patch_distances.shape == (100,)
    checked = np.argsort(-approx, kind="stable")[:result.reranked]
    assert np.array_equal(result.patch_distances[checked], exact[checked])
    others = np.setdiff1d(np.arange(100), checked)
    assert np.array_equal(result.patch_distances[others], approx[others])
    assert np.all(result.patch_distances[others] < result.max_distance)


def test_rerank_bounds_and_ties(world: Tuple[np.ndarray, np.ndarray, np.random.Generator]) -> None:
    bank, centres, rng = world
    search = PatchSearch.from_bank(bank, m=8, ef_construction=64, ef=32, threads=1)
    neighbours = bank_neighbours(bank, 3)
    features = clustered(rng, 20, 16, centres, 1.0)
    everything = image_score(features, search, neighbours, rerank=50)
    assert everything.reranked == 20
    single = image_score(features, search, neighbours, rerank=1)
    assert (single.max_distance, single.argmax) == (everything.max_distance, everything.argmax)
    # Identical patches tie everywhere: all must be checked, and p* is the first, as with exact search.
    same = np.repeat(features[:1] + 0.3, 12, axis=0)
    tied = image_score(same, search, neighbours, rerank=2)
    assert tied.argmax == 0 and tied.reranked == 12
    with pytest.raises(ValueError, match="rerank"):
        image_score(features, search, neighbours, rerank=0)
    with pytest.raises(ValueError, match=r"\[B, P, 16\]"):
        image_scores(features[:, :8][None], search, neighbours)
    with pytest.raises(ValueError, match="neighbours"):
        image_score(features, search, neighbours[:10])


def test_batch_equals_single_images(world: Tuple[np.ndarray, np.ndarray, np.random.Generator]) -> None:
    bank, centres, rng = world
    search = PatchSearch(bank, build_index(bank, m=4, ef_construction=8), ef=2, threads=1)
    neighbours = bank_neighbours(bank, 5)
    batch = np.stack([clustered(rng, 36, 16, centres, s) for s in (0.5, 1.0, 1.5, 2.5)])
    together = image_scores(batch, search, neighbours, rerank=3)
    for features, result in zip(batch, together):
        alone = image_score(features, search, neighbours, rerank=3)
        assert isinstance(result, PatchScores)
        assert (result.score, result.max_distance, result.argmax, result.nearest_bank_index, result.reranked) == \
            (alone.score, alone.max_distance, alone.argmax, alone.nearest_bank_index, alone.reranked)
        assert np.array_equal(result.patch_distances, alone.patch_distances)


def test_exact_only_search_without_index(world: Tuple[np.ndarray, np.ndarray, np.random.Generator]) -> None:
    bank, centres, rng = world
    exact_search = PatchSearch(bank, None, threads=1)
    neighbours = bank_neighbours(bank, 4)
    features = clustered(rng, 50, 16, centres, 1.0)
    result = image_score(features, exact_search, neighbours)
    score, s_star, p_star, m_star = brute_force(features, exact_search, neighbours)
    assert (result.max_distance, result.argmax, result.nearest_bank_index) == (s_star, p_star, m_star)
    assert result.score == pytest.approx(score, rel=1e-6) and result.reranked == 50
    assert np.array_equal(result.patch_distances, exact_search.exact_nearest(features)[0])


def test_single_neighbour_means_no_reweighting(world: Tuple[np.ndarray, np.ndarray, np.random.Generator]) -> None:
    bank, centres, rng = world
    search = PatchSearch.from_bank(bank, m=8, ef_construction=64, threads=1)
    features = clustered(rng, 30, 16, centres, 1.0)
    result = image_score(features, search, np.arange(len(bank), dtype=np.int32)[:, None])
    assert result.weight == 1.0 and result.score == result.max_distance


@pytest.mark.parametrize("scale", [1.0, 50.0, 800.0, 5000.0])
def test_reweight_matches_paper_formula(scale: float) -> None:
    rng = np.random.default_rng(int(scale))
    for _ in range(20):
        d = np.sort(rng.uniform(0.0, 1.0, size=9)) * scale / 10 + scale
        expected = paper_weight(d)
        assert float(reweight(d)) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    if scale >= 800.0:
        with np.errstate(over="ignore", invalid="ignore"):
            naive = 1.0 - np.exp(d[0]) / np.exp(d).sum()
        assert not np.isfinite(naive)  # the literal formula overflows here; ours does not
    batch = rng.uniform(0, scale, size=(4, 6))
    assert np.allclose(reweight(batch), [paper_weight(row) for row in batch], rtol=1e-12, atol=1e-15)


def bilinear_half_pixel(grid: np.ndarray, size: int) -> np.ndarray:
    """torch interpolate(mode="bilinear", align_corners=False), written out: src = (dst + 0.5) * in/out - 0.5."""
    def axis(n_in: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
        low = np.floor(src).astype(int)
        return low, np.minimum(low + 1, n_in - 1), src - low
    r0, r1, fr = axis(grid.shape[0])
    c0, c1, fc = axis(grid.shape[1])
    g = grid.astype(np.float64)
    top = g[r0][:, c0] * (1 - fc) + g[r0][:, c1] * fc
    bottom = g[r1][:, c0] * (1 - fc) + g[r1][:, c1] * fc
    result: np.ndarray = top * (1 - fr)[:, None] + bottom * fr[:, None]
    return result


def test_anomaly_map_matches_patchcore_reference() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    grid = np.random.default_rng(3).uniform(0, 5, size=(28, 28)).astype(np.float32)
    result = anomaly_map(grid, 224, sigma=4.0)
    assert result.dtype == np.float32 and result.shape == (224, 224)
    np.testing.assert_allclose(anomaly_map(grid, 224, sigma=0.0), bilinear_half_pixel(grid, 224), atol=1e-5)
    # patchcore-inspection: scipy gaussian_filter(sigma=4), truncate 4 (33 taps), mode "reflect".
    reference = ndimage.gaussian_filter(bilinear_half_pixel(grid, 224), sigma=4.0, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(result, reference, atol=1e-5)
    assert gaussian_kernel_size(4.0) == 33


def test_anomaly_map_bilinear_equals_torch() -> None:
    torch = pytest.importorskip("torch")
    grid = np.random.default_rng(4).uniform(0, 5, size=(14, 20)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(grid)[None, None], size=(224, 224),
                                               mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(anomaly_map(grid, 224, sigma=0.0), expected, atol=1e-5)


def test_anomaly_map_peak_and_smoothing() -> None:
    grid = np.zeros((28, 28), np.float32)
    grid[5, 20] = 1.0
    sharp = anomaly_map(grid, 224, sigma=0.0)
    smooth = anomaly_map(grid, 224)
    row, col = np.unravel_index(smooth.argmax(), smooth.shape)
    # Patch (5, 20) is centred at ((5 + 0.5) * 8 - 0.5, (20 + 0.5) * 8 - 0.5) = (43.5, 163.5) in crop pixels.
    assert row in (43, 44) and col in (163, 164)
    assert 0.0 < smooth.max() < sharp.max()
    assert np.isclose(smooth.sum(), sharp.sum(), rtol=1e-3)  # blur away from the border keeps the mass
    assert np.abs(np.diff(smooth, axis=1)).sum() < np.abs(np.diff(sharp, axis=1)).sum()
    constant = anomaly_map(np.full((7, 7), 2.5, np.float32), 64)
    np.testing.assert_allclose(constant, 2.5, rtol=1e-6)


def test_anomaly_map_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        anomaly_map(np.zeros(10, np.float32), 32)
    bad = np.zeros((4, 4), np.float32)
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        anomaly_map(bad, 32)


def test_invalid_patches_never_score(world: Tuple[np.ndarray, np.ndarray, np.random.Generator]) -> None:
    # Letterbox padding / outside a region of interest: far-off patches there must not become s*.
    bank, centres, rng = world
    search = PatchSearch(bank, build_index(bank, m=4, ef_construction=8), ef=2, threads=1)
    neighbours = bank_neighbours(bank, 5)
    features = clustered(rng, 64, 16, centres, 1.0)
    features[:8] += 50.0  # eight patches far from everything
    valid = np.ones((1, 64), bool)
    valid[0, :8] = False
    (masked,) = image_scores(features[None], search, neighbours, rerank=4, valid=valid)
    score, s_star, p_star, _ = brute_force(features[8:], search, neighbours)
    assert masked.max_distance == s_star and masked.argmax == p_star + 8
    assert masked.score == pytest.approx(score, rel=1e-6)
    assert np.all(masked.patch_distances[:8] == 0.0)
    (unmasked,) = image_scores(features[None], search, neighbours, rerank=4)
    assert unmasked.max_distance > 10 * masked.max_distance
    (nothing,) = image_scores(features[None], search, neighbours, rerank=4, valid=np.zeros((1, 64), bool))
    assert nothing.score == 0.0 and nothing.max_distance == 0.0


def _tied_world(seed: int = 7):
    """Images whose farthest patch p* has two bank rows at the same distance up to a few ulps (p* + s u and
    p* - s u), one inside a tight cluster of rows (low weight) and one among spread rows (high weight)."""
    rng = np.random.default_rng(seed)
    dim, b, images, per_image = 16, 5, 6, 20
    rows = [rng.normal(scale=1.0, size=(300, dim))]
    patches = []
    for _ in range(images):
        p_star = rng.normal(scale=6.0, size=dim)
        u = rng.normal(size=dim)
        u /= np.linalg.norm(u)
        s = 2.0
        tight, spread = p_star + s * u, p_star - s * u
        cluster = []
        for centre, radius in ((tight, 0.05), (spread, 1.5)):
            for _ in range(b - 1):
                d = rng.normal(size=dim)
                d -= d.dot(u) * u  # orthogonal to u: farther from p* than the centre row
                cluster.append(centre + radius * d / np.linalg.norm(d))
        pair = [tight, spread] if rng.random() < 0.5 else [spread, tight]
        rows.append(np.array(pair + cluster))
        others = rows[0][rng.integers(0, 300, per_image - 1)] + rng.normal(scale=0.01, size=(per_image - 1, dim))
        image = np.vstack([others, p_star])
        patches.append(image[rng.permutation(per_image)])
    return (np.vstack(rows).astype(np.float32), np.array(patches, dtype=np.float32), b)


def test_tied_nearest_rows_give_one_score_in_every_mode() -> None:
    bank, patches, b = _tied_world()
    neighbours = bank_neighbours(bank, b)
    index = build_index(bank, m=8, ef_construction=40)
    modes = [PatchSearch(bank, None)] + [PatchSearch(bank, index, ef=ef, threads=1) for ef in (1, 4, 32, 400)]
    reference = image_scores(patches, modes[0], neighbours)
    weights = []
    for search in modes:
        for batch in (1, 2, len(patches)):
            got = [s for start in range(0, len(patches), batch)
                   for s in image_scores(patches[start:start + batch], search, neighbours)]
            for ref, score in zip(reference, got):
                assert (score.score, score.max_distance, score.argmax, score.nearest_bank_index) == \
                    (ref.score, ref.max_distance, ref.argmax, ref.nearest_bank_index)
        weights.append([s.weight for s in got])
    # The ties matter: the two candidate rows give weights that differ by far more than rounding.
    for ref, image in zip(reference, patches):
        p = image[ref.argmax]
        d = np.linalg.norm(bank.astype(np.float64) - p, axis=1)
        tied = np.flatnonzero(d <= d.min() * (1 + 1e-6))
        assert tied.size == 2
        w = [reweight(np.linalg.norm(bank[neighbours[t]].astype(np.float64) - p, axis=1)) for t in tied]
        assert abs(w[0] - w[1]) > 0.01 * max(w)
        # The rule: lowest row number among the smallest direct distance.
        direct = np.sqrt(((p - bank[tied]) ** 2).sum(1, dtype=np.float32))
        assert ref.nearest_bank_index == int(tied[direct == direct.min()].min())


def test_calibrated_masks_equal_exact_search_at_any_ef(
        world: Tuple[np.ndarray, np.ndarray, np.random.Generator]) -> None:
    from patchcore_edge.maps import map_reach_cells

    bank, centres, _ = world
    rng = np.random.default_rng(11)
    grid, crop, sigma = (14, 14), 112, 4.0
    neighbours = bank_neighbours(bank, 5)
    poor = build_index(bank, m=4, ef_construction=8)  # recall@1 about 0.3 at ef 2: many over-estimates
    images = []
    for _ in range(4):
        patches = clustered(rng, 196, 16, centres, 0.6).reshape(14, 14, 16)
        top, left = rng.integers(0, 10, 2)
        patches[top:top + 4, left:left + 4] += rng.normal(scale=1.5, size=(4, 4, 16)).astype(np.float32)
        images.append(patches.reshape(196, 16))
    features = np.array(images, dtype=np.float32)
    exact_maps = [anomaly_map(s.patch_distances.reshape(grid), crop, sigma)
                  for s in image_scores(features, PatchSearch(bank, None), neighbours)]
    level = float(np.median([np.quantile(m, 0.85) for m in exact_maps]))
    reach = map_reach_cells(grid, crop, sigma)
    moved_without_rule = 0
    for ef in (1, 2, 8):
        search = PatchSearch(bank, poor, ef=ef, threads=1)
        plain = image_scores(features, search, neighbours)
        checked = image_scores(features, search, neighbours, exact_above=level, grid=grid, reach=reach)
        for exact_map, p, c in zip(exact_maps, plain, checked):
            expected = exact_map > level
            assert np.array_equal(anomaly_map(c.patch_distances.reshape(grid), crop, sigma) > level, expected)
            moved_without_rule += int(np.count_nonzero(
                (anomaly_map(p.patch_distances.reshape(grid), crop, sigma) > level) != expected))
            assert c.score == p.score  # the image score never needed the rule
    # What the rule is for: without it (the behaviour before) the masks move with ef.
    assert moved_without_rule > 0
