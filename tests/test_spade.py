"""SPADE: the exact k-NN and score math on small arrays with known answers, array validation, and the numpy
scorer against the exporter's torch reference on real MVTec bottle images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import onnx_outputs
from patchcore_edge.methods.spade import (SpadeArrayError, SpadeParams, SpadeScorer, exact_knn,
                                          leave_one_out_image_scores)


def test_exact_knn_returns_the_true_neighbours_in_order(rng: np.random.Generator) -> None:
    rows = rng.normal(size=(200, 7)).astype(np.float32) + 5.0  # a shared offset, as ReLU features have
    queries = rng.normal(size=(13, 7)).astype(np.float32) + 5.0
    distances, idx = exact_knn(queries, rows, 4)
    full = np.linalg.norm(queries[:, None].astype(np.float64) - rows[None], axis=2)
    np.testing.assert_array_equal(idx, np.argsort(full, axis=1)[:, :4])
    np.testing.assert_allclose(distances, np.sort(full, axis=1)[:, :4], rtol=1e-6)
    with pytest.raises(ValueError, match="k <= 200"):
        exact_knn(queries, rows, 201)


def _toy_scorer(k: int = 2, kappa: int = 1) -> SpadeScorer:
    # Three training images; global features on a line at 0, 1, 10; grids 1 x 2 with 1-d features.
    global_features = np.array([[0.0], [1.0], [10.0]], dtype=np.float32)
    gallery = np.array([[[[0.0], [1.0]]], [[[2.0], [3.0]]], [[[100.0], [100.0]]]], dtype=np.float32)
    return SpadeScorer(global_features, gallery, SpadeParams(k=k, kappa=kappa, images=3, global_dim=1))


def test_scores_have_the_known_values() -> None:
    scorer = _toy_scorer()
    (result,) = scorer.score_batch(np.array([[0.5]], np.float32), np.array([[[[0.25], [2.5]]]], np.float32))
    assert result.score == pytest.approx(0.5)  # distances 0.5 and 0.5 to images 0 and 1
    assert sorted(result.nearest_images.tolist()) == [0, 1]
    # Gallery of images 0 and 1 only: {0, 1, 2, 3}; image 2's 100s are not searched.
    np.testing.assert_allclose(result.patch_map, [[0.25, 0.5]])
    (two,) = _toy_scorer(kappa=2).score_batch(np.array([[0.5]], np.float32),
                                              np.array([[[[0.25], [2.5]]]], np.float32))
    np.testing.assert_allclose(two.patch_map, [[0.5, 0.5]])  # (0.25 + 0.75) / 2, (0.5 + 0.5) / 2


def test_leave_one_out_scores_exclude_the_image_itself() -> None:
    features = np.array([[0.0], [1.0], [3.0]], dtype=np.float32)
    np.testing.assert_allclose(leave_one_out_image_scores(features, 1), [1.0, 1.0, 2.0])


def test_gallery_disagreeing_with_the_manifest_is_refused() -> None:
    global_features = np.zeros((3, 4), np.float32)
    params = SpadeParams(k=2, kappa=1, images=3, global_dim=4)
    with pytest.raises(SpadeArrayError, match=r"gallery is float32 \(2, 5, 5, 8\), the manifest says \[3, h, w, D\]"):
        SpadeScorer(global_features, np.zeros((2, 5, 5, 8), np.float32), params)
    with pytest.raises(SpadeArrayError, match="global features"):
        SpadeScorer(np.zeros((3, 5), np.float32), np.zeros((3, 5, 5, 8), np.float32), params)
    with pytest.raises(SpadeArrayError, match="k=4 exceeds the 3 training images"):
        SpadeParams.from_manifest({"k": 4, "kappa": 1, "images": 3, "global_dim": 4})
    scorer = SpadeScorer(global_features, np.zeros((3, 5, 5, 8), np.float32), params)
    with pytest.raises(SpadeArrayError, match="grid"):
        scorer.score_batch(np.zeros((1, 4), np.float32), np.zeros((1, 5, 6, 8), np.float32))


def test_runtime_matches_the_torch_reference_on_bottle(bottle: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from patchcore_edge.export.methods.spade import OUTPUTS, build_spade_network, fit_spade, reference_spade_scores
    from patchcore_edge.export.transform import torch_preprocess
    from patchcore_edge.imageio import read_rgb
    from patchcore_edge.preprocess import InputSpec
    from patchcore_edge.maps import anomaly_map

    spec = InputSpec(resize=72, crop=64)
    network, info = build_spade_network("mobilenet_v2", None, spec)
    train = [read_rgb(p) for p in sorted((bottle / "train" / "good").glob("*.png"))[:12]]
    tests = [read_rgb(p) for p in sorted((bottle / "test" / "broken_large").glob("*.png"))[:3]]
    tests += [read_rgb(p) for p in sorted((bottle / "test" / "good").glob("*.png"))[:3]]
    with torch.no_grad():
        grids, pooled = network(torch.stack([torch_preprocess(image, spec) for image in train]))
    fitted = fit_spade(grids.numpy(), pooled.numpy(), k=5)
    scorer = SpadeScorer(fitted.arrays["global_features"], fitted.arrays["gallery"], fitted.params)
    expected = reference_spade_scores(network, tests, spec, fitted.arrays["global_features"],
                                      fitted.arrays["gallery"], fitted.params, sigma=4.0)
    batch = torch.stack([torch_preprocess(image, spec) for image in tests]).numpy()
    outputs = onnx_outputs(network, spec, batch, OUTPUTS, tmp_path)  # the device's features: ONNX Runtime
    results = scorer.score_batch(outputs["global"], outputs["features"])
    scores = np.array([r.score for r in results])
    assert len(set(np.round(scores, 3))) > 1
    np.testing.assert_allclose(scores, [e.score for e in expected], rtol=1e-4)
    assert scores[:3].mean() > scores[3:].mean()  # broken bottles lie further from the training images
    for result, ref in zip(results, expected):
        np.testing.assert_allclose(result.patch_map, ref.patch_map, rtol=1e-4)
        crop_map = anomaly_map(result.patch_map, spec.crop, 4.0)
        span = float(ref.crop_map.max() - ref.crop_map.min()) or 1.0
        np.testing.assert_allclose(crop_map, ref.crop_map, rtol=0, atol=1e-4 * span)
