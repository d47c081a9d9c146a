"""Every input geometry end to end: export (torch) and runtime (ONNX Runtime, OpenCV) agree, letterbox padding
and the outside of a region of interest never score, tiles are stitched and their maximum is the image score."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest

from conftest import make_nominal_folder
from patchcore_edge.bundle import Bundle, read_manifest
from patchcore_edge.preprocess import InputSpec, geometry, map_to_image, patch_validity, region_mask
from patchcore_edge.runtime.detector import Detector

torch = pytest.importorskip("torch")

RELATIVE = 1e-4
ROI = ((0.0, 0.0), (0.5, 0.0), (0.5, 1.0), (0.0, 1.0))  # the left half of the image


def _export(root: Path, name: str, **options: Any) -> Path:
    from patchcore_edge.export.pipeline import ExportOptions, export_bundle

    nominal = root / "nominal"
    if not nominal.exists():
        make_nominal_folder(nominal, count=8, size=96)
    return export_bundle(ExportOptions(nominal_dir=nominal, output=root / name, coreset_ratio=0.25, engine=False,
                                       **options)).bundle


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("geometry")
    return {"letterbox": _export(root, "letterbox", fit="letterbox", input_size=(64, 32)),
            "roi": _export(root, "roi", fit="squash", crop=64, roi=ROI),
            "tile": _export(root, "tile", fit="squash", crop=64, tile=64, tile_overlap=16),
            "nominal": root / "nominal"}


def _reference(bundle: Path, images: List[np.ndarray], valid: Optional[List[Optional[np.ndarray]]] = None
               ) -> Tuple[InputSpec, List[Any]]:
    from patchcore_edge.export.features import build_extractor
    from patchcore_edge.export.reference import reference_scores

    loaded = Bundle.load(bundle)
    spec = loaded.input_spec
    extractor, _ = build_extractor(str(loaded.backbone["name"]), None, spec, loaded.features.dim,
                                   layers=tuple(loaded.layers))
    bank = loaded.method_array("memory_bank")
    neighbours = loaded.method_array("bank_neighbours")
    b = loaded.method.params["reweight_neighbours"]
    assert bank.shape[1] == loaded.features.dim and neighbours.shape == (bank.shape[0], b)
    return spec, reference_scores(extractor, images, spec, bank, neighbours, loaded.map_sigma, valid=valid)


def _images(seed: int, sizes: List[Tuple[int, int]]) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.clip(rng.normal(128, 25, (h, w, 3)), 0, 255).astype(np.uint8) for h, w in sizes]


def test_letterbox_non_square_matches_torch_and_padding_never_scores(bundles: Dict[str, Path]) -> None:
    manifest = read_manifest(bundles["letterbox"])
    assert manifest["input"]["fit"] == "letterbox" and manifest["input"]["size"] == [64, 32]
    assert manifest["features"]["grid"] == [4, 8]  # stride 8 on a 32 x 64 input
    images = _images(1, [(40, 200), (96, 96), (60, 120)])  # 5:1 and 1:1 leave padding, 2:1 fills the input
    spec = InputSpec.from_manifest(manifest["input"])
    valid = [patch_validity(geometry(i.shape[0], i.shape[1], spec), (4, 8)) for i in images]
    assert valid[0] is not None and not valid[0].all() and valid[2] is None
    spec, expected = _reference(bundles["letterbox"], images, valid)
    detector = Detector.load(bundles["letterbox"], backend="onnxruntime")
    try:
        results = detector.predict_batch(images)
    finally:
        detector.close()
    np.testing.assert_allclose([r.score for r in results], [e.score for e in expected], rtol=RELATIVE)
    for image, result, ref in zip(images, results, expected):
        target = map_to_image(ref.crop_map, geometry(image.shape[0], image.shape[1], spec))
        assert result.anomaly_map is not None and result.anomaly_map.shape == image.shape[:2]
        span = float(target.max() - target.min()) or 1.0
        np.testing.assert_allclose(result.anomaly_map, target, rtol=0, atol=RELATIVE * span)


def test_outside_the_region_of_interest_nothing_scores(bundles: Dict[str, Path]) -> None:
    from patchcore_edge.imageio import list_images, read_rgb

    images = [read_rgb(list_images(bundles["nominal"])[0][0])]  # a training image: it scores low as it is
    defect = images[0].copy()
    defect[30:60, 70:90] = 255  # a bright block in the right half, outside the region
    inside = images[0].copy()
    inside[30:60, 10:30] = 255  # the same block inside it
    detector = Detector.load(bundles["roi"], backend="onnxruntime")
    try:
        clean, outside, seen = detector.predict_batch([images[0], defect, inside])
    finally:
        detector.close()
    mask = region_mask(96, 96, detector.spec)
    assert mask is not None
    for result in (clean, outside, seen):
        assert result.anomaly_map is not None and np.all(result.anomaly_map[~mask] == 0.0)
    assert seen.score > 2 * clean.score
    # The block outside only reaches the region through the receptive field of patches near its edge.
    assert outside.score < seen.score


def test_tiles_are_scored_one_by_one_and_stitched(bundles: Dict[str, Path]) -> None:
    manifest = read_manifest(bundles["tile"])
    assert manifest["input"]["tile"] == {"size": 64, "overlap": 16}
    image = _images(3, [(150, 110)])[0]
    image[120:140, 80:100] = 0  # a dark block in the last tile only
    spec = InputSpec.from_manifest(manifest["input"])
    tiles, pieces = spec.pieces(image)
    assert len(tiles) == 3 * 2
    _, expected = _reference(bundles["tile"], pieces)
    detector = Detector.load(bundles["tile"], backend="onnxruntime")
    try:
        result = detector.predict(image)
        (streamed_key, streamed), = list(detector.stream([("a", image)]))
    finally:
        detector.close()
    assert result.score == pytest.approx(max(e.score for e in expected), rel=RELATIVE)
    assert streamed_key == "a" and streamed.score == pytest.approx(result.score, rel=1e-6)
    assert result.anomaly_map is not None and result.anomaly_map.shape == (150, 110)
    worst = int(np.argmax([e.score for e in expected]))
    t = tiles[worst]
    assert t.top <= 130 < t.top + t.height and t.left <= 90 < t.left + t.width
    hot = np.unravel_index(int(np.argmax(result.anomaly_map)), result.anomaly_map.shape)
    assert 100 <= hot[0] < 150 and 60 <= hot[1] < 110


def test_tiled_training_reference_is_per_image(bundles: Dict[str, Path]) -> None:
    """Calibration's drift check compares image scores (max over tiles) with this reference: one per image."""
    manifest = read_manifest(bundles["tile"])
    assert manifest["training_images"]["count"] == 8
    assert manifest["score"]["training_scores"]["n"] == 8  # 8 images of 4 tiles, not 32 tiles


