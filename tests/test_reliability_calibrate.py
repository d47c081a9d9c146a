"""Calibration: options checked first, reports never become parts, a damaged calibration is replaceable, two
calibrations at once lose nothing (issue 12)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from patchcore_edge.bundle import Bundle, BundleError, bundle_lock
from patchcore_edge.cli import main


def _good(folder: Path, count: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = np.clip(rng.normal(128, 20, (72, 72, 3)), 0, 255).astype(np.uint8)
        assert cv2.imwrite(str(folder / f"g{seed}_{i:03d}.png"), image)
    return folder


@pytest.fixture
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def test_report_dir_inside_the_nominal_folder_or_bundle_is_refused(bundle: Path, tmp_path: Path) -> None:
    good = _good(tmp_path / "good", 3)
    for inside in (good / "report", bundle / "report"):
        result = CliRunner().invoke(main, ["calibrate", str(bundle), str(good), "--report-dir", str(inside)])
        assert result.exit_code == 2 and "--report-dir" in result.output and "lies inside" in result.output
        assert not inside.exists() and "Traceback" not in result.output


@pytest.mark.parametrize("option, words", [
    (["--backend", "foo"], "--backend"),
    (["--false-alarm-rate", "0"], "--false-alarm-rate"),
    (["--confidence", "1.5"], "--confidence"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_bad_options_are_named(bundle: Path, tmp_path: Path, option: list, words: str) -> None:
    good = _good(tmp_path / "good", 3)
    result = CliRunner().invoke(main, ["calibrate", str(bundle), str(good), *option])
    assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output


def test_a_damaged_calibration_file_is_replaced(bundle: Path, tmp_path: Path) -> None:
    good = _good(tmp_path / "good", 24)
    first = CliRunner().invoke(main, ["calibrate", str(bundle), str(good), "-q"])
    assert first.exit_code == 0, first.output
    current = Bundle.load(bundle).calibration
    assert current is not None
    (bundle / current.file).write_text("[" * 50000 + "]" * 50000)  # damaged: and nested too deep to parse
    again = CliRunner().invoke(main, ["calibrate", str(bundle), str(good), "-q"])
    assert again.exit_code == 0 and "Traceback" not in again.output, again.output
    assert Bundle.load(bundle, verify_calibration=False).calibration.file != current.file


def test_the_lock_makes_a_second_writer_wait_or_fail_with_a_message(bundle: Path) -> None:
    with bundle_lock(bundle, "calibrate"):
        with pytest.raises(BundleError, match=r"calibrate \(pid \d+\) is changing this bundle"):
            with bundle_lock(bundle, "calibrate", wait_s=0.3):
                pass
    with bundle_lock(bundle, "calibrate", wait_s=0.3):
        pass
    assert not (bundle / ".patchcore-edge.lock").exists()


def test_two_calibrations_at_once_both_kept(bundle: Path, tmp_path: Path) -> None:
    goods = [_good(tmp_path / f"good{k}", 24, seed=k) for k in (1, 2)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    children = [subprocess.Popen([sys.executable, "-c", "from patchcore_edge.cli import main; main()",
                                  "calibrate", str(bundle), str(good), "-q"], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for good in goods]
    outputs = [child.communicate(timeout=300)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs
    loaded = Bundle.load(bundle)
    ref = loaded.calibration
    assert ref is not None and ref.previous is not None  # the second made the first its previous
    assert {ref.file, ref.previous} <= set(loaded.file_names)


def _limited(args: list, limit: int) -> subprocess.CompletedProcess:
    import resource

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", "from patchcore_edge.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300, preexec_fn=limit_files, env=env)


def test_calibrate_on_a_full_disk_names_the_file_and_keeps_the_bundle(bundle: Path, tmp_path: Path) -> None:
    good = _good(tmp_path / "good", 24)
    before = (bundle / "manifest.json").read_bytes()
    done = _limited(["calibrate", str(bundle), str(good), "-q"], limit=1000)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{bundle}/calibration-" in done.stderr and "File too large" in done.stderr
    assert (bundle / "manifest.json").read_bytes() == before
    Bundle.load(bundle)


def test_export_on_a_full_disk_names_the_file_and_leaves_no_bundle(tmp_path: Path) -> None:
    good = _good(tmp_path / "good", 6)
    target = tmp_path / "out"
    done = _limited(["export", str(good), "-o", str(target), "--resize", "72", "--crop", "64", "-q",
                     "--no-engine"], limit=200_000)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "File too large" in done.stderr and str(tmp_path) in done.stderr
    assert not target.exists() and not [p for p in tmp_path.iterdir() if ".staging-" in p.name]
