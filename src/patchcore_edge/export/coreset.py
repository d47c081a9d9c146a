"""Greedy k-center coreset (PatchCore's memory-bank subsampling), exact, seeded and in bounded memory.

Selection rule (the "plain greedy"): a seeded random patch is the first centre; every next centre is the
not-yet-selected patch farthest (Euclidean) from its nearest centre, the lowest index winning ties.
Distances are taken after a seeded Gaussian Johnson-Lindenstrauss projection to `projection_dim` dimensions
when the features are wider than that; otherwise in the original space (then it is the exact greedy).

On CPU the selection is accelerated with the triangle inequality: each point remembers its nearest centre,
a new centre ``c`` can only take a point ``x`` away from centre ``a`` when ``d(a, c) < 2 d(x, a)``, and
whole clusters are skipped when ``d(a, c) >= 2 radius(a)``. The bounds carry a floating-point safety margin
and the distances that are computed use the plain loop's float32 kernel, so the accelerated selection is the
plain loop's, index for index. On a torch accelerator device the plain loop runs as is: there a full
distance pass per centre is cheap, and data-dependent pruning would only add host synchronisations.

Memory: the (projected) points ``N x projection_dim`` float32, the centres ``size x projection_dim`` float32
and a few length-N vectors; never an ``N x N`` or ``N x size`` matrix.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, Callable, Optional, Tuple, Union, cast

import numpy as np

if TYPE_CHECKING:  # torch is optional for callers that pass numpy arrays and select on CPU
    import torch

Progress = Callable[[int, int], None]
FeatureArray = Union[np.ndarray, "torch.Tensor"]

_U32 = 2.0 ** -24  # float32 unit roundoff
_ROWS_PER_CHUNK = 16384  # rows per pass when projecting, validating or computing distances (8 MB at D=128)
_PROGRESS_STEPS = 100  # the callback is called about this many times per selection


class CoresetInputError(ValueError):
    """Features, sizes or options that the coreset selection cannot use, with the reason in words."""


# ------------------------------------------------------------------------------------------ size and inputs


def coreset_size(num_patches: int, ratio: Optional[float] = None, size: Optional[int] = None) -> int:
    """The number of centres to select, from either a ratio of the patches or an absolute size (exactly one).

    A ratio must lie in (0, 1] and is rounded to the nearest integer, at least 1; an absolute size must lie in
    [1, num_patches].
    """
    if not _is_int(num_patches) or num_patches < 1:
        raise CoresetInputError(f"the number of patches must be a positive integer, got {num_patches!r}")
    if (ratio is None) == (size is None):
        raise CoresetInputError("give exactly one of a coreset ratio or a coreset size")
    if size is not None:
        if not _is_int(size):
            raise CoresetInputError(f"coreset size must be an integer, got {size!r}")
        if not 1 <= size <= num_patches:
            raise CoresetInputError(f"coreset size must be between 1 and the number of patches "
                                    f"({num_patches}), got {size}")
        return int(size)
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(float(ratio)):
        raise CoresetInputError(f"coreset ratio must be a number in (0, 1], got {ratio!r}")
    if not 0.0 < float(ratio) <= 1.0:
        raise CoresetInputError(f"coreset ratio must be in (0, 1], got {ratio}")
    return min(num_patches, max(1, int(round(num_patches * float(ratio)))))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_torch_tensor(value: Any) -> bool:
    # Checked by type name so that numpy-only callers never import torch.
    return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach")


def _check_shape(features: Any) -> Tuple[int, int]:
    shape = tuple(features.shape) if hasattr(features, "shape") else None
    if shape is None or len(shape) != 2:
        raise CoresetInputError(f"features must be a 2-D array [patches, dim], got shape {shape}")
    if shape[0] < 1 or shape[1] < 1:
        raise CoresetInputError(f"features are empty (shape {shape})")
    return int(shape[0]), int(shape[1])


def _as_numpy(features: FeatureArray) -> np.ndarray:
    if _is_torch_tensor(features):
        features = cast("torch.Tensor", features).detach().cpu().numpy()
    if not isinstance(features, np.ndarray):
        raise CoresetInputError(f"features must be a numpy array or a torch tensor, "
                                f"got {type(features).__name__}")
    if features.dtype.kind not in "fiu":
        raise CoresetInputError(f"features must hold real numbers, got dtype {features.dtype}")
    return features


def _raise_not_finite(start_row: int, block: np.ndarray) -> None:
    bad_row = start_row + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
    raise CoresetInputError(f"features contain NaN or infinite values (first in patch row {bad_row})")


def _gaussian_projection(dim: int, projection_dim: int, rng: np.random.Generator) -> np.ndarray:
    # Variance 1/k keeps expected squared distances unchanged (Johnson-Lindenstrauss).
    matrix = rng.standard_normal((dim, projection_dim), dtype=np.float64) / math.sqrt(projection_dim)
    return matrix.astype(np.float32)


def _prepare_numpy(features: np.ndarray, projection_dim: int, rng: np.random.Generator) -> np.ndarray:
    """float32 C-order points, projected when wider than projection_dim; checked finite chunk by chunk."""
    n, dim = features.shape
    if dim <= projection_dim:
        points = np.ascontiguousarray(features, dtype=np.float32)  # no copy when already float32 C-order
        for start in range(0, n, _ROWS_PER_CHUNK):
            block = points[start:start + _ROWS_PER_CHUNK]
            if not np.isfinite(block).all():
                _raise_not_finite(start, block)
        return points
    matrix = _gaussian_projection(dim, projection_dim, rng)
    points = np.empty((n, projection_dim), dtype=np.float32)
    for start in range(0, n, _ROWS_PER_CHUNK):
        block = np.asarray(features[start:start + _ROWS_PER_CHUNK], dtype=np.float32)
        if not np.isfinite(block).all():
            _raise_not_finite(start, block)
        np.matmul(block, matrix, out=points[start:start + block.shape[0]])
    if not np.isfinite(points).all():
        raise CoresetInputError("features are too large in magnitude: their projection overflows float32")
    return points


# ----------------------------------------------------------------------------------------- public functions


def greedy_coreset(features: FeatureArray, size: int, projection_dim: int = 128, seed: int = 0,
                   device: str = "cpu", progress: Optional[Progress] = None) -> np.ndarray:
    """Indices (int64, in selection order) of a greedy k-center coreset of `size` rows of `features` [N, D].

    The first index is the seeded random start, which belongs to the coreset; each next one is the patch
    farthest from the centres chosen so far. `device` is "cpu" (numpy, accelerated exact greedy) or a torch
    device such as "cuda" / "cuda:1" (plain loop on that device). `progress(done, total)` is called about
    100 times; an exception raised by it stops the selection. Same seed, same indices.
    """
    n, dim = _check_shape(features)
    if not _is_int(size) or not 1 <= size <= n:
        raise CoresetInputError(f"coreset size must be an integer between 1 and the number of patches ({n}), "
                                f"got {size!r}")
    if not _is_int(projection_dim) or projection_dim < 1:
        raise CoresetInputError(f"projection_dim must be a positive integer, got {projection_dim!r}")
    if not _is_int(seed) or seed < 0:
        raise CoresetInputError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(device, str) or not device:
        raise CoresetInputError(f"device must be a string such as 'cpu' or 'cuda', got {device!r}")
    every = max(1, size // _PROGRESS_STEPS)
    if device.split(":")[0] == "cpu":
        points, start = selection_points(features, projection_dim, seed)
        return _greedy_pruned(points, start, size, progress, every)
    rng = np.random.default_rng(seed)
    start = int(rng.integers(n))
    points_t = _prepare_torch(features, projection_dim, rng, device)
    return _greedy_dense_torch(points_t, start, size, progress, every)


def selection_points(features: FeatureArray, projection_dim: int = 128,
                     seed: int = 0) -> Tuple[np.ndarray, int]:
    """The float32 points the greedy measures distances between, and its seeded start, as greedy_coreset.

    The points are `features` themselves (no copy if already float32 C-order) when D <= projection_dim, else
    their seeded Gaussian projection to projection_dim dimensions. Benchmarks and tests use this to run other
    selection loops on exactly the same points.
    """
    n, _ = _check_shape(features)
    if not _is_int(projection_dim) or projection_dim < 1:
        raise CoresetInputError(f"projection_dim must be a positive integer, got {projection_dim!r}")
    if not _is_int(seed) or seed < 0:
        raise CoresetInputError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(seed)
    start = int(rng.integers(n))  # drawn before the projection, so the start does not depend on D
    return _prepare_numpy(_as_numpy(features), projection_dim, rng), start


def coverage_radius(features: FeatureArray, indices: Any, chunk_size: int = 2048) -> float:
    """max over all rows of `features` of the Euclidean distance to the nearest row in `indices`.

    Computed in the original feature space, `chunk_size` rows at a time against blocks of centres (never an
    N x N matrix). A float32 matrix product finds each row's nearest-centre distance to within a proven
    rounding bound; the rows that may attain the maximum are then recomputed exactly in float64.
    """
    n, dim = _check_shape(features)
    array = _as_numpy(features)
    if not _is_int(chunk_size) or chunk_size < 1:
        raise CoresetInputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.size == 0 or idx.dtype.kind not in "iu":
        raise CoresetInputError(f"indices must be a non-empty 1-D integer array, got shape {idx.shape} of "
                                f"{idx.dtype}")
    if idx.min() < 0 or idx.max() >= n:
        raise CoresetInputError(f"indices must lie in [0, {n}), got values from {idx.min()} to {idx.max()}")
    centres64 = np.asarray(array[idx], dtype=np.float64)
    if not np.isfinite(centres64).all():
        raise CoresetInputError("the selected feature rows contain NaN or infinite values")
    # Centring on the centres' mean shrinks the norms, hence the cancellation error of |x|^2 + |c|^2 - 2 x.c.
    mean = centres64.mean(axis=0)
    centres = (centres64 - mean).astype(np.float32)
    centre_norms = np.einsum("ij,ij->i", centres, centres, dtype=np.float64).astype(np.float32)
    max_centre_norm = float(centre_norms.max())
    block = max(1, (1 << 22) // chunk_size)  # centres per block: chunk x block float32 stays about 16 MB
    gamma = 4.0 * (dim + 4) * _U32
    approx = np.empty(n, dtype=np.float64)
    error = np.empty(n, dtype=np.float64)
    for start in range(0, n, chunk_size):
        rows = np.asarray(array[start:start + chunk_size], dtype=np.float64) - mean
        if not np.isfinite(rows).all():
            _raise_not_finite(start, rows)
        rows32 = rows.astype(np.float32)
        row_norms = np.einsum("ij,ij->i", rows32, rows32, dtype=np.float64).astype(np.float32)
        best = np.full(rows32.shape[0], np.inf, dtype=np.float32)
        for c0 in range(0, centres.shape[0], block):
            d2 = rows32 @ centres[c0:c0 + block].T
            d2 *= -2.0
            d2 += row_norms[:, None]
            d2 += centre_norms[None, c0:c0 + block]
            np.minimum(best, d2.min(axis=1), out=best)
        stop = start + rows32.shape[0]
        approx[start:stop] = np.maximum(best, 0.0)
        # Each squared distance is off by at most gamma * (|x|^2 + |c|^2) (dot products and norms in float32).
        error[start:stop] = gamma * (row_norms.astype(np.float64) + max_centre_norm) + 1e-30
    floor = float(np.max(approx - error))
    contenders = np.flatnonzero(approx + error >= floor)
    exact = 0.0
    for start in range(0, contenders.size, 256):
        rows = np.asarray(array[contenders[start:start + 256]], dtype=np.float64)
        for row in rows:
            diff = centres64 - row
            exact = max(exact, float(np.min(np.einsum("ij,ij->i", diff, diff))))
    return math.sqrt(exact)


# ------------------------------------------------------------------------------------- exact float32 kernel


def row_distances(rows: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """float32 Euclidean distances from each row to one centre: the kernel of the plain greedy loop.

    Each row's result depends on that row only (the sum runs along the row, whatever the number of rows or
    their alignment in memory), so distances computed for a subset of rows are bit-identical to the same rows'
    distances computed in a full pass: this is what lets the pruned greedy reproduce the plain loop exactly.
    """
    return _finish_distances(np.subtract(rows, centre, dtype=np.float32))


def _distances_at(points: np.ndarray, indices: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """row_distances(points[indices], centre), gathering at most _ROWS_PER_CHUNK rows at a time."""
    if indices.size > _ROWS_PER_CHUNK:
        return np.concatenate([_distances_at(points, indices[i:i + _ROWS_PER_CHUNK], centre)
                               for i in range(0, indices.size, _ROWS_PER_CHUNK)])
    diff = np.take(points, indices, axis=0)
    np.subtract(diff, centre, out=diff)
    return _finish_distances(diff)


def _finish_distances(diff: np.ndarray) -> np.ndarray:
    squared: np.ndarray = np.einsum("ij,ij->i", diff, diff)
    distances: np.ndarray = np.sqrt(squared, out=squared)
    return distances


def _full_distances(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    out = np.empty(points.shape[0], dtype=np.float32)
    for start in range(0, points.shape[0], _ROWS_PER_CHUNK):
        out[start:start + _ROWS_PER_CHUNK] = row_distances(points[start:start + _ROWS_PER_CHUNK], centre)
    return out


# -------------------------------------------------------------------------------------- pruned exact greedy


def _segment_ranges(starts: np.ndarray, lengths: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Positions of the concatenated ranges [start, start + length), and each segment's offset in them."""
    offsets = np.cumsum(lengths) - lengths
    positions = np.arange(int(lengths.sum()), dtype=np.int64)
    positions += np.repeat(starts - offsets, lengths)
    return positions, offsets


