"""The public API users expect: top-level names, paths or arrays in, a Result that saves itself, a Bundle model."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_nominal_folder
from patchcore_edge.search import build_index, save_index


def test_top_level_names_without_torch() -> None:
    code = ("import sys; from patchcore_edge import Bundle, Detector, Result, export; "
            "assert callable(export) and Detector.load and Result and Bundle.load; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # the runtime names never pull in the exporter's torch


def test_predict_takes_paths_or_arrays_and_saves_its_maps(tiny_bundle: Path, tmp_path: Path) -> None:
    from patchcore_edge import Detector, Result
    from patchcore_edge.imageio import list_images, read_rgb

    folder = make_nominal_folder(tmp_path / "parts", count=3, size=96, seed=3)
    paths, _ = list_images(folder)
    with Detector.load(tiny_bundle, backend="onnxruntime", threads=1) as detector:
        from_path = detector.predict(paths[0])
        from_array = detector.predict(read_rgb(paths[0]))
        batch = detector.predict_batch([paths[1], read_rgb(paths[2]), str(paths[0])])
    assert isinstance(from_path, Result) and from_path.source == str(paths[0]) and from_array.source is None
    assert from_path.score == from_array.score == batch[2].score
    assert [r.source for r in batch] == [str(paths[1]), None, str(paths[0])]
    written = from_path.save(tmp_path / "out")
    assert set(written) == {"heatmap", "overlay"}  # uncalibrated: no mask
    for file in written.values():
        assert Path(file).is_file() and Path(file).name.startswith(paths[0].stem)
    assert from_array.save(tmp_path / "out", name="array")["heatmap"].endswith("array.heatmap.png")


def test_predict_of_an_unreadable_path_names_the_file(tiny_bundle: Path, tmp_path: Path) -> None:
    from patchcore_edge import Detector
    from patchcore_edge.imageio import ImageReadError

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with Detector.load(tiny_bundle, backend="onnxruntime", threads=1) as detector:
        with pytest.raises(ImageReadError, match="bad.png"):
            detector.predict(bad)


def test_bundle_model_exposes_typed_parts(tiny_bundle: Path) -> None:
    from patchcore_edge import Bundle

    bundle = Bundle.load(tiny_bundle)
    assert bundle.format_version == 3 and bundle.method.name == "patchcore"
    bank = bundle.method_array("memory_bank")
    assert bank.shape == bundle.method.arrays["memory_bank"].shape and bank.shape[1] == bundle.features.dim
    assert bundle.features.outputs == ("features",) and bundle.input_spec.crop == 64
    # Format 3: no index file, the first pass is derived from the bank (recorded in params).
    assert bundle.method.files == {} and bundle.calibration is None
    assert bundle.method.params["first_pass"]["kind"] == "kmeans_cells"
    assert set(bundle.fingerprint()) >= {"features_sha256", "memory_bank_sha256"}
    described = bundle.describe()
    assert described["method"]["name"] == "patchcore" and "files" not in described


def test_version_1_bundle_is_migrated_in_memory(tiny_bundle: Path, tmp_path: Path) -> None:
    """A bundle written by the previous release (format 1) scores the same as today's."""
    from patchcore_edge import Bundle, Detector
    from patchcore_edge.bundle import MANIFEST

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    manifest = json.loads((old / MANIFEST).read_text())
    method = manifest.pop("method")
    params = method["params"]
    # Format 1 always carried index.hnsw (written here as that release did) and its settings.
    save_index(build_index(np.load(old / "memory_bank.npy")), old / "index.hnsw")
    data = (old / "index.hnsw").read_bytes()
    manifest["files"]["index.hnsw"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest.update(format_version=1, coreset=params["coreset"], index={"M": 16, "ef_construction": 200, "ef": 32})
    manifest["score"].update(method="patchcore", reweight_neighbours=params["reweight_neighbours"],
                             rerank=params["rerank"])
    del manifest["features"]["outputs"]
    (old / MANIFEST).write_text(json.dumps(manifest))
    loaded = Bundle.load(old)
    assert loaded.format_version == 3 and loaded.method.params["rerank"] == params["rerank"]
    image = np.full((80, 80, 3), 120, np.uint8)
    with Detector.load(old, backend="onnxruntime") as a, Detector.load(tiny_bundle, backend="onnxruntime") as b:
        assert a.predict(image).score == b.predict(image).score


def test_unknown_method_is_refused_with_the_known_ones(tiny_bundle: Path, tmp_path: Path) -> None:
    from patchcore_edge import BundleError, Detector
    from patchcore_edge.bundle import MANIFEST

    other = tmp_path / "other"
    shutil.copytree(tiny_bundle, other)
    manifest = json.loads((other / MANIFEST).read_text())
    manifest["method"]["name"] = "telepathy"
    (other / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unknown scoring method 'telepathy'.*patchcore"):
        Detector.load(other, backend="onnxruntime")


def test_export_from_python_with_a_list_of_files(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from patchcore_edge import Bundle, export
    from patchcore_edge.imageio import list_images

    folder = make_nominal_folder(tmp_path / "good", count=7, size=80, seed=5)
    paths, _ = list_images(folder)
    summary = export(paths[:6], tmp_path / "bundle", resize=72, crop=64, coreset_ratio=0.25, engine=False)
    assert summary.images == 6
    assert Bundle.load(tmp_path / "bundle").training_image_count == 6


def test_thread_budget_follows_the_cpu_affinity(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `taskset -c 0` the runtime sizes its pools to one core, not to the machine's count."""
    import os

    from patchcore_edge import Detector
    from patchcore_edge.cpu import available_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert available_cores() == 1
    with Detector.load(tiny_bundle, backend="onnxruntime") as detector:
        assert detector.scorer.search.threads == 1  # type: ignore[attr-defined]
        options = detector.backend.session.get_session_options()  # type: ignore[attr-defined]
        assert options.intra_op_num_threads == 1
