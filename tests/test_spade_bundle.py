"""`export --method spade` makes a bundle that every command handles: run, calibrate, eval, engine build,
devices fit; the runtime (ONNX Runtime + numpy) matches the torch reference through the exported bundle; a
gallery disagreeing with the manifest is refused with one line. A real bundle of 10 bottle images at 64 px."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import (assert_matches_reference, bottle_images, calibrate_and_decide, export_cli_bundle,
                      mini_category, rewrite_method_array)
from patchcore_edge.bundle import Bundle, BundleError
from patchcore_edge.cli import main
from patchcore_edge.methods.spade import SpadeMethod, SpadeParams, SpadeScorer
from test_trt_double import fake  # noqa: F401  (the TensorRT test double, a fixture)

ORT = ["--backend", "onnxruntime"]


@pytest.fixture(scope="module")
def spade(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, str]:
    # Default K=50 on 10 images: capped and recorded; float16 gallery: its error measured and recorded.
    return export_cli_bundle(tmp_path_factory.mktemp("spade"), "spade", "--method-param", "gallery_dtype=float16")


def _records(text: str) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]


def test_export_records_k_the_gallery_and_the_float16_error(spade: Tuple[Path, str]) -> None:
    path, output = spade
    bundle = Bundle.load(path)
    params = bundle.method.params
    assert bundle.method.name == "spade" and bundle.features.outputs == ("features", "global")
    assert params["k"] == 10 and params["k_requested"] == 50 and params["images"] == 10
    assert params["kappa"] == 1 and params["gallery_dtype"] == "float16"
    gallery = bundle.method.arrays["gallery"]
    assert gallery.dtype == "float16" and gallery.shape == (10, 8, 8, bundle.features.dim)
    error = params["float16_error"]
    assert error["images"] == 8 and 0 < error["max_relative_map_difference"] < 1e-2
    assert error["max_relative_image_score_difference"] == 0.0
    assert bundle.training_scores is not None and bundle.training_scores["n"] == 10
    assert "K=10 (asked 50, capped by the 10 images)" in output
    assert "MiB of bundle per training image" in output and "float16 error" in output
    assert "coreset" not in output


def test_runtime_matches_the_torch_reference_through_the_bundle(spade: Tuple[Path, str]) -> None:
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from patchcore_edge import Detector
    from patchcore_edge.export.methods.spade import build_spade_network, reference_spade_scores
    from patchcore_edge.imageio import read_rgb

    path, _ = spade
    images = [read_rgb(p) for p in bottle_images("test/broken_large", 3) + bottle_images("test/good", 2)]
    with Detector.load(path, backend="onnxruntime") as detector:
        bundle, spec = detector.bundle, detector.spec
        network, _ = build_spade_network(bundle.backbone["name"], None, spec)
        expected = reference_spade_scores(network, images, spec, bundle.method_array("global_features"),
                                          bundle.method_array("gallery"),
                                          SpadeParams.from_manifest(bundle.method.params), bundle.map_sigma)
        assert_matches_reference(detector, images, expected)
    assert np.mean([e.score for e in expected[:3]]) > np.mean([e.score for e in expected[3:]])


def test_run_writes_json_lines_and_heat_maps(spade: Tuple[Path, str], tmp_path: Path) -> None:
    path, _ = spade
    images = [str(p) for p in bottle_images("test/broken_large", 1) + bottle_images("test/good", 1)]
    result = CliRunner().invoke(main, ["run", str(path), *images, "-o", str(tmp_path / "out"), *ORT])
    assert result.exit_code == 0, result.output
    bad, good = _records(result.stdout)
    assert bad["score"] > good["score"] > 0
    assert Path(bad["outputs"]["heatmap"]).is_file() and Path(good["outputs"]["heatmap"]).is_file()
    # The colour range comes from leave-one-out patch maps, not from the image scores (another scale).
    scale = json.loads((tmp_path / "out" / "run.json").read_text())["map_scale"]
    recorded = Bundle.load(path).map_range
    assert recorded is not None and recorded[0] == 0.0 and recorded[1] > 0
    assert scale["source"] == "manifest score.map_range" and [scale["low"], scale["high"]] == list(recorded)


def test_calibrate_then_run_gives_decisions(spade: Tuple[Path, str], tmp_path: Path) -> None:
    bundle = shutil.copytree(spade[0], tmp_path / "bundle")
    calibrate_and_decide(bundle, tmp_path, bottle_images("test/broken_large", 1)[0])
    assert Bundle.load(bundle).calibration is not None


def test_eval_reports_image_and_pixel_metrics(spade: Tuple[Path, str], tmp_path: Path) -> None:
    report = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", str(spade[0]), str(mini_category(tmp_path)), *ORT, "-q",
                                       "--report", str(report)])
    assert result.exit_code == 0, result.output
    overall = json.loads(report.read_text())["metrics"]
    assert overall["image_auroc"] > 0.5 and overall["pixel_auroc"] > 0.5 and 0 < overall["aupro"] <= 1
    assert "assumes aligned parts" not in result.output  # only PaDiM has that note


def test_engine_build_without_tensorrt_says_so_as_for_patchcore(spade: Tuple[Path, str]) -> None:
    result = CliRunner().invoke(main, ["engine", "build", str(spade[0])])
    assert result.exit_code == 2 and "cannot build a TensorRT engine here" in result.output
    assert "Traceback" not in result.output


def test_engine_build_of_the_two_output_network_serves_both_outputs(fake: Any, spade: Tuple[Path, str],  # noqa: F811
                                                                     tmp_path: Path) -> None:
    """TensorRT played by the double (its engine computes every output with ONNX Runtime): the SPADE network's
    grid and global feature are both built, verified, served and scored as ONNX Runtime does."""
    from patchcore_edge.bundle import read_manifest
    from patchcore_edge.runtime.detector import Detector

    bundle = shutil.copytree(spade[0], tmp_path / "bundle")
    result = CliRunner().invoke(main, ["engine", "build", str(bundle), "--max-batch", "2"])
    assert result.exit_code == 0, result.output
    assert "on all 2 outputs" in result.output and "Traceback" not in result.output
    (entry,) = read_manifest(bundle)["engines"]
    assert sorted(entry["verification"]["outputs"]) == ["features", "global"]
    image = np.random.default_rng(5).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    with Detector.load(bundle, backend="auto", ignore_calibration=True) as with_engine, \
            Detector.load(bundle, backend="onnxruntime", ignore_calibration=True) as reference:
        assert with_engine.scored_with["engine_file"] == entry["file"]
        assert with_engine.predict(image, maps=False).score == pytest.approx(
            reference.predict(image, maps=False).score, rel=1e-5)


def test_devices_fit_counts_the_gallery_and_warns_when_it_does_not_fit(spade: Tuple[Path, str],
                                                                       tmp_path: Path) -> None:
    runner = CliRunner()
    fits = runner.invoke(main, ["devices", "fit", str(spade[0]), "--device", "jetson-orin-nano", "--json"])
    assert fits.exit_code == 0, fits.output
    estimate = json.loads(fits.stdout)
    gallery = 10 * 8 * 8 * Bundle.load(spade[0]).features.dim
    assert estimate["components"]["gallery"] == gallery * 2  # float16
    assert estimate["components"]["gallery_search"] >= gallery * 4 * 2 and estimate["fits"]
    # The same bundle as if it held 300,000 training images (devices fit reads the manifest only).
    big = shutil.copytree(spade[0], tmp_path / "big")
    manifest = json.loads((big / "manifest.json").read_text())
    manifest["method"]["arrays"]["gallery"]["shape"][0] = 300_000
    manifest["method"]["arrays"]["global_features"]["shape"][0] = 300_000
    manifest["method"]["params"]["images"] = 300_000
    (big / "manifest.json").write_text(json.dumps(manifest))
    warned = runner.invoke(main, ["devices", "fit", str(big), "--device", "jetson-orin-nano", "--strict"])
    assert warned.exit_code == 1
    assert "the SPADE gallery holds 300000 training images" in warned.output
    assert "re-export with fewer training images" in warned.output


def test_gallery_disagreeing_with_the_manifest_is_refused_in_one_line(spade: Tuple[Path, str],
                                                                      tmp_path: Path) -> None:
    image = str(bottle_images("test/good", 1)[0])
    cases = [(False, r"gallery.npy: shape \(9, 8, 8, \d+\), expected \(10, 8, 8, \d+\)"),
             (True, r"gallery.npy: gallery has shape \(9, 8, 8, \d+\), the manifest says \(10, 8, 8, \d+\)")]
    for number, (record_shape, message) in enumerate(cases):
        bundle = shutil.copytree(spade[0], tmp_path / f"bad{number}")
        gallery = np.load(bundle / "gallery.npy")
        rewrite_method_array(bundle, "gallery", gallery[:9], record_shape=record_shape)
        from patchcore_edge import Detector

        with pytest.raises(BundleError, match=message):
            Detector.load(bundle, backend="onnxruntime")
        result = CliRunner().invoke(main, ["run", str(bundle), image, *ORT])
        assert result.exit_code == 2 and "Traceback" not in result.output
        (line,) = [text for text in result.stderr.splitlines() if "gallery" in text]
        assert "gallery.npy" in line and line.startswith("Error: cannot load bundle")


def test_positions_that_may_not_score_are_zero_on_the_map() -> None:
    global_features = np.array([[0.0], [1.0]], dtype=np.float32)
    gallery = np.zeros((2, 1, 3, 1), dtype=np.float32)  # grid 1 x 3
    method = SpadeMethod(SpadeScorer(global_features, gallery, SpadeParams(k=1, kappa=1, images=2, global_dim=1)))
    outputs = {"global": np.array([[0.25]], np.float32), "features": np.array([[[[1.0], [5.0], [2.0]]]], np.float32)}
    (free,) = method.score(outputs)
    np.testing.assert_allclose(free.patch_map, [[1.0, 5.0, 2.0]])
    (masked,) = method.score(outputs, valid=np.array([[True, False, True]]))
    np.testing.assert_allclose(masked.patch_map, [[1.0, 0.0, 2.0]])
    assert masked.details["max_patch_distance"] == 2.0
    assert masked.score == free.score == pytest.approx(0.25)  # the image score is the global features' distance
