"""PatchCore's first pass, the bank's k-means cells (search.CellIndex), and the canonical exact search (issue 13).

The image score must equal exact search's bit for bit (score, p*, s*, m*) with any number of cells and probes, in
any batch, with ties between bank rows and with patches that may not score; the exact search must follow its one
rule (smallest `row_distances` value, lowest row among equal ones) whatever the other queries of the call.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest

from patchcore_edge import search as search_module
from patchcore_edge.scoring import image_scores
from patchcore_edge.search import CellIndex, PatchSearch, bank_neighbours, default_cells, row_distances


def _world(seed: int = 7) -> Tuple[np.ndarray, np.ndarray]:
    """A clustered bank with exact duplicates and equidistant rows (ties), and images whose patches sit near the
    bank, some far from it (defects), a few exactly on bank rows."""
    rng = np.random.default_rng(seed)
    dim = 24
    centres = rng.normal(scale=4.0, size=(12, dim))
    bank = (centres[rng.integers(0, 12, 3000)] + rng.normal(scale=0.7, size=(3000, dim))).astype(np.float32)
    bank[100:110] = bank[90:100]  # duplicates: equal distances to any query, the lower row must win
    images = []
    for i in range(6):
        patches = (centres[rng.integers(0, 12, 196)] + rng.normal(scale=0.7, size=(196, dim))).astype(np.float32)
        if i < 5:
            patches[rng.integers(0, 196, 3)] += rng.normal(scale=3.0, size=(3, dim)).astype(np.float32)
        patches[5] = bank[95]  # on a duplicated row: distance 0 to two rows
        images.append(patches)
    # The top patch of the last image, far from every cluster, is equidistant (bit for bit: a step along one axis
    # of a power of two) to two rows, p - d and p + d.
    p = (centres[0] + 40.0).astype(np.float32)
    step = np.zeros(dim, np.float32)
    step[0] = 8.0
    bank[2000], bank[2500] = p - step, p + step
    images[-1][0] = p
    return np.ascontiguousarray(bank), np.array(images)


def _rule(queries: np.ndarray, bank: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The exact search's rule by brute force: every row's `row_distances` value, smallest, lowest row on ties."""
    rows = []
    for q in queries:
        d = row_distances(np.repeat(q[None], bank.shape[0], axis=0), bank)
        rows.append(int(np.flatnonzero(d == d.min()).min()))
    idx = np.array(rows, dtype=np.int64)
    return row_distances(queries, bank[idx]), idx


def test_exact_search_follows_its_rule_whatever_the_other_queries() -> None:
    bank, images = _world()
    search = PatchSearch(bank, None, threads=1)
    queries = images.reshape(-1, bank.shape[1])[:300]
    expected = _rule(queries, bank)
    together = search.exact_nearest(queries)
    alone = [search.exact_nearest(q[None]) for q in queries[:40]]
    np.testing.assert_array_equal(together[1], expected[1])
    np.testing.assert_array_equal(together[0], expected[0])
    np.testing.assert_array_equal(np.concatenate([a[1] for a in alone]), expected[1][:40])
    # Patch 5 of image 0 is bank row 95, which row 105 duplicates: distance 0 to both, the lower row.
    assert together[0][5] == 0.0 and together[1][5] == 95


@pytest.mark.parametrize("cells, probes", [(1, 1), (8, 1), (default_cells(3000), 2), (64, 3), (300, 1)])
def test_image_scores_equal_exact_search_with_any_cells(cells: int, probes: int) -> None:
    bank, images = _world()
    neighbours = bank_neighbours(bank, 5)
    exact = image_scores(images, PatchSearch(bank, None, threads=1), neighbours)
    search = PatchSearch(bank, CellIndex(bank, cells), ef=probes, threads=1)
    for batch in (1, 2, len(images)):
        got = [s for start in range(0, len(images), batch)
               for s in image_scores(images[start:start + batch], search, neighbours)]
        for e, g in zip(exact, got):
            assert (g.score, g.max_distance, g.argmax, g.nearest_bank_index, g.weight) == \
                (e.score, e.max_distance, e.argmax, e.nearest_bank_index, e.weight)
            # Every patch distance is an upper bound of the exact one, equal where it was searched exactly.
            assert (g.patch_distances >= e.patch_distances).all()
    # The tie: the top patch of the last image is as far from row 2000 as from row 2500; the lower row wins.
    assert exact[-1].argmax == 0 and exact[-1].nearest_bank_index == 2000


