"""`patchcore-edge export` end to end on small real images: bad files are skipped and named, the manifest is
complete and true to the files, too few images and an existing bundle are refused with one clear line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_nominal_folder
from patchcore_edge.bundle import read_manifest
from patchcore_edge.cli import main
from patchcore_edge.search import default_cells

pytest.importorskip("torch")

SMALL = ["--resize", "72", "--crop", "64", "--coreset-ratio", "0.25", "--no-engine", "-q"]


def _export(args: List[str]):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, ["export", *args, *SMALL], catch_exceptions=False)


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """Six good images (one grayscale, one 16-bit, one RGBA) and four files that are not usable images."""
    folder = make_nominal_folder(tmp_path / "good", count=6, size=80)
    images = sorted(folder.iterdir())
    def colour(path: Path) -> np.ndarray:
        return cv2.imread(str(path), cv2.IMREAD_COLOR)

    cv2.imwrite(str(images[1]), cv2.cvtColor(colour(images[1]), cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(images[2]), colour(images[2]).astype(np.uint16) * 257)
    cv2.imwrite(str(images[3]), cv2.cvtColor(colour(images[3]), cv2.COLOR_BGR2BGRA))
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is not a picture\n")
    (folder / "truncated.png").write_bytes(images[0].read_bytes()[:200])
    (folder / "readme.txt").write_text("good parts from line 3\n")
    return folder


def test_bad_files_are_skipped_and_named_and_the_manifest_tells_the_truth(messy_folder: Path,
                                                                          tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    result = _export([str(messy_folder), "-o", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("empty.png", "notes.png", "truncated.png", "readme.txt"):
        lines = [line for line in result.output.splitlines() if name in line]
        assert lines and lines[0].startswith("skipped "), (name, result.output)
    assert "6 used, 4 skipped" in result.output

    manifest = read_manifest(out, verify_files=True)
    assert manifest["training_images"]["count"] == 6
    hashes = json.loads((out / manifest["training_images"]["file"]).read_text())["sha256"]
    assert len(hashes) == 6 and len(set(hashes)) == 6
    assert manifest["backbone"]["name"] == "efficientnet_lite1"  # PatchCore's default (geometry.md, session 6)
    assert manifest["features"]["reduction_order"] == "concat" and manifest["features"]["dim"] == 120
    assert len(manifest["backbone"]["weights"]["sha256"]) == 64
    assert manifest["input"]["crop"] == 64 and manifest["input"]["resize"] == 72
    grid = manifest["features"]["grid"]
    patches = 6 * grid[0] * grid[1]
    assert manifest["method"]["params"]["coreset"]["patches"] == patches
    assert manifest["method"]["params"]["coreset"]["size"] == round(0.25 * patches)
    bank = np.load(out / "memory_bank.npy", allow_pickle=False)
    assert bank.shape == (manifest["method"]["params"]["coreset"]["size"], manifest["features"]["dim"]) and bank.dtype == np.float32
    assert manifest["features"]["onnx_parity"]["max_abs_diff"] <= manifest["features"]["onnx_parity"]["tolerance"]
    assert manifest["format_version"] == 3 and "index" not in manifest["method"]["params"]
    assert manifest["method"]["params"]["first_pass"] == {"kind": "kmeans_cells", "cells": default_cells(bank.shape[0])}
    # No search index file since format 3: the runtime derives its first pass from the bank.
    assert set(manifest["files"]) == {"memory_bank.npy", "bank_neighbours.npy", "features.onnx",
                                      "training_images.json"} and not (out / "index.hnsw").exists()


def test_too_few_images_is_one_line_with_the_count(tmp_path: Path) -> None:
    folder = make_nominal_folder(tmp_path / "good", count=3, size=80)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n")
    result = CliRunner().invoke(main, ["export", str(folder), "-o", str(tmp_path / "b"), *SMALL])
    assert result.exit_code != 0
    assert "found 3 usable image(s)" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("problem", ["missing", "empty"])
def test_missing_or_empty_folder(tmp_path: Path, problem: str) -> None:
    folder = tmp_path / "good"
    if problem == "empty":
        folder.mkdir()
    result = CliRunner().invoke(main, ["export", str(folder), "-o", str(tmp_path / "b"), *SMALL])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert str(folder) in result.output


def test_existing_bundle_is_kept_without_force_and_replaced_with_it(tiny_bundle: Path, tmp_path: Path) -> None:
    folder = make_nominal_folder(tmp_path / "good", count=6, size=80)
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for force in ([], ["--force"]):  # a folder that is not a bundle is never replaced, not even with --force
        refused = CliRunner().invoke(main, ["export", str(folder), "-o", str(out), *SMALL, *force])
        assert refused.exit_code != 0 and "not a patchcore-edge bundle" in refused.output
        assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    shutil.copytree(tiny_bundle, out, dirs_exist_ok=True)
    refused = CliRunner().invoke(main, ["export", str(folder), "-o", str(out), *SMALL])
    assert refused.exit_code != 0 and "--force" in refused.output

    replaced = _export([str(folder), "-o", str(out), "--force"])
    assert replaced.exit_code == 0, replaced.output
    assert read_manifest(out, verify_files=True)["training_images"]["count"] == 6


@pytest.mark.parametrize("option, message", [
    (["--coreset-ratio", "1.5"], "coreset ratio must be in (0, 1]"),
    (["--coreset-size", "0"], "coreset size must be between 1"),
    (["--weights", "nowhere.pth"], "nowhere.pth"),
])
def test_bad_options_are_one_line(tmp_path: Path, option: List[str], message: str) -> None:
    folder = make_nominal_folder(tmp_path / "good", count=5, size=80)
    result = CliRunner().invoke(main, ["export", str(folder), "-o", str(tmp_path / "b"), *SMALL, *option])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert message in result.output, result.output
