"""patchcore_edge.search: hnswlib index, exact float32 search, bank self-neighbours, index file checks."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from patchcore_edge import search as search_module
from patchcore_edge.search import (
    IndexFileError,
    PatchSearch,
    bank_neighbours,
    build_index,
    load_index,
    row_distances,
    save_index,
    validate_neighbours,
)


def random_bank(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    return rng.normal(size=(count, dim)).astype(np.float32)


def clustered_bank(rng: np.random.Generator, count: int, dim: int, clusters: int = 20) -> np.ndarray:
    centres = rng.normal(scale=4.0, size=(clusters, dim))
    return (centres[rng.integers(0, clusters, count)] + rng.normal(scale=0.5, size=(count, dim))).astype(
        np.float32)


def naive_nearest(queries: np.ndarray, bank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None, :, :].astype(np.float64)) ** 2).sum(-1))
    idx = d.argmin(axis=1)
    return d[np.arange(len(queries)), idx], idx


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_hnsw_recall_and_never_below_exact(kind: str, rng: np.random.Generator) -> None:
    make = random_bank if kind == "random" else clustered_bank
    bank = make(rng, 3000, 24)
    queries = make(rng, 400, 24)
    # Random 24-dim data is harder for HNSW than real patch features (high intrinsic dimension), so the
    # recall is checked at a generous ef; benchmarks/results/search.md measures the default on real data.
    searcher = PatchSearch.from_bank(bank, ef=128, threads=1)
    approx, approx_idx = searcher.nearest(queries)
    exact, exact_idx = searcher.exact_nearest(queries)
    recall = float(np.mean(approx_idx == exact_idx))
    assert recall >= 0.99, f"recall@1 {recall} on {kind} data"
    searcher.set_ef(4)
    assert float(np.mean(searcher.nearest(queries)[1] == exact_idx)) < recall  # ef really is the knob
    assert approx.dtype == np.float32 and exact.dtype == np.float32 and approx_idx.dtype == np.int64
    # The property the re-rank proof rests on, bit-for-bit in float32.
    assert np.all(approx >= exact)
    assert np.array_equal(approx[approx_idx == exact_idx], exact[approx_idx == exact_idx])


def test_poor_index_overestimates(rng: np.random.Generator) -> None:
    bank = clustered_bank(rng, 3000, 16)
    queries = clustered_bank(rng, 300, 16)
    searcher = PatchSearch(bank, build_index(bank, m=2, ef_construction=2), ef=1, threads=1)
    approx, _ = searcher.nearest(queries)
    exact, _ = searcher.exact_nearest(queries)
    assert np.all(approx >= exact)
    assert np.mean(approx > exact) > 0.2


def test_exact_nearest_matches_float64_reference(rng: np.random.Generator,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bank = random_bank(rng, 1500, 20)
    queries = random_bank(rng, 200, 20)
    searcher = PatchSearch.from_bank(bank, threads=1)
    ref_dist, ref_idx = naive_nearest(queries, bank)
    dist, idx = searcher.exact_nearest(queries)
    assert np.array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-6)
    # A few queries take the bank @ q.T path: same answers.
    few_dist, few_idx = searcher.exact_nearest(queries[:5])
    assert np.array_equal(few_idx, idx[:5]) and np.array_equal(few_dist, dist[:5])
    # Force many bank blocks (at least 256 rows each): the running minimum across blocks must agree.
    monkeypatch.setattr(search_module, "_BLOCK_VALUES", 1)
    for part in (slice(None), slice(0, 5)):
        blocked_dist, blocked_idx = searcher.exact_nearest(queries[part])
        assert np.array_equal(blocked_idx, idx[part]) and np.array_equal(blocked_dist, dist[part])


def test_exact_distance_free_of_cancellation(rng: np.random.Generator) -> None:
    # Far from the origin ||q||^2 and ||b||^2 are ~2e8 while squared distances are ~1: an uncentred norm
    # expansion in float32 errs by ~10 and picks essentially random rows. Centring on the bank mean and
    # recomputing the winner directly must give the true nearest row and its distance.
    bank = (random_bank(rng, 500, 8) + 5000.0).astype(np.float32)
    queries = (bank[:50] + rng.normal(scale=0.5, size=(50, 8))).astype(np.float32)
    searcher = PatchSearch.from_bank(bank, threads=1)
    dist, idx = searcher.exact_nearest(queries)
    ref_dist, ref_idx = naive_nearest(queries, bank)
    assert np.array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-5)
    uncentred = (bank * bank).sum(1)[None, :] - 2.0 * queries @ bank.T
    assert np.mean(uncentred.argmin(1) != ref_idx) > 0.2  # the case really is ill-conditioned


@pytest.mark.parametrize("block_values", [None, 1])
def test_exact_search_through_the_cells_rows_is_the_exact_only_search(rng: np.random.Generator,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      block_values: Optional[int]) -> None:
    # With a CellIndex the exact search reads the cells' centred, reordered rows (one copy of the bank): the rows it
    # returns are still the canonical ones (smallest direct distance, lowest row among ties), bit for bit those of
    # the exact-only search, also where an uncentred expansion fails and with the bank cut into many blocks.
    bank = (random_bank(rng, 600, 8) + 5000.0).astype(np.float32)
    bank[17] = bank[400]  # a tie: the lower row must win
    queries = np.concatenate([(bank[:60] + rng.normal(scale=0.5, size=(60, 8))), bank[400:401]]).astype(np.float32)
    if block_values is not None:
        monkeypatch.setattr(search_module, "_BLOCK_VALUES", block_values)
    with_cells = PatchSearch.with_cells(bank, cells=7, threads=1)
    assert with_cells._centred is None  # no second copy
    exact_only = PatchSearch(bank, None, threads=1)
    ref_dist, ref_idx = naive_nearest(queries, bank)
    for part in (slice(None), slice(0, 1), slice(0, 5), slice(60, 61)):
        dist, idx = with_cells.exact_nearest(queries[part])
        alone_dist, alone_idx = exact_only.exact_nearest(queries[part])
        assert np.array_equal(idx, alone_idx) and np.array_equal(dist, alone_dist)
        assert np.array_equal(idx, ref_idx[part])
    assert with_cells.exact_nearest(queries[60:61])[1][0] == 17


def test_row_distances_independent_of_batch_layout(rng: np.random.Generator) -> None:
    queries = random_bank(rng, 64, 13)
    rows = random_bank(rng, 64, 13)
    together = row_distances(queries, rows)
    alone = np.array([row_distances(queries[i:i + 1].copy(), rows[i:i + 1].copy())[0] for i in range(64)])
    assert np.array_equal(together, alone)


def test_query_validation(rng: np.random.Generator) -> None:
    searcher = PatchSearch.from_bank(random_bank(rng, 300, 8), threads=1)
    with pytest.raises(ValueError, match=r"\[n, 8\]"):
        searcher.nearest(np.zeros((4, 9), np.float32))
    bad = np.zeros((4, 8), np.float32)
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        searcher.exact_nearest(bad)
    with pytest.raises(ValueError, match="ef"):
        searcher.set_ef(0)
    with pytest.raises(ValueError, match="NaN"):
        PatchSearch.from_bank(np.full((10, 4), np.inf, np.float32))
    other = build_index(random_bank(rng, 200, 8))
    with pytest.raises(ValueError, match="200 vectors"):
        PatchSearch(random_bank(rng, 300, 8), other)


def test_threads_do_not_change_results(rng: np.random.Generator) -> None:
    bank = clustered_bank(rng, 2000, 16)
    queries = clustered_bank(rng, 200, 16)
    searcher = PatchSearch.from_bank(bank, threads=1)
    one = searcher.nearest(queries), searcher.exact_nearest(queries)
    searcher.set_threads(2)
    two = searcher.nearest(queries), searcher.exact_nearest(queries)
    for (d1, i1), (d2, i2) in zip(one, two):
        assert np.array_equal(i1, i2) and np.array_equal(d1, d2)


def test_exact_search_without_threadpoolctl(rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    # threadpoolctl is optional on the device: without it the thread limit is a no-op, results unchanged.
    bank = random_bank(rng, 500, 8)
    queries = random_bank(rng, 40, 8)
    searcher = PatchSearch(bank, None, threads=1)
    expected = searcher.exact_nearest(queries)
    monkeypatch.setattr(search_module, "_controller", False)
    got = searcher.exact_nearest(queries)
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert np.array_equal(searcher.nearest(queries)[1], expected[1])  # no index: nearest is exact


def naive_neighbours(bank: np.ndarray, b: int) -> np.ndarray:
    d = ((bank[:, None, :].astype(np.float64) - bank[None, :, :].astype(np.float64)) ** 2).sum(-1)
    np.fill_diagonal(d, -1.0)
    return np.argsort(d, axis=1, kind="stable")[:, :b]


@pytest.mark.parametrize("blocked", [False, True])
def test_bank_neighbours_matches_naive(blocked: bool, rng: np.random.Generator,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    bank = clustered_bank(rng, 400, 12)
    if blocked:
        monkeypatch.setattr(search_module, "_BLOCK_VALUES", 400 * 37)  # 37 rows per block, last one short
    result = bank_neighbours(bank, 6)
    assert result.dtype == np.int32 and result.shape == (400, 6)
    assert np.array_equal(result, naive_neighbours(bank, 6))
    assert np.array_equal(validate_neighbours(result, 400), result)


def test_bank_neighbours_self_first_with_duplicates_and_full_width(rng: np.random.Generator) -> None:
    bank = random_bank(rng, 30, 5)
    bank[7] = bank[3]
    result = bank_neighbours(bank, 30)
    assert np.array_equal(result[:, 0], np.arange(30))
    assert result[3, 1] == 7 and result[7, 1] == 3
    assert all(sorted(row) == list(range(30)) for row in result.tolist())
    with pytest.raises(ValueError, match="b=31"):
        bank_neighbours(bank, 31)


def test_validate_neighbours_errors() -> None:
    good = np.array([[0, 1], [1, 0], [2, 1]], dtype=np.int32)
    assert validate_neighbours(good, 3).shape == (3, 2)
    with pytest.raises(ValueError, match="shape"):
        validate_neighbours(good, 4)
    with pytest.raises(ValueError, match="outside"):
        validate_neighbours(np.array([[0, 5], [1, 0], [2, 1]]), 3)
    with pytest.raises(ValueError, match="itself first"):
        validate_neighbours(np.array([[1, 0], [1, 0], [2, 1]]), 3)
    with pytest.raises(ValueError, match="integers"):
        validate_neighbours(good.astype(np.float32), 3)


@pytest.fixture(scope="module")
def saved_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    bank = clustered_bank(np.random.default_rng(7), 1200, 16)
    path = tmp_path_factory.mktemp("index") / "index.hnsw"
    save_index(build_index(bank, m=8, ef_construction=64), path)
    return path, bank


def test_index_round_trip_and_reproducible(saved_index: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, bank = saved_index
    loaded = load_index(path, dim=16, count=1200, bank=bank)
    original = PatchSearch(bank, build_index(bank, m=8, ef_construction=64), threads=1)
    reloaded = PatchSearch(bank, loaded, threads=1)
    queries = bank[:100] + 0.1
    assert np.array_equal(original.nearest(queries)[1], reloaded.nearest(queries)[1])
    # Single-threaded builds are a function of (bank, parameters, seed): the bundle file is reproducible.
    again = tmp_path / "again.hnsw"
    save_index(build_index(bank, m=8, ef_construction=64), again)
    assert again.read_bytes() == path.read_bytes()


def test_load_index_mismatch_errors(saved_index: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, bank = saved_index
    with pytest.raises(IndexFileError, match="dim 16 but the memory bank has dim 32") as info:
        load_index(path, dim=32, count=1200)
    assert info.value.path == str(path)
    with pytest.raises(IndexFileError, match="1200 vectors but the memory bank has 1000"):
        load_index(path, dim=16, count=1000)
    other = bank.copy()
    other[5, 0] += 1.0
    with pytest.raises(IndexFileError, match="differ from the memory bank"):
        load_index(path, dim=16, count=1200, bank=other)
    with pytest.raises(IndexFileError, match="no such file"):
        load_index(tmp_path / "missing.hnsw", dim=16, count=1200)


def test_load_index_broken_files(saved_index: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, _ = saved_index
    data = path.read_bytes()
    cases = {
        "empty": b"",
        "garbage": bytes(range(256)) * 8,
        "truncated": data[: len(data) // 2],
        "trailing": data + b"\0" * 16,
    }
    # A neighbour id far out of range in the first element's level-0 list: hnswlib would read wild memory.
    header = struct.Struct("<QQQQQQiIQQQdQ")
    corrupt = bytearray(data)
    struct.pack_into("<I", corrupt, header.size + 4, 10_000_000)
    cases["bad neighbour id"] = bytes(corrupt)
    for name, content in cases.items():
        broken = tmp_path / f"{name.replace(' ', '_')}.hnsw"
        broken.write_bytes(content)
        with pytest.raises(IndexFileError) as info:
            load_index(broken, dim=16, count=1200)
        assert str(broken) in str(info.value), name
