"""`patchcore-edge run` end to end: the session's real tiny bundle (conftest `tiny_bundle`), the real
torch-free Detector on ONNX Runtime + hnswlib, real files, a real video, PNGs checked on disk."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import cv2
import numpy as np
import pytest
from click.testing import CliRunner, Result

from patchcore_edge.cli.run import EXIT_CANNOT_START, EXIT_FAILED_INPUTS, EXIT_OK, StatusLine, run_command
from patchcore_edge.runtime.outputs import RunStats

RUNTIME = ["--backend", "onnxruntime", "--threads", "1"]


def with_defect(image: np.ndarray) -> np.ndarray:
    """A saturated orange square (rows 32-52, columns 40-60) that no nominal image shows."""
    damaged = image.copy()
    damaged[32:52, 40:60] = (40, 160, 250)
    return damaged


@pytest.fixture(scope="session")
def nominal_images(tiny_bundle: Path) -> List[np.ndarray]:
    """The images the session's tiny bundle was exported from (BGR, 96x96): the bank covers them."""
    folder = tiny_bundle.parent / "nominal"
    paths = sorted(folder.glob("*.png"))
    assert paths, f"{folder}: the tiny_bundle fixture no longer keeps its nominal images there"
    return [cv2.imread(str(path)) for path in paths]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def invoke(*arguments: str) -> Result:
    return CliRunner().invoke(run_command, list(arguments), catch_exceptions=False)


