"""PatchCore scores from patch features: exact image score via a provable re-rank, re-weighting, pixel map.

Why the re-rank is exact: `PatchSearch.nearest` returns, for every patch, the distance to *some* bank row
(the one hnswlib found), so each approximate distance a_i is >= the exact nearest distance e_i. Patches are
sorted by a_i; the top r are searched exactly. If the largest exact value found, E, is >= a_j for every
patch j not yet searched, then e_j <= a_j <= E for all of them, so E is the exact maximum over the image.
Patches tied with E (a_j == E) are searched too, so that the patch chosen as p* (first index attaining the
maximum) is the one a full exact search would choose. Otherwise r doubles (capped at the patches whose a_j
still reaches E) until the condition holds, at worst after every patch was searched exactly.

Why the re-weighted score is the same in every mode (HNSW at any ef, exact search, any batch): the weight depends
on *which* bank row m* is nearest to p*, and two rows a few ulps apart are picked differently by hnswlib and by
BLAS (whose rounding also changes with the batch). So p*, s* and m* are finally fixed by a rule that depends on
the patch features and the bank alone: `PatchSearch.canonical_nearest` (the smallest `row_distances` value, the
lowest row number among equal ones) gives c_j for the patches in decreasing order of their distance so far d_j,
until the next d_j is below the largest c found. Every d_j is a `row_distances` value to some bank row, so
c_j <= d_j bit for bit, and no patch left out can beat (or tie) it. p* is the lowest patch index attaining the
largest c_j, s* that value and m* its row.

Why calibrated masks are the same in every mode: a pixel of the anomaly map is a weighted mean (weights >= 0,
summing to 1) of the patch distances within `reach` cells of it (`maps.map_reach_cells`). Given the pixel
threshold t (`exact_above`), every patch within 2 * reach cells of a patch whose distance so far exceeds t is
searched exactly. A pixel above t then has a contributing patch above t (a mean cannot exceed its largest
term), whose distance so far is above t too (it only falls when made exact), so all its contributors lie within
2 * reach of that patch and are exact: the pixel has its exact value. A pixel at or below t is at or below it
exactly as well (distances so far are never below exact). So the mask `map > t` equals exact search's. Without
a pixel threshold (no calibration) the patches outside the re-ranked set keep hnswlib's distances: the heat map
is an upper bound of exact search's, equal at the maximum, and may change with `ef`.

Runs on the device: numpy only. The pixel map from patch distances is `patchcore_edge.maps`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import cv2
import numpy as np

from .search import PatchSearch, row_distances

DEFAULT_RERANK = 8


@dataclass(frozen=True)
class PatchScores:
    """Scores of one image.

    score: PatchCore image score, weight * max_distance.
    max_distance: s* = max over patches of the exact nearest-bank distance.
    patch_distances: float32 [P] nearest-bank distance per patch; exact for the `reranked` patches checked
        exactly (always including the maximum), hnswlib's (never smaller than exact) for the others.
    argmax: index of p* among the P patches. nearest_bank_index: m*, the bank row nearest to p*.
    reranked: how many patches were searched exactly. weight: the re-weighting factor w.
    """

    score: float
    max_distance: float
    patch_distances: np.ndarray
    argmax: int
    nearest_bank_index: int
    reranked: int
    weight: float


def reweight(neighbour_distances: np.ndarray) -> np.ndarray:
    """PatchCore weight w = 1 - exp(d_0) / sum_j exp(d_j) per row of distances [..., b] (d_0: p* to m*).

    Computed as a shifted softmax in float64 so large distances cannot overflow. With b == 1 the paper's
    formula would give w = 0; there is no neighbourhood to compare with, so the weight is 1 (no re-weighting,
    as anomalib does for num_neighbors == 1).
    """
    d = np.asarray(neighbour_distances, dtype=np.float64)
    if d.shape[-1] == 1:
        return np.ones(d.shape[:-1], dtype=np.float64)
    shifted = np.exp(d - d.max(axis=-1, keepdims=True))
    weights: np.ndarray = 1.0 - shifted[..., 0] / shifted.sum(axis=-1)
    return weights


def image_score(patch_features: np.ndarray, search: PatchSearch, reweight_neighbours: np.ndarray,
                rerank: int = DEFAULT_RERANK) -> PatchScores:
    """Exact PatchCore score of one image from its patch features [P, D]."""
    features = np.asarray(patch_features)
    if features.ndim != 2:
        raise ValueError(f"patch features must have shape [P, D], got {features.shape}")
    return image_scores(features[None], search, reweight_neighbours, rerank)[0]


def image_scores(patch_features: np.ndarray, search: PatchSearch, reweight_neighbours: np.ndarray,
                 rerank: int = DEFAULT_RERANK, valid: Optional[np.ndarray] = None, exact_above: Optional[float] = None,
                 grid: Optional[Tuple[int, int]] = None, reach: int = 0) -> List[PatchScores]:
    """Exact PatchCore scores of a batch [B, P, D]: one hnswlib query for all B*P patches, then re-rank
    rounds that search the patches of all unfinished images in one exact call each.

    `valid` (bool [B, P], optional): patches that may score; the others (letterbox padding, outside the region
    of interest) get distance 0: never the maximum, zero in the map; an image without one scores 0.
    exact_above (a pixel threshold), with the patch `grid` [h, w] (h * w == P) and the map's `reach` in cells:
    also search exactly every patch within 2 * reach cells of one whose distance exceeds it (module docstring)."""
    features = np.asarray(patch_features)
    if features.ndim != 3 or features.shape[1] < 1 or features.shape[2] != search.dim:
        raise ValueError(f"patch features must have shape [B, P, {search.dim}], got {features.shape}")
    if rerank < 1:
        raise ValueError(f"rerank must be >= 1, got {rerank}")
    neighbours = np.asarray(reweight_neighbours)
    if neighbours.ndim != 2 or neighbours.shape[0] != search.count or neighbours.shape[1] < 1:
        raise ValueError(f"re-weighting neighbours must have shape [{search.count}, b], got {neighbours.shape}")
    batch, patches, dim = features.shape
    if batch == 0:
        return []
    flat = np.ascontiguousarray(features.reshape(batch * patches, dim), dtype=np.float32)

    approx, approx_idx = search.nearest(flat)
    approx = approx.reshape(batch, patches)
    keep = np.ones((batch, patches), bool) if valid is None else np.asarray(valid, dtype=bool)
    if keep.shape != (batch, patches):
        raise ValueError(f"valid must be bool [{batch}, {patches}], got shape {keep.shape}")
    approx = np.where(keep, approx, np.float32(0.0))
    distances = approx.copy()
    nearest = approx_idx.reshape(batch, patches).copy()
    order = np.argsort(-approx, axis=1, kind="stable")
    # Without an index every distance is already exact: nothing to re-rank.
    done = np.full(batch, patches if search.is_exact else 0, dtype=np.int64)
    target = np.full(batch, patches if search.is_exact else min(rerank, patches), dtype=np.int64)

    while (target > done).any():
        images = np.flatnonzero(target > done)
        rows = [order[i, done[i]:target[i]] for i in images]
        which = np.repeat(images, [len(r) for r in rows])
        cols = np.concatenate(rows)
        exact, exact_idx = search.exact_nearest(flat[which * patches + cols])
        # Keep hnswlib's row where it is strictly closer: both are true distances to bank rows, and this
        # keeps "exact <= approximate" even where rounding in the BLAS expansion picked a near-tie. Equal
        # distances take the exact search's row, as a full exact search would.
        better = exact <= approx[which, cols]
        distances[which, cols] = np.where(keep[which, cols], np.where(better, exact, approx[which, cols]), 0.0)
        nearest[which, cols] = np.where(better, exact_idx, nearest[which, cols])
        done[images] = target[images]
        for i in images:
            best = distances[i, order[i, :done[i]]].max()
            # Patches still able to reach `best` (a_j >= best) are a prefix of the order.
            reachable = int(np.count_nonzero(approx[i] >= best))
            target[i] = done[i] if reachable <= done[i] else min(2 * done[i], reachable)

    if exact_above is not None and not search.is_exact:
        checked = np.zeros((batch, patches), dtype=bool)
        for image in range(batch):
            checked[image, order[image, :done[image]]] = True
        _exact_near_level(flat, search, approx, distances, nearest, checked, float(exact_above),
                          grid or (1, patches), int(reach))
        distances = np.where(keep, distances, np.float32(0.0))  # the rule may have searched invalid neighbours
    argmax, s_star, m_star = _canonical_maximum(flat.reshape(batch, patches, dim), distances, nearest, search,
                                                keep)
    image_rows = np.arange(batch)
    support = neighbours[m_star].astype(np.int64)
    if support.min() < 0 or support.max() >= search.count:
        raise ValueError("re-weighting neighbours hold row numbers outside the memory bank")
    b = support.shape[1]
    p_star = np.repeat(flat[image_rows * patches + argmax], b, axis=0)
    neighbour_distances = row_distances(p_star, search.bank[support.ravel()]).reshape(batch, b)
    # Column 0 is m* itself; use s* so that the formula sees exactly the score's distance.
    neighbour_distances[:, 0] = s_star
    weights = reweight(neighbour_distances).astype(np.float32)
    scores = weights * s_star
    return [PatchScores(score=float(scores[i]), max_distance=float(s_star[i]),
                        patch_distances=distances[i].copy(), argmax=int(argmax[i]),
                        nearest_bank_index=int(m_star[i]), reranked=int(done[i]), weight=float(weights[i]))
            for i in range(batch)]


def _canonical_maximum(features: np.ndarray, distances: np.ndarray, nearest: np.ndarray, search: PatchSearch,
                       keep: np.ndarray) -> tuple:
    """(p*, s*, m*) per image by the mode-independent rule of the module docstring; updates the checked patches'
    entries of `distances` and `nearest` (in place) to their canonical values. Patches outside `keep` never
    count; an image without a valid patch gets s* = 0 at patch 0."""
    batch = features.shape[0]
    argmax = np.empty(batch, dtype=np.int64)
    s_star = np.empty(batch, dtype=np.float32)
    m_star = np.empty(batch, dtype=np.int64)
    for i in range(batch):
        order = np.argsort(-distances[i], kind="stable")
        best, best_patch, best_row = -1.0, -1, -1
        for j in order:
            if distances[i, j] < best:
                break
            if not keep[i, j]:
                continue
            value, row = search.canonical_nearest(features[i, j])
            distances[i, j], nearest[i, j] = value, row
            if value > best or (value == best and j < best_patch):
                best, best_patch, best_row = value, int(j), row
        if best_patch < 0:  # nothing may score
            best_patch, best, best_row = 0, 0.0, int(nearest[i, 0])
        argmax[i], s_star[i], m_star[i] = best_patch, best, best_row
    return argmax, s_star, m_star


def _exact_near_level(flat: np.ndarray, search: PatchSearch, approx: np.ndarray, distances: np.ndarray,
                      nearest: np.ndarray, checked: np.ndarray, level: float, grid: Tuple[int, int], reach: int
                      ) -> None:
    """Search exactly (in place) the unchecked patches within 2 * reach cells of a patch above `level`."""
    batch, patches = distances.shape
    if grid[0] * grid[1] != patches:
        raise ValueError(f"grid {grid} does not hold {patches} patches")
    kernel = np.ones((4 * reach + 1, 4 * reach + 1), dtype=np.uint8)
    above = (distances > level).reshape(batch, grid[0], grid[1]).astype(np.uint8)
    near = np.stack([cv2.dilate(image, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0) if image.any()
                     else image for image in above]).reshape(batch, patches).astype(bool)
    which, cols = np.nonzero(near & ~checked)
    if which.size == 0:
        return
    exact, exact_idx = search.exact_nearest(flat[which * patches + cols])
    better = exact <= approx[which, cols]
    distances[which, cols] = np.where(better, exact, approx[which, cols])
    nearest[which, cols] = np.where(better, exact_idx, nearest[which, cols])
