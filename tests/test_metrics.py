"""Each metric against an independent reference: sklearn for AUROC/F1, a slow per-threshold loop for AUPRO."""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import f1_score, roc_auc_score

from patchcore_edge.evaluation.metrics import (
    _kth_largest,
    aupro,
    auroc,
    best_f1,
    pixel_auroc,
    pixel_entry,
    pixel_metrics,
)


def reference_aupro(maps: List[np.ndarray], masks: List[Optional[np.ndarray]], limit: float) -> float:
    """Obviously correct and slow: one (FPR, PRO) point per distinct score; scipy regions, 8-connected."""
    masks = [np.zeros(m.shape, bool) if gt is None else gt != 0 for m, gt in zip(maps, masks)]
    regions = []
    for i, gt in enumerate(masks):
        labelled, n = ndimage.label(gt, structure=np.ones((3, 3), dtype=int))
        regions += [(i, labelled == k) for k in range(1, n + 1)]
    nominal = np.concatenate([m[~gt] for m, gt in zip(maps, masks)]).astype(np.float64)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]).astype(np.float64))[::-1]:
        fprs.append(float(np.mean(nominal >= t)))
        pros.append(float(np.mean([np.mean(maps[i][r] >= t) for i, r in regions])))
    area = 0.0
    for k in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
        if x1 <= limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
            continue
        if x0 < limit:
            y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_limit) * (limit - x0)
        break
    return area / limit


def blob_masks(rng: np.random.Generator, shapes, n_good: int) -> List[Optional[np.ndarray]]:
    masks: List[Optional[np.ndarray]] = []
    for i, (h, w) in enumerate(shapes):
        if i < n_good:
            masks.append(None if i % 2 else np.zeros((h, w), np.uint8))
            continue
        gt = np.zeros((h, w), np.uint8)
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
            gt[y:y + rng.integers(1, 4), x:x + rng.integers(1, 5)] = 255
        # Scattered single pixels: many small regions, some touching others only diagonally.
        gt[rng.random((h, w)) < 0.03] = 1
        masks.append(gt)
    return masks


def noisy_maps(rng: np.random.Generator, masks, decimals: Optional[int],
               dtype=np.float32) -> List[np.ndarray]:
    maps = []
    for gt in masks:
        m = rng.random(gt.shape if gt is not None else (9, 11))
        if gt is not None:
            m = m + 0.6 * (gt != 0)
        if decimals is not None:
            m = np.round(m, decimals)  # many ties
        maps.append(m.astype(dtype))
    return maps


# ---------------------------------------------------------------------------------------------- image level


@pytest.mark.parametrize("decimals", [None, 1])
def test_auroc_matches_sklearn_with_and_without_ties(rng: np.random.Generator,
                                                     decimals: Optional[int]) -> None:
    labels = rng.integers(0, 2, 200)
    scores = rng.normal(size=200) + labels
    if decimals is not None:
        scores = np.round(scores, decimals)
        assert np.unique(scores).size < 100  # the case really has ties
    value, reason = auroc(scores, labels)
    assert reason is None
    assert value == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_known_answers() -> None:
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]).value == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]).value == 0.0
    assert auroc([0.5, 0.5, 0.5], [0, 1, 1]).value == 0.5  # all tied: each pair counts half
    assert auroc([0.1, 0.5, 0.5, 0.9], [0, 0, 1, 1]).value == pytest.approx(0.875)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1], []])
def test_single_class_gives_none_with_reason(labels) -> None:
    scores = np.linspace(0, 1, len(labels))
    for result in (auroc(scores, labels), best_f1(scores, labels)):
        assert result[0] is None
        assert result.reason and ("both classes" in result.reason or "no images" in result.reason)
    assert best_f1(scores, labels).threshold is None


def test_bad_image_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="NaN"):
        auroc([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="equal length"):
        auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
        best_f1([0.1, 0.2], [0, 2])


@pytest.mark.parametrize("decimals", [None, 1])
def test_best_f1_matches_a_sweep_with_sklearn(rng: np.random.Generator, decimals: Optional[int]) -> None:
    labels = rng.integers(0, 2, 120)
    scores = rng.normal(size=120) + 1.2 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    f1, threshold, reason = best_f1(scores, labels)
    assert reason is None
    expected = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    assert f1 == pytest.approx(expected, abs=1e-12)
    assert f1_score(labels, scores >= threshold) == pytest.approx(f1, abs=1e-12)


def test_best_f1_known_answer_and_highest_threshold_on_equal_f1() -> None:
    f1, threshold, _ = best_f1([0.1, 0.2, 0.7, 0.8, 0.9], [0, 0, 1, 1, 1])
    assert (f1, threshold) == (1.0, 0.7)
    # Thresholds 0.9 and 0.5 both give F1 = 2/3 here (1 TP of 2 / 2 TP + 2 FP); the higher one is reported.
    f1, threshold, _ = best_f1([0.9, 0.8, 0.7, 0.5, 0.1], [1, 0, 0, 1, 0])
    assert f1 == pytest.approx(2 / 3)
    assert threshold == 0.9


# ---------------------------------------------------------------------------------------------- pixel level


@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_pixel_auroc_matches_sklearn_on_all_pixels(rng: np.random.Generator, decimals: Optional[int]) -> None:
    shapes = [(9, 11), (13, 7), (12, 12), (10, 15), (8, 20)]
    masks = blob_masks(rng, shapes, n_good=2)
    maps = noisy_maps(rng, masks, decimals)
    labels = np.concatenate([np.zeros(m.size) if gt is None else (gt != 0).ravel()
                             for m, gt in zip(maps, masks)])
    scores = np.concatenate([m.ravel() for m in maps])
    value, reason = pixel_auroc(maps, masks)
    assert reason is None
    assert value == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("decimals", [None, 2, 1])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_slow_reference(rng: np.random.Generator, decimals: Optional[int],
                                      limit: float) -> None:
    shapes = [(9, 11), (13, 7), (12, 12), (10, 15), (8, 20)]
    masks = blob_masks(rng, shapes, n_good=2)
    maps = noisy_maps(rng, masks, decimals)
    value, reason = aupro(maps, masks, fpr_limit=limit)
    assert reason is None
    assert value == pytest.approx(reference_aupro(maps, masks, limit), abs=1e-9)


def test_aupro_known_answers() -> None:
    gt = np.zeros((6, 6), np.uint8)
    gt[1:3, 1:4] = 255
    gt[4, 5] = 1
    assert aupro([gt.astype(float)], [gt]).value == pytest.approx(1.0)  # perfect map
    assert aupro([1.0 - (gt > 0)], [gt]).value == pytest.approx(0.0)  # inverted map

    # 10 nominal pixels 0.0..0.9 and one region of two pixels scored 0.95 and 0.45: PRO is 0.5 until the FPR
    # passes 0.5, then 1.  AUPRO@0.3 = 0.5; AUPRO@1 = (0.5 * 0.5 + 1 * 0.5) / 1 = 0.75.
    scores = np.array([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.45]])
    mask = np.zeros_like(scores, np.uint8)
    mask[0, 10:] = 1
    assert aupro([scores], [mask]).value == pytest.approx(0.5)
    assert aupro([scores], [mask], fpr_limit=1.0).value == pytest.approx(0.75)


