"""Partitioned greedy k-center: the greedy rule run inside the cells of a coarse partition, merged by radius.

Why: the exact greedy costs about N x size distance evaluations (less with pruning, but pruning stops paying
on textures such as tiles: 1,425 s for 600k patches at 10 %). Split the points into C compact cells (a
seeded k-means), and the greedy inside each cell costs (N / C) x (size / C), C^2 times less in all, and the
cells are independent (they can run on several processes or machines, see export/distributed.py).

The merge: inside a cell the greedy's "key" (each centre's distance to the cell's earlier centres when it is
chosen) is non-increasing, and the cell's coverage radius after m centres is its (m+1)-th key. Taking the
`size` largest keys over all cells (ties: lower cell, then earlier step) gives every cell the same final
radius threshold, exactly as one greedy that only ever looks inside each point's own cell would. The result
is defined by the cells' full greedy sequences, so it does not depend on how far each cell was run first, nor
on where it ran: each cell runs to a cap proportional to its size and is run again with a larger cap when all
its keys made the cut.

The reported radius bound is the largest key left out: every point lies within it of a centre of its own
cell (in the selection space; exact when the features were not projected). The true coverage radius, with
centres from all cells, can only be smaller. Unlike the global greedy there is no factor-2 guarantee against
the optimum (a point near a cell border ignores the neighbour cell's centres); benchmarks/results/coreset.md
measures the cost against the exact greedy.

Inside a cell the greedy chooses several centres per pass over the cell's points where that is provably the
one-centre-per-pass choice (cell_greedy), so the pass is a matrix product, not a matrix-vector product per
centre. float16 / bfloat16 passes were measured and rejected: numpy and torch run them 50-100x slower than
float32 on this CPU (no native half-precision arithmetic), so the passes stay float32.

Memory: the features (or their projection), one int64 label per point, the k-means centroids, and in process
one cell's points at a time (O(N / C)) with a 4 MB pass buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..search import nearest_centre
from .coreset import CoresetInputError, Progress

# A cell task: (its points float32 [n, d], centres to select, first centre). Its result: (local indices, keys).
CellTask = Tuple[np.ndarray, int, int]
CellResult = Tuple[np.ndarray, np.ndarray]
# Runs cell tasks (in this process, or on a Dask cluster); calls done(task_position) as each finishes.
CellRunner = Callable[[Sequence[Callable[[], CellTask]], Callable[[int], None]], List[CellResult]]

_KMEANS_SAMPLE_PER_CELL = 256  # k-means runs on a seeded sample of this many points per cell
_KMEANS_ITERATIONS = 10
_ASSIGN_ROWS = 16384
_CAP_SLACK = 1.25  # first cap: 1.25x the cell's share in a pilot run (run again further when that is short)
_PILOT_SAMPLE = 32768
_CANDIDATES = 512  # candidates per round of the cell greedy (512 beat 1,024 and 2,048 on ELPV cells)
_ROUND_CENTRES = 256  # at most this many centres per round
_PASS_ROWS = 4096  # rows per matrix product in a round's pass: 4096 x 256 float32 = 4 MB


@dataclass
class CellSelection:
    """Indices in merged order (largest key first), the own-cell radius bound, and how it was computed."""

    indices: np.ndarray
    radius_bound: float
    cells: int
    reruns: int


def default_cell_count(n: int, size: int) -> int:
    """About 16,384 points per cell, and at least 16 centres per cell (so borders cost few centres).

    Fewer, larger cells lose less radius at their borders and cost more (work N x size / cells); on the ELPV
    cells (benchmarks/results/coreset.md) 16k points per cell gave about +6 % radius over the exact greedy
    where 8k gave +9 %, at 600k patches in about 20 s of CPU.
    """
    return int(max(1, min(n // 16384, size // 16)))


def cell_start(n: int, seed: int, cell: int) -> int:
    """The seeded first centre of a cell of n points (its own stream, so cells are independent)."""
    return int(np.random.default_rng([seed, cell]).integers(n))


def cell_greedy(points: np.ndarray, cap: int, start: int,
                on_round: Optional[Callable[[int], None]] = None) -> CellResult:
    """Greedy k-center on one cell's points to `cap` centres from `start`: local indices and keys.

    `on_round(chosen)` is called after every pass over the cell (a large cell runs for minutes: progress).

    Keys are the centres' distances when chosen (inf for the start), non-increasing. Distances are
    |x|^2 + |c|^2 - 2 x.c on coordinates centred on the cell mean. The selection rule is the plain loop's
    (farthest point from the centres so far, lowest index among equal distances), but several centres are
    chosen per pass over the cell, where that is provably the plain loop's choice:

    each round takes the farthest point, then the K farthest (`_CANDIDATES`) as candidates, with m_out, the
    largest distance outside them. Choosing a centre only lowers distances, so while the farthest candidate,
    updated against the round's centres on the K candidates alone, is still above m_out, it is the plain
    loop's next centre: nothing outside can have overtaken it. Then one pass updates the whole cell against
    the round's centres at once, a matrix product (N x B) instead of B matrix-vector products: the cell is
    read from memory once per round, not once per centre (4x faster on a 32k-point cell; equal on cells that
    stay in cache). The result depends on the rounding of those products, not on the cap: a longer run
    continues a shorter one, which the merge needs.
    """
    n = points.shape[0]
    centred = np.subtract(points, points.mean(axis=0, dtype=np.float64).astype(np.float32), dtype=np.float32)
    norms = np.einsum("ij,ij->i", centred, centred)
    selected = np.empty(cap, dtype=np.int64)
    keys = np.empty(cap, dtype=np.float32)
    mind2 = np.full(n, np.inf, dtype=np.float32)  # -inf marks centres: never the farthest again
    selected[0], keys[0] = int(start), np.inf
    chosen, round_centres = 1, [int(start)]
    while True:
        _lower_against(centred, norms, np.asarray(round_centres), mind2)
        if on_round is not None:
            on_round(chosen)
        if chosen == cap:
            return selected, keys
        round_centres = []
        k = min(_CANDIDATES, n)
        if k < n:
            order = np.argpartition(mind2, n - k - 1)  # the k largest after position n - k - 1
            candidates, outside = np.sort(order[n - k:]), float(mind2[order[n - k - 1]])
        else:
            candidates, outside = np.arange(n), -np.inf
        # Sorted candidates: argmax, the first largest, is the lowest point index among equal distances.
        values = mind2[candidates]
        rows, row_norms = centred[candidates] * np.float32(-2.0), norms[candidates]
        centre = int(np.argmax(mind2))  # the plain loop's choice, lowest index among ties
        best = float(mind2[centre])
        position = int(np.searchsorted(candidates, centre))  # == k when the centre is not a candidate
        while True:
            selected[chosen], keys[chosen] = centre, math.sqrt(max(best, 0.0))
            chosen += 1
            round_centres.append(centre)
            if chosen == cap or len(round_centres) == _ROUND_CENTRES:
                break
            d2 = rows @ centred[centre]
            d2 += row_norms
            d2 += norms[centre]
            np.minimum(values, d2, out=values)
            if position < k and candidates[position] == centre:
                values[position] = -np.inf
            position = int(np.argmax(values))
            best = float(values[position])
            if not best > outside:  # a point outside may now be as far: end the round, update the cell
                break
            centre = int(candidates[position])


def _lower_against(centred: np.ndarray, norms: np.ndarray, centres: np.ndarray, mind2: np.ndarray) -> None:
    """mind2 = min(mind2, squared distances to `centres`), in row chunks; the centres get -inf."""
    # min_c |x|^2 + |c|^2 - 2 x.c = |x|^2 + min_c (|c|^2 - 2 x.c): |x|^2 is added after the minimum.
    # A C-order [d, B] right operand: OpenBLAS runs 1.7-2x faster on it than on the transposed view.
    block = np.ascontiguousarray((centred[centres] * np.float32(-2.0)).T)
    block_norms = norms[centres]
    for row in range(0, centred.shape[0], _PASS_ROWS):
        part = centred[row:row + _PASS_ROWS] @ block
        part += block_norms
        nearest = np.minimum.reduce(part, axis=1)
        nearest += norms[row:row + _PASS_ROWS]
        np.minimum(mind2[row:row + _PASS_ROWS], nearest, out=mind2[row:row + _PASS_ROWS])
    mind2[centres] = -np.inf


def kmeans_labels(points: np.ndarray, cells: int, seed: int) -> np.ndarray:
    """Cell label (int64) of every point: nearest centroid of a seeded Lloyd k-means fitted on a sample.

    Cells that end up empty are dropped and the labels renumbered 0..C'-1 in centroid order.
    """
    n = points.shape[0]
    rng = np.random.default_rng([seed, 0x6B6D])
    sample_size = min(n, cells * _KMEANS_SAMPLE_PER_CELL)
    sample = points[np.sort(rng.choice(n, sample_size, replace=False))].astype(np.float32)
    centroids = sample[rng.choice(sample_size, cells, replace=False)].copy()
    for _ in range(_KMEANS_ITERATIONS):
        nearest = nearest_centre(sample, centroids)
        counts = np.bincount(nearest, minlength=cells)
        sums = np.stack([np.bincount(nearest, weights=sample[:, d], minlength=cells)
                         for d in range(sample.shape[1])], axis=1)
        filled = counts > 0
        centroids[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
    labels = np.empty(n, dtype=np.int64)
    for start in range(0, n, _ASSIGN_ROWS):
        labels[start:start + _ASSIGN_ROWS] = nearest_centre(np.asarray(points[start:start + _ASSIGN_ROWS],
                                                                 dtype=np.float32), centroids)
    used = np.flatnonzero(np.bincount(labels, minlength=cells))
    renumber = np.full(cells, -1, dtype=np.int64)
    renumber[used] = np.arange(used.size)
    labels = renumber[labels]
    return labels


def run_in_process(tasks: Sequence[Callable[[], CellTask]], done: Callable[[int], None],
                   on_round: Optional[Callable[[int, int], None]] = None) -> List[CellResult]:
    """Cell tasks one after another in this process, each cell's points gathered only while it runs;
    `on_round(position, chosen)` after every pass of a cell's greedy."""
    results = []
    for position, make in enumerate(tasks):
        points, cap, seed = make()
        report = None if on_round is None else (lambda chosen, at=position: on_round(at, chosen))
        results.append(cell_greedy(points, cap, seed, report))
        del points
        done(position)
    return results