def test_patches_that_may_not_score_never_do() -> None:
    bank, images = _world()
    neighbours = bank_neighbours(bank, 5)
    valid = np.ones(images.shape[:2], bool)
    for i in range(len(images)):
        top = int(np.argmax(PatchSearch(bank, None).exact_nearest(images[i])[0]))
        valid[i, top] = False  # the patch that would score: now it must not
    valid[2] = False  # an image without a valid patch scores 0
    exact = image_scores(images, PatchSearch(bank, None, threads=1), neighbours, valid=valid)
    fast = image_scores(images, PatchSearch.with_cells(bank, threads=1), neighbours, valid=valid)
    for i, (e, g) in enumerate(zip(exact, fast)):
        assert (g.score, g.argmax, g.nearest_bank_index) == (e.score, e.argmax, e.nearest_bank_index)
        assert valid[i, g.argmax] or g.score == 0.0
        assert (g.patch_distances[~valid[i]] == 0).all()
    assert fast[2].score == 0.0 and fast[2].argmax == 0


def test_cells_are_a_function_of_the_bank() -> None:
    bank, images = _world()
    a, b = CellIndex(bank), CellIndex(bank.copy())
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.bounds, b.bounds)
    if a.packed is None:
        np.testing.assert_array_equal(a.members, b.members)
    else:  # the compiled pass keeps only the packed copy of the rows
        assert a.members is None and b.members is None
        np.testing.assert_array_equal(a.packed, b.packed)
        np.testing.assert_array_equal(a.col_rows, b.col_rows)
    plain, again = CellIndex(bank, compiled=False), CellIndex(bank.copy(), compiled=False)
    np.testing.assert_array_equal(plain.members, again.members)
    np.testing.assert_array_equal(plain.rows, a.rows)
    queries = images.reshape(-1, bank.shape[1])
    np.testing.assert_array_equal(a.nearest_rows(queries, 3), b.nearest_rows(queries, 3))
    assert 1 < a.cells <= default_cells(bank.shape[0]) and sorted(a.rows.tolist()) == list(range(bank.shape[0]))
    assert a.bounds[0] == 0 and a.bounds[-1] == bank.shape[0] and (np.diff(a.bounds) >= 0).all()


def test_more_probes_never_find_a_farther_row_and_all_probes_are_exact() -> None:
    bank, images = _world()
    cells = CellIndex(bank, 16)
    queries = images.reshape(-1, bank.shape[1])
    exact = PatchSearch(bank, None).exact_nearest(queries)[0]
    found = [row_distances(queries, bank[cells.nearest_rows(queries, p)]) for p in (1, 2, 4, 16)]
    recall = [float(np.mean(f <= exact)) for f in found]
    assert recall == sorted(recall) and recall[0] < 1.0  # one probe misses some: the re-rank has work to do
    # All 16 probes scan the whole bank: the smallest expanded value is within rounding of the exact distance.
    np.testing.assert_allclose(found[-1], exact, rtol=1e-5, atol=1e-5)
    # A small bank gets probes that cover every cell: its first pass is brute force.
    small = CellIndex(bank[:400])
    assert small.default_probes() == small.cells


