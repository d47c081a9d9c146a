"""Anomaly detection metrics in numpy: image AUROC, best F1, pixel AUROC and AUPRO (MVTec AD definition).

Every metric is exact: no binning, no sampled thresholds. Ties count half, as in sklearn's roc_auc_score.
A metric that cannot be computed (one class only, no ground-truth regions) comes back as `value=None` with the
reason in words, never as 0.

Pixel metrics keep one `PixelEntry` per image: its nominal scores sorted, and its anomalous scores with the
size of the ground-truth region each belongs to. That is 4 bytes per pixel (8 per anomalous pixel), and
nothing is ever concatenated across images: 83 MVTec maps of 900x900 (67M pixels) hold about 270 MB and need
about 60 MB more while the metrics are computed. The sums run image by image against the (much smaller)
sorted set of anomalous pixels, so the cost is O(N log P) for N nominal and P anomalous pixels.

AUPRO follows the MVTec AD reference evaluation code: connected components of each ground-truth mask with
8-connectivity, PRO(t) = mean over all regions of all images of the fraction of the region scoring >= t,
FPR(t) = fraction of all nominal pixels (of every image, good ones included) scoring >= t, one curve point per
distinct score, trapezoidal integration from FPR 0 up to the limit with linear interpolation at the limit,
divided by the limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

import cv2
import numpy as np

DEFAULT_FPR_LIMIT = 0.3


class Metric(NamedTuple):
    """A metric value, or None and the reason it could not be computed."""

    value: Optional[float]
    reason: Optional[str] = None


class F1Result(NamedTuple):
    """Best F1 over all thresholds; an image is called anomalous when its score >= threshold."""

    f1: Optional[float]
    threshold: Optional[float]
    reason: Optional[str] = None


# ---------------------------------------------------------------------------------------------- image level


def _scores_labels(scores: Sequence[float] | np.ndarray,
                   labels: Sequence[int] | np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"scores and labels must be 1-D and of equal length, got {s.shape} and {y.shape}")
    if s.dtype.kind not in "fiub":
        raise ValueError(f"scores must be numbers, got dtype {s.dtype}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinity")
    if y.size and (y.dtype.kind not in "iub" or not np.all((y == 0) | (y == 1))):
        raise ValueError("labels must be 0 (good) or 1 (anomalous)")
    return s.astype(np.float64, copy=False), y.astype(bool)


def _one_class_reason(n_pos: int, n_neg: int, what: str) -> Optional[str]:
    if n_pos == 0 and n_neg == 0:
        return f"no {what} to evaluate"
    if n_pos == 0:
        return f"only good {what} (no anomalous ones): the metric needs both classes"
    if n_neg == 0:
        return f"only anomalous {what} (no good ones): the metric needs both classes"
    return None


def _twice_pairs_below(sorted_reference: np.ndarray, queries: np.ndarray) -> int:
    """sum over queries q of 2 * #(reference < q) + #(reference == q), exactly (integers)."""
    left = np.searchsorted(sorted_reference, queries, side="left")
    right = np.searchsorted(sorted_reference, queries, side="right")
    return int(left.sum(dtype=np.int64) + right.sum(dtype=np.int64))


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> Metric:
    """Area under the ROC curve: P(anomalous score > good score) + 0.5 * P(equal)."""
    s, y = _scores_labels(scores, labels)
    positives, negatives = s[y], np.sort(s[~y])
    reason = _one_class_reason(positives.size, negatives.size, "images")
    if reason:
        return Metric(None, reason)
    pairs = 2 * positives.size * negatives.size
    return Metric(_twice_pairs_below(negatives, positives) / pairs)