def test_aupro_uses_8_connectivity_like_the_mvtec_reference() -> None:
    # One pixel touching a 2x2 block only by a corner: one region of 5 pixels with 8-connectivity (MVTec), two
    # regions (1 + 4 pixels) with 4-connectivity.  Only the corner pixel scores high.
    mask = np.zeros((3, 3), np.uint8)
    mask[0, 0] = 1
    mask[1:, 1:] = 1
    scores = np.where(mask > 0, 0.2, 0.5)
    scores[0, 0] = 1.0
    value = aupro([scores], [mask]).value
    assert value == pytest.approx(0.2)  # 8-connected: PRO = 1/5 while FPR <= 0.3; 4-connected would give 0.5
    assert value == pytest.approx(reference_aupro([scores], [mask], 0.3))


def test_pixel_metrics_accept_mixed_dtypes_exactly(rng: np.random.Generator) -> None:
    masks = blob_masks(rng, [(9, 11), (10, 10), (12, 8)], n_good=1)
    maps64 = noisy_maps(rng, masks, None, dtype=np.float64)
    mixed = [maps64[0].astype(np.float32), maps64[1], maps64[2].astype(np.float32)]
    as64 = [m.astype(np.float64) for m in mixed]
    assert pixel_auroc(mixed, masks).value == pytest.approx(pixel_auroc(as64, masks).value, abs=1e-15)
    assert aupro(mixed, masks).value == pytest.approx(aupro(as64, masks).value, abs=1e-15)


def test_pixel_metrics_without_anomalous_pixels_give_none_with_reason() -> None:
    maps = [np.random.default_rng(1).random((5, 5)) for _ in range(2)]
    for masks in ([None, None], [np.zeros((5, 5)), None]):
        for result in (pixel_auroc(maps, masks), aupro(maps, masks)):
            assert result.value is None
            assert "no anomalous pixels" in (result.reason or "")
    full = [np.ones((5, 5)), np.ones((5, 5))]
    assert "no nominal pixels" in (aupro(maps, full).reason or "")


def test_pixel_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="image 1: mask shape"):
        pixel_auroc([np.zeros((4, 4)), np.zeros((4, 4))], [None, np.zeros((4, 5))])
    with pytest.raises(ValueError, match="NaN"):
        aupro([np.full((3, 3), np.nan)], [np.eye(3)])
    with pytest.raises(ValueError, match="2 anomaly maps but 1 masks"):
        aupro([np.zeros((3, 3))] * 2, [None])
    with pytest.raises(ValueError, match="fpr_limit"):
        pixel_metrics([pixel_entry(np.zeros((3, 3)), np.eye(3))], fpr_limit=0.0)


def test_pixel_entry_counts_regions_and_keeps_nominal_sorted() -> None:
    mask = np.zeros((5, 6), np.uint8)
    mask[0, 0] = 255
    mask[3:5, 3:6] = 7  # any non-zero value marks a defect
    scores = np.arange(30, dtype=np.float32).reshape(5, 6)[::-1]
    entry = pixel_entry(scores, mask)
    assert entry.n_regions == 2
    assert sorted(entry.region_size.tolist()) == [1, 6, 6, 6, 6, 6, 6]
    assert np.all(np.diff(entry.nominal) >= 0) and entry.nominal.size == 23
    assert entry.n_pixels == 30


def test_kth_largest_over_chunks_equals_sorting_everything(rng: np.random.Generator) -> None:
    chunks = [np.sort(np.round(rng.normal(size=n), 1)).astype(np.float32) for n in (1, 50, 0, 333, 7, 120)]
    chunks = [c for c in chunks if c.size]
    everything = np.sort(np.concatenate(chunks))[::-1]
    for k in [1, 2, 5, 100, 256, everything.size - 1, everything.size]:
        assert _kth_largest(chunks, k) == everything[k - 1]
