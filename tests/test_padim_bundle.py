"""`export --method padim` makes a bundle that every command handles (run, calibrate, eval, engine build
through the TensorRT test double, devices fit), on a non-square input (grid h != w); the runtime matches the
torch reference through the bundle; a covariance that is not positive definite is refused with one line; the
leave-one-out training scores equal explicit refits. A real bundle of 10 bottle images at 80 x 64 px."""

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
from patchcore_edge.methods.padim import PadimParams, PadimScorer
from test_trt_double import fake  # noqa: F401  (the TensorRT test double, a fixture)

ORT = ["--backend", "onnxruntime"]


@pytest.fixture(scope="module")
def padim(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, str]:
    return export_cli_bundle(tmp_path_factory.mktemp("padim"), "padim", "--input-size", "80", "64",
                             "--method-param", "d=24", "--seed", "3")


def _records(text: str) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]


def test_export_records_d_the_seed_and_leave_one_out_scores(padim: Tuple[Path, str]) -> None:
    path, output = padim
    bundle = Bundle.load(path)
    params = bundle.method.params
    assert bundle.method.name == "padim" and bundle.features.grid == (8, 10) and bundle.features.dim == 24
    assert params["d"] == 24 and len(params["channels"]) == 24 and params["channel_seed"] == 3
    assert params["regularisation"] == 0.01 and 1 < params["max_condition"] < 1e6
    assert bundle.method.arrays["precision"].shape == (8, 10, 24, 24)
    assert bundle.training_scores is not None and bundle.training_scores["n"] == 10
    assert "d=24 of" in output and "(seed 3)" in output and "assumes aligned parts" in output


def test_leave_one_out_distances_equal_explicit_refits(rng: np.random.Generator) -> None:
    from patchcore_edge.export.methods.padim import fit_padim, leave_one_out_distances

    grids = rng.normal(size=(7, 2, 3, 4)) * np.array([1.0, 3.0, 0.5, 2.0])
    got = leave_one_out_distances(grids, regularisation=0.05)
    for i in range(grids.shape[0]):
        rest = np.delete(grids, i, axis=0)
        fitted = fit_padim(rest, channels=range(4), seed=0, regularisation=0.05)
        mean = rest.mean(axis=0)
        precision = np.linalg.inv(np.einsum("npqi,npqj->pqij", rest - mean, rest - mean) / 5 + 0.05 * np.eye(4))
        diff = grids[i] - mean
        expected = np.sqrt(np.einsum("pqi,pqij,pqj->pq", diff, precision, diff))
        np.testing.assert_allclose(got[i], expected, rtol=1e-9)
        np.testing.assert_allclose(fitted.arrays["mean"], mean, rtol=1e-6)


def test_runtime_matches_the_torch_reference_through_the_bundle(padim: Tuple[Path, str]) -> None:
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from patchcore_edge import Detector
    from patchcore_edge.export.methods.padim import build_padim_network, reference_padim_scores
    from patchcore_edge.imageio import read_rgb

    path, _ = padim
    images = [read_rgb(p) for p in bottle_images("test/broken_large", 3) + bottle_images("test/good", 2)]
    with Detector.load(path, backend="onnxruntime") as detector:
        bundle, spec = detector.bundle, detector.spec
        assert (spec.width, spec.height) == (80, 64)
        params = bundle.method.params
        network, info = build_padim_network(bundle.backbone["name"], None, spec, d=params["d"],
                                            seed=params["channel_seed"])
        assert info["channels"] == params["channels"]
        expected = reference_padim_scores(network, images, spec, bundle.method_array("mean"),
                                          bundle.method_array("precision"), bundle.map_sigma)
        assert_matches_reference(detector, images, expected)
    assert np.mean([e.score for e in expected[:3]]) > np.mean([e.score for e in expected[3:]])


def test_run_calibrate_and_eval(padim: Tuple[Path, str], tmp_path: Path) -> None:
    bundle = shutil.copytree(padim[0], tmp_path / "bundle")
    runner = CliRunner()
    images = [str(p) for p in bottle_images("test/broken_large", 1) + bottle_images("test/good", 1)]
    run = runner.invoke(main, ["run", str(bundle), *images, "-o", str(tmp_path / "out"), *ORT])
    assert run.exit_code == 0, run.output
    bad, good = _records(run.stdout)
    assert bad["score"] > good["score"] > 0 and Path(bad["outputs"]["heatmap"]).is_file()
    report = tmp_path / "eval.json"
    evaluated = runner.invoke(main, ["eval", str(bundle), str(mini_category(tmp_path)), *ORT, "-q", "--report",
                                     str(report)])
    assert evaluated.exit_code == 0, evaluated.output
    assert "caveat (padim): PaDiM assumes aligned parts" in evaluated.stdout
    metrics = json.loads(report.read_text())["metrics"]
    assert metrics["image_auroc"] > 0.5 and metrics["pixel_auroc"] > 0.5
    calibrate_and_decide(bundle, tmp_path, Path(images[0]))


