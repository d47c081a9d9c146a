from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest

from patchcore_edge.bundle import (FORMAT_NAME, FORMAT_VERSION, MANIFEST, BundleError, load_array, read_manifest,
                                   update_bundle, write_new_bundle)
from patchcore_edge.preprocess import InputSpec


def _manifest() -> Dict[str, Any]:
    return {
        "format": FORMAT_NAME, "format_version": 1, "toolkit_version": "test",
        "backbone": {"name": "toy"}, "layers": ["a", "b"], "input": InputSpec(64, 56).to_manifest(),
        "features": {"dim": 4, "grid": [7, 7], "stride": 8, "onnx_file": "features.onnx",
                     "input_name": "image", "output_name": "features"},
        "coreset": {"size": 3}, "index": {"M": 8, "ef_construction": 40, "ef": 16},
        "score": {"reweight_neighbours": 2, "rerank": 4, "gaussian_sigma": 4.0},
        "engines": [], "calibration": None,
    }


def _build(staging: Path) -> Dict[str, Any]:
    (staging / "features.onnx").write_bytes(b"onnx bytes")
    np.save(staging / "memory_bank.npy", np.ones((3, 4), np.float32))
    np.save(staging / "bank_neighbours.npy", np.zeros((3, 2), np.int32))
    (staging / "index.hnsw").write_bytes(b"index bytes")
    return _manifest()


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return write_new_bundle(tmp_path / "bundle", _build)


def test_written_bundle_validates_and_lists_every_file(bundle: Path) -> None:
    manifest = read_manifest(bundle)
    assert set(manifest["files"]) == {"features.onnx", "memory_bank.npy", "bank_neighbours.npy", "index.hnsw"}
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_existing_bundle_needs_force(bundle: Path) -> None:
    with pytest.raises(BundleError, match="--force"):
        write_new_bundle(bundle, _build)
    write_new_bundle(bundle, _build, force=True)
    read_manifest(bundle)


def test_interrupted_export_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    def failing(staging: Path) -> Dict[str, Any]:
        _build(staging)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_new_bundle(tmp_path / "b", failing)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_forced_export_keeps_the_old_bundle(bundle: Path) -> None:
    def failing(staging: Path) -> Dict[str, Any]:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_new_bundle(bundle, failing, force=True)
    read_manifest(bundle)


def test_altered_file_is_refused_with_its_name(bundle: Path) -> None:
    path = bundle / "memory_bank.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="memory_bank.npy: sha256 differs"):
        read_manifest(bundle)


def test_missing_file_is_refused(bundle: Path) -> None:
    (bundle / "index.hnsw").unlink()
    with pytest.raises(BundleError, match="index.hnsw: missing"):
        read_manifest(bundle)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format_version=99), "format version 99 is not supported"),
    (lambda m: m.update(format="something"), "not a patchcore-edge bundle"),
    (lambda m: m["features"].update(grid=[7]), "features.grid"),
    (lambda m: m["index"].update(ef=0), "index.ef"),
    (lambda m: m["features"].update(onnx_file="../evil.onnx"), "not a plain file name"),
    (lambda m: m.pop("score"), "missing field 'score'"),
    (lambda m: m["features"].update(output_shapes={"features": [7, 7, 4], "other": [3]}), "features.output_shapes"),
    (lambda m: m["features"].update(output_shapes={"features": [7, 0, 4]}), "features.output_shapes"),
    (lambda m: m["features"].update(output_shapes={"features": [7, 7, 5]}),
     r"features.output_shapes\['features'\] is \[7, 7, 5\], but grid and dim say \[7, 7, 4\]"),
])
def test_invalid_manifest_fields(bundle: Path, edit: Any, message: str) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    edit(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        read_manifest(bundle, verify_files=False)


def test_not_json(bundle: Path) -> None:
    (bundle / MANIFEST).write_text("{ nope")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(bundle)


def test_load_array_checks_dtype_and_shape(bundle: Path) -> None:
    assert load_array(bundle, "memory_bank.npy", np.float32, (3, 4)).shape == (3, 4)
    with pytest.raises(BundleError, match="shape"):
        load_array(bundle, "memory_bank.npy", np.float32, (3, 5))
    with pytest.raises(BundleError, match="dtype"):
        load_array(bundle, "memory_bank.npy", np.float64, (3, 4))


def test_pickled_array_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BundleError, match="obj.npy"):
        load_array(tmp_path, "obj.npy", np.float32, (1,))


def test_update_adds_files_and_removes_old_ones(bundle: Path) -> None:
    update_bundle(bundle, {"calibration-1.json": b"{}"},
                  lambda m: m.update(calibration={"file": "calibration-1.json", "previous": None}))
    update_bundle(bundle, {"calibration-2.json": b"{\"x\": 1}"},
                  lambda m: m.update(calibration={"file": "calibration-2.json", "previous": "calibration-1.json"}))
    manifest = read_manifest(bundle)
    assert manifest["calibration"]["file"] == "calibration-2.json"
    update_bundle(bundle, {}, lambda m: m.update(calibration={"file": "calibration-2.json", "previous": None}),
                  remove=["calibration-1.json"])
    assert not (bundle / "calibration-1.json").exists()
    assert "calibration-1.json" not in read_manifest(bundle)["files"]


def test_update_refuses_to_overwrite_a_listed_file(bundle: Path) -> None:
    with pytest.raises(BundleError, match="already part of the bundle"):
        update_bundle(bundle, {"index.hnsw": b"x"}, lambda m: None)


def test_update_that_breaks_the_schema_changes_nothing(bundle: Path) -> None:
    before = (bundle / MANIFEST).read_bytes()
    with pytest.raises(BundleError):
        update_bundle(bundle, {"calibration-x.json": b"{}"}, lambda m: m.update(calibration={"file": "nope.json"}))
    assert (bundle / MANIFEST).read_bytes() == before
    read_manifest(bundle)
