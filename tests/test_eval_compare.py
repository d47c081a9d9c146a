"""`eval BUNDLE... DATASET_DIR`: several real bundles on one test set, a row each; bad input; method caveats.

Real tiny PatchCore bundles (offline MobileNetV2, 64 px input, few bottle images) and a tiny MVTec-layout
category made from bottle test images in a temporary folder (never in the repository).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from conftest import BOTTLE
from patchcore_edge.cli import eval as eval_cli
from patchcore_edge.methods.base import Scorer
from patchcore_edge.methods.patchcore import PatchCoreScorer

SIZE = 96  # side of the shrunk bottle images


def _shrink(source: Path, target: Path, interpolation: int) -> None:
    image = cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
    target.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(target), cv2.resize(image, (SIZE, SIZE), interpolation=interpolation))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """Two bundles that differ in coreset ratio and input fit, and a 3 good + 3 broken category with masks."""
    if not BOTTLE.is_dir():
        pytest.skip("../shared/data/mvtec_ad/bottle is absent")
    pytest.importorskip("torch")
    from patchcore_edge.export.pipeline import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("compare")
    for path in sorted((BOTTLE / "train" / "good").glob("*.png"))[:6]:
        _shrink(path, root / "nominal" / path.name, cv2.INTER_AREA)
    category = root / "bottle_small"
    for defect in ("good", "broken_large"):
        for path in sorted((BOTTLE / "test" / defect).glob("*.png"))[:3]:
            _shrink(path, category / "test" / defect / path.name, cv2.INTER_AREA)
            if defect != "good":
                mask = BOTTLE / "ground_truth" / defect / f"{path.stem}_mask.png"
                _shrink(mask, category / "ground_truth" / defect / mask.name, cv2.INTER_NEAREST)
    made = {"category": category, "root": root}
    for name, extra in (("dense", {"coreset_ratio": 0.25}),
                        ("sparse", {"coreset_ratio": 0.05, "fit": "crop", "resize": 72})):
        options = ExportOptions(nominal_dir=root / "nominal", output=root / name, crop=64, engine=False,
                                parity_images=2, **{"resize": 64, **extra})
        made[name] = export_bundle(options).bundle
    return made


def _eval(args: List[Any]) -> Any:
    return CliRunner().invoke(eval_cli.eval_command, [str(a) for a in args] + ["-q", "--threads", "1"])


def _rows(path: Path) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = json.loads(path.read_text())["rows"]
    return rows


def _table(stdout: str) -> List[str]:
    """The Markdown table's header and rows (not its alignment line)."""
    return [line for line in stdout.splitlines() if line.startswith("| ") and not line.startswith("| ---")]


def _bytes_on_disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def test_two_bundles_one_table_and_every_row_in_the_report(setup: Dict[str, Path], tmp_path: Path) -> None:
    from patchcore_edge.runtime.detector import Detector

    report = tmp_path / "compare.json"
    result = _eval([setup["dense"], setup["sparse"], setup["category"], "--report", report])
    assert result.exit_code == 0, result.output
    table = _table(result.stdout)
    assert table[0].startswith("| bundle | method | backbone | fit | image AUROC | pixel AUROC | AUPRO@0.3 |")
    assert len(table) == 3  # the header and a row per bundle
    assert "| patchcore | efficientnet_lite1 | squash |" in table[1] and "| 1.000 |" in table[1]
    # 96 px images resized to 72, a 64 px centre crop: (64 / 72)^2 of each image is seen.
    assert "| patchcore | efficientnet_lite1 | crop |" in table[2] and f"| {(64 / 72) ** 2:.3f} |" in table[2]

    rows = _rows(report)
    assert [r["bundle"] for r in rows] == [str(setup["dense"]), str(setup["sparse"])]
    assert rows[0]["method_params"] != rows[1]["method_params"]  # the coreset ratios differ
    for row, name in zip(rows, ("dense", "sparse")):
        assert row["error"] is None and row["caveats"] == []
        assert row["size_mb"] == pytest.approx(_bytes_on_disk(setup[name]) / 1e6)
        assert row["latency_ms_median"] > 0
        assert {"features", "search_score"} <= set(row["stages_ms_median"])
        assert all(ms > 0 for ms in row["stages_ms_median"].values())
        images = row["report"]["images"]
        assert len(images) == 6
        labels = [i["label"] for i in images]
        assert row["image_auroc"] == pytest.approx(roc_auc_score(labels, [i["score"] for i in images]))
        assert 0.0 <= row["pixel_auroc"] <= 1.0 and 0.0 <= row["aupro"] <= 1.0
        # The row holds this bundle's scores, not another's: score one image again with the runtime.
        first = images[0]
        with Detector.load(setup[name], threads=1) as detector:
            again = detector.predict(str(setup["category"] / first["file"])).score
        assert first["score"] == pytest.approx(again, rel=1e-6)
    assert rows[0]["inspected_fraction"] == 1.0
    assert rows[1]["inspected_fraction"] == pytest.approx((64 / 72) ** 2)


