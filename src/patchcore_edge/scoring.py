"""PatchCore scores from patch features: exact image score via a provable re-rank, re-weighting, pixel map.

Why the re-rank is exact: `PatchSearch.nearest` returns, for every patch, the distance to *some* bank row
(the one the first pass found: k-means cells or hnswlib), so each approximate distance a_i is >= the exact
nearest distance e_i. Patches are sorted by a_i; the top r are searched exactly. If the largest exact value
found, E, is >= a_j for every patch j not yet searched, then e_j <= a_j <= E for all of them, so E is the exact maximum over the image.
Patches tied with E (a_j == E) are searched too, so that the patch chosen as p* (first index attaining the
maximum) is the one a full exact search would choose. Otherwise r doubles (capped at the patches whose a_j
still reaches E) until the condition holds, at worst after every patch was searched exactly.

Why the re-weighted score is the same in every mode (any first pass at any breadth, exact search, any batch): the
weight depends on *which* bank row m* is nearest to p*, and two rows a few ulps apart are picked differently by a
first pass and by BLAS (whose rounding also changes with the batch). So every exact search returns the row fixed by
a rule that depends on the patch features and the bank alone: `PatchSearch.exact_nearest` gives c_j, the smallest
`row_distances` value, the lowest row number among equal ones. When the re-rank stops, every patch whose distance
so far a_j reaches the largest c found, E, has been searched exactly (ties a_j == E included), and every other
patch has c_j <= a_j < E (each a_j is a `row_distances` value to some bank row, so c_j <= a_j bit for bit): no patch
left out can beat or tie E. p* is the lowest patch index attaining E, s* = E and m* its row; patches searched only
for the map (below) were not searched before, so their c_j <= a_j < E cannot change that.

Why calibrated masks are the same in every mode: a pixel of the anomaly map is a weighted mean (weights >= 0,
summing to 1) of the patch distances within `reach` cells of it (`maps.map_reach_cells`). Given the pixel
threshold t (`exact_above`), every patch within 2 * reach cells of a patch whose distance so far exceeds t is
searched exactly. A pixel above t then has a contributing patch above t (a mean cannot exceed its largest
term), whose distance so far is above t too (it only falls when made exact), so all its contributors lie within
2 * reach of that patch and are exact: the pixel has its exact value. A pixel at or below t is at or below it
exactly as well (distances so far are never below exact). So the mask `map > t` equals exact search's. Without
a pixel threshold (no calibration) the patches outside the re-ranked set keep the first pass's distances: the heat
map is an upper bound of exact search's, equal at the maximum, and may change with the first pass and its breadth.

Runs on the device: numpy only. The pixel map from patch distances is `patchcore_edge.maps`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import cv2
import numpy as np

from .search import PatchSearch, row_distances

# Patches searched exactly in the first re-rank round (then doubling): with the cells' first pass 76 of the 83 bottle
# test images need 1, the others 2 (issue 13); each round is one exact search for every unfinished image of a batch.
DEFAULT_RERANK = 1


@dataclass(frozen=True)
class PatchScores:
    """Scores of one image.

    score: PatchCore image score, weight * max_distance.
    max_distance: s* = max over patches of the exact nearest-bank distance.
    patch_distances: float32 [P] nearest-bank distance per patch; exact for the `reranked` patches checked
        exactly (always including the maximum), the first pass's (never smaller than exact) for the
        others.
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
    """Exact PatchCore scores of a batch [B, P, D]: one first-pass query for all B*P patches, then re-rank
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
        # Exact and canonical (search.PatchSearch.exact_nearest), never above the first pass's distance.
        exact, exact_idx = search.exact_nearest(flat[which * patches + cols])
        distances[which, cols] = np.where(keep[which, cols], exact, np.float32(0.0))
        nearest[which, cols] = exact_idx
        done[images] = target[images]
        for i in images:
            best = distances[i, order[i, :done[i]]].max()
            # Patches still able to reach `best` (a_j >= best) are a prefix of the order.
            reachable = int(np.count_nonzero(approx[i] >= best))
            target[i] = done[i] if reachable <= done[i] else min(2 * done[i], reachable)

    # p*: the lowest patch index attaining the largest distance; every patch that could reach it is exact by now
    # (module docstring), so this is the exact-search rule. An image without a valid patch scores 0 at patch 0.
    argmax = distances.argmax(axis=1)
    image_rows = np.arange(batch)
    s_star = distances[image_rows, argmax].astype(np.float32)
    m_star = nearest[image_rows, argmax].astype(np.int64)
    if exact_above is not None and not search.is_exact:
        checked = np.zeros((batch, patches), dtype=bool)
        for image in range(batch):
            checked[image, order[image, :done[image]]] = True
        _exact_near_level(flat, search, distances, nearest, checked, float(exact_above), grid or (1, patches),
                          int(reach))
        distances = np.where(keep, distances, np.float32(0.0))  # the rule may have searched invalid neighbours
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


def _exact_near_level(flat: np.ndarray, search: PatchSearch, distances: np.ndarray, nearest: np.ndarray,
                      checked: np.ndarray, level: float, grid: Tuple[int, int], reach: int) -> None:
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
    distances[which, cols], nearest[which, cols] = search.exact_nearest(flat[which * patches + cols])
