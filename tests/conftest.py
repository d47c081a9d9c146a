from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BOTTLE = SHARED_DATA / "mvtec_ad" / "bottle"


def elpv_images_dir() -> Path | None:
    try:
        import elpv_dataset
    except ImportError:
        return None
    folder = Path(elpv_dataset.__file__).parent / "data" / "images"
    return folder if folder.is_dir() else None


@pytest.fixture
def bottle() -> Path:
    if not BOTTLE.is_dir():
        pytest.skip("../shared/data/mvtec_ad/bottle is absent")
    return BOTTLE


@pytest.fixture
def elpv_images() -> Path:
    folder = elpv_images_dir()
    if folder is None:
        pytest.skip("the elpv-dataset package is not installed")
    return folder


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def make_nominal_folder(target: Path, count: int = 10, size: int = 96, seed: int = 0) -> Path:
    """Small real images for exports: elpv solar cells when installed, else synthetic textures."""
    import cv2

    target.mkdir(parents=True, exist_ok=True)
    source = elpv_images_dir()
    if source is not None:
        for path in sorted(source.glob("*.png"))[:count]:
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            cv2.imwrite(str(target / path.name), cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA))
        return target
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = (rng.normal(128, 20, (size, size, 3)) + 40 * np.sin(np.arange(size) / 5.0)[None, :, None])
        cv2.imwrite(str(target / f"synthetic_{i:03d}.png"), np.clip(image, 0, 255).astype(np.uint8))
    return target


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle, exported once per test session: offline MobileNetV2 weights, 64x64 input, small bank."""
    pytest.importorskip("torch")
    from patchcore_edge.export.pipeline import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("tiny")
    nominal = make_nominal_folder(root / "nominal", count=10, size=96)
    options = ExportOptions(nominal_dir=nominal, output=root / "bundle", resize=72, crop=64, coreset_ratio=0.25,
                            engine=False)
    return export_bundle(options).bundle


def onnx_outputs(network, spec, batch: np.ndarray, names, folder: Path):  # type: ignore[no-untyped-def]
    """Export `network` (one or several outputs, named `names`) to ONNX and run `batch` through ONNX Runtime:
    the runtime's side of a method's parity test."""
    import warnings

    import onnxruntime as ort
    import torch

    path = folder / "network.onnx"
    with warnings.catch_warnings():  # the classic exporter's deprecation notice, as in export/onnx_export.py
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(network, (torch.zeros(2, 3, spec.crop, spec.crop),), str(path), input_names=["image"],
                          output_names=list(names), dynamic_axes={n: {0: "batch"} for n in ["image", *names]},
                          opset_version=17, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(list(names), {"image": batch.astype(np.float32)})))


def bottle_images(kind: str, count: int) -> list:
    """The first `count` bottle images of `kind` ("train/good", "test/good", "test/broken_large", ...)."""
    return sorted((BOTTLE / kind).glob("*.png"))[:count]


def export_cli_bundle(root: Path, method: str, *args: str, count: int = 10):  # type: ignore[no-untyped-def]
    """A bundle of `method` made by `patchcore-edge export` from `count` bottle training images (64 px by
    default); returns (bundle path, the command's output). Skips where ../shared is absent."""
    if not BOTTLE.is_dir():
        pytest.skip("../shared/data/mvtec_ad/bottle is absent")
    pytest.importorskip("torch")
    from click.testing import CliRunner

    from patchcore_edge.cli import main

    good = root / "good"
    good.mkdir(parents=True)
    for path in bottle_images("train/good", count):
        (good / path.name).symlink_to(path)
    bundle = root / f"{method}-bundle"
    result = CliRunner().invoke(main, ["export", str(good), "-o", str(bundle), "--method", method, "--resize", "72",
                                       "--crop", "64", "--no-engine", "-q", *args])
    assert result.exit_code == 0, result.output
    return bundle, result.output


def mini_category(root: Path, defects: int = 3, goods: int = 3) -> Path:
    """An MVTec-layout category (test/good, test/broken_large, ground_truth masks) of a few bottle images, linked."""
    category = root / "bottle-mini"
    for kind, count in (("good", goods), ("broken_large", defects)):
        folder = category / "test" / kind
        folder.mkdir(parents=True)
        for path in bottle_images(f"test/{kind}", count):
            (folder / path.name).symlink_to(path)
            if kind != "good":
                masks = category / "ground_truth" / kind
                masks.mkdir(parents=True, exist_ok=True)
                mask = BOTTLE / "ground_truth" / kind / f"{path.stem}_mask.png"
                (masks / mask.name).symlink_to(mask)
    return category


def rewrite_method_array(bundle: Path, key: str, array: np.ndarray, record_shape: bool = False) -> None:
    """Replace one method array of a bundle and its sha256/bytes record (a consistent, hostile bundle);
    `record_shape` also writes the new shape into method.arrays."""
    import json

    from patchcore_edge.bundle import file_record, manifest_bytes

    manifest = json.loads((bundle / "manifest.json").read_text())
    record = manifest["method"]["arrays"][key]
    np.save(bundle / record["file"], array, allow_pickle=False)
    manifest["files"][record["file"]] = file_record(bundle / record["file"])
    if record_shape:
        record["shape"] = [int(n) for n in array.shape]
    (bundle / "manifest.json").write_bytes(manifest_bytes(manifest))


def assert_matches_reference(detector, images, expected) -> None:  # type: ignore[no-untyped-def]
    """The runtime through an exported bundle vs a method's torch reference (`score`, `patch_map`, `crop_map`
    per image), 1e-4 relative: image scores from `Detector.predict`, patch maps from the bundle's scorer on
    the ONNX Runtime outputs, pixel maps upsampled and smoothed as the runtime does."""
    from patchcore_edge.maps import anomaly_map
    from patchcore_edge.preprocess import preprocess

    spec, sigma = detector.spec, detector.bundle.map_sigma
    scores = np.array([detector.predict(image, maps=False).score for image in images])
    scored = detector.scorer.score(detector.backend.run(np.stack([preprocess(image, spec) for image in images])))
    assert len(set(np.round(scores, 3))) > 1
    np.testing.assert_allclose(scores, [e.score for e in expected], rtol=1e-4)
    for method_score, ref in zip(scored, expected):
        assert method_score.patch_map.shape == detector.bundle.features.grid
        np.testing.assert_allclose(method_score.patch_map, ref.patch_map, rtol=1e-4, atol=1e-4 * ref.patch_map.max())
        pixel = anomaly_map(method_score.patch_map, (spec.width, spec.height), sigma)
        assert pixel.shape == (spec.height, spec.width)
        span = float(ref.crop_map.max() - ref.crop_map.min())
        np.testing.assert_allclose(pixel, ref.crop_map, rtol=0, atol=1e-4 * span)


def calibrate_and_decide(bundle: Path, root: Path, image: Path) -> dict:
    """`calibrate` BUNDLE on 12 bottle test/good images, then `run` IMAGE: its JSON line (with a decision)."""
    import json

    from click.testing import CliRunner

    from patchcore_edge.cli import main

    good = root / "calibration-good"
    good.mkdir()
    for source in bottle_images("test/good", 12):
        (good / source.name).symlink_to(source)
    runner = CliRunner()
    calibrated = runner.invoke(main, ["calibrate", str(bundle), str(good), "--backend", "onnxruntime", "-q"])
    assert calibrated.exit_code == 0, calibrated.output
    result = runner.invoke(main, ["run", str(bundle), str(image), "--no-maps", "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    (line,) = [text for text in result.stdout.splitlines() if text.startswith("{")]
    record: dict = json.loads(line)
    assert isinstance(record["anomalous"], bool) and record["normalised_score"] > 0
    return record


# Networks with several named outputs (SPADE: "features" + "global"), for the TensorRT tests.


def two_output_onnx(path: Path) -> Path:
    """A real two-output ONNX model (the shape of SPADE's network): a 2 x 2 x 3 patch grid "features" and a pooled
    "global" feature 100 times larger, so that each output's error must be taken against its own scale."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    nodes = [helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
             helper.make_node("Transpose", ["pooled"], ["features"], perm=[0, 2, 3, 1]),
             helper.make_node("ReduceMean", ["image"], ["mean"], axes=[2, 3], keepdims=0),
             helper.make_node("Mul", ["mean", "hundred"], ["global"])]
    graph = helper.make_graph(
        nodes, "two_outputs", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 2, 2, 3]),
         helper.make_tensor_value_info("global", TensorProto.FLOAT, ["batch", 3])],
        initializer=[helper.make_tensor("hundred", TensorProto.FLOAT, [], [100.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return path


def with_global_output(tiny_bundle: Path, target: Path, record_shapes: bool = True) -> Path:
    """A copy of the tiny PatchCore bundle whose network has a second output, "global" (the grid's mean over its
    positions, [B, D]), as SPADE's has; the manifest declares both (and, with record_shapes, their shapes)."""
    import shutil

    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from patchcore_edge.bundle import file_record, manifest_bytes, read_manifest

    bundle = shutil.copytree(tiny_bundle, target)
    manifest = read_manifest(bundle)
    features = manifest["features"]
    model = onnx.load(str(bundle / features["onnx_file"]))
    grid_output = features["outputs"][0]
    model.graph.node.append(helper.make_node("ReduceMean", [grid_output], ["global"], axes=[1, 2], keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("global", TensorProto.FLOAT, ["batch", features["dim"]]))
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(bundle / features["onnx_file"]))
    features["outputs"] = [grid_output, "global"]
    features["output_shapes"] = {grid_output: [*features["grid"], features["dim"]], "global": [features["dim"]]}
    if not record_shapes:
        del features["output_shapes"]
    manifest["files"][features["onnx_file"]] = file_record(bundle / features["onnx_file"])
    (bundle / "manifest.json").write_bytes(manifest_bytes(manifest))
    return bundle
