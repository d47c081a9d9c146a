"""Every command on every input geometry (issue 18): export, run, calibrate, eval, `engine build` (TensorRT played
by the double of tests/test_trt_double.py: what it proves and does not is said there) and `devices fit`, for a
centre crop, a non-square letterbox input and a tiled bundle with a region of interest.

The test category is 2:1 (96 x 192) with the defect near a short end, where a centre crop never looks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_nominal_folder
from patchcore_edge.cli import main
from patchcore_edge.devices.engine import preprocessed_images, tiled_max_batch
from patchcore_edge.preprocess import InputSpec, inspected_fraction, region_mask

ROI = [[0.0, 0.0], [0.75, 0.0], [0.75, 1.0], [0.0, 1.0]]  # the defect (x 170-188 of 192) lies outside it
GEOMETRIES: Dict[str, List[str]] = {
    "crop": ["--fit", "crop", "--resize", "72", "--crop", "64"],
    "letterbox": ["--fit", "letterbox", "--input-size", "96", "64"],
    "tile-roi": ["--fit", "squash", "--crop", "64", "--tile", "64", "--tile-overlap", "16", "--roi", "ROI"],
}
FRAME = ("192", "96")  # W H of the test images: 4 x 2 tiles of 64 px with 16 px overlap


def _invoke(args: List[str], code: int = 0, stdout: bool = False) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code and "Traceback" not in result.output, result.output
    return result.stdout if stdout else result.output


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("geometry_commands")
    images = sorted(make_nominal_folder(root / "pool", count=32, size=96).glob("*.png"))
    nominal = root / "nominal"
    nominal.mkdir()
    for path in images[:8]:
        (nominal / path.name).write_bytes(path.read_bytes())
    category = root / "category"
    for folder in ("test/good", "test/blob", "ground_truth/blob"):
        (category / folder).mkdir(parents=True)
    for i, (left, right) in enumerate(zip(images[8::2], images[9::2])):
        wide = np.concatenate([cv2.imread(str(left)), cv2.imread(str(right))], axis=1)
        cv2.imwrite(str(category / "test" / "good" / f"g{i}.png"), wide)
        if i < 4:
            bad = np.concatenate([cv2.imread(str(left)), cv2.imread(str(left))[:, ::-1]], axis=1)
            bad[30:50, 170:188] = 255
            mask = np.zeros(bad.shape[:2], np.uint8)
            mask[30:50, 170:188] = 255
            cv2.imwrite(str(category / "test" / "blob" / f"b{i}.png"), bad)
            cv2.imwrite(str(category / "ground_truth" / "blob" / f"b{i}_mask.png"), mask)
    roi = root / "roi.json"
    roi.write_text(json.dumps({"polygon": ROI}))
    out = {"root": root, "category": category}
    for name, options in GEOMETRIES.items():
        options = [str(roi) if o == "ROI" else o for o in options]
        out[name] = root / name
        _invoke(["export", str(nominal), "-o", str(out[name]), "--no-engine", "-q", "--coreset-ratio", "0.25",
                 *options])
    return out


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_run_calibrate_eval_fit_on_the_geometry(setup: Dict[str, Path], name: str) -> None:
    bundle, category, root = setup[name], setup["category"], setup["root"]
    jsonl = root / f"{name}.jsonl"
    _invoke(["run", str(bundle), str(category / "test" / "blob"), "-o", str(root / f"maps-{name}"),
             "--jsonl", str(jsonl)])
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    assert len(records) == 4
    maps = sorted((root / f"maps-{name}").rglob("*.png"))
    assert maps and all(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape[:2] == (96, 192) for p in maps)

    _invoke(["calibrate", str(bundle), str(category / "test" / "good"), "--defects", str(category / "test" / "blob"),
             "--masks", str(category / "ground_truth" / "blob"), "-q", "--dry-run"])

    report_file = root / f"{name}-eval.json"
    _invoke(["eval", str(bundle), str(category), "-q", "--report", str(report_file)])
    report = json.loads(report_file.read_text())
    inspected = report["inspected_fraction"]
    if name == "crop":  # 72 x 144 resized, centre 64 x 64 kept
        assert inspected["median"] == pytest.approx(64 * 64 / (72 * 144)) and not inspected["roi"]
    elif name == "letterbox":
        assert inspected["median"] == 1.0
        assert report["metrics"]["pixel_auroc"] > 0.9  # the defect near the end is seen
    else:
        assert inspected["median"] == pytest.approx(0.75, abs=0.01) and inspected["roi"]

    fit = json.loads(_invoke(["devices", "fit", str(bundle), "--device", "jetson-orin-nano", "--json",
                              "--image-size", *FRAME], stdout=True))
    big = json.loads(_invoke(["devices", "fit", str(bundle), "--device", "jetson-orin-nano", "--json",
                              "--image-size", "2592", "1944"], stdout=True))
    # A 5 MP frame's RGB copy and full-size maps are counted, tiles or not.
    assert big["components"]["activations"] - fit["components"]["activations"] >= (2592 * 1944 - 192 * 96) * 11 * (
        1 if name == "tile-roi" else fit["batch"])
    if name == "tile-roi":
        assert (fit["batch"], big["batch"]) == (8, 41 * 54)
    else:
        assert fit["batch"] == big["batch"]


def test_tiled_bundles_smallest_defect_is_a_tiles_quarter_cell(setup: Dict[str, Path]) -> None:
    """The calibration's default minimum defect area follows the tile (64 px into 64 px: 8 px cells), not the
    whole frame squashed (which would make it (2592 / 64 * 8 / 2)^2 pixels on a 5 MP frame)."""
    from patchcore_edge.bundle import Bundle
    from patchcore_edge.calibration.calibrate import default_min_defect_area

    tiled = Bundle.load(setup["tile-roi"])
    assert default_min_defect_area(tiled, 1944) == default_min_defect_area(tiled, 64) == 16
    assert default_min_defect_area(Bundle.load(setup["letterbox"]), 1944) == round((8 * 1944 / 64 / 2) ** 2)


def test_inspected_fraction_counts_crop_and_region_of_interest_together() -> None:
    half = ((0.0, 0.0), (0.5, 0.0), (0.5, 1.0), (0.0, 1.0))
    crop = InputSpec(fit="crop", resize=64, crop=64, roi=half)  # 64 x 256 resized: the centre quarter is seen
    assert inspected_fraction(100, 400, crop) == pytest.approx(0.125, abs=0.01)  # half of that quarter
    squash = InputSpec(fit="squash", crop=64, roi=half)
    assert inspected_fraction(100, 400, squash) == pytest.approx(0.5, abs=0.01)
    mask = region_mask(100, 400, squash)
    assert mask is not None and inspected_fraction(100, 400, squash) == pytest.approx(mask.mean(), abs=0.01)
    assert inspected_fraction(100, 400, InputSpec(fit="squash", crop=64, tile=64, tile_overlap=8)) == 1.0


# ----------------------------------------------------------------------------------------------- engine build

@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    from test_trt_double import FakeCudart, make_fake_tensorrt

    module = make_fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", FakeCudart())
    return module


def _profiles(fake) -> List[tuple]:  # type: ignore[no-untyped-def]
    return [p._shapes_set["image"] for p in fake._state.builds[-1]["config"]._profiles_set]


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_engine_build_profiles_follow_the_input_and_the_tiles(setup: Dict[str, Path], name: str, fake,  # type: ignore[no-untyped-def]
                                                              tmp_path: Path) -> None:
    import shutil

    bundle = Path(shutil.copytree(setup[name], tmp_path / "bundle"))
    good = setup["category"] / "test" / "good"
    height, width = (64, 96) if name == "letterbox" else (64, 64)
    if name == "tile-roi":
        refused = _invoke(["engine", "build", str(bundle)], code=2)
        assert "--image-size" in refused and "tiled bundle" in refused and str(bundle) in refused
        assert len(refused.strip().splitlines()) == 1
        shown = _invoke(["engine", "build", str(bundle), "--image-size", *FRAME, "--verify-images", str(good)])
        assert "192x96 frame: 8 tiles of 64 px" in shown
        assert _profiles(fake) == [((1, 3, 64, 64),) * 3, ((2, 3, 64, 64), (8, 3, 64, 64), (8, 3, 64, 64))]
        # Verified on tiles, as the network sees them: 16 images read as tiles (8 per frame), not 16 frames.
        spec = InputSpec(fit="squash", crop=64, tile=64, tile_overlap=16)
        assert len(list(preprocessed_images(good, spec, 16))) == 16
        assert all(t.shape == (3, 64, 64) for t in preprocessed_images(good, spec, 3))
    else:
        _invoke(["engine", "build", str(bundle), "--max-batch", "4", "--verify-images", str(good)])
        assert _profiles(fake) == [((1, 3, height, width),) * 3,
                                   ((2, 3, height, width), (4, 3, height, width), (4, 3, height, width))]
    out = tmp_path / "trt.jsonl"
    _invoke(["run", str(bundle), str(setup["category"] / "test" / "blob"), "--backend", "tensorrt", "--jsonl",
             str(out)])
    assert len(out.read_text().splitlines()) == 4


def test_tiled_max_batch_rules() -> None:
    tiled = InputSpec(fit="squash", crop=64, tile=64, tile_overlap=16)
    assert tiled_max_batch(tiled, (192, 96), None, None)[0] == 8
    assert tiled_max_batch(tiled, (192, 96), 4, None) == (4, "192x96 frame: 8 tiles of 64 px, --max-batch 4; "
                                                              "frames run in chunks of 4")
    assert tiled_max_batch(tiled, (192, 96), None, 0)[0] is None  # DLA: static batch, the profile's default
    assert tiled_max_batch(tiled, None, 2, None) == (2, None)
    assert tiled_max_batch(tiled, (4096, 4096), None, None)[0] == 256  # TensorRT's batch cap here
    assert tiled_max_batch(InputSpec(crop=64), (192, 96), None, None)[1] is not None  # said to be ignored
    from patchcore_edge import trt

    with pytest.raises(trt.EngineBuildError, match="--image-size W H"):
        tiled_max_batch(tiled, None, None, None)


def test_export_builds_a_tiled_bundles_engine_for_its_frames(fake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from patchcore_edge.export.pipeline import ExportOptions, export_bundle

    nominal = make_nominal_folder(tmp_path / "nominal", count=5, size=96)
    export_bundle(ExportOptions(nominal_dir=nominal, output=tmp_path / "bundle", crop=64, tile=64, tile_overlap=32,
                                coreset_ratio=0.25))
    # 96 x 96 frames, 64 px tiles with 32 px overlap: 2 x 2 tiles, one frame one batch.
    assert _profiles(fake)[-1] == ((2, 3, 64, 64), (4, 3, 64, 64), (4, 3, 64, 64))


def test_activation_memory_follows_the_network_input_size(setup: Dict[str, Path]) -> None:
    """A 96 x 64 input holds 1.5x the activations of a 64 x 64 one (same backbone, liveness analysis)."""
    pytest.importorskip("onnx")
    from patchcore_edge.bundle import Bundle
    from patchcore_edge.devices.memory import onnx_peak_activation_bytes

    square = onnx_peak_activation_bytes(setup["crop"] / "features.onnx", 1)
    wide = onnx_peak_activation_bytes(setup["letterbox"] / "features.onnx", 1)
    assert square is not None and wide is not None
    assert wide == pytest.approx(1.5 * square, rel=0.05)
    assert Bundle.load(setup["letterbox"]).features.grid == (8, 12)
