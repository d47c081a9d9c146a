"""The torch-free runtime against the exporter's torch reference (exact search, float64 distances).

Real images (elpv solar cells when installed), a real bundle (tests' `tiny_bundle`), the runtime's default path
(ONNX Runtime features, HNSW search with exact re-ranking) and its exact-search path: image scores must agree
within 1e-4 relative and the anomaly maps within 1e-4 of their range.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import pytest

from conftest import elpv_images_dir
from patchcore_edge.bundle import load_array, read_manifest
from patchcore_edge.preprocess import InputSpec, geometry, map_to_image
from patchcore_edge.runtime.detector import Detector

torch = pytest.importorskip("torch")

RELATIVE = 1e-4


def _test_images() -> List[np.ndarray]:
    """Images the bundle never saw, in sizes unlike the training ones (non-square, larger, smaller)."""
    import cv2

    sizes = [(120, 96), (96, 150), (300, 260), (80, 80), (200, 90), (96, 96)]
    source = elpv_images_dir()
    if source is not None:
        paths = sorted(source.glob("*.png"))[40:40 + len(sizes)]
        grey = [cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) for path in paths]
        images = [cv2.cvtColor(g, cv2.COLOR_GRAY2RGB) for g in grey]
    else:
        rng = np.random.default_rng(5)
        images = [np.clip(rng.normal(128, 30, (128, 128, 3)), 0, 255).astype(np.uint8) for _ in sizes]
    return [cv2.resize(image, size, interpolation=cv2.INTER_AREA) for image, size in zip(images, sizes)]


@pytest.fixture(scope="module")
def reference(tiny_bundle: Path):  # type: ignore[no-untyped-def]
    from patchcore_edge.export.features import build_extractor
    from patchcore_edge.export.reference import reference_scores

    manifest = read_manifest(tiny_bundle)
    spec = InputSpec.from_manifest(manifest["input"])
    extractor, info = build_extractor(manifest["backbone"]["name"], None, spec, int(manifest["features"]["dim"]),
                                      layers=tuple(manifest["layers"]))
    assert info.backbone_manifest()["weights"] == manifest["backbone"]["weights"]
    size, dim = int(manifest["method"]["params"]["coreset"]["size"]), int(manifest["features"]["dim"])
    bank = load_array(tiny_bundle, "memory_bank.npy", np.float32, (size, dim))
    b = int(manifest["method"]["params"]["reweight_neighbours"])
    neighbours = load_array(tiny_bundle, "bank_neighbours.npy", np.int32, (size, b))
    images = _test_images()
    scores = reference_scores(extractor, images, spec, bank, neighbours, float(manifest["score"]["gaussian_sigma"]))
    return images, spec, scores


@pytest.mark.parametrize("exact_search", [False, True], ids=["hnsw+rerank", "exact"])
def test_runtime_matches_the_torch_reference(tiny_bundle: Path, reference, exact_search: bool) -> None:  # type: ignore[no-untyped-def]
    images, spec, expected = reference
    detector = Detector.load(tiny_bundle, backend="onnxruntime", exact_search=exact_search)
    try:
        results = detector.predict_batch(images)
    finally:
        detector.close()
    scores = np.array([r.score for r in results])
    reference_scores = np.array([e.score for e in expected])
    assert len(set(np.round(reference_scores, 3))) > 1, "test images should not all score alike"
    np.testing.assert_allclose(scores, reference_scores, rtol=RELATIVE, atol=0)
    np.testing.assert_allclose([r.max_patch_distance for r in results], [e.max_distance for e in expected],
                               rtol=RELATIVE, atol=0)
    for image, result, ref in zip(images, results, expected):
        geo = geometry(image.shape[0], image.shape[1], spec)
        expected_map = map_to_image(ref.crop_map, geo)
        assert result.anomaly_map is not None and result.anomaly_map.shape == image.shape[:2]
        span = float(expected_map.max() - expected_map.min()) or 1.0
        np.testing.assert_allclose(result.anomaly_map, expected_map, rtol=0, atol=RELATIVE * span)