def best_f1(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> F1Result:
    """Highest F1 over every threshold (each distinct score) and that threshold (the highest one on a tie)."""
    s, y = _scores_labels(scores, labels)
    n_pos = int(y.sum())
    reason = _one_class_reason(n_pos, y.size - n_pos, "images")
    if reason:
        return F1Result(None, None, reason)
    order = np.argsort(-s, kind="stable")
    s_desc, y_desc = s[order], y[order]
    true_pos = np.cumsum(y_desc)
    flagged = np.arange(1, s.size + 1)
    # A threshold flags all images of its score at once: only the last index of each run of ties is a point.
    last_of_tie = np.append(s_desc[1:] != s_desc[:-1], True)
    tp, n_flagged = true_pos[last_of_tie], flagged[last_of_tie]
    f1 = 2.0 * tp / (n_flagged + n_pos)
    best = int(np.argmax(f1))
    return F1Result(float(f1[best]), float(s_desc[last_of_tie][best]))


# ---------------------------------------------------------------------------------------------- pixel level


@dataclass(frozen=True)
class PixelEntry:
    """One image's pixels as the pixel metrics need them."""

    nominal: np.ndarray  # scores of pixels outside the ground truth, sorted ascending
    anomalous: np.ndarray  # scores of ground-truth pixels
    region_size: np.ndarray  # int32, for each anomalous pixel the size of its connected region
    n_regions: int

    @property
    def n_pixels(self) -> int:
        return int(self.nominal.size + self.anomalous.size)


def _as_float_map(anomaly_map: np.ndarray) -> np.ndarray:
    m = np.asarray(anomaly_map)
    if m.dtype.kind == "f":
        return m  # float32 stays float32 (half the memory); comparisons with float64 are exact anyway
    if m.dtype.kind in "iub":
        return m.astype(np.float64)
    raise ValueError(f"anomaly map must be numeric, got dtype {m.dtype}")


def pixel_entry(anomaly_map: np.ndarray, mask: Optional[np.ndarray]) -> PixelEntry:
    """Split an anomaly map by its ground-truth mask (None or all zero: good image; non-zero = anomalous)."""
    m = _as_float_map(anomaly_map)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"anomaly map must be a non-empty 2-D array, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("anomaly map contains NaN or infinity")
    if mask is None:
        return PixelEntry(np.sort(m, axis=None), m[:0].ravel(), np.zeros(0, np.int32), 0)
    gt = np.asarray(mask)
    if gt.shape != m.shape:
        raise ValueError(f"mask shape {gt.shape} differs from anomaly map shape {m.shape}")
    gt = gt != 0
    if not gt.any():
        return PixelEntry(np.sort(m, axis=None), m[:0].ravel(), np.zeros(0, np.int32), 0)
    # 8-connectivity, as the MVTec AD reference code (scipy.ndimage.label with a 3x3 structure of ones).
    n_labels, labels = cv2.connectedComponents(gt.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    region_of_pixel = labels[gt]
    sizes = np.bincount(region_of_pixel, minlength=n_labels).astype(np.int32)
    return PixelEntry(np.sort(m[~gt]), m[gt], sizes[region_of_pixel], int(n_labels - 1))


def _kth_largest(chunks: Sequence[np.ndarray], k: int) -> np.generic:
    """The k-th largest value (1-based) of several ascending arrays together, without concatenating them.

    Weighted median of the middle elements of the candidate windows as pivot: each round removes at least a
    quarter of the candidates, so about 60 rounds for 67M values, each costing two binary searches per chunk.
    """
    lo = [0] * len(chunks)
    hi = [c.size for c in chunks]
    while True:
        mids, weights = [], []
        for c, a, b in zip(chunks, lo, hi):
            if b > a:
                mids.append(c[(a + b) // 2])
                weights.append(b - a)
        if not mids:
            raise AssertionError(f"k-th largest: no candidates left (k={k} out of range?)")
        order = np.argsort(mids, kind="stable")
        cumulative = np.cumsum(np.asarray(weights)[order])
        pivot = mids[order[int(np.searchsorted(cumulative, cumulative[-1] / 2.0))]]
        at_least = sum(c.size - int(np.searchsorted(c, pivot, side="left")) for c in chunks)
        above = sum(c.size - int(np.searchsorted(c, pivot, side="right")) for c in chunks)
        if above < k <= at_least:
            return pivot
        if at_least < k:  # the answer is below the pivot
            hi = [min(b, int(np.searchsorted(c, pivot, side="left"))) for c, b in zip(chunks, hi)]
        else:  # at least k values lie above the pivot
            lo = [max(a, int(np.searchsorted(c, pivot, side="right"))) for c, a in zip(chunks, lo)]


def _insertion_bounds(sorted_values: np.ndarray, queries: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """np.searchsorted left and right bounds, with one binary search per query instead of two.

    The bounds differ only where a query equals some value; only those queries are searched a second time.
    """
    right = np.searchsorted(sorted_values, queries, side="right")
    left = right.copy()
    tied = (right > 0) & (sorted_values[np.maximum(right - 1, 0)] == queries)
    if tied.any():
        left[tied] = np.searchsorted(sorted_values, queries[tied], side="left")
    return left, right


def pixel_metrics(entries: Sequence[PixelEntry],
                  fpr_limit: float = DEFAULT_FPR_LIMIT) -> Tuple[Metric, Metric]:
    """(pixel AUROC, AUPRO up to `fpr_limit`) over all pixels of all entries, both exact, in one pass."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    # One dtype for all arrays: a float64 key searched in a float32 array copies the array on every search.
    dtype = np.result_type(np.float32, *[e.nominal.dtype for e in entries],
                           *[e.anomalous.dtype for e in entries])
    chunks = [e.nominal.astype(dtype, copy=False) for e in entries if e.nominal.size]
    n_neg = sum(c.size for c in chunks)
    n_pos = sum(e.anomalous.size for e in entries)
    n_regions = sum(e.n_regions for e in entries)
    if n_pos == 0:
        reason = "no anomalous pixels: no ground-truth mask marks any pixel" if n_neg else "no pixels"
        return Metric(None, reason), Metric(None, reason)
    if n_neg == 0:
        reason = "no nominal pixels: the ground-truth masks cover every pixel, the metric needs both classes"
        return Metric(None, reason), Metric(None, reason)

    values = np.concatenate([e.anomalous for e in entries]).astype(dtype, copy=False)
    weights = 1.0 / np.concatenate([e.region_size for e in entries]).astype(np.float64)
    order = np.argsort(values, kind="stable")
    values, weights = values[order], weights[order]
    # overlap_at[j] = sum of 1/|region| over the anomalous pixels values[j:], so that the PRO at threshold t
    # is overlap_at[first index with value >= t] / n_regions.
    overlap_at = np.zeros(values.size + 1)
    overlap_at[:-1] = np.cumsum(weights[::-1])[::-1]

    # The FPR reaches the limit inside the run of ties of one nominal score, `cut`: nominal pixels above it
    # are integrated in full, the run at `cut` only up to the limit.
    limit = fpr_limit * n_neg
    rank = int(np.floor(limit)) + 1
    cut = _kth_largest(chunks, rank) if rank <= n_neg else dtype.type(-np.inf)

    twice_auroc_pairs = 0
    pro_area = 0.0  # in units of (nominal pixels x regions)
    above_cut = 0
    for chunk in chunks:
        left, right = _insertion_bounds(values, chunk)
        below = int(left.sum(dtype=np.int64) + right.sum(dtype=np.int64))
        twice_auroc_pairs += 2 * values.size * chunk.size - below
        # Each nominal pixel n above the cut is one FPR step of the curve, from PRO(> n) to PRO(>= n).
        start = int(np.searchsorted(chunk, cut, side="right"))
        above_cut += chunk.size - start
        pro_area += 0.5 * float(overlap_at[right[start:]].sum() + overlap_at[left[start:]].sum())
    if rank <= n_neg:
        at_cut = sum(int(np.searchsorted(c, cut, side="right") - np.searchsorted(c, cut, side="left"))
                     for c in chunks)
        pro_before = overlap_at[int(np.searchsorted(values, cut, side="right"))]
        pro_after = overlap_at[int(np.searchsorted(values, cut, side="left"))]
        step = limit - above_cut  # the part of the tie run's FPR step below the limit: 0 <= step < at_cut
        pro_at_limit = pro_before + (pro_after - pro_before) * step / at_cut
        pro_area += 0.5 * (pro_before + pro_at_limit) * step

    pixel_auroc_value = twice_auroc_pairs / (2.0 * n_pos * n_neg)
    aupro_value = pro_area / (n_regions * n_neg * fpr_limit)  # n_regions > 0 since n_pos > 0
    return Metric(pixel_auroc_value), Metric(float(min(max(aupro_value, 0.0), 1.0)))


def _entries(maps: Sequence[np.ndarray], masks: Sequence[Optional[np.ndarray]]) -> List[PixelEntry]:
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} anomaly maps but {len(masks)} masks")
    entries = []
    for i, (m, gt) in enumerate(zip(maps, masks)):
        try:
            entries.append(pixel_entry(m, gt))
        except ValueError as error:
            raise ValueError(f"image {i}: {error}") from None
    return entries


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[Optional[np.ndarray]]) -> Metric:
    """Exact AUROC over every pixel of every map (masks: None or all zero for good images)."""
    return pixel_metrics(_entries(maps, masks))[0]


def aupro(maps: Sequence[np.ndarray], masks: Sequence[Optional[np.ndarray]],
          fpr_limit: float = DEFAULT_FPR_LIMIT) -> Metric:
    """Exact normalised area under the per-region-overlap curve up to `fpr_limit` (MVTec AD definition)."""
    return pixel_metrics(_entries(maps, masks), fpr_limit)[1]
