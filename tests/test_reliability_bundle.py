"""A bundle is checked as a whole, and export never destroys what is not ours (issue 12).

Every case edits a real exported bundle and re-hashes it, so the integrity check alone cannot catch it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np
import pytest
from click.testing import CliRunner

from patchcore_edge.bundle import MANIFEST, Bundle, BundleError, read_manifest, write_new_bundle
from patchcore_edge.cli import main
from patchcore_edge.runtime.backends import refuse_external_data


def _rehash(folder: Path, manifest: Dict[str, Any], raw: str = "") -> None:
    for name in manifest["files"]:
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / MANIFEST).write_text(raw or json.dumps(manifest, indent=2))


def _copy(tiny_bundle: Path, tmp_path: Path) -> tuple:
    folder = tmp_path / "b"
    shutil.copytree(tiny_bundle, folder)
    return folder, json.loads((folder / MANIFEST).read_text())


def _image(tmp_path: Path) -> str:
    import cv2

    path = tmp_path / "part.png"
    cv2.imwrite(str(path), np.full((80, 80, 3), 100, np.uint8))
    return str(path)


def _load(folder: Path) -> Any:
    from patchcore_edge.runtime.detector import Detector

    return Detector.load(folder, backend="onnxruntime")


def _first_output_shape_follows(m: Dict[str, Any]) -> None:
    # The manifest stays consistent with itself (its recorded output shape says the same), not with the network.
    features = m["features"]
    features["output_shapes"][features["outputs"][0]] = [*features["grid"], features["dim"]]


def _grid_off(m: Dict[str, Any], folder: Path) -> None:
    m["features"]["grid"] = [m["features"]["grid"][0] + 1, m["features"]["grid"][1]]
    _first_output_shape_follows(m)


def _crop_off(m: Dict[str, Any], folder: Path) -> None:
    m["input"]["crop"] += 8
    m["input"]["resize"] += 8
    if "size" in m["input"]:  # format with input geometry: [width, height] says the same square
        m["input"]["size"] = [m["input"]["crop"], m["input"]["crop"]]


def _dim_off(m: Dict[str, Any], folder: Path) -> None:
    # bank and manifest agree with each other (dim + 1) but not with the network's output
    from patchcore_edge.search import build_index, save_index

    bank = np.load(folder / "memory_bank.npy")
    bank = np.ascontiguousarray(np.concatenate([bank, np.zeros_like(bank[:, :1])], axis=1))
    np.save(folder / "memory_bank.npy", bank)
    save_index(build_index(bank), folder / "index.hnsw")
    m["features"]["dim"] += 1
    m["method"]["arrays"]["memory_bank"]["shape"][1] += 1
    _first_output_shape_follows(m)


def _neighbours_wrong(m: Dict[str, Any], folder: Path) -> None:
    neighbours = np.load(folder / "bank_neighbours.npy")
    rows = neighbours.shape[0]
    wrong = neighbours.copy()  # in range, distinct, self still first: only the distances can tell
    wrong[:, 1:] = (np.arange(rows)[:, None] + 3 * np.arange(1, neighbours.shape[1])[None, :]) % rows
    np.save(folder / "bank_neighbours.npy", wrong)


def _set(path: str, value: Any) -> Callable[[Dict[str, Any], Path], None]:
    def edit(m: Dict[str, Any], folder: Path) -> None:
        *parents, leaf = path.split(".")
        node = m
        for key in parents:
            node = node[key]
        node[leaf] = value
    return edit


@pytest.mark.parametrize("edit, words", [
    (_grid_off, "features has shape"),
    (_crop_off, "has shape"),
    (_dim_off, "features has shape"),
    (_neighbours_wrong, "nearest bank rows"),
    (_set("score.gaussian_sigma", 1e9), "gaussian_sigma"),
    (_set("input.resize", 4096), "input.resize"),
    (_set("input.resize", 256.9), "input.resize"),
    (_set("input.resize", "256"), "input.resize"),
    (_set("format_version", True), "format_version"),
    (_set("training_images.file", "../outside/t.json"), "not a plain file name"),
    (_set("method.params.first_pass", {"kind": "faiss"}), "method.params.first_pass must be"),
    (_set("method.params.first_pass", []), "method.params.first_pass must be"),
    (_set("method.params.first_pass", {"kind": "kmeans_cells", "cells": 0}), "first_pass.cells must be"),
    (_set("method.params.first_pass", {"kind": "kmeans_cells", "cells": 10 ** 9}), "first_pass.cells must be"),
    (_set("method.params.first_pass", {"kind": "kmeans_cells", "cells": True}), "first_pass.cells must be"),
    (_set("method.params.first_pass", {"kind": "kmeans_cells", "cells": 2.5}), "first_pass.cells must be"),
])
def test_inconsistent_rehashed_bundles_are_refused_at_load(tiny_bundle: Path, tmp_path: Path,
                                                          edit: Callable[[Dict[str, Any], Path], None],
                                                          words: str) -> None:
    folder, manifest = _copy(tiny_bundle, tmp_path)
    edit(manifest, folder)
    _rehash(folder, manifest)
    with pytest.raises(BundleError) as caught:
        _load(folder)
    assert words in str(caught.value), str(caught.value)
    result = CliRunner().invoke(main, ["run", str(folder), _image(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output and words in result.output


def test_the_recorded_first_pass_cells_are_the_ones_used(tiny_bundle: Path, tmp_path: Path) -> None:
    folder, manifest = _copy(tiny_bundle, tmp_path)
    recorded = manifest["method"]["params"]["first_pass"]
    with _load(tiny_bundle) as detector:
        # More than 2 cells by default, so that the check below can tell whether the recorded number is used.
        assert 2 < detector.scorer.search.index.cells <= recorded["cells"]
    manifest["method"]["params"]["first_pass"] = {"kind": "kmeans_cells", "cells": 2}
    _rehash(folder, manifest)
    with _load(folder) as detector:
        assert detector.scorer.search.index.cells <= 2
        assert detector.predict(_image(tmp_path)).score >= 0.0


@pytest.mark.parametrize("raw, words", [
    ('"gaussian_sigma": Infinity', "Infinity is not a number"),
    ('"gaussian_sigma": NaN', "NaN is not a number"),
])
def test_non_finite_numbers_are_refused(tiny_bundle: Path, tmp_path: Path, raw: str, words: str) -> None:
    folder, manifest = _copy(tiny_bundle, tmp_path)
    text = json.dumps(manifest, indent=2)
    text = text.replace(f'"gaussian_sigma": {json.dumps(manifest["score"]["gaussian_sigma"])}', raw)
    assert raw in text
    (folder / MANIFEST).write_text(text)
    with pytest.raises(BundleError, match=words):
        Bundle.load(folder)


def test_deeply_nested_manifest_is_one_line_in_every_command(tiny_bundle: Path, tmp_path: Path) -> None:
    folder, manifest = _copy(tiny_bundle, tmp_path)
    (folder / MANIFEST).write_text(json.dumps(manifest)[:-1] + ', "deep": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(BundleError, match="nested too deeply|nested deeper"):
        Bundle.load(folder)
    image = _image(tmp_path)
    for command in (["calibrate", str(folder), str(Path(image).parent)], ["run", str(folder), image]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code != 0 and "Traceback" not in result.output and "nested" in result.output


# ------------------------------------------------------------------------------------------ ONNX external data


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def _field(number: int, payload: Any) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _external_data_model(folder: Path) -> Path:
    """y = x + w with w (4 floats) in the external file w.bin: an ONNX protobuf written field by field."""
    (folder / "w.bin").write_bytes(struct.pack("<4f", 1, 2, 3, 4))
    tensor_type = _field(1, 1) + _field(2, _field(1, _field(1, 4)))
    value = lambda name: _field(1, name) + _field(2, _field(1, tensor_type))  # noqa: E731
    weight = (_field(1, 4) + _field(2, 1) + _field(8, "w") + _field(13, _field(1, "location") + _field(2, "w.bin"))
              + _field(14, 1))
    node = _field(1, "x") + _field(1, "w") + _field(2, "y") + _field(4, "Add")
    graph = _field(1, node) + _field(2, "g") + _field(5, weight) + _field(11, value("x")) + _field(12, value("y"))
    model = _field(1, 7) + _field(7, graph) + _field(8, _field(2, 13))
    path = folder / "features.onnx"
    path.write_bytes(model)
    return path


def test_onnx_external_data_is_refused(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = _external_data_model(tmp_path)
    # The model is real: ONNX Runtime reads its weight from w.bin, which no manifest sha256 covers.
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": np.zeros(4, np.float32)})[0]
    assert out.tolist() == [1, 2, 3, 4]
    with pytest.raises(BundleError, match="external data file"):
        refuse_external_data(model)


def test_exported_network_has_no_external_data(tiny_bundle: Path) -> None:
    refuse_external_data(tiny_bundle / "features.onnx")


# ------------------------------------------------------------------------------------------ writing bundles


def _tiny_build(staging: Path) -> Dict[str, Any]:
    source = Path(os.environ["_TINY"])
    for path in source.iterdir():
        if path.name != MANIFEST:
            shutil.copy(path, staging / path.name)
    manifest = json.loads((source / MANIFEST).read_text())
    manifest.pop("files")
    return manifest


def test_force_replaces_only_a_bundle_of_ours(tiny_bundle: Path, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("_TINY", str(tiny_bundle))
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "me.jpg").write_bytes(b"precious")
    with pytest.raises(BundleError, match="not a patchcore-edge bundle"):
        write_new_bundle(photos, _tiny_build, force=True)
    assert (photos / "me.jpg").read_bytes() == b"precious"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    with pytest.raises(BundleError, match="not a folder"):
        write_new_bundle(a_file, _tiny_build, force=True)
    assert a_file.read_text() == "keep"
    ours = write_new_bundle(tmp_path / "ours", _tiny_build)
    write_new_bundle(ours, _tiny_build, force=True)
    read_manifest(ours)


def test_export_into_the_nominal_folder_is_refused_before_work(tmp_path: Path) -> None:
    from tests.conftest import make_nominal_folder

    good = make_nominal_folder(tmp_path / "good", count=3, size=64)
    before = sorted(p.name for p in good.iterdir())
    for output in (good, good / "bundle"):
        result = CliRunner().invoke(main, ["export", str(good), "-o", str(output), "--force", "-q"])
        assert result.exit_code != 0 and "outside NOMINAL_DIR" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in good.iterdir()) == before


@pytest.mark.parametrize("option, words", [
    (["--batch-size", "0"], "--batch-size"),
    (["--ef", "-1"], "--ef"),
    (["--ef", "8"], "run BUNDLE ... --ef N"),  # PatchCore keeps no index to record it in (format 3)
    (["--method", "spade", "--reduction", "concat"], "--method spade forms its own"),  # refused, not ignored
    (["--device", "cuda"], "--device cuda"),
    (["--device", "banana"], "--device banana"),
])
def test_export_options_are_checked_before_work(tmp_path: Path, option: list, words: str) -> None:
    import torch

    if option[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from tests.conftest import make_nominal_folder

    good = make_nominal_folder(tmp_path / "good", count=3, size=64)
    result = CliRunner().invoke(main, ["export", str(good), "-o", str(tmp_path / "b"), "-q", *option])
    assert result.exit_code != 0 and words in result.output and "Traceback" not in result.output, result.output
    assert "features" not in result.output  # refused before the features stage ran


@pytest.mark.parametrize("content, words", [
    ('{"polygon": [[0, 0], [1, 0]]}', "roi needs at least 3"),
    ('{"polygon": [[0, 0], [1, 0], [1, 2]]}', "roi needs at least 3"),
    ('{"polygon": [[0, 0], [1, 0], [1, NaN]]}', "roi needs at least 3"),
    ("not json", 'expected JSON {"polygon"'),
    ('{"points": []}', 'expected JSON {"polygon"'),
])
def test_a_bad_region_of_interest_file_is_named_before_work(tmp_path: Path, content: str, words: str) -> None:
    from tests.conftest import make_nominal_folder

    good = make_nominal_folder(tmp_path / "good", count=3, size=64)
    roi = tmp_path / "roi.json"
    roi.write_text(content)
    result = CliRunner().invoke(main, ["export", str(good), "-o", str(tmp_path / "b"), "-q", "--roi", str(roi)])
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert f"{roi}: " in result.output and words in result.output, result.output
    assert not (tmp_path / "b").exists()


def test_export_to_a_file_with_force_is_refused_before_work(tmp_path: Path) -> None:
    from tests.conftest import make_nominal_folder

    good = make_nominal_folder(tmp_path / "good", count=3, size=64)
    target = tmp_path / "a_file"
    target.write_text("keep")
    result = CliRunner().invoke(main, ["export", str(good), "-o", str(target), "--force", "-q"])
    assert result.exit_code != 0 and "not a folder" in result.output and target.read_text() == "keep"


def test_bundle_permissions_follow_the_umask(tiny_bundle: Path, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("_TINY", str(tiny_bundle))
    old = os.umask(0o022)
    try:
        folder = write_new_bundle(tmp_path / "shared", _tiny_build)
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_leftovers_of_a_killed_export_are_cleaned_or_reported(tiny_bundle: Path, tmp_path: Path,
                                                             monkeypatch: Any, caplog: Any) -> None:
    monkeypatch.setenv("_TINY", str(tiny_bundle))
    target = tmp_path / "b"
    stale = tmp_path / ".b.staging-abc"
    stale.mkdir()
    os.utime(stale, (0, 0))
    # a kill between the two renames of --force: the old bundle moved aside, the target missing
    aside = tmp_path / ".b.old-123"
    shutil.copytree(tiny_bundle, aside)
    with pytest.raises(BundleError, match=r"previous bundle at .*\.b\.old-123"):
        Bundle.load(target)
    with caplog.at_level("INFO", logger="patchcore_edge"):
        write_new_bundle(target, _tiny_build)
    assert not stale.exists()
    assert aside.exists() and "interrupted export left the previous bundle" in caplog.text
    write_new_bundle(target, _tiny_build, force=True)  # now the target is valid: the old copy is ours to remove
    assert not aside.exists()


def test_export_and_calibrate_skip_hostile_images(tiny_bundle: Path, tmp_path: Path) -> None:
    from tests.conftest import make_nominal_folder
    from tests.test_imageio import _png_header_only

    good = make_nominal_folder(tmp_path / "good", count=12, size=72)
    (good / "bomb.png").write_bytes(_png_header_only(40000, 40000))
    (good / "line.png").write_bytes(_png_header_only(16000, 1, rows=1))
    os.mkfifo(good / "pipe.png")
    result = CliRunner().invoke(main, ["export", str(good), "-o", str(tmp_path / "b"), "--resize", "72", "--crop",
                                       "64", "--no-engine", "-q"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "bomb.png" in result.output and "line.png" in result.output and "pipe.png" in result.output
    copy = tmp_path / "c"
    shutil.copytree(tiny_bundle, copy)
    result = CliRunner().invoke(main, ["calibrate", str(copy), str(good), "-q"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
