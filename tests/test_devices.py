"""Device profiles, board detection on device-tree files the tests write, the memory estimate and the CLI.

Detection runs the real parsing code on a folder laid out like a Jetson's / (proc/device-tree/model,
proc/device-tree/compatible, etc/nv_tegra_release, proc/meminfo). Memory figures are checked against real
hnswlib index files and a real exported ONNX model (the session's tiny bundle).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import pytest
from click.testing import CliRunner

from patchcore_edge import search, trt
from patchcore_edge.bundle import Bundle
from patchcore_edge.devices import memory
from patchcore_edge.cli.devices import devices_group, engine_group
from patchcore_edge.devices.engine import synthetic_images, verify_against_onnxruntime
from patchcore_edge.devices.detect import detect_device, jetpack_for_l4t, parse_nv_tegra_release
from patchcore_edge.devices.profiles import ProfileError, get_profile, load_profiles
from patchcore_edge.preprocess import InputSpec

JETSONS = ["jetson-nano", "jetson-tx2", "jetson-xavier-nx", "jetson-agx-xavier", "jetson-orin-nano",
           "jetson-orin-nx", "jetson-agx-orin"]

# ----------------------------------------------------------------------------------------------- profiles


def test_every_board_has_a_valid_profile_with_sources() -> None:
    profiles = load_profiles()
    assert sorted(profiles) == sorted(JETSONS + ["cuda-workstation", "cpu-only"])
    for name in JETSONS:
        sources = profiles[name].data["sources"]
        for group in ("gpu", "variants", "software", "engines", "detection"):
            assert sources[group].startswith("https://") and "nvidia.com" in sources[group], (name, group)


@pytest.mark.parametrize("name, cc, dla", [
    ("jetson-nano", (5, 3), {"4GB": 0, "2GB": 0}),
    ("jetson-tx2", (6, 2), {"8GB": 0, "4GB": 0}),
    ("jetson-xavier-nx", (7, 2), {"8GB": 2, "16GB": 2}),
    ("jetson-agx-xavier", (7, 2), {"32GB": 2, "64GB": 2}),
    ("jetson-orin-nano", (8, 7), {"8GB": 0, "4GB": 0}),
    ("jetson-orin-nx", (8, 7), {"16GB": 2, "8GB": 1}),
    ("jetson-agx-orin", (8, 7), {"32GB": 2, "64GB": 2}),
])
def test_compute_capability_and_dla_cores(name: str, cc: tuple, dla: Dict[str, int]) -> None:
    profile = get_profile(name)
    assert profile.compute_capability == cc
    assert {v.name: v.dla_cores for v in profile.variants} == dla


@pytest.mark.parametrize("name", ["jetson-nano", "jetson-tx2"])
def test_old_boards_use_onnxruntime_and_no_int8(name: str) -> None:
    profile = get_profile(name)
    assert not profile.engines_supported and profile.precisions == []
    assert profile.data["gpu"]["fast_int8"] is False
    assert profile.data["software"][-1]["tensorrt"] == "8.2.1"
    assert "8.5" in profile.data["engines"]["note"] and "ONNX Runtime" in profile.data["engines"]["note"]
    assert profile.defaults["backend"] == "onnxruntime"


@pytest.mark.parametrize("name", ["jetson-xavier-nx", "jetson-agx-xavier", "jetson-orin-nano", "jetson-orin-nx",
                                  "jetson-agx-orin"])
def test_engine_boards_ship_tensorrt_8_5_or_newer(name: str) -> None:
    profile = get_profile(name)
    assert profile.engines_supported and "int8" in profile.precisions
    newest = max(trt.parse_version(s["tensorrt"]) for s in profile.data["software"])
    assert newest >= (8, 5)


def test_broken_profiles_are_named(tmp_path: Path) -> None:
    good = copy.deepcopy(get_profile("jetson-nano").data)
    (tmp_path / "jetson-nano.json").write_text(json.dumps(good))
    assert list(load_profiles(tmp_path)) == ["jetson-nano"]
    bad = copy.deepcopy(good)
    del bad["sources"]["software"]
    (tmp_path / "jetson-nano.json").write_text(json.dumps(bad))
    with pytest.raises(ProfileError, match=r"jetson-nano\.json: sources\.software is missing"):
        load_profiles(tmp_path)
    (tmp_path / "jetson-nano.json").write_text("{not json")
    with pytest.raises(ProfileError, match=r"jetson-nano\.json: cannot read"):
        load_profiles(tmp_path)
    with pytest.raises(ProfileError, match="known devices: .*jetson-orin-nx"):
        get_profile("jetson-thor")


def test_variant_choice() -> None:
    profile = get_profile("jetson-orin-nx")
    assert profile.variant().name == "8GB"
    assert profile.variant("16gb").dla_cores == 2
    assert profile.variant_for_memory(7620).name == "8GB"
    assert profile.variant_for_memory(15400).name == "16GB"
    with pytest.raises(ProfileError, match="choose one of 16GB, 8GB"):
        profile.variant("32GB")


# ----------------------------------------------------------------------------------------------- detection


def jetson_root(tmp_path: Path, model: Optional[str], compatible: Optional[str], release: Optional[str],
                mem_kb: Optional[int]) -> Path:
    root = tmp_path / "root"
    tree = root / "proc" / "device-tree"
    tree.mkdir(parents=True)
    if model is not None:
        (tree / "model").write_bytes(model.encode() + b"\0")
    if compatible is not None:
        (tree / "compatible").write_bytes(compatible.replace("|", "\0").encode() + b"\0")
    if release is not None:
        (root / "etc").mkdir()
        (root / "etc" / "nv_tegra_release").write_text(release + "\n")
    if mem_kb is not None:
        (root / "proc" / "meminfo").write_text(f"MemTotal:       {mem_kb} kB\nMemFree:         1000 kB\n")
    return root


R35 = "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 2023"
R36 = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 2025"
R32 = "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, DATE: Sat Feb 19 2022"


@pytest.mark.parametrize("model, compatible, release, mem_kb, slug, variant, dla, jetpack", [
    ("NVIDIA Orin NX Developer Kit", "nvidia,p3768-0000+p3767-0001|nvidia,p3767-0001|nvidia,tegra234", R35,
     7_620_000, "jetson-orin-nx", "8GB", 1, "5.1.2"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "nvidia,p3768-0000+p3767-0000|nvidia,tegra234",
     R36, 15_400_000, "jetson-orin-nx", "16GB", 2, "6.2"),
    ("NVIDIA Jetson Orin Nano Developer Kit", "nvidia,p3768-0000+p3767-0005|nvidia,tegra234", R36, 7_620_000,
     "jetson-orin-nano", "8GB", 0, "6.2"),
    ("Jetson AGX Orin", "nvidia,p3737-0000+p3701-0005|nvidia,p3701-0005|nvidia,tegra234", R35, 64_000_000,
     "jetson-agx-orin", "64GB", 2, "5.1.2"),
    ("NVIDIA Jetson Xavier NX Developer Kit", "nvidia,p3509-0000+p3668-0001|nvidia,tegra194", R35, 7_700_000,
     "jetson-xavier-nx", "8GB", 2, "5.1.2"),
    ("Jetson-AGX", "nvidia,p2972-0000|nvidia,galen|nvidia,tegra194", R32, 31_900_000, "jetson-agx-xavier", "32GB",
     2, "4.6.1/4.6.2"),
    ("NVIDIA Jetson Nano Developer Kit", "nvidia,p3450-0000|nvidia,jetson-nano|nvidia,tegra210", R32, 4_050_000,
     "jetson-nano", "4GB", 0, "4.6.1/4.6.2"),
    ("quill", "nvidia,p2771-0000|nvidia,quill|nvidia,tegra186", R32, 7_850_000, "jetson-tx2", "8GB", 0,
     "4.6.1/4.6.2"),
    # Model string only (a device tree without 'compatible'): keyword match, variant from MemTotal.
    ("NVIDIA Jetson Orin Nano Developer Kit", None, None, 3_700_000, "jetson-orin-nano", "4GB", 0, None),
])
def test_detect_boards_from_device_tree_files(tmp_path: Path, model: str, compatible: Optional[str],
                                              release: Optional[str], mem_kb: int, slug: str, variant: str,
                                              dla: int, jetpack: Optional[str]) -> None:
    root = jetson_root(tmp_path, model, compatible, release, mem_kb)
    info = detect_device(root, probe_cuda=False, probe_tensorrt=False)
    assert (info.slug, info.variant, info.dla_cores, info.jetpack) == (slug, variant, dla, jetpack)
    assert info.model == model and info.memory_total_mb == mem_kb // 1024
    assert info.compute_capability == get_profile(slug).compute_capability


def test_unknown_jetson_and_plain_machine_fall_back(tmp_path: Path) -> None:
    root = jetson_root(tmp_path, "NVIDIA Jetson AGX Thor Developer Kit", "nvidia,p3834-0000|nvidia,tegra264",
                       None, 128_000_000)
    info = detect_device(root, probe_cuda=False, probe_tensorrt=False)
    assert info.slug == "cpu-only" and any("unknown Jetson board" in n for n in info.notes)
    empty = tmp_path / "empty"
    empty.mkdir()
    info = detect_device(empty, probe_cuda=False, probe_tensorrt=False)
    assert (info.slug, info.model, info.compatible, info.l4t_release) == ("cpu-only", None, (), None)


def test_detect_with_the_real_cuda_probe(tmp_path: Path) -> None:
    devices, reason = trt.cuda_devices()
    info = detect_device(tmp_path, probe_cuda=True, probe_tensorrt=True)
    if devices:
        assert info.slug == "cuda-workstation" and info.compute_capability == devices[0].compute_capability
    else:
        assert info.slug == "cpu-only" and any(reason in n for n in info.notes)


@pytest.mark.parametrize("line, release", [
    (R35, "35.4.1"), (R36, "36.4.3"), (R32, "32.7.1"),
    ("# R36 (release), REVISION: 3.0, GCID: 1, BOARD: generic", "36.3.0"), ("garbage", None),
])
def test_parse_l4t_release(line: str, release: Optional[str]) -> None:
    assert parse_nv_tegra_release(line) == release


def test_jetpack_for_unlisted_l4t_patch_uses_the_line() -> None:
    assert jetpack_for_l4t("35.4.1") == "5.1.2"
    assert jetpack_for_l4t("36.4.7") == "6.2.1"
    assert jetpack_for_l4t("40.0.0") is None


def test_stub_only_tensorrt_is_not_mistaken_for_tensorrt() -> None:
    import importlib.util

    spec = importlib.util.find_spec("tensorrt")
    if spec is None or spec.origin not in (None, "namespace"):
        pytest.skip("this check needs the tensorrt-stubs namespace package without TensorRT")
    ok, reason = trt.tensorrt_status()
    assert not ok and "type stubs only?" in reason
    assert trt.tensorrt_version() is None


# ----------------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("count, dim, m", [(3000, 32, 8), (2000, 64, 16)])
def test_index_file_size_matches_hnswlib(tmp_path: Path, count: int, dim: int, m: int) -> None:
    bank = np.random.default_rng(1).standard_normal((count, dim)).astype(np.float32)
    path = tmp_path / "index.hnsw"
    search.save_index(search.build_index(bank, m=m, ef_construction=20, threads=2), path)
    actual = path.stat().st_size
    assert abs(search.index_file_bytes(count, dim, m) - actual) / actual < 0.01
    assert search.index_resident_bytes(count, dim, m) > actual


def _tiny_manifest(tiny_bundle: Path) -> Dict[str, Any]:
    from patchcore_edge.bundle import read_manifest

    return read_manifest(tiny_bundle, verify_files=False)


def _tiny(tiny_bundle: Path) -> Bundle:
    return Bundle.load(tiny_bundle, verify=False)


def test_onnx_liveness_peak_scales_with_batch(tiny_bundle: Path) -> None:
    pytest.importorskip("onnx")
    manifest = _tiny_manifest(tiny_bundle)
    one = memory.onnx_peak_activation_bytes(tiny_bundle / "features.onnx", 1)
    four = memory.onnx_peak_activation_bytes(tiny_bundle / "features.onnx", 4)
    assert one is not None and four is not None
    crop, (h, w), dim = manifest["input"]["crop"], manifest["features"]["grid"], manifest["features"]["dim"]
    assert one >= 3 * crop * crop * 4 + h * w * dim * 4
    assert four == pytest.approx(4 * one, rel=0.01)
    assert memory.onnx_peak_activation_bytes(tiny_bundle / "memory_bank.npy", 1) is None


def test_estimate_components_and_budget(tiny_bundle: Path) -> None:
    manifest = _tiny_manifest(tiny_bundle)
    size, dim = manifest["method"]["params"]["coreset"]["size"], manifest["features"]["dim"]
    estimate = memory.estimate_memory(_tiny(tiny_bundle), get_profile("jetson-orin-nx"), variant="8GB", batch=2,
                                      backend="onnxruntime")
    parts = estimate["components"]
    # The bank and its squared norms (the exact search reads the cells' centred rows: no centred copy); the first
    # pass's cells: the bank reordered with a norm row (numpy pass) or, where the compiled pass is built, its packed
    # copy (each cell padded to at most 15 more columns) with the column order; the centres likewise, the row order.
    assert parts["bank"] == size * dim * 4 + size * 4
    cells = search.default_cells(size)
    shared = cells * (dim + 1) * 4 + size * 8
    padded = size + 15 * cells
    rows = size * (dim + 1) * 4 if search._cellscan is None else padded * (dim + 1) * 4 + padded * 8
    assert parts["index"] == shared + rows
    real = search.CellIndex(np.load(tiny_bundle / "memory_bank.npy"))
    assert real.cells == cells and shared + size * (dim + 1) * 4 <= real.nbytes <= parts["index"]
    assert parts["neighbours"] == size * manifest["method"]["params"]["reweight_neighbours"] * 4
    assert parts["model"] == int(manifest["files"]["features.onnx"]["bytes"] * memory.ORT_MODEL_FACTOR)
    assert estimate["total"] == sum(parts.values())
    assert estimate["budget"] == int(8 * 1024 * memory.MIB * 0.6)
    assert estimate["fits"] is True and estimate["warning"] is None
    # The Nano builds no engine: a TensorRT request falls back to ONNX Runtime.
    assert memory.estimate_memory(_tiny(tiny_bundle), get_profile("jetson-nano"), backend="tensorrt")["backend"] == \
        "onnxruntime"


def test_estimate_warns_when_the_bank_does_not_fit() -> None:
    manifest = {"features": {"dim": 1024, "grid": [28, 28], "stride": 8, "onnx_file": "features.onnx",
                             "input_name": "image", "outputs": ["features"]},
                "method": {"name": "patchcore", "params": {"index": {"M": 16}, "reweight_neighbours": 9},
                           "arrays": {"memory_bank": {"file": "memory_bank.npy", "dtype": "float32",
                                                      "shape": [400_000, 1024]},
                                      "bank_neighbours": {"file": "bank_neighbours.npy", "dtype": "int32",
                                                          "shape": [400_000, 9]}}},
                "input": InputSpec(resize=256, crop=224).to_manifest(), "score": {"gaussian_sigma": 4.0},
                "files": {"features.onnx": {"bytes": 40 << 20}}}
    bundle = Bundle(Path("not-on-disk"), manifest)
    estimate = memory.estimate_memory(bundle, get_profile("jetson-orin-nano"), variant="4GB",
                                      measure_activations=False)
    assert estimate["fits"] is False
    assert "400000 x 1024" in estimate["warning"] and "jetson-orin-nano 4GB" in estimate["warning"]
    assert estimate["components"]["bank"] > 1.5 * (1 << 30)
    assert any("engine size taken as the ONNX weights" in a for a in estimate["assumptions"])
    fine = memory.estimate_memory(bundle, get_profile("jetson-agx-orin"), variant="64GB", measure_activations=False)
    assert fine["fits"] is True
    unknown = memory.estimate_memory(bundle, get_profile("cpu-only"), measure_activations=False)
    assert unknown["budget"] is None and unknown["fits"] is None
    sized = memory.estimate_memory(bundle, get_profile("cpu-only"), memory_total_mb=2048, measure_activations=False)
    assert sized["fits"] is False and "this machine (2048 MB)" in sized["warning"]


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_list_show_detect(tmp_path: Path) -> None:
    runner = CliRunner()
    listed = runner.invoke(devices_group, ["list"])
    assert listed.exit_code == 0 and all(name in listed.output for name in JETSONS)
    shown = runner.invoke(devices_group, ["show", "jetson-orin-nx"])
    assert shown.exit_code == 0 and "variant 8GB: 8 GB, 1 DLA core(s)" in shown.output
    assert "https://developer.nvidia.com/cuda-gpus" in shown.output
    as_json = json.loads(runner.invoke(devices_group, ["show", "jetson-tx2", "--json"]).output)
    assert as_json["gpu"]["compute_capability"] == "6.2"
    unknown = runner.invoke(devices_group, ["show", "jetson-thor"])
    assert unknown.exit_code == 2 and "known devices" in unknown.output and "Traceback" not in unknown.output
    root = jetson_root(tmp_path, "NVIDIA Jetson Xavier NX Developer Kit", "nvidia,p3668-0003|nvidia,tegra194",
                       R35, 15_600_000)
    detected = json.loads(runner.invoke(devices_group, ["detect", "--root", str(root), "--no-probe",
                                                        "--json"]).output)
    assert (detected["device"], detected["variant"], detected["dla_cores"]) == ("jetson-xavier-nx", "16GB", 2)
    # Which search the install runs: the compiled pass where setup.py could build it, numpy otherwise.
    assert detected["first_pass"] == search.first_pass_kernel()
    assert detected["first_pass"] == ("numpy" if search._cellscan is None else f"compiled ({search._cellscan.variant()})")
    text = runner.invoke(devices_group, ["detect", "--root", str(root), "--no-probe"]).output
    assert f"PatchCore first pass: {detected['first_pass']}" in text


def test_cli_fit(tiny_bundle: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(devices_group, ["fit", str(tiny_bundle), "--device", "jetson-nano", "--variant", "2GB"])
    assert result.exit_code == 0 and "-> fits" in result.output and "bank" in result.output
    huge = runner.invoke(devices_group, ["fit", str(tiny_bundle), "--device", "jetson-nano", "--variant", "2GB",
                                         "--batch", "1024", "--strict"])
    assert huge.exit_code == 1 and "WARNING: needs about" in huge.output
    missing = runner.invoke(devices_group, ["fit", str(tiny_bundle.parent / "nope"), "--device", "jetson-nano"])
    assert missing.exit_code == 2 and "error:" in missing.output and "Traceback" not in missing.output


def test_engine_build_without_tensorrt_is_one_line(tiny_bundle: Path) -> None:
    ok, _ = trt.tensorrt_status()
    if ok:
        pytest.skip("TensorRT is usable here")
    result = CliRunner().invoke(engine_group, ["build", str(tiny_bundle)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot build a TensorRT engine here")
    assert "--backend onnxruntime" in lines[0]


# ----------------------------------------------------------------------------------------------- verification


class ShiftedFeatures:
    """Test double of a feature backend: ONNX Runtime's features scaled by (1 + shift), as a bad engine would."""

    name = "shifted"
    max_batch = None

    def __init__(self, bundle: Bundle, shift: float) -> None:
        from patchcore_edge.runtime.backends import OnnxRuntimeFeatures

        features = bundle.features
        self.inner = OnnxRuntimeFeatures(bundle.path / features.onnx_file, features.input_name, features.outputs,
                                         threads=1)
        self.shift = shift

    def run(self, batch: np.ndarray) -> Dict[str, np.ndarray]:
        return {name: out * np.float32(1.0 + self.shift) for name, out in self.inner.run(batch).items()}

    def close(self) -> None:
        self.inner.close()