def partitioned_greedy(points: np.ndarray, size: int, seed: int = 0, cells: Optional[int] = None,
                       runner: Optional[CellRunner] = None,
                       progress: Optional[Progress] = None) -> CellSelection:
    """`size` centres of float32 `points` [N, d] by the partitioned greedy (module docstring); seeded.

    `cells`: number of k-means cells (default: default_cell_count); 1 runs the plain greedy on all points
    from cell_start(N, seed, 0): the exact greedy, whose bound is then its exact coverage radius. `runner`
    runs the cell tasks (None: in this process; or a Dask runner); the result does not depend on it.
    `progress(done, total)` counts centres: of finished cell runs, and in process of every pass as well.
    """
    n = points.shape[0]
    if not isinstance(size, (int, np.integer)) or not 1 <= size <= n:
        raise CoresetInputError(f"coreset size must be an integer between 1 and the number of patches ({n}), "
                                f"got {size!r}")
    wanted = default_cell_count(n, size) if cells is None else int(cells)
    if wanted < 1:
        raise CoresetInputError(f"the number of cells must be a positive integer, got {cells!r}")
    wanted = min(wanted, size)  # every cell holds at least its start
    labels = np.zeros(n, dtype=np.int64) if wanted == 1 else kmeans_labels(points, wanted, seed)
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    count = counts.size
    caps = _pilot_caps(points, labels, counts, size, seed)
    results: List[Optional[CellResult]] = [None] * count
    pending = list(range(count))
    reruns = -1
    planned = int(caps.sum())
    finished = 0
    while pending:
        reruns += 1

        def make(cell: int) -> Callable[[], CellTask]:
            members = order[offsets[cell]:offsets[cell + 1]]
            return lambda: (points[members], int(caps[cell]), cell_start(members.size, seed, cell))

        def done(position: int, batch: List[int] = pending) -> None:
            nonlocal finished
            finished += int(caps[batch[position]])
            if progress is not None:
                progress(min(finished, planned), planned)

        def on_round(position: int, chosen: int, batch: List[int] = pending) -> None:
            if progress is not None:
                progress(min(finished + min(chosen, int(caps[batch[position]])), planned), planned)

        tasks = [make(cell) for cell in pending]
        batch_results = run_in_process(tasks, done, on_round) if runner is None else runner(tasks, done)
        for cell, result in zip(pending, batch_results):
            results[cell] = result
        taken = _merge_counts(results, size)
        # A cell all of whose keys made the cut may have more above it: run it again, further.
        pending = [cell for cell in range(count) if taken[cell] == caps[cell] < counts[cell]]
        for cell in pending:
            caps[cell] = min(int(counts[cell]), max(int(caps[cell]) * 3 // 2, int(caps[cell]) + 16))
            planned += int(caps[cell])

    taken = _merge_counts(results, size)
    cell_ids, steps, keys = _all_keys(results)
    chosen = _merge_order(cell_ids, steps, keys)[:size]
    indices = np.empty(size, dtype=np.int64)
    for position, entry in enumerate(chosen):
        cell, step = int(cell_ids[entry]), int(steps[entry])
        local = results[cell][0]  # type: ignore[index]
        indices[position] = order[offsets[cell] + local[step]]
    bound = 0.0
    for cell in range(count):
        local_keys = results[cell][1]  # type: ignore[index]
        if taken[cell] < local_keys.size:
            bound = max(bound, float(local_keys[taken[cell]]))
    return CellSelection(indices=indices, radius_bound=bound, cells=count, reruns=reruns)


def _pilot_caps(points: np.ndarray, labels: np.ndarray, counts: np.ndarray, size: int, seed: int) -> np.ndarray:
    """First cap per cell: its share of a greedy run on a seeded sample, with slack (dense cells need few
    centres, sparse ones many, so shares by point count would send most cells round again)."""
    n = points.shape[0]
    if counts.size == 1:
        return np.minimum(counts, size + 1)  # one more than taken: its key is the radius bound
    m = min(n, _PILOT_SAMPLE)
    rng = np.random.default_rng([seed, 0x7069])
    sample = np.sort(rng.choice(n, m, replace=False))
    steps = max(counts.size, min(m, int(round(size * m / n))))
    chosen, _ = cell_greedy(points[sample], steps, 0)
    shares = np.bincount(labels[sample[chosen]], minlength=counts.size)
    caps = np.ceil(_CAP_SLACK * size * shares / steps).astype(np.int64) + 8
    return np.clip(caps, 1, counts)


def _all_keys(results: Sequence[Optional[CellResult]]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    keys = [r[1] for r in results if r is not None]
    cell_ids = np.concatenate([np.full(k.size, cell, dtype=np.int64) for cell, k in enumerate(keys)])
    steps = np.concatenate([np.arange(k.size, dtype=np.int64) for k in keys])
    return cell_ids, steps, np.concatenate(keys)


def _merge_order(cell_ids: np.ndarray, steps: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Entries by key descending, then cell, then step: one total order, whatever the caps were."""
    return np.lexsort((steps, cell_ids, -keys.astype(np.float64)))


def _merge_counts(results: Sequence[Optional[CellResult]], size: int) -> np.ndarray:
    """How many of each cell's centres are among the `size` first in merged order."""
    cell_ids, steps, keys = _all_keys(results)
    chosen = _merge_order(cell_ids, steps, keys)[:size]
    return np.bincount(cell_ids[chosen], minlength=len(results))
