"""A calibration holds for the set-up that produced its scores (issue 11, item 1) and calibrate hashes each bundle
file once (item 8). Real bundle, real ONNX Runtime; the TensorRT engine is stood in for by a backend that says it
runs an FP16 engine file of the bundle (TensorRT itself cannot run here)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Dict

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from patchcore_edge import bundle as bundle_module
from patchcore_edge.bundle import Bundle
from patchcore_edge.cli import main as cli
from patchcore_edge.runtime import detector as detector_module
from patchcore_edge.runtime.backends import OnnxRuntimeFeatures
from patchcore_edge.runtime.detector import Detector

from conftest import elpv_images_dir


def _good_parts(folder: Path, count: int = 12) -> Path:
    """Good parts the tiny bundle has not seen (it was built from the first 10 elpv images / synthetic seed 0)."""
    folder.mkdir(parents=True)
    source = elpv_images_dir()
    if source is not None:
        for path in sorted(source.glob("*.png"))[20:20 + count]:
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            cv2.imwrite(str(folder / path.name), cv2.resize(image, (96, 96), interpolation=cv2.INTER_AREA))
        return folder
    rng = np.random.default_rng(99)
    for i in range(count):
        image = rng.normal(128, 20, (96, 96, 3)) + 40 * np.sin(np.arange(96) / 5.0)[None, :, None]
        cv2.imwrite(str(folder / f"new_{i:03d}.png"), np.clip(image, 0, 255).astype(np.uint8))
    return folder


@pytest.fixture(scope="module")
def calibrated(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("binding")
    bundle = root / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    good = _good_parts(root / "good")
    result = CliRunner().invoke(cli, ["calibrate", str(bundle), str(good), "--backend", "onnxruntime", "-q"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {"bundle": bundle, "good": good}


def _record(bundle: Path) -> Dict[str, Any]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return json.loads((bundle / manifest["calibration"]["file"]).read_text())


def test_calibration_records_what_produced_its_scores(calibrated: Dict[str, Path]) -> None:
    from patchcore_edge import __version__

    scored_with = _record(calibrated["bundle"])["scored_with"]
    probes = scored_with["method"].get("probes")
    assert isinstance(probes, int) and probes >= 1  # cells probed per patch by the first pass
    assert scored_with == {"backend": "onnxruntime:cpu", "engine_file": None, "engine_sha256": None,
                           "precision": "fp32", "method": {"search": "cells", "probes": probes, "exact_search": False},
                           "toolkit_version": __version__}
    with Detector.load(calibrated["bundle"], backend="onnxruntime") as same:
        assert same.scored_with["method"]["probes"] == probes
        assert same.calibration is not None and same.calibration_refused is None
        assert same.predict(np.full((96, 96, 3), 128, np.uint8)).is_anomalous is not None


def test_another_search_setting_keeps_scores_and_refuses_decisions(calibrated: Dict[str, Path]) -> None:
    image = cv2.imread(str(sorted(calibrated["good"].iterdir())[0]))[:, :, ::-1].copy()
    with Detector.load(calibrated["bundle"], backend="onnxruntime") as same:
        expected = same.predict(image).score
    with Detector.load(calibrated["bundle"], backend="onnxruntime", exact_search=True) as other:
        assert other.calibration is None
        reason = other.calibration_refused
        result = other.predict(image)
    assert result.score == expected  # scores still flow (and are the same: issue 11, item 2)
    assert result.is_anomalous is None and result.normalised_score is None and result.mask is None
    assert reason is not None and "\n" not in reason
    probes = same.scored_with["method"]["probes"]
    assert (f"search settings (exact_search False, probes {probes}, search cells) at calibration, "
            "(exact_search True, probes none, search exact) now") in reason
    assert "patchcore-edge calibrate" in reason


def test_an_fp16_engine_added_after_calibration_voids_the_decisions(calibrated: Dict[str, Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = Bundle.load(calibrated["bundle"])
    engine_name = bundle.features.onnx_file  # a file of the bundle, so that its sha256 is known

    class EngineLike:
        """What open_backend gives for an engine (trt.TensorRTFeatures): name, engine file, precision, run."""

        name = "tensorrt"
        max_batch = None
        engine_file = engine_name
        precision = "fp16"

        def __init__(self) -> None:
            self.ort = OnnxRuntimeFeatures(bundle.path / bundle.features.onnx_file, bundle.features.input_name,
                                           bundle.features.outputs, threads=1)

        def run(self, batch: np.ndarray) -> Dict[str, np.ndarray]:
            return self.ort.run(batch)

        def close(self) -> None:
            pass

    def engine_backend(bundle_: Bundle, backend: str = "auto", threads: Any = None) -> Any:
        return EngineLike(), f"TensorRT engine {engine_name}"

    monkeypatch.setattr(detector_module, "open_backend", engine_backend)
    with Detector.load(calibrated["bundle"], backend="auto") as detector:
        assert detector.calibration is None
        reason = detector.calibration_refused
        assert detector.predict(np.full((96, 96, 3), 128, np.uint8)).is_anomalous is None
    assert reason is not None
    assert "feature backend onnxruntime:cpu at calibration, tensorrt now" in reason
    assert f"TensorRT engine (sha256) none at calibration, {bundle.file_sha256(engine_name)[:12]} now" in reason
    assert "precision fp32 at calibration, fp16 now" in reason


def test_a_calibration_without_the_record_is_not_applied(calibrated: Dict[str, Path], tmp_path: Path) -> None:
    from patchcore_edge.decision import Calibration

    bundle = tmp_path / "bundle"
    shutil.copytree(calibrated["bundle"], bundle)
    old = Calibration.from_dict({k: v for k, v in _record(bundle).items() if k != "scored_with"})
    Bundle.load(bundle).set_calibration("calibration-old.json", old.to_json_bytes())
    with Detector.load(bundle, backend="onnxruntime") as detector:
        assert detector.calibration is None
        assert "does not record the backend" in (detector.calibration_refused or "")


def test_check_runs_with_the_deployed_set_up(calibrated: Dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from patchcore_edge.calibration import calibrate as flow

    ok = CliRunner().invoke(cli, ["calibrate", str(calibrated["bundle"]), "--check", str(calibrated["good"]),
                                  "--backend", "onnxruntime", "-q"], catch_exceptions=False)
    assert ok.exit_code in (0, 3), ok.output
    # The line now runs with exact search (or an engine): the check refuses instead of vouching for it.
    real = flow.load_detector
    monkeypatch.setattr(flow, "load_detector", lambda bundle, backend="auto": _exact(real, bundle, backend))
    refused = CliRunner().invoke(cli, ["calibrate", str(calibrated["bundle"]), "--check", str(calibrated["good"]),
                                       "--backend", "onnxruntime", "-q"], catch_exceptions=False)
    assert refused.exit_code == 1
    assert "does not apply to this set-up" in refused.output and "exact_search True" in refused.output
    assert "Traceback" not in refused.output


def _exact(real: Any, bundle: Any, backend: str) -> Any:
    detector = real(bundle, backend)
    detector.close()
    return Detector.load(bundle, backend=backend, exact_search=True, ignore_calibration=True)


def test_calibrate_hashes_every_bundle_file_once(calibrated: Dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(calibrated["bundle"], bundle)
    listed = set(json.loads((bundle / "manifest.json").read_text())["files"])
    hashed: Counter = Counter()
    real = bundle_module.sha256_file

    def counting(path: Any) -> str:
        hashed[Path(path).name] += 1
        return real(path)

    monkeypatch.setattr(bundle_module, "sha256_file", counting)
    result = CliRunner().invoke(cli, ["calibrate", str(bundle), str(calibrated["good"]), "--backend",
                                      "onnxruntime", "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    score_files = {name for name in listed if not name.startswith("calibration-")}
    assert score_files and all(hashed[name] == 1 for name in score_files), dict(hashed)


def test_calibrated_mask_equals_the_exact_search_mask(calibrated: Dict[str, Path]) -> None:
    from patchcore_edge.decision import remove_small_regions

    image = cv2.imread(str(sorted(calibrated["good"].iterdir())[1]))[:, :, ::-1].copy()
    image[30:60, 20:70] = (250, 160, 40)  # a defect no good part shows
    with Detector.load(calibrated["bundle"], backend="onnxruntime", ef=1) as fast:
        assert fast.calibration_refused is not None  # another ef: no decisions ...
    with Detector.load(calibrated["bundle"], backend="onnxruntime") as detector:  # ... the calibrated set-up
        assert detector.calibration is not None and detector.calibration.pixel is not None
        result = detector.predict(image)
        pixel = detector.calibration.pixel
    with Detector.load(calibrated["bundle"], backend="onnxruntime", exact_search=True,
                       ignore_calibration=True) as exact:
        exact_map = exact.predict(image).anomaly_map
    assert result.is_anomalous and result.mask is not None and result.mask.any()
    np.testing.assert_array_equal(result.mask,
                                  remove_small_regions(exact_map > pixel.threshold, pixel.min_defect_area))
    above = exact_map > pixel.threshold
    np.testing.assert_allclose(result.anomaly_map[above], exact_map[above], rtol=1e-6)
