"""The export's coreset options end to end: method, device-profile cap, Dask, manifest record, progress lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_nominal_folder
from patchcore_edge.bundle import read_manifest
from patchcore_edge.cli import main

pytest.importorskip("torch")

SMALL = ["--resize", "72", "--crop", "64", "--coreset-ratio", "0.25", "--no-engine"]


def test_partitioned_export_records_the_selection_and_prints_progress_lines(tmp_path: Path) -> None:
    folder = make_nominal_folder(tmp_path / "good", count=6, size=80)
    result = CliRunner().invoke(main, ["export", str(folder), "-o", str(tmp_path / "b"), *SMALL,
                                       "--coreset-method", "partitioned"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    coreset = read_manifest(tmp_path / "b")["method"]["params"]["coreset"]
    assert coreset["selection"] == "partitioned" and coreset["seconds"] >= 0 and coreset["cells"] >= 1
    assert coreset["coverage_radius"] > 0 and coreset["coverage_radius_bound"] >= coreset["coverage_radius"] * (
        1 - 1e-5)
    # CliRunner's stderr is no terminal: every stage still reports, in lines, up to done.
    for stage in ("features", "coreset", "index", "onnx"):
        assert any(line.startswith(f"{stage}:") and "(100%)" in line for line in result.stderr.splitlines()), \
            result.stderr
    assert "selection" in result.stdout and "partitioned, radius" in result.stdout


def test_dask_local_export_gives_the_in_process_bank(tmp_path: Path) -> None:
    pytest.importorskip("dask.distributed")
    folder = make_nominal_folder(tmp_path / "good", count=6, size=80)
    banks = []
    for name, extra in (("plain", []), ("dask", ["--dask", "local"])):
        result = CliRunner().invoke(main, ["export", str(folder), "-o", str(tmp_path / name), *SMALL, "-q",
                                           "--coreset-method", "partitioned", *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        banks.append(np.load(tmp_path / name / "memory_bank.npy"))
    # The same rows in the same order. Their values may differ in the last bits: torch's convolutions round
    # differently with a worker's thread count (seen at load 16: 5e-7), so bit equality is not a property of
    # the feature pass; a different selection would differ by whole feature distances.
    # Through Dask with PatchCore's default backbone (EfficientNet-Lite1: features up to ~13, the rounding
    # differences up to ~1e-5) the tolerance is the features' scale times float32 rounding of a few ulps.
    assert banks[0].shape == banks[1].shape
    np.testing.assert_allclose(banks[0], banks[1], rtol=1e-5, atol=2e-6 * float(np.abs(banks[0]).max()))
    # ... and row for row the same selection: each row's nearest row of the other bank is itself.
    squared = (banks[1] ** 2).sum(1)[:, None] - 2.0 * banks[1] @ banks[0].T + (banks[0] ** 2).sum(1)[None, :]
    assert np.array_equal(squared.argmin(axis=1), np.arange(len(banks[0])))


@pytest.mark.parametrize("profile, message", [("cpu-only", "no memory size"), ("no-such-board", "no-such-board")])
def test_bad_device_profile_is_one_line(tmp_path: Path, profile: str, message: str) -> None:
    folder = make_nominal_folder(tmp_path / "good", count=6, size=80)
    result = CliRunner().invoke(main, ["export", str(folder), "-o", str(tmp_path / "b"), *SMALL, "-q",
                                       "--device-profile", profile])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()


def test_device_profile_caps_the_bank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from patchcore_edge.export import coreset_select

    real = coreset_select.bank_size_limit
    seen = {}

    def tiny_limit(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen["limit"] = real(*args, **kwargs)
        return 40, "memory budget of test board"

    monkeypatch.setattr(coreset_select, "bank_size_limit", tiny_limit)
    folder = make_nominal_folder(tmp_path / "good", count=6, size=80)
    result = CliRunner().invoke(main, ["export", str(folder), "-o", str(tmp_path / "b"), *SMALL, "-q",
                                       "--device-profile", "jetson-orin-nano"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert seen["limit"][0] == 30_000  # the real profile's cap, computed on the real extractor
    manifest = read_manifest(tmp_path / "b")
    coreset = manifest["method"]["params"]["coreset"]
    assert coreset["size"] == 40 and "capped from" in coreset["size_limit"]
    assert "capped from" in result.stdout
