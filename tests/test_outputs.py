"""Outputs of `patchcore-edge run`: JSON lines, heat-map scale, PNG files written atomically, summary."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import cv2
import numpy as np
import pytest

from patchcore_edge.bundle import Bundle
from patchcore_edge.imageio import ImageReadError
from patchcore_edge.runtime.outputs import (JsonLinesWriter, MapScale, MapWriter, OutputError, RunStats,
                                            atomic_write_bytes, blend, colourise, error_record,
                                            format_summary, map_scale_for, mask_image, result_record)
from patchcore_edge.runtime.sources import FrameKey


@dataclass
class Outcome:
    """Plain data with the fields of the runtime's Result dataclass (no behaviour to fake)."""

    score: float
    anomaly_map: Optional[np.ndarray] = None
    normalised_score: Optional[float] = None
    is_anomalous: Optional[bool] = None
    mask: Optional[np.ndarray] = None
    timing_ms: Dict[str, float] = field(default_factory=dict)


@dataclass
class Threshold:
    threshold: float


@dataclass
class Thresholds:
    """The two fields of decision.Calibration that set the heat-map range."""

    image_value: Optional[float] = None
    pixel_value: Optional[float] = None

    @property
    def image(self) -> Optional[Threshold]:
        return None if self.image_value is None else Threshold(self.image_value)

    @property
    def pixel(self) -> Optional[Threshold]:
        return None if self.pixel_value is None else Threshold(self.pixel_value)


def jet(level: int) -> np.ndarray:
    return cv2.applyColorMap(np.array([[level]], dtype=np.uint8), cv2.COLORMAP_JET)[0, 0]


def _bundle(score: Dict[str, Any], radius: float) -> Bundle:
    """A Bundle over a manifest (no files needed: map_scale_for reads recorded numbers only)."""
    manifest = {"features": {"onnx_file": "features.onnx", "input_name": "image", "outputs": ["features"],
                             "dim": 4, "grid": [2, 2], "stride": 8},
                "method": {"name": "patchcore", "params": {"coreset": {"coverage_radius": radius}}, "arrays": {}},
                "score": {"gaussian_sigma": 4.0, **score}, "files": {}}
    return Bundle(Path("bundle"), manifest)


def test_map_scale_priority() -> None:
    score: Dict[str, Any] = {"map_range": [0.5, 4.0], "training_scores": {"p50": 1.0, "max": 1.5}}
    bundle = _bundle(score, 2.5)
    assert map_scale_for(bundle, Thresholds(1.0, 0.8), (0.0, 9.0)) == MapScale(0.0, 9.0, "--map-range")
    def high(calibration: object) -> float:
        scale = map_scale_for(bundle, calibration)
        assert scale is not None and scale.low == 0.0
        return scale.high

    assert high(Thresholds(1.0, 0.8)) == pytest.approx(1.6)
    scale = map_scale_for(bundle, None)
    assert scale is not None and (scale.low, scale.high) == (0.5, 4.0)
    # A manifest map range (SPADE: its image score is not on the map's scale) beats the image threshold.
    ranged = map_scale_for(bundle, Thresholds(1.0, None))
    assert ranged is not None and (ranged.low, ranged.high) == (0.5, 4.0)
    del score["map_range"]
    bundle = _bundle(score, 2.5)
    assert high(Thresholds(1.0, None)) == pytest.approx(2.0)
    assert high({"image": {"threshold": 3.0}, "pixel": None}) == pytest.approx(6.0)
    assert map_scale_for(_bundle(score, 2.5), None).high == pytest.approx(3.0)  # type: ignore[union-attr]
    assert map_scale_for(_bundle({}, 2.5), None).high == pytest.approx(5.0)  # type: ignore[union-attr]
    assert map_scale_for(_bundle({}, float("nan")), None) is None
    with pytest.raises(ValueError, match="low < high"):
        MapScale(2.0, 1.0, "test")


def test_colourise_uses_the_fixed_range_not_the_image_range() -> None:
    scale = MapScale(0.0, 2.0, "test")
    quiet = np.full((10, 12), 0.2, dtype=np.float32)  # a good image: low everywhere
    quiet[5, 6] = 0.25
    heat = colourise(quiet, scale)
    assert heat.shape == (10, 12, 3) and heat.dtype == np.uint8
    # A per-image min-max would paint the 0.25 pixel dark red; the fixed range keeps it blue.
    assert np.array_equal(heat[5, 6], jet(int(0.25 / 2.0 * 255 + 0.5)))
    assert heat[5, 6, 0] > heat[5, 6, 2]  # BGR: more blue than red
    hot = colourise(np.array([[0.0, 1.0, 2.0, 5.0, -1.0]], dtype=np.float32), scale)
    assert np.array_equal(hot[0, 0], jet(0)) and np.array_equal(hot[0, 4], jet(0))
    assert np.array_equal(hot[0, 2], jet(255)) and np.array_equal(hot[0, 3], jet(255))
    assert np.array_equal(hot[0, 1], jet(128))