def test_verification_accepts_equal_and_refuses_changed_scores(tiny_bundle: Path) -> None:
    from patchcore_edge.trt import check_scores as check_tolerance

    bundle = _tiny(tiny_bundle)
    images = synthetic_images(bundle.input_spec, count=3)
    same = verify_against_onnxruntime(bundle, ShiftedFeatures(bundle, 0.0), images, "synthetic")
    assert same["features"]["max_abs"] == pytest.approx(0.0, abs=1e-6)
    assert same["scores"]["max_rel_change"] == pytest.approx(0.0, abs=1e-6)
    assert check_tolerance(same, "fp16")[0]
    shifted = verify_against_onnxruntime(bundle, ShiftedFeatures(bundle, 0.2), images, "synthetic")
    assert shifted["features"]["max_rel"] == pytest.approx(0.2 / 1.0, rel=0.05)
    ok, line = check_tolerance(shifted, "fp16")
    assert not ok and "BEYOND the 0.02 tolerance for fp16" in line and "3 synthetic images" in line
    assert check_tolerance(shifted, "fp16", tolerance=0.9)[0]


def test_engine_build_says_the_calibration_must_be_redone(tmp_path: Path) -> None:
    from patchcore_edge.devices.engine import calibration_note

    calibrated = calibration_note("calibration-20260101T000000000Z.json", tmp_path)
    assert "calibration-20260101T000000000Z.json" in calibrated and "do not carry over to this engine" in calibrated
    assert f"patchcore-edge calibrate {tmp_path} GOOD_DIR` again on this device" in calibrated
    assert "no calibration yet" in calibration_note(None, tmp_path)