def test_memory_estimate_counts_the_tiles_of_a_frame(bundles: Dict[str, Path]) -> None:
    from click.testing import CliRunner

    from patchcore_edge.cli.devices import devices_group
    from patchcore_edge.devices.memory import estimate_memory, onnx_peak_activation_bytes
    from patchcore_edge.devices.profiles import get_profile

    pytest.importorskip("onnx")
    bundle = Bundle.load(bundles["tile"])
    profile = get_profile("jetson-orin-nano")
    small = estimate_memory(bundle, profile, variant="4GB", backend="onnxruntime", image_size=(64, 64))
    frame = estimate_memory(bundle, profile, variant="4GB", backend="onnxruntime", image_size=(110, 150))
    assert (small["batch"], frame["batch"]) == (1, 6)  # 64 px tiles, 16 px overlap: 2 x 3 on 110 x 150
    six = onnx_peak_activation_bytes(bundles["tile"] / "features.onnx", 6)
    assert six is not None
    assert frame["components"]["activations"] >= 1.3 * six + 150 * 110 * 11
    assert frame["components"]["activations"] > small["components"]["activations"]
    runner = CliRunner()
    refused = runner.invoke(devices_group, ["fit", str(bundles["tile"]), "--device", "jetson-orin-nano"])
    assert refused.exit_code == 2 and "--image-size" in refused.output and "Traceback" not in refused.output
    shown = runner.invoke(devices_group, ["fit", str(bundles["tile"]), "--device", "jetson-orin-nano",
                                          "--image-size", "110", "150"])
    assert shown.exit_code == 0 and "6 tiles of 64 px" in shown.output