def test_blend_and_mask_images() -> None:
    image = np.zeros((4, 5, 3), dtype=np.uint8)
    image[..., 0] = 200  # red in RGB
    heat = np.zeros((4, 5, 3), dtype=np.uint8)
    heat[..., 0] = 100  # blue in BGR
    out = blend(image, heat, alpha=0.5)
    assert tuple(int(v) for v in out[0, 0]) == (50, 0, 100)
    with pytest.raises(ValueError, match="differ in size"):
        blend(image, heat[:3])
    mask = np.array([[True, False]])
    assert mask_image(mask).tolist() == [[255, 0]] and mask_image(mask).dtype == np.uint8


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "deep" / "x.bin"
    atomic_write_bytes(target, b"old")
    assert target.read_bytes() == b"old"

    def fail(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.bin"]  # temporary file removed


@pytest.mark.parametrize("workers", [0, 2])
def test_map_writer_writes_named_pngs(tmp_path: Path, workers: int) -> None:
    scale = MapScale(0.0, 2.0, "test")
    writer = MapWriter(tmp_path / "out", scale, overlays=True, workers=workers)
    anomaly = np.linspace(0, 2, 30 * 40, dtype=np.float32).reshape(30, 40)
    image = np.full((30, 40, 3), 90, dtype=np.uint8)
    mask = anomaly > 1.0
    files = writer.write("test/good/000", anomaly, mask, image, 1.0)
    assert writer.write("plain", anomaly) == {"heatmap": str(tmp_path / "out" / "plain.heatmap.png")}
    writer.close()
    assert set(files) == {"heatmap", "overlay", "mask"}
    heat = cv2.imread(files["heatmap"], cv2.IMREAD_UNCHANGED)
    assert np.array_equal(heat, colourise(anomaly, scale))
    overlay = cv2.imread(files["overlay"], cv2.IMREAD_UNCHANGED)
    assert np.array_equal(overlay, blend(image, heat))
    written_mask = cv2.imread(files["mask"], cv2.IMREAD_UNCHANGED)
    assert written_mask.shape == (30, 40) and np.array_equal(written_mask > 0, mask)
    assert files["heatmap"] == str(tmp_path / "out" / "test" / "good" / "000.heatmap.png")
    leftovers = [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_map_writer_without_scale_fixes_it_once_and_warns(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    writer = MapWriter(tmp_path, None, workers=0)
    first = np.full((8, 8), 1.0, dtype=np.float32)
    with caplog.at_level("WARNING"):
        writer.write("a", first, score=1.0)
        writer.write("b", first * 3, score=3.0)
    writer.close()
    assert writer.scale is not None and writer.scale.high == pytest.approx(2.0)
    assert any("records no score range" in record.getMessage() for record in caplog.records)
    second = cv2.imread(str(tmp_path / "b.heatmap.png"))
    assert np.array_equal(second[0, 0], jet(255))  # saturates on the first image's scale, not its own


def test_map_writer_reports_the_file_it_cannot_write(tmp_path: Path) -> None:
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where a folder should be")
    writer = MapWriter(tmp_path, MapScale(0.0, 1.0, "test"), workers=1)
    writer.write("blocked/x", np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(OutputError, match="blocked"):
        writer.close()


def test_result_and_error_records_are_strict_json() -> None:
    frame = FrameKey("data/a.png", "data/a", 3)
    outcome = Outcome(score=float(np.float32(1.2345678)), normalised_score=0.61, is_anomalous=False,
                      mask=np.array([[True, False, True]]), timing_ms={"features": 3.14159, "search": 1.0})
    record = result_record(frame, outcome, 900, 800, {"heatmap": "out/data/a.heatmap.png"})
    line = json.loads(json.dumps(record, allow_nan=False))
    assert line == {"path": "data/a.png", "index": 3, "width": 800, "height": 900, "score": 1.2345678,
                    "normalised_score": 0.61, "anomalous": False, "defect_pixels": 2,
                    "timing_ms": {"features": 3.142, "search": 1.0},
                    "outputs": {"heatmap": "out/data/a.heatmap.png"}}
    uncalibrated = result_record(frame, Outcome(score=0.5), 10, 10)
    assert "anomalous" not in uncalibrated and "normalised_score" not in uncalibrated
    broken = result_record(frame, Outcome(score=float("nan")), 10, 10)
    assert "non-finite" in broken["error"]
    assert error_record(frame, ImageReadError("data/a.png", "file not found")) == {
        "path": "data/a.png", "index": 3, "error": "file not found"}


def test_json_lines_file(tmp_path: Path) -> None:
    writer = JsonLinesWriter(target=tmp_path / "sub" / "results.jsonl")
    writer.write({"path": "a", "score": 1.0})
    writer.write({"path": "b", "error": "bad"})
    writer.close()
    lines = (tmp_path / "sub" / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["path"] for line in lines] == ["a", "b"]
    with pytest.raises(ValueError):
        JsonLinesWriter(target=tmp_path / "x.jsonl").write({"score": float("inf")})


def test_run_stats_and_summary() -> None:
    stats = RunStats(reservoir_size=500)
    for n in range(2000):
        stats.add_result({"anomalous": n % 4 == 0, "timing_ms": {"a": n % 100, "b": 1.0}})
    stats.add_result({"error": "x"})
    assert len(stats.latencies) == 500  # bounded
    median, p95 = stats.latency_quantiles()  # type: ignore[misc]
    assert abs(median - 50.5) < 6 and abs(p95 - 96) < 4  # uniform sample of 1..100 ms
    assert stats.images == 2000 and stats.failures == 1 and stats.anomalous == 500
    text = format_summary(stats, wall_s=4.0, backend="onnxruntime", batch_size=2)
    assert "2000" in text and "500 (25.0 %)" in text and "500.0 images/s" in text and "p95" in text
    empty = format_summary(RunStats(), wall_s=0.0)
    assert "not calibrated" in empty
