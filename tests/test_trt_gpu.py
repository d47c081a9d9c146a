"""Real TensorRT on a real GPU: build, load, run and verify engines against ONNX Runtime.

Skipped (with the reason) where `tensorrt` is not importable, is older than 8.5, or no CUDA GPU is visible --
which is every machine this project's CI has. Run on a Jetson (JetPack 5.1+/6.x) or a CUDA workstation with
TensorRT: `pytest -m tensorrt tests/test_trt_gpu.py`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest

from patchcore_edge import trt

from conftest import two_output_onnx, with_global_output

AVAILABLE, REASON = trt.tensorrt_status()
pytestmark = [pytest.mark.tensorrt, pytest.mark.skipif(not AVAILABLE, reason=REASON)]


@pytest.fixture(scope="module")
def model(tiny_bundle: Path) -> Dict[str, Any]:
    from patchcore_edge.bundle import Bundle, read_manifest
    from patchcore_edge.devices.engine import bundle_io

    manifest = read_manifest(tiny_bundle)

    return {"bundle": tiny_bundle, "manifest": manifest, "onnx": tiny_bundle / manifest["features"]["onnx_file"],
            "io": bundle_io(Bundle.load(tiny_bundle))}


def _inputs(manifest: Dict[str, Any], count: int, seed: int = 0) -> np.ndarray:
    crop = int(manifest["input"]["crop"])
    return np.random.default_rng(seed).standard_normal((count, 3, crop, crop)).astype(np.float32)


def _onnx(model: Dict[str, Any], batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model["onnx"]), providers=["CPUExecutionProvider"])
    features = model["manifest"]["features"]
    return np.asarray(session.run([features["output_name"]], {features["input_name"]: batch})[0])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_features_match_onnxruntime(model: Dict[str, Any], precision: str) -> None:
    result = trt.build_engine(model["onnx"], precision=precision, max_batch=3, workspace_mb=256)
    assert len(result.engine) > 0 and len(result.timing_cache) > 0 and result.int8_cache is None
    batch = _inputs(model["manifest"], 5)
    with trt.TensorRTFeatures(result.engine, model["io"]) as backend:
        assert backend.max_batch == 3
        got = backend.run(batch)["features"]  # 3 + 2: both optimisation profiles
        single = backend.run(batch[:1])["features"]  # profile 0
    errors = trt.feature_errors(_onnx(model, batch), got)
    assert errors["max_rel"] <= trt.FEATURE_TOLERANCE[precision]
    np.testing.assert_allclose(single[0], got[0], rtol=0, atol=trt.FEATURE_TOLERANCE[precision] * np.abs(got).max())


def test_timing_cache_round_trip(model: Dict[str, Any]) -> None:
    first = trt.build_engine(model["onnx"], precision="fp16", max_batch=1, workspace_mb=256)
    second = trt.build_engine(model["onnx"], precision="fp16", max_batch=1, workspace_mb=256,
                              timing_cache=first.timing_cache)
    assert len(second.timing_cache) >= len(first.timing_cache)


def test_int8_calibration_writes_a_cache_that_rebuilds(model: Dict[str, Any]) -> None:
    images = list(_inputs(model["manifest"], 8, seed=1))
    try:
        result = trt.build_engine(model["onnx"], precision="int8", max_batch=1, calibration_batches=images)
    except trt.EngineBuildError as error:
        if "no fast INT8" in str(error):
            pytest.skip(str(error))
        raise
    assert result.int8_cache
    again = trt.build_engine(model["onnx"], precision="int8", max_batch=1, int8_cache=result.int8_cache)
    assert again.int8_cache == result.int8_cache
    batch = _inputs(model["manifest"], 2, seed=2)
    with trt.TensorRTFeatures(again.engine, model["io"]) as backend:
        errors = trt.feature_errors(_onnx(model, batch), backend.run(batch)["features"])
    assert errors["max_rel"] <= trt.FEATURE_TOLERANCE["int8"]


def test_corrupt_engine_is_refused_with_rebuild_hint(model: Dict[str, Any]) -> None:
    engine = trt.build_engine(model["onnx"], precision="fp16", max_batch=1, workspace_mb=256).engine
    broken = engine[: len(engine) // 2]
    with pytest.raises(trt.EngineLoadError, match="engine build BUNDLE"):
        trt.TensorRTFeatures(broken, model["io"])


def test_engine_build_command_registers_and_auto_backend_uses_it(model: Dict[str, Any], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from patchcore_edge.bundle import read_manifest
    from patchcore_edge.cli.devices import engine_group
    from patchcore_edge.runtime.detector import Detector

    bundle = shutil.copytree(model["bundle"], tmp_path / "bundle")
    result = CliRunner().invoke(engine_group, ["build", str(bundle), "--precision", "fp16", "--max-batch", "2",
                                               "--workspace", "256"])
    assert result.exit_code == 0, result.output
    (entry,) = read_manifest(bundle)["engines"]
    assert entry["verification"]["scores"]["max_rel_change"] <= 0.02
    detector = Detector.load(bundle, backend="auto")
    assert detector.backend_name == "tensorrt"
    image = np.random.default_rng(4).integers(0, 255, (80, 96, 3), dtype=np.uint8)
    reference = Detector.load(bundle, backend="onnxruntime").predict(image, maps=False).score
    assert detector.predict(image, maps=False).score == pytest.approx(reference, rel=0.02)
    detector.backend.close()


def test_two_output_engine_matches_onnxruntime_on_every_output(tmp_path: Path) -> None:
    path = two_output_onnx(tmp_path / "two.onnx")
    io = trt.onnx_io(path)
    result = trt.build_engine(path, precision="fp32", max_batch=2, workspace_mb=256, output_names=io.output_names)
    images = list(np.random.default_rng(6).standard_normal((3, 3, 8, 8)).astype(np.float32))
    with trt.TensorRTFeatures(result.engine, io, precision="fp32") as backend:
        out = backend.run(np.stack(images))  # 2 + 1: both optimisation profiles
        assert list(out) == ["features", "global"] and out["global"].shape == (3, 3)
        record = trt.verify_engine(backend, path, io, images, "random", "fp32")
    assert sorted(record["outputs"]) == ["features", "global"]
    assert record["features"]["max_rel"] <= trt.FEATURE_TOLERANCE["fp32"]


def test_engine_build_of_a_two_output_bundle(model: Dict[str, Any], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from patchcore_edge.bundle import read_manifest
    from patchcore_edge.cli.devices import engine_group
    from patchcore_edge.runtime.detector import Detector

    bundle = with_global_output(model["bundle"], tmp_path / "bundle")
    result = CliRunner().invoke(engine_group, ["build", str(bundle), "--precision", "fp16", "--workspace", "256"])
    assert result.exit_code == 0, result.output
    (entry,) = read_manifest(bundle)["engines"]
    assert sorted(entry["verification"]["outputs"]) == ["features", "global"]
    with Detector.load(bundle, backend="tensorrt") as detector:
        got = detector.backend.run(_inputs(model["manifest"], 2))
    assert list(got) == ["features", "global"]