def test_real_bundle_scores_equal_exact_search_in_every_batch(tiny_bundle: Path) -> None:
    from patchcore_edge.runtime.detector import Detector

    rng = np.random.default_rng(3)
    images = [np.clip(rng.normal(128, 40, (96, 96, 3)), 0, 255).astype(np.uint8) for _ in range(6)]
    images[2][20:40, 30:60] = (250, 40, 40)  # a defect
    with Detector.load(tiny_bundle, backend="onnxruntime", threads=1) as fast, \
            Detector.load(tiny_bundle, backend="onnxruntime", threads=1, exact_search=True) as exact:
        assert fast.scored_with["method"]["search"] == "cells"
        reference = [r.score for r in exact.predict_batch(images, maps=False)]
        one = [fast.predict(image, maps=False).score for image in images]
        all_at_once = [r.score for r in fast.predict_batch(images, maps=False)]
        again = [r.score for r in fast.predict_batch(images, maps=False)]
    assert one == reference and all_at_once == reference and again == reference


def test_two_threads_name_the_same_rows_as_one() -> None:
    """The second thread takes part of the probed cells: the rows named (ties included) must not change."""
    bank, images = _world()
    cells = CellIndex(bank, 16, compiled=False)
    queries = np.ascontiguousarray(np.tile(images.reshape(-1, bank.shape[1]), (2, 1)))
    rows_per_cell = bank.shape[0] / cells.cells
    assert queries.shape[0] * 4 * rows_per_cell > search_module._TWO_THREAD_WORK  # the two-thread path runs
    for probes in (1, 4):
        np.testing.assert_array_equal(cells.nearest_rows(queries, probes, threads=2),
                                      cells.nearest_rows(queries, probes, threads=1))
    # Ties between cells resolve to the lower cell in both: the duplicated rows name the lower one.
    on_duplicate = cells.nearest_rows(bank[95:96], 16, threads=1)
    assert int(on_duplicate[0]) == 95


# --- the compiled first pass (patchcore_edge._cellscan, built by setup.py where a C compiler is present)

needs_compiled = pytest.mark.skipif(search_module._cellscan is None,
                                    reason="patchcore_edge._cellscan is not built in this install (no C compiler?)")


@needs_compiled
def test_compiled_first_pass_names_the_rows_numpy_names() -> None:
    """Same cells, same rule (smallest value, lowest position): the rows may differ only where two values are within
    rounding (fused multiply-adds against BLAS), so their distances agree to float32 precision."""
    bank, images = _world()
    queries = images.reshape(-1, bank.shape[1])
    for cells, probes in ((1, 1), (16, 1), (16, 4), (default_cells(bank.shape[0]), 3), (300, 2)):
        compiled, plain = CellIndex(bank, cells), CellIndex(bank, cells, compiled=False)
        assert compiled.kernel.startswith("compiled") and plain.kernel == "numpy"
        got, expected = compiled.nearest_rows(queries, probes), plain.nearest_rows(queries, probes)
        assert np.mean(got == expected) > 0.99
        np.testing.assert_allclose(row_distances(queries, bank[got]), row_distances(queries, bank[expected]),
                                   rtol=1e-5, atol=1e-5)
    # The duplicated rows: the lower one, as in numpy.
    assert int(CellIndex(bank, 16).nearest_rows(bank[95:96], 16)[0]) == 95


@needs_compiled
def test_compiled_first_pass_on_two_threads_names_the_same_rows_as_on_one() -> None:
    bank, images = _world()
    cells = CellIndex(bank, 16)
    queries = np.ascontiguousarray(np.tile(images.reshape(-1, bank.shape[1]), (2, 1)))
    assert queries.shape[0] * bank.shape[0] / 16 > search_module._TWO_THREAD_COMPILED_WORK  # two threads run
    for probes in (1, 4):
        np.testing.assert_array_equal(cells.nearest_rows(queries, probes, threads=2),
                                      cells.nearest_rows(queries, probes, threads=1))