def test_a_broken_bundle_gets_a_row_saying_why(setup: Dict[str, Path], tmp_path: Path) -> None:
    bad_bank = tmp_path / "bad_bank"
    shutil.copytree(setup["dense"], bad_bank)
    (bad_bank / "memory_bank.npy").write_bytes(b"not an array")
    bad_manifest = tmp_path / "bad_manifest"
    shutil.copytree(setup["dense"], bad_manifest)
    (bad_manifest / "manifest.json").write_text("{ not json", encoding="utf-8")
    report = tmp_path / "compare.json"
    result = _eval([bad_bank, setup["sparse"], bad_manifest, setup["category"], "--report", report])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "2 of 3 bundles could not be evaluated" in result.stderr
    table = _table(result.stdout)
    assert len(table) == 4
    assert "memory_bank.npy" in table[1] and "not evaluated:" in table[1]
    assert "| patchcore | efficientnet_lite1 | squash | n/a | n/a | n/a |" in table[1]  # its manifest still reads
    assert "not evaluated:" not in table[2] and "| crop |" in table[2]
    assert "manifest.json" in table[3] and "| ? | ? | ? |" in table[3]
    rows = _rows(report)
    assert [r["error"] is None for r in rows] == [False, True, False]
    assert "memory_bank.npy" in rows[0]["error"] and rows[0]["report"] is None
    assert rows[1]["image_auroc"] is not None


def test_paths_that_are_neither_bundle_nor_dataset_are_refused(setup: Dict[str, Path],
                                                                tmp_path: Path) -> None:
    neither = tmp_path / "neither"
    neither.mkdir()
    result = _eval([setup["dense"], neither, setup["category"]])
    assert result.exit_code == 2 and f"{neither}: not a bundle (no manifest.json)" in result.output
    missing = _eval([tmp_path / "typo", setup["dense"], setup["category"]])
    assert missing.exit_code == 2 and "typo: not found" in missing.output
    # Two bundles and no test set: the last path is a bundle.
    no_dataset = _eval([setup["dense"], setup["sparse"]])
    assert no_dataset.exit_code == 2 and "this is a bundle (it has manifest.json)" in no_dataset.output
    # The test set given first: it is not a bundle, and the last path is.
    swapped = _eval([setup["category"], setup["dense"], setup["sparse"]])
    assert swapped.exit_code == 2 and "this is a bundle" in swapped.output
    maps = _eval([setup["dense"], setup["sparse"], setup["category"], "--save-maps", tmp_path / "maps"])
    assert maps.exit_code == 2 and "--save-maps" in maps.output and not (tmp_path / "maps").exists()
    for outcome in (result, missing, no_dataset, swapped, maps):
        assert "Traceback" not in outcome.output
        assert sum(line.startswith("Error:") for line in outcome.output.splitlines()) == 1


def test_several_bundles_on_good_and_bad_folders(setup: Dict[str, Path]) -> None:
    test = setup["category"] / "test"
    result = _eval([setup["dense"], setup["sparse"], "--good", test / "good", "--bad", test / "broken_large"])
    assert result.exit_code == 0, result.output
    table = _table(result.stdout)
    assert len(table) == 3 and all("| n/a | n/a |" in row for row in table[1:])  # no masks: no pixel metrics
    assert "n/a: pixel_auroc: no ground-truth masks (plain --good/--bad layout)" in result.stdout


def test_methods_compare_in_one_table_with_padims_caveat(setup: Dict[str, Path], tmp_path: Path) -> None:
    from patchcore_edge.export.pipeline import ExportOptions, export_bundle

    padim = export_bundle(ExportOptions(nominal_dir=setup["root"] / "nominal", output=tmp_path / "padim",
                                        method="padim", resize=64, crop=64, engine=False,
                                        parity_images=2)).bundle
    report = tmp_path / "compare.json"
    result = _eval([setup["dense"], padim, setup["category"], "--report", report])
    assert result.exit_code == 0, result.output
    table = _table(result.stdout)
    assert "| patchcore |" in table[1] and "| padim | mobilenet_v2 | squash |" in table[2]
    rows = _rows(report)
    assert rows[0]["caveats"] == [] and len(rows[1]["caveats"]) == 1 and "aligned" in rows[1]["caveats"][0]
    assert f"caveat ({padim}, padim): {rows[1]['caveats'][0]}" in result.stdout.split("| --- |", 1)[1]
    assert rows[1]["stages_ms_median"] and rows[1]["image_auroc"] is not None


def test_method_caveats_are_printed_under_the_tables(setup: Dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from patchcore_edge.bundle import Bundle

    bundle = Bundle.load(setup["dense"])
    assert PatchCoreScorer.caveats(bundle) == Scorer.caveats(bundle) == []  # the default: none
    warning = "the test images must show the part where the training images did"
    monkeypatch.setattr(PatchCoreScorer, "caveats", classmethod(lambda cls, bundle: [warning]))
    report = tmp_path / "compare.json"
    result = _eval([setup["dense"], setup["sparse"], setup["category"], "--report", report])
    assert result.exit_code == 0, result.output
    below = result.stdout.split("| --- |", 1)[1]
    assert f"caveat ({setup['dense']}, patchcore): {warning}" in below
    assert f"caveat ({setup['sparse']}, patchcore): {warning}" in below
    assert [r["caveats"] for r in _rows(report)] == [[warning], [warning]]
    single = _eval([setup["dense"], setup["category"]])  # the one-bundle form, per defect type
    assert single.exit_code == 0, single.output
    assert "| all | 3 | 3 |" in single.stdout and "| broken_large | 3 | 3 |" in single.stdout
    assert f"caveat (patchcore): {warning}" in single.stdout.split("| all |", 1)[1]