def _segment_max_first(values: np.ndarray, labels: np.ndarray, lengths: np.ndarray,
                       missing_label: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per segment: the largest value and the smallest label attaining it (-1 and -1 when empty)."""
    best = np.full(lengths.shape[0], -1.0, dtype=np.float32)
    first = np.full(lengths.shape[0], -1, dtype=np.int64)
    filled = np.flatnonzero(lengths > 0)
    if filled.size == 0:
        return best, first
    offsets = (np.cumsum(lengths) - lengths)[filled]  # reduceat would read one element for an empty segment
    best[filled] = np.maximum.reduceat(values, offsets)
    candidates = np.where(values == np.repeat(best, lengths), labels, missing_label)
    first[filled] = np.minimum.reduceat(candidates, offsets)
    return best, first


class _Clusters:
    """Points grouped by their nearest centre: each cluster is a contiguous segment of one index buffer.

    A segment only shrinks after its cluster is created (points move to newer centres), so it is compacted
    in place; a new cluster is appended at the tail, and the whole buffer is compacted when the tail reaches
    its end. Holds 2N indices at most.
    """

    def __init__(self, num_points: int, max_clusters: int) -> None:
        self.buffer = np.empty(2 * num_points + 64, dtype=np.int64)
        self.start = np.zeros(max_clusters, dtype=np.int64)
        self.length = np.zeros(max_clusters, dtype=np.int64)
        self.tail = 0

    def append(self, cluster: int, members: np.ndarray) -> None:
        if self.tail + members.size > self.buffer.size:
            self._compact(cluster)
        self.start[cluster] = self.tail
        self.length[cluster] = members.size
        self.buffer[self.tail:self.tail + members.size] = members
        self.tail += members.size

    def gather(self, clusters: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The members of `clusters`, concatenated in that order, and each cluster's member count."""
        lengths = self.length[clusters]
        positions, _ = _segment_ranges(self.start[clusters], lengths)
        return self.buffer[positions], lengths

    def rewrite(self, clusters: np.ndarray, kept: np.ndarray, kept_lengths: np.ndarray) -> None:
        """Shrink each cluster to its members in `kept` (concatenated in cluster order)."""
        positions, _ = _segment_ranges(self.start[clusters], kept_lengths)
        self.buffer[positions] = kept
        self.length[clusters] = kept_lengths

    def _compact(self, clusters_so_far: int) -> None:
        members, lengths = self.gather(np.arange(clusters_so_far))
        self.buffer[:members.size] = members
        self.start[:clusters_so_far] = np.cumsum(lengths) - lengths
        self.tail = members.size


class _Centres:
    """The centres chosen so far, and which of them a new centre can be close to.

    Centre-to-centre distances come from matrix-vector products |a|^2 + |c|^2 - 2 a.c on coordinates
    centred on the data mean (small norms, small cancellation error), minus a proven float32 error bound, so
    they are lower bounds. So that a step need not touch every centre, the first `heads` centres are group
    heads: every later centre is filed under its nearest head with an upper bound of its distance to it, and
    d(j, c) >= d(c, head(j)) - d(j, head(j)) rules most centres out from d(c, heads) alone.
    """

    def __init__(self, points: np.ndarray, capacity: int, heads: int) -> None:
        dim = points.shape[1]
        self.points = points
        self.mean = points.mean(axis=0, dtype=np.float64).astype(np.float32)
        self.centred = np.empty((capacity, dim), dtype=np.float32)
        self.norms = np.empty(capacity, dtype=np.float32)
        self.group = np.zeros(capacity, dtype=np.int64)
        self.to_head = np.full(capacity, np.inf, dtype=np.float64)  # upper bound of d(centre, its head)
        self.heads = min(heads, capacity)
        # Bound on the float32 error of |a|^2 + |c|^2 - 2 a.c (centring, dot products, sums), relative to
        # |a|^2 + |c|^2; generous, since a looser bound only costs a few more exact checks.
        self.gamma = 8.0 * (dim + 8) * _U32

    def add(self, slot: int, point: int) -> None:
        self.centred[slot] = self.points[point] - self.mean
        self.norms[slot] = np.dot(self.centred[slot], self.centred[slot])
        if slot < self.heads:
            self.group[slot] = slot
            self.to_head[slot] = 0.0

    def _bounds(self, rows: Union[slice, np.ndarray], slot: int) -> Tuple[np.ndarray, np.ndarray]:
        """Lower bounds of the squared distances of centres `rows` to centre `slot`, and approximations."""
        block = self.centred[rows] if isinstance(rows, slice) else np.take(self.centred, rows, axis=0)
        dots = block @ self.centred[slot]
        norm_sum = self.norms[rows] + self.norms[slot]
        approx = norm_sum - 2.0 * dots
        return approx - self.gamma * norm_sum, approx

    def near(self, slot: int, reach: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Centres j < slot whose distance to centre `slot` may be below reach[j] (a lower bound of it, each).

        `reach` holds float64 values for the centres 0..slot-1, -inf for those to leave out.
        """
        if slot <= self.heads:
            lower2, _ = self._bounds(slice(0, slot), slot)
            lower = np.sqrt(np.maximum(lower2, 0.0), dtype=np.float64)
            chosen = np.flatnonzero(lower < reach)
            return chosen, lower[chosen]
        head_lower2, head_approx = self._bounds(slice(0, self.heads), slot)
        head_lower = np.sqrt(np.maximum(head_lower2, 0.0), dtype=np.float64)
        nearest = int(np.argmin(head_approx))
        self.group[slot] = nearest
        self.to_head[slot] = math.sqrt(float(head_approx[nearest]) + self.gamma * float(
            self.norms[nearest] + self.norms[slot])) * (1.0 + 4.0 * _U32)
        maybe = np.flatnonzero(head_lower[self.group[:slot]] - self.to_head[:slot] < reach)
        lower2, _ = self._bounds(maybe, slot)
        lower = np.sqrt(np.maximum(lower2, 0.0), dtype=np.float64)
        keep = lower < reach[maybe]
        return maybe[keep], lower[keep]


def _head_count(size: int) -> int:
    """How many centres index the others (see _Centres): 8 sqrt(size), 1024 for bottle at 10%."""
    return max(256, int(8 * math.sqrt(size)))


def _greedy_pruned(points: np.ndarray, start: int, size: int, progress: Optional[Progress],
                   every: int, keys: Optional[np.ndarray] = None) -> np.ndarray:
    """Exact greedy k-center on float32 points, skipping the distances the triangle inequality rules out.

    Invariant: mind[x] is row_distances(x, its centre) for every point x, exactly as the plain loop holds it
    (its min over all centres is the distance to the first centre attaining it). A new centre c can lower
    mind[x] only if d(x, c) < mind[x]; since d(x, c) >= d(a, c) - mind[x] for x's centre a, that needs
    d(a, c) < 2 mind[x]. The tests use 2 (1 + eps), eps far above the float32 rounding of the distances, so
    no point whose computed distance would be smaller is ever skipped: the selection is the plain loop's.

    `keys`, when given (float32 [size]), receives each centre's distance to the earlier ones when it was
    chosen (the coverage radius just before that step; inf for the start): a non-increasing sequence.
    """
    n, dim = points.shape
    eps = 1e-3 + 2.0 * (dim + 4) * _U32
    selected = np.empty(size, dtype=np.int64)
    selected[0] = start
    mind = _full_distances(points, points[start])
    mind[start] = 0.0
    radius = np.full(size, -1.0, dtype=np.float32)  # per cluster: max mind over its members, -1 when empty
    far = np.full(size, -1, dtype=np.int64)  # per cluster: lowest index among the members attaining radius
    reach = np.full(size, -np.inf, dtype=np.float64)  # per cluster: 2 (1 + eps) radius, -inf when no use
    centres = _Centres(points, size, _head_count(size))
    clusters = _Clusters(n, size)

    def set_radius(slots: np.ndarray, values: np.ndarray, firsts: np.ndarray) -> None:
        radius[slots] = values
        far[slots] = firsts
        reach[slots] = np.where(values > 0.0, values.astype(np.float64) * (2.0 * (1.0 + eps)), -np.inf)

    centres.add(0, start)
    if keys is not None:
        keys[0] = np.inf
    members = np.concatenate([np.arange(start, dtype=np.int64), np.arange(start + 1, n, dtype=np.int64)])
    clusters.append(0, members)
    set_radius(np.array([0]), *_segment_max_first(mind[members], members, np.array([members.size]), n))
    if progress is not None:
        progress(1, size)

    for t in range(1, size):
        live = radius[:t]
        owner = int(np.argmax(live))
        best = live[owner]
        if np.count_nonzero(live == best) > 1:  # ties: the plain loop takes the lowest point index
            tied = np.flatnonzero(live == best)
            owner = int(tied[np.argmin(far[tied])])
        centre = int(far[owner])
        selected[t] = centre
        if keys is not None:
            keys[t] = best
        centres.add(t, centre)

        if best > 0.0:
            candidates, lower = centres.near(t, reach[:t])
            if not np.any(candidates == owner):  # cannot happen in exact arithmetic: d(owner, c) = best
                candidates = np.append(candidates, owner)
                lower = np.append(lower, 0.0)
            pts, lengths = clusters.gather(candidates)
            # x may get closer to c only if d(a, c) < 2 (1 + eps) mind[x]; the others are skipped unseen.
            bound = (lower / (2.0 * (1.0 + eps))).astype(np.float32)
            maybe = np.flatnonzero(mind[pts] > np.repeat(bound, lengths))
            maybe_pts = pts[maybe]
            if maybe_pts.size * 4 > n:  # a sequential full pass beats gathering that many scattered rows
                dist = _full_distances(points, points[centre])[maybe_pts]
            else:
                dist = _distances_at(points, maybe_pts, points[centre])
            closer = dist < mind[maybe_pts]
            moved_at = maybe[closer]
            moved = maybe_pts[closer]
            mind[moved] = dist[closer]
        else:  # everything is covered: the centre only leaves its cluster
            candidates = np.array([owner], dtype=np.int64)
            pts, lengths = clusters.gather(candidates)
            moved_at = np.flatnonzero(pts == centre)
            moved = pts[moved_at]
        mind[centre] = 0.0

        keep = np.ones(pts.size, dtype=bool)
        keep[moved_at] = False
        keep[pts == centre] = False
        kept = pts[keep]
        kept_lengths = np.zeros_like(lengths)
        filled = lengths > 0
        if pts.size:
            offsets = (np.cumsum(lengths) - lengths)[filled]
            kept_lengths[filled] = np.add.reduceat(keep, offsets, dtype=np.int64)
        clusters.rewrite(candidates, kept, kept_lengths)
        set_radius(candidates, *_segment_max_first(mind[kept], kept, kept_lengths, n))

        joined = moved[moved != centre]
        clusters.append(t, joined)
        if joined.size:
            set_radius(np.array([t]), *_segment_max_first(mind[joined], joined, np.array([joined.size]), n))
        if progress is not None and ((t + 1) % every == 0 or t + 1 == size):
            progress(t + 1, size)
    return selected


# ----------------------------------------------------------------------------- plain loop on a torch device


def _prepare_torch(features: FeatureArray, projection_dim: int, rng: np.random.Generator,
                   device: str) -> "torch.Tensor":
    """float32 points on `device`, projected there when wider than projection_dim (same matrix as on CPU)."""
    import torch

    try:
        target = torch.device(device)
    except RuntimeError as error:
        raise CoresetInputError(f"unknown device {device!r}: {error}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise CoresetInputError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    if _is_torch_tensor(features):
        tensor = cast(torch.Tensor, features)
        if tensor.is_complex() or tensor.dtype == torch.bool:
            raise CoresetInputError(f"features must hold real numbers, got dtype {tensor.dtype}")
        source = tensor.detach()
    else:
        array = _as_numpy(features)
        source = torch.from_numpy(np.ascontiguousarray(array))
    n, dim = source.shape
    matrix = None
    width = dim
    if dim > projection_dim:
        matrix = torch.from_numpy(_gaussian_projection(dim, projection_dim, rng)).to(target)
        width = projection_dim
    points = torch.empty((n, width), dtype=torch.float32, device=target)
    for start in range(0, n, _ROWS_PER_CHUNK):
        block = source[start:start + _ROWS_PER_CHUNK].to(device=target, dtype=torch.float32)
        finite = torch.isfinite(block).all(dim=1)
        if not bool(finite.all()):
            bad_row = start + int(torch.nonzero(~finite)[0, 0])
            raise CoresetInputError(f"features contain NaN or infinite values (first in patch row {bad_row})")
        points[start:start + block.shape[0]] = block if matrix is None else block @ matrix
    return points


def _greedy_dense_torch(points: "torch.Tensor", start: int, size: int, progress: Optional[Progress],
                        every: int) -> np.ndarray:
    """The plain greedy loop: one full distance pass per centre, on the device, no host sync but progress."""
    import torch

    selected = torch.empty(size, dtype=torch.int64, device=points.device)
    selected[0] = start
    # -inf marks selected points, so argmax never returns one of them again (even when all distances are 0).
    mind = torch.linalg.vector_norm(points - points[start], dim=1)
    mind[start] = float("-inf")
    if progress is not None:
        progress(1, size)
    for t in range(1, size):
        centre = torch.argmax(mind).reshape(1)
        selected[t:t + 1] = centre
        dist = torch.linalg.vector_norm(points - points.index_select(0, centre), dim=1)
        torch.minimum(mind, dist, out=mind)
        mind.index_fill_(0, centre, float("-inf"))
        if progress is not None and ((t + 1) % every == 0 or t + 1 == size):
            progress(t + 1, size)
    return selected.cpu().numpy()