def lines(text: str) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def parts_folder(tmp_path: Path, nominal_images: List[np.ndarray]) -> Path:
    folder = tmp_path / "parts"
    cv2.imwrite(str(_mkdir(folder / "good") / "a.png"), nominal_images[0])
    cv2.imwrite(str(folder / "good" / "b.png"), nominal_images[1])
    cv2.imwrite(str(_mkdir(folder / "bad") / "c.png"), with_defect(nominal_images[2]))
    (folder / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_folder_run_scores_in_order_writes_maps_and_reports_the_bad_file(
        tiny_bundle: Path, parts_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke(str(tiny_bundle), str(parts_folder), "-o", str(out), "--overlays", *RUNTIME)
    assert result.exit_code == EXIT_FAILED_INPUTS, result.stderr
    records = lines(result.stdout)
    assert [Path(r["path"]).name for r in records] == ["c.png", "a.png", "b.png", "broken.png"]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert "not a readable image" in records[3]["error"] and "score" not in records[3]
    bad, good_a, good_b = records[:3]
    assert bad["score"] > 2 * max(good_a["score"], good_b["score"])
    assert (good_a["width"], good_a["height"]) == (96, 96)
    assert set(good_a["timing_ms"]) >= {"preprocess", "features", "map"}
    assert "anomalous" not in good_a  # not calibrated

    heat = cv2.imread(bad["outputs"]["heatmap"])
    assert bad["outputs"]["heatmap"] == str(out / "parts" / "bad" / "c.heatmap.png")
    assert heat.shape == (96, 96, 3)
    overlay = cv2.imread(bad["outputs"]["overlay"])
    assert overlay.shape == (96, 96, 3)
    # On the run's fixed scale the defect is red in JET and a good part is not.
    def redness(image: np.ndarray) -> np.ndarray:
        return image[..., 2].astype(int) - image[..., 0].astype(int)

    good_heat = cv2.imread(good_a["outputs"]["heatmap"])
    assert redness(heat)[34:50, 42:58].mean() > 100
    assert redness(good_heat).mean() < redness(heat)[34:50, 42:58].mean() - 100
    assert not (out / "parts" / "good" / "broken.heatmap.png").exists()

    run_info = json.loads((out / "run.json").read_text())
    assert run_info["map_scale"]["source"] == "manifest score.training_scores max x 2"
    assert run_info["summary"]["failures"] == 1
    assert "failed inputs      1" in result.stderr and "images scored      3" in result.stderr
    assert "notes.txt" in result.stderr  # skipped, said so, not a failure


def test_calibrated_run_decides_and_writes_masks(tiny_bundle: Path, parts_folder: Path,
                                                 tmp_path: Path) -> None:
    from patchcore_edge.bundle import Bundle
    from patchcore_edge.calibration.calibrate import write_calibration
    from patchcore_edge.decision import Calibration, ImageCalibration, PixelCalibration
    from patchcore_edge.imageio import read_rgb
    from patchcore_edge.runtime.detector import Detector

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    detector = Detector.load(bundle, backend="onnxruntime", threads=1)
    good = [detector.predict(read_rgb(parts_folder / "good" / n)) for n in ("a.png", "b.png")]
    bad = detector.predict(read_rgb(parts_folder / "bad" / "c.png"))
    scored_with = detector.scored_with  # the set-up `run` below uses: the calibration applies to it
    detector.close()
    threshold = float(np.sqrt(max(r.score for r in good) * bad.score))  # between the two, on a log scale
    pixel = float(np.sqrt(max(float(r.anomaly_map.max()) for r in good) * float(bad.anomaly_map.max())))
    calibration = Calibration(
        image=ImageCalibration(threshold=threshold, method="maximum-too-few-images",
                               target_false_alarm_rate=0.01, confidence=0.95, n_nominal=2, rank=2,
                               n_required=299, guarantee_met=False,
                               guaranteed_false_alarm_rate=0.78, expected_false_alarm_rate=0.33,
                               empirical_false_alarm_rate=0.0),
        pixel=PixelCalibration(threshold=pixel, min_defect_area=1, method="manual"),
        nominal_scores={"q25": good[0].score, "q50": good[0].score, "q75": good[1].score},
        scored_with=scored_with)
    write_calibration(Bundle.load(bundle), calibration)
    (parts_folder / "good" / "broken.png").unlink()

    out = tmp_path / "out"
    result = invoke(str(bundle), str(parts_folder), "-o", str(out), *RUNTIME)
    assert result.exit_code == EXIT_OK, result.stderr
    records = {Path(r["path"]).name: r for r in lines(result.stdout)}
    assert records["c.png"]["anomalous"] is True
    assert records["a.png"]["anomalous"] is False and records["b.png"]["anomalous"] is False
    bad = records["c.png"]
    assert bad["normalised_score"] == pytest.approx(bad["score"] / threshold, rel=1e-5)
    assert records["c.png"]["defect_pixels"] > 0 and records["a.png"]["defect_pixels"] == 0
    mask = cv2.imread(records["c.png"]["outputs"]["mask"], cv2.IMREAD_UNCHANGED)
    assert mask.shape == (96, 96) and set(np.unique(mask)) <= {0, 255}
    assert int(np.count_nonzero(mask)) == records["c.png"]["defect_pixels"]
    assert json.loads((out / "run.json").read_text())["map_scale"]["high"] == pytest.approx(2 * pixel)
    assert "anomalous          1 (33.3 %)" in result.stderr


def test_video_input_with_max_frames_to_a_jsonl_file(tiny_bundle: Path, nominal_images: List[np.ndarray],
                                                     tmp_path: Path) -> None:
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (96, 96))
    for number in range(5):
        frame = nominal_images[number]
        writer.write(with_defect(frame) if number == 1 else frame)
    writer.release()
    jsonl = tmp_path / "results" / "run.jsonl"
    result = invoke(str(tiny_bundle), str(video), "--max-frames", "3", "--jsonl", str(jsonl), "--no-maps",
                    *RUNTIME)
    assert result.exit_code == EXIT_OK, result.stderr
    assert result.stdout == ""
    records = lines(jsonl.read_text())
    assert [r["path"] for r in records] == [f"{video}#frame={n:06d}" for n in range(3)]
    assert records[1]["score"] > 2 * max(records[0]["score"], records[2]["score"])
    assert all("outputs" not in r for r in records)


def test_batches_give_the_same_scores_as_single_images(tiny_bundle: Path, parts_folder: Path) -> None:
    (parts_folder / "good" / "broken.png").unlink()
    single = lines(invoke(str(tiny_bundle), str(parts_folder), "--no-maps", *RUNTIME).stdout)
    batched = lines(invoke(str(tiny_bundle), str(parts_folder), "--no-maps", "--batch-size", "2",
                           "--read-ahead", "0", *RUNTIME).stdout)
    assert [r["path"] for r in single] == [r["path"] for r in batched]
    assert [r["score"] for r in batched] == pytest.approx([r["score"] for r in single], rel=1e-4)


@pytest.fixture
def plain_folder(tmp_path: Path) -> Path:
    folder = _mkdir(tmp_path / "plain")
    cv2.imwrite(str(folder / "x.png"), np.full((20, 30, 3), 99, dtype=np.uint8))
    return folder


def test_unusable_bundle_is_one_clear_line(tmp_path: Path, plain_folder: Path) -> None:
    parts_folder = plain_folder
    not_a_bundle = _mkdir(tmp_path / "empty_bundle")
    result = CliRunner().invoke(run_command, [str(not_a_bundle), str(parts_folder)])
    assert result.exit_code == EXIT_CANNOT_START
    assert str(not_a_bundle) in result.stderr and "Traceback" not in result.output


def test_option_conflicts_and_empty_inputs(tmp_path: Path, plain_folder: Path) -> None:
    parts_folder = plain_folder
    bundle = _mkdir(tmp_path / "b")
    result = CliRunner().invoke(run_command, [str(bundle), str(parts_folder), "--overlays"])
    assert result.exit_code == EXIT_CANNOT_START and "-o OUTDIR" in result.stderr
    result = CliRunner().invoke(run_command, [str(bundle), str(parts_folder), "--map-range", "2", "1",
                                              "-o", "x"])
    assert result.exit_code == EXIT_CANNOT_START and "LOW < HIGH" in result.stderr
    empty = _mkdir(tmp_path / "nothing")
    result = CliRunner().invoke(run_command, [str(bundle), str(empty)])
    assert result.exit_code == EXIT_FAILED_INPUTS and "no images found" in result.stderr


def test_camera_that_cannot_open_fails_cleanly_after_its_retries(tiny_bundle: Path) -> None:
    result = invoke(str(tiny_bundle), "7", "--reconnect-retries", "0", "--max-frames", "1", *RUNTIME)
    records = lines(result.stdout)
    assert len(records) == 1
    if "error" in records[0]:  # no /dev/video7 here: one error line, the run ends with status 1
        assert result.exit_code == EXIT_FAILED_INPUTS
        assert records[0]["path"] == "camera7" and "gave up after 0 reconnect attempts" in records[0]["error"]
    else:  # a machine with a 8th camera scores one frame
        assert result.exit_code == EXIT_OK and records[0]["path"] == "camera7#frame=000000"


def test_status_line_reports_frames_per_second() -> None:
    stream = io.StringIO()
    status = StatusLine(stream, interval=1.0)
    stats = RunStats()
    for frame in range(41):  # 20 fps for 2 s
        stats.images += 1
        status.update(stats, now=100.0 + frame * 0.05)
    shown = stream.getvalue().splitlines()
    assert len(shown) == 2  # once per interval, on its own line (not a terminal)
    assert shown[-1].startswith("41 frames, 20.0 fps")


def test_runtime_modules_never_import_torch() -> None:
    code = ("import sys; import patchcore_edge.cli.run, patchcore_edge.runtime.sources, "
            "patchcore_edge.runtime.outputs, patchcore_edge.runtime.detector; "
            "bad = [m for m in ('torch', 'torchvision') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