@needs_compiled
@pytest.mark.parametrize("compiled", [True, False])
def test_image_scores_equal_exact_search_with_either_first_pass(compiled: bool) -> None:
    bank, images = _world()
    neighbours = bank_neighbours(bank, 5)
    exact = image_scores(images, PatchSearch(bank, None, threads=1), neighbours)
    search = PatchSearch(bank, CellIndex(bank, compiled=compiled), ef=2, threads=1)
    for e, g in zip(exact, image_scores(images, search, neighbours)):
        assert (g.score, g.max_distance, g.argmax, g.nearest_bank_index) == \
            (e.score, e.max_distance, e.argmax, e.nearest_bank_index)
        assert (g.patch_distances >= e.patch_distances).all()


@needs_compiled
def test_compiled_scan_refuses_inconsistent_arrays() -> None:
    """The C entry points check every size and offset before reading (a ValueError, never a crash)."""
    from patchcore_edge import _cellscan  # type: ignore[attr-defined]

    bank, images = _world()
    cells = CellIndex(bank, 8)
    packed, cell_cols = cells.packed, cells.cell_cols
    lifted = cells.lift(images[0])
    n, dp = lifted.shape
    starts, grouped = np.empty(cells.cells + 1, np.int64), np.empty(n, np.int64)
    _cellscan.probe(lifted @ cells.centres, n, cells.cells, 1, starts, grouped)
    value, col, counter = np.full(n, np.inf, np.float32), np.zeros(n, np.int64), np.zeros(1, np.int64)
    bad_queries = grouped.copy()
    bad_queries[3] = n  # a query number out of range
    bad_cols = cell_cols.copy()
    bad_cols[1] += 8  # a cell width that is not a multiple of 16
    k = cells.cells
    for args in ((lifted, n, dp, packed[:-1], cell_cols, k, starts, grouped, counter, value, col),
                 (lifted, n, dp, packed, cell_cols, k, starts, bad_queries, counter, value, col),
                 (lifted, n, dp, packed, bad_cols, k, starts, grouped, counter, value, col),
                 (lifted, n, dp, packed, cell_cols, k, starts, grouped, np.full(1, -1, np.int64), value, col),
                 (lifted, n, dp, packed, cell_cols, k, starts, grouped, counter.astype(np.int32), value, col),
                 (lifted[:-1], n, dp, packed, cell_cols, k, starts, grouped, counter, value, col)):
        with pytest.raises(ValueError):
            _cellscan.scan(*args)
    assert counter[0] == 0 and np.isinf(value).all()  # refused before any work
    out = np.empty((n, packed.size // dp), np.float32)
    for args in ((lifted, n, dp, packed, cell_cols, k, 0, k + 1, out), (lifted, n, dp, packed, cell_cols, k, 0, k, out[:-1]),
                 (lifted, n, dp, packed, bad_cols, k, 0, k, out)):
        with pytest.raises(ValueError):
            _cellscan.values(*args)
    with pytest.raises(ValueError):
        _cellscan.probe(lifted @ cells.centres, n, k, k + 1, starts, grouped)


def test_compiled_first_pass_is_refused_where_it_is_not_built(monkeypatch: pytest.MonkeyPatch) -> None:
    bank, _ = _world()
    monkeypatch.setattr(search_module, "_cellscan", None)
    assert CellIndex(bank, 8).kernel == "numpy"
    with pytest.raises(RuntimeError, match="not built"):
        CellIndex(bank, 8, compiled=True)


@needs_compiled
@pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")),
                    reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (apt-get install gcc-aarch64-linux-gnu "
                           "qemu-user)")
def test_the_neon_scan_names_the_rows_the_x86_scan_names(tmp_path: Path) -> None:
    """The kernel as a Jetson builds it (aarch64, NEON), run under qemu: each value is the same chain of fused
    multiply-adds as on x86 (AVX-512 or AVX2), so the rows are the same bit for bit."""
    from patchcore_edge import _cellscan  # type: ignore[attr-defined]

    if _cellscan.variant() not in ("avx512", "avx2"):
        pytest.skip("the x86 scan here has no fused multiply-add to compare with")
    root = Path(__file__).resolve().parents[1]
    harness = tmp_path / "harness"
    subprocess.run(["aarch64-linux-gnu-gcc", "-O3", "-ffp-contract=fast", "-static", "-o", str(harness),
                    "-I", str(root / "src" / "patchcore_edge" / "_native"), str(root / "tests" / "cellscan_harness.c")],
                   check=True)
    bank, images = _world()
    cells = CellIndex(bank, 16)
    packed, cell_cols, col_rows = cells.packed, cells.cell_cols, cells.col_rows
    queries = images.reshape(-1, bank.shape[1])
    lifted = cells.lift(queries)
    n, dp = lifted.shape
    starts, grouped = np.empty(cells.cells + 1, np.int64), np.empty(n * 3, np.int64)
    _cellscan.probe(lifted @ cells.centres, n, cells.cells, 3, starts, grouped)
    for name, array in (("lifted.f32", lifted), ("packed.f32", packed), ("cell_cols.i64", cell_cols),
                        ("starts.i64", starts), ("grouped.i64", grouped)):
        array.tofile(tmp_path / name)
    subprocess.run(["qemu-aarch64", str(harness), str(tmp_path), str(n), str(dp), str(cells.cells)], check=True,
                   timeout=120)
    neon = col_rows[np.fromfile(tmp_path / "col.i64", dtype=np.int64)]
    np.testing.assert_array_equal(neon, cells.nearest_rows(queries, 3))


@pytest.mark.parametrize("compiled", [pytest.param(True, marks=needs_compiled), False])
@pytest.mark.parametrize("block_values", [16 * 1024 * 1024, 3000])
def test_exact_search_through_the_cells_follows_its_rule(compiled: bool, block_values: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact search reads the cells' rows (the packed copy when compiled): the same rule, in one span of columns or
    in many (a small block forces spans of a few cells)."""
    monkeypatch.setattr(search_module, "_BLOCK_VALUES", block_values)
    bank, images = _world()
    search = PatchSearch(bank, CellIndex(bank, 16, compiled=compiled), ef=2, threads=1)
    if compiled:
        cells = search.index
        assert cells.kernel.startswith("compiled")
        most = search_module._block_rows(300, cells.packed_columns)
        spans = cells.column_spans(most)
        assert (len(spans) == 1) == (block_values > 10**6)
        # The spans tile the packed columns, each at most `most` columns or a single cell.
        assert spans[0][0] == 0 and spans[-1][1] == cells.packed_columns
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all(stop - start <= most or np.sum((cells.cell_cols > start) & (cells.cell_cols <= stop)) == 1
                   for start, stop in spans)
    queries = images.reshape(-1, bank.shape[1])[:300]
    expected = _rule(queries, bank)
    found = search.exact_nearest(queries)
    np.testing.assert_array_equal(found[1], expected[1])
    np.testing.assert_array_equal(found[0], expected[0])
    assert found[0][5] == 0.0 and found[1][5] == 95


def test_a_bundle_scores_the_same_without_the_compiled_pass(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An install without a C compiler runs the numpy pass end to end: the same image scores, maps within rounding."""
    from patchcore_edge.runtime.detector import Detector

    rng = np.random.default_rng(5)
    images = [np.clip(rng.normal(128, 40, (96, 96, 3)), 0, 255).astype(np.uint8) for _ in range(4)]
    images[1][10:40, 20:50] = (20, 240, 20)
    with Detector.load(tiny_bundle, backend="onnxruntime", threads=2) as usual:
        expected = usual.predict_batch(images)
    monkeypatch.setattr(search_module, "_cellscan", None)
    with Detector.load(tiny_bundle, backend="onnxruntime", threads=2) as plain:
        assert plain.scorer.search.index.kernel == "numpy"
        got = plain.predict_batch(images)
    assert [r.score for r in got] == [r.score for r in expected]
    for g, e in zip(got, expected):
        assert g.anomaly_map is not None and e.anomaly_map is not None
        np.testing.assert_allclose(g.anomaly_map, e.anomaly_map, rtol=1e-5, atol=1e-5 * float(e.anomaly_map.max()))