def test_engine_build_without_tensorrt_says_so(padim: Tuple[Path, str]) -> None:
    result = CliRunner().invoke(main, ["engine", "build", str(padim[0])])
    assert result.exit_code == 2 and "cannot build a TensorRT engine here" in result.output


def test_engine_build_through_the_double_registers_and_scores_alike(fake: Any, padim: Tuple[Path, str],  # noqa: F811
                                                                   tmp_path: Path) -> None:
    from patchcore_edge import Detector

    bundle = shutil.copytree(padim[0], tmp_path / "bundle")
    result = CliRunner().invoke(main, ["engine", "build", str(bundle), "--max-batch", "2"])
    assert result.exit_code == 0, result.output
    assert "registered features.cuda-workstation" in result.output
    image = np.random.default_rng(3).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    with Detector.load(bundle, backend="auto") as engine, Detector.load(bundle, backend="onnxruntime") as ort:
        assert engine.backend_name == "tensorrt"
        assert engine.predict(image).score == pytest.approx(ort.predict(image).score, rel=1e-5)


def test_devices_fit_counts_the_gaussians(padim: Tuple[Path, str]) -> None:
    result = CliRunner().invoke(main, ["devices", "fit", str(padim[0]), "--device", "jetson-nano", "--json"])
    assert result.exit_code == 0, result.output
    components = json.loads(result.stdout)["components"]
    assert components["mean"] == 80 * 24 * 4 and components["precision_factors"] == 80 * 24 * 24 * 4


def test_covariance_that_is_not_positive_definite_is_refused_in_one_line(padim: Tuple[Path, str],
                                                                         tmp_path: Path) -> None:
    from patchcore_edge import Detector

    bundle = shutil.copytree(padim[0], tmp_path / "bundle")
    precision = np.load(bundle / "precision.npy")
    precision[0, 3] = -np.eye(24, dtype=np.float32)  # symmetric, negative definite
    rewrite_method_array(bundle, "precision", precision)
    with pytest.raises(BundleError, match=r"precision.npy: the covariance at position 3 is not positive definite"):
        Detector.load(bundle, backend="onnxruntime")
    result = CliRunner().invoke(main, ["run", str(bundle), str(bottle_images("test/good", 1)[0]), *ORT])
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = [text for text in result.stderr.splitlines() if "positive definite" in text]
    assert "re-export the bundle" in line


def test_positions_that_may_not_score_never_give_the_image_score() -> None:
    params = PadimParams(d=1, regularisation=0.0, max_condition=1.0, channel_seed=0, channels=(0,))
    scorer = PadimScorer(np.zeros((1, 3, 1), np.float32), np.ones((1, 3, 1, 1), np.float32), params, size=(3, 1),
                         sigma=0.0)
    grids = np.array([[[[1.0], [9.0], [2.0]]]], np.float32)
    ((free, _),) = scorer.score_batch(grids)
    ((masked, patch_map),) = scorer.score_batch(grids, valid=np.array([[True, False, True]]))
    assert free == 9.0 and masked == 2.0
    np.testing.assert_allclose(patch_map, [[1.0, 0.0, 2.0]])


def test_region_of_interest_and_tiles_work_through_valid(padim: Tuple[Path, str], tmp_path: Path) -> None:
    from patchcore_edge import Detector
    from patchcore_edge.imageio import read_rgb

    variants = {"roi": {"roi": [[0.0, 0.0], [0.5, 0.0], [0.5, 1.0], [0.0, 1.0]]},
                "tiles": {"tile": {"size": 450, "overlap": 0}}}
    for name, change in variants.items():
        bundle = shutil.copytree(padim[0], tmp_path / name)
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["input"].update(change)
        (bundle / "manifest.json").write_text(json.dumps(manifest))
    image = read_rgb(bottle_images("test/broken_large", 1)[0])
    with Detector.load(padim[0], backend="onnxruntime") as whole:
        full = whole.predict(image)
    with Detector.load(tmp_path / "roi", backend="onnxruntime") as left:
        part = left.predict(image)
    assert part.anomaly_map is not None and part.anomaly_map[:, 460:].max() == 0.0
    assert 0 < part.score <= full.score
    with Detector.load(tmp_path / "tiles", backend="onnxruntime") as tiled:
        result = tiled.predict(image)
    assert result.anomaly_map is not None and result.anomaly_map.shape == image.shape[:2] and result.score > 0


def test_eval_prints_the_aligned_parts_caveat(padim: Tuple[Path, str]) -> None:
    from patchcore_edge.methods import scorer_class

    path, _ = padim
    (caveat,) = scorer_class("padim").caveats(Bundle.load(path))
    assert "assumes aligned parts" in caveat
