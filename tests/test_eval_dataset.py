"""Dataset discovery (MVTec AD layout and plain folders), evaluate() and the `eval` command.

`FakeDetector` below is a declared test double for `runtime.detector.Detector`: its anomaly map is the blurred
brightness of the image, which is enough to check the wiring (scores, maps, masks, subsets) of evaluate(). The
lead runs the command end to end with a real bundle.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from patchcore_edge.cli import eval as eval_cli
from patchcore_edge.evaluation.dataset import (
    DatasetError,
    check_masks,
    discover_mvtec,
    discover_plain,
    image_size,
    load_mask,
)
from patchcore_edge.evaluation.evaluate import evaluate, reduce_to, report_markdown
from patchcore_edge.evaluation.metrics import aupro, auroc, best_f1
from patchcore_edge.imageio import read_rgb


class FakeDetector:
    """TEST DOUBLE for Detector: map = blurred mean brightness in [0, 1], score = the map's maximum."""

    backend_name = "fake"
    manifest: ClassVar[Dict[str, Any]] = {"toolkit_version": "test", "backbone": {"name": "none"},
                                          "coreset": {"size": 0}, "files": {"memory_bank.npy": {}}}

    def __init__(self) -> None:
        self.calls = 0
        self.closed = False

    def predict(self, image: np.ndarray) -> SimpleNamespace:
        self.calls += 1
        brightness = image.astype(np.float32).mean(axis=2) / 255.0
        amap = cv2.GaussianBlur(brightness, (0, 0), 1.5)
        return SimpleNamespace(score=float(amap.max()), anomaly_map=amap, timing_ms={"features": 1.0})

    def predict_batch(self, images: List[np.ndarray]) -> List[SimpleNamespace]:
        return [self.predict(image) for image in images]

    def close(self) -> None:
        self.closed = True


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def make_category(root: Path, size: Tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    """test/good (4), test/crack (3, one without mask), test/hole (3); defects are bright rectangles."""
    rng = np.random.default_rng(seed)
    h, w = size

    def background() -> np.ndarray:
        return rng.normal(70, 8, (h, w, 3)).clip(0, 255).astype(np.uint8)

    for i in range(4):
        image = background()
        if i == 0:
            image[5:9, 5:9] = 150  # a good image with a bright spot: a likely false alarm
        _write(root / "test" / "good" / f"{i:03d}.png", image)
    brightness = {"crack": [200, 190, 120], "hole": [230, 210, 180]}
    for defect, levels in brightness.items():
        for i, level in enumerate(levels):
            image = background()
            mask = np.zeros((h, w), np.uint8)
            y, x = int(rng.integers(2, h - 14)), int(rng.integers(2, w - 14))
            mask[y:y + 6 + i, x:x + 10] = 255
            mask[y + 9, x + 11] = 255  # a one-pixel second region
            image[mask > 0] = level
            _write(root / "test" / defect / f"{i:03d}.png", image)
            if not (defect == "crack" and i == 2):  # crack/002 has no mask
                _write(root / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    return root


# ---------------------------------------------------------------------------------------------- discovery


def test_discovers_mvtec_tree_with_missing_mask(tmp_path: Path) -> None:
    root = make_category(tmp_path / "widget")
    (root / "test" / "good" / "notes.txt").write_text("not an image")
    data = discover_mvtec(root)
    assert data.layout == "mvtec"
    assert data.counts() == {"good": 4, "crack": 3, "hole": 3}
    assert data.defects == ["crack", "hole"]
    by_name = {data.name(s): s for s in data.samples}
    assert by_name["test/crack/000.png"].mask_path == root / "ground_truth" / "crack" / "000_mask.png"
    assert by_name["test/crack/002.png"].mask_path is None
    assert by_name["test/good/000.png"].label == 0 and by_name["test/hole/001.png"].label == 1
    assert any("crack/002.png" in w and "image metrics only" in w for w in data.warnings)
    assert any("notes.txt" in w for w in data.warnings)
    assert check_masks(data) == []


def test_wrong_size_mask_is_reported_with_both_sizes(tmp_path: Path) -> None:
    root = make_category(tmp_path / "widget")
    bad_mask = root / "ground_truth" / "hole" / "001_mask.png"
    _write(bad_mask, np.zeros((20, 30), np.uint8))
    problems = check_masks(discover_mvtec(root))
    assert len(problems) == 1
    message = str(problems[0])
    assert str(bad_mask) in message and "30x20" in message and "48x40" in message
    with pytest.raises(DatasetError, match="must have the size of their image"):
        evaluate(FakeDetector(), discover_mvtec(root))


def test_unreadable_mask_is_reported(tmp_path: Path) -> None:
    root = make_category(tmp_path / "widget")
    (root / "ground_truth" / "hole" / "000_mask.png").write_bytes(b"not a png")
    problems = check_masks(discover_mvtec(root))
    assert [p.path for p in problems] == [str(root / "ground_truth" / "hole" / "000_mask.png")]
    assert "not a readable image" in problems[0].reason


@pytest.mark.parametrize("case, expected", [
    ("missing", "folder not found"),
    ("no_test", "no test/ folder"),
    ("empty", "no images in its sub-folders"),
    ("only_good", "no anomalous images"),
    ("only_defects", "no defect-free (good) images"),
    ("dataset_root", "several categories"),
    ("test_folder", "pass its parent"),
])
def test_unusable_categories_raise_clear_errors(tmp_path: Path, case: str, expected: str) -> None:
    target = tmp_path / "cat"
    if case == "no_test":
        target.mkdir()
    elif case == "empty":
        (target / "test" / "good").mkdir(parents=True)
    elif case == "only_good":
        _write(target / "test" / "good" / "a.png", np.zeros((8, 8), np.uint8))
    elif case == "only_defects":
        _write(target / "test" / "scratch" / "a.png", np.zeros((8, 8), np.uint8))
    elif case == "dataset_root":
        make_category(target / "bottle")
        make_category(target / "cable")
    elif case == "test_folder":
        make_category(target)
        target = target / "test"
    with pytest.raises(DatasetError, match=re.escape(expected)):
        discover_mvtec(target)


def test_plain_layout(tmp_path: Path) -> None:
    for folder, n in (("ok", 2), ("ng", 3)):
        for i in range(n):
            _write(tmp_path / folder / f"{i}.png", np.full((10, 12), 40 * i, np.uint8))
    data = discover_plain(tmp_path / "ok", tmp_path / "ng")
    assert data.layout == "plain" and data.counts() == {"good": 2, "bad": 3}
    assert all(s.mask_path is None for s in data.samples)
    assert data.name(data.samples[0]) == "ok/0.png"
    with pytest.raises(DatasetError, match="--bad folder not found"):
        discover_plain(tmp_path / "ok", tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no anomalous images"):
        discover_plain(tmp_path / "ok", tmp_path / "empty")


def test_mask_values_any_nonzero_and_png_header_size(tmp_path: Path) -> None:
    mask = np.zeros((6, 9, 3), np.uint8)
    mask[1, 2, 0] = 1
    mask[4, 7, 2] = 255
    _write(tmp_path / "m.png", mask)
    loaded = load_mask(tmp_path / "m.png", (6, 9))
    assert loaded.dtype == bool and loaded.sum() == 2 and loaded[1, 2] and loaded[4, 7]
    assert image_size(tmp_path / "m.png") == (6, 9)
    _write(tmp_path / "m.bmp", mask)
    assert image_size(tmp_path / "m.bmp") == (6, 9)


def test_real_bottle_layout(bottle: Path) -> None:
    data = discover_mvtec(bottle)
    assert data.counts() == {"good": 20, "broken_large": 20, "broken_small": 22, "contamination": 21}
    assert sum(s.mask_path is not None for s in data.samples) == 63
    assert data.warnings == ()
    sample = next(s for s in data.samples if s.defect == "broken_small")
    mask = load_mask(sample.mask_path, image_size(sample.path), sample.path)
    assert mask.shape == (900, 900) and 0 < mask.sum() < mask.size
    assert check_masks(data) == []


# ---------------------------------------------------------------------------------------------- evaluate


def _reference_pixels(data, report) -> Tuple[List[np.ndarray], List[Optional[np.ndarray]]]:
    fake = FakeDetector()
    by_name = {data.name(s): s for s in data.samples}
    maps, masks = [], []
    for entry in report["images"]:
        if entry["pixel_metrics"]:
            sample = by_name[entry["file"]]
            maps.append(fake.predict(read_rgb(sample.path)).anomaly_map)
            masks.append(load_mask(sample.mask_path) if sample.mask_path else None)
    return maps, masks


@pytest.mark.parametrize("batch_size", [1, 3])
def test_evaluate_report_matches_independent_computation(tmp_path: Path, batch_size: int) -> None:
    data = discover_mvtec(make_category(tmp_path / "widget"))
    detector = FakeDetector()
    calls: List[Tuple[int, int]] = []
    report = evaluate(detector, data, batch_size=batch_size, progress=lambda d, t, n: calls.append((d, t)))
    assert calls[-1] == (10, 10) and detector.calls == 10
    assert report["backend"] == "fake" and "files" not in report["bundle"]
    assert report["pixel_evaluation"]["resolution"] == "native resolution"
    assert report["pixel_evaluation"]["map_sizes"] == ["48x40"]

    labels = [e["label"] for e in report["images"]]
    scores = [e["score"] for e in report["images"]]
    metrics = report["metrics"]
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics["image_auroc"] < 1.0  # the faint crack scores below the good image with a bright spot
    assert (metrics["n_good"], metrics["n_anomalous"], metrics["n_pixel_images"]) == (4, 6, 9)
    f1, threshold, _ = best_f1(scores, labels)
    assert (metrics["image_f1"], metrics["image_f1_threshold"]) == (f1, threshold)

    maps, masks = _reference_pixels(data, report)
    pixel_labels = np.concatenate([np.zeros(m.size) if g is None else g.ravel() for m, g in zip(maps, masks)])
    pixel_scores = np.concatenate([m.ravel() for m in maps])
    assert metrics["pixel_auroc"] == pytest.approx(roc_auc_score(pixel_labels, pixel_scores), abs=1e-12)
    assert metrics["aupro"] == pytest.approx(aupro(maps, masks).value, abs=1e-12)

    rows = {row["defect"]: row for row in report["per_defect"]}
    assert set(rows) == {"crack", "hole"}
    crack = rows["crack"]
    assert (crack["n_good"], crack["n_anomalous"], crack["n_pixel_images"]) == (4, 3, 6)
    hole = [(e["score"], e["label"]) for e in report["images"] if e["defect"] in ("good", "hole")]
    assert rows["hole"]["image_auroc"] == auroc(*zip(*hole)).value
    json.dumps(report)  # JSON-ready

    table = report_markdown(report)
    assert "| all | 4 | 6 |" in table and "| crack | 4 | 3 |" in table and "AUPRO@0.3" in table


def test_evaluate_at_reduced_pixel_size(tmp_path: Path) -> None:
    data = discover_mvtec(make_category(tmp_path / "widget", size=(60, 90)))
    report = evaluate(FakeDetector(), data, pixel_size=30)
    assert report["pixel_evaluation"]["map_sizes"] == ["30x20"]
    assert report["pixel_evaluation"]["pixel_size"] == 30
    assert "30 px" in report["pixel_evaluation"]["resolution"] and "30 px" in report_markdown(report)
    assert 0.5 < report["metrics"]["pixel_auroc"] <= 1.0
    native = evaluate(FakeDetector(), data)
    assert native["metrics"]["image_auroc"] == report["metrics"]["image_auroc"]  # image metrics do not change


def test_reduce_to_keeps_majority_covered_pixels() -> None:
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True  # exactly the top-left quarter
    mask[6, 6] = True  # one pixel: 1/4 of a reduced pixel, dropped
    amap = np.arange(64, dtype=np.float32).reshape(8, 8)
    small_map, small_mask = reduce_to(amap, mask, 4)
    assert small_map.shape == (4, 4) and small_map[0, 0] == pytest.approx(amap[:2, :2].mean())
    assert small_mask is not None and small_mask.sum() == 4 and small_mask[:2, :2].all()
    same_map, same_mask = reduce_to(amap, mask, 16)
    assert same_map is amap and same_mask is mask


def test_evaluate_skips_unreadable_images_and_plain_layout_has_no_pixel_metrics(tmp_path: Path) -> None:
    for folder, levels in (("ok", [60, 70, 80]), ("ng", [200, 75])):
        for i, level in enumerate(levels):
            _write(tmp_path / folder / f"{i}.png", np.full((16, 16, 3), level, np.uint8))
    (tmp_path / "ng" / "broken.png").write_bytes(b"\x89PNG truncated")
    report = evaluate(FakeDetector(), discover_plain(tmp_path / "ok", tmp_path / "ng"))
    assert report["skipped"] == [{"file": "ng/broken.png", "reason": report["skipped"][0]["reason"]}]
    assert "not a readable image" in report["skipped"][0]["reason"]
    assert report["metrics"]["image_auroc"] == pytest.approx(5 / 6)  # 200 beats all three good, 75 beats two
    assert report["metrics"]["pixel_auroc"] is None and report["metrics"]["aupro"] is None
    assert "plain" in report["metrics"]["reasons"]["pixel_auroc"]
    assert "n/a: pixel_auroc: no ground-truth masks" in report_markdown(report)


# ---------------------------------------------------------------------------------------------- command


@pytest.fixture
def fake_loader(monkeypatch: pytest.MonkeyPatch) -> Dict[str, FakeDetector]:
    """Replaces bundle loading with the FakeDetector test double (the real Detector is tested by the lead)."""
    made: Dict[str, FakeDetector] = {}

    def load(bundle, backend, ef, exact_search, threads):
        made["detector"] = FakeDetector()
        return made["detector"]

    monkeypatch.setattr(eval_cli, "load_detector", load)
    return made


def test_eval_command_writes_report_table_and_overlays(tmp_path: Path, fake_loader) -> None:
    root = make_category(tmp_path / "widget")
    out = tmp_path / "out"
    result = CliRunner().invoke(eval_cli.eval_command, [
        str(tmp_path / "bundle"), str(root), "--report", str(out / "r.json"),
        "--save-maps", str(out / "maps"),
        "--top", "2", "--pixel-size", "24", "-q"])
    assert result.exit_code == 0, result.output
    assert "| all | 4 | 6 |" in result.stdout
    assert "crack/002.png" in result.stderr  # the missing mask is warned about
    report = json.loads((out / "r.json").read_text())
    assert report["settings"]["pixel_size"] == 24 and report["pixel_evaluation"]["map_sizes"] == ["24x20"]
    files = report["overlays"]["files"]
    assert [f["kind"] for f in files] == ["false_alarm", "false_alarm", "miss", "miss"]
    good_scores = sorted((e["score"] for e in report["images"] if e["label"] == 0), reverse=True)
    assert [f["score"] for f in files[:2]] == good_scores[:2]
    for entry in files:
        picture = cv2.imread(str(out / "maps" / entry["file"]))
        assert picture is not None and picture.shape == (40, 48, 3)
    assert fake_loader["detector"].closed


def test_eval_command_errors_are_messages_not_tracebacks(tmp_path: Path, fake_loader) -> None:
    runner = CliRunner()
    missing = runner.invoke(eval_cli.eval_command, [str(tmp_path / "b"), str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "folder not found" in missing.output
    assert "Traceback" not in missing.output
    both = runner.invoke(eval_cli.eval_command, [str(tmp_path / "b"), str(tmp_path), "--good", str(tmp_path)])
    assert both.exit_code == 2 and "not both" in both.output
    root = make_category(tmp_path / "widget")
    _write(root / "ground_truth" / "crack" / "000_mask.png", np.zeros((3, 3), np.uint8))
    bad_mask = runner.invoke(eval_cli.eval_command, [str(tmp_path / "b"), str(root)])
    assert bad_mask.exit_code == 1 and "000_mask.png" in bad_mask.output and "3x3" in bad_mask.output
    assert "detector" not in fake_loader  # masks are checked before the bundle is loaded


def test_evaluation_imports_neither_torch_nor_sklearn() -> None:
    code = ("import sys, patchcore_edge.cli.eval, patchcore_edge.evaluation.evaluate; "
            "bad = [m for m in ('torch', 'sklearn', 'torchvision') if m in sys.modules]; "
            "print(', '.join(bad)); sys.exit(1 if bad else 0)")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                               check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_eval_command_plain_layout_with_progress_bar(tmp_path: Path, fake_loader) -> None:
    for folder, levels in (("ok", [60, 70]), ("ng", [200, 65])):
        for i, level in enumerate(levels):
            _write(tmp_path / folder / f"{i}.png", np.full((16, 16, 3), level, np.uint8))
    result = CliRunner().invoke(eval_cli.eval_command, [
        str(tmp_path / "bundle"), "--good", str(tmp_path / "ok"), "--bad", str(tmp_path / "ng"),
        "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    assert "scoring" in result.stderr  # the progress bar writes to stderr, the table to stdout
    assert "| all | 2 | 2 | 0.7500 | n/a | n/a |" in result.stdout
    assert "| bad | 2 | 2 |" in result.stdout


def test_evaluate_reports_the_inspected_fraction(tmp_path: Path) -> None:
    from patchcore_edge.preprocess import InputSpec

    data = discover_mvtec(make_category(tmp_path / "widget", size=(60, 120)))  # 1:2 images
    cropped = FakeDetector()
    cropped.spec = InputSpec(resize=64, crop=56)  # type: ignore[attr-defined]
    report = evaluate(cropped, data)
    # 60x120 -> 64x128, a 56x56 window: 3136 / 8192 of the image is seen.
    assert report["inspected_fraction"]["median"] == pytest.approx(56 * 56 / (64 * 128))
    assert "blind" not in report_markdown(report) and "never looked at" in report_markdown(report)
    whole = FakeDetector()
    whole.spec = InputSpec(fit="letterbox", crop=56)  # type: ignore[attr-defined]
    report = evaluate(whole, data)
    assert report["inspected_fraction"]["min"] == 1.0 and "never looked at" not in report_markdown(report)
    assert evaluate(FakeDetector(), data)["inspected_fraction"] is None
