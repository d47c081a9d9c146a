"""features.onnx: the contract (names, dynamic batch, one file) and the parity check against torch."""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from patchcore_edge.export import backbones
from patchcore_edge.export.features import ExtractorInfo, PatchFeatureExtractor, build_extractor
from patchcore_edge.export.onnx_export import OnnxModelError, OnnxParityError, check_onnx_parity, export_onnx
from patchcore_edge.export.transform import torch_preprocess_batch
from patchcore_edge.imageio import read_rgb
from patchcore_edge.preprocess import InputSpec

SMALL = InputSpec(resize=72, crop=64)
SmallModel = Tuple[PatchFeatureExtractor, ExtractorInfo, Path]
RealModel = Tuple[PatchFeatureExtractor, Path]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> SmallModel:
    # A reduced dim, so the exported graph contains the channel-reduction MatMul too.
    extractor, info = build_extractor("mobilenet_v2", "random", SMALL, feature_dim=48)
    path = export_onnx(extractor, tmp_path_factory.mktemp("onnx") / "features.onnx", SMALL)
    return extractor, info, path


def _batch(size: int, crop: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((size, 3, crop, crop)).astype(np.float32)


def _dims(value: onnx.ValueInfoProto) -> List[object]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_contract_names_shapes_and_single_file(small_model: SmallModel) -> None:
    _, info, path = small_model
    # No external data file, no leftover partial file.
    assert sorted(p.name for p in path.parent.iterdir()) == ["features.onnx"]
    model = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["features"]
    assert _dims(model.graph.input[0]) == ["batch", 3, 64, 64]
    assert _dims(model.graph.output[0]) == ["batch", *info.grid, 48]
    assert any(node.op_type == "MatMul" for node in model.graph.node)
    assert model.opset_import[0].version == 17


@pytest.mark.parametrize("batch_size", [1, 3])
def test_dynamic_batch_and_parity(small_model: SmallModel, batch_size: int) -> None:
    import onnxruntime as ort

    extractor, info, path = small_model
    batch = _batch(batch_size, 64, seed=batch_size)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(["features"], {"image": batch})[0]
    assert out.shape == (batch_size, *info.grid, 48) and out.dtype == np.float32
    report = check_onnx_parity(extractor, path, batch, providers=["CPUExecutionProvider"])
    assert report.ok and report.batch == batch_size
    assert report.max_abs <= report.tolerance and report.tolerance > 0
    with torch.no_grad():
        np.testing.assert_allclose(out, extractor(torch.from_numpy(batch)).numpy(), atol=report.tolerance)


def test_perturbed_model_is_rejected(small_model: SmallModel, tmp_path: Path) -> None:
    extractor, _, path = small_model
    model = onnx.load(str(path))
    # A 1% error in the first convolution: the kind of damage a wrong export option or a bad copy does.
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    weight = next(t for t in model.graph.initializer if t.name == conv.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.01), weight.name))
    broken = tmp_path / "perturbed.onnx"
    onnx.save(model, str(broken))
    batch = _batch(2, 64, seed=7)
    with pytest.raises(OnnxParityError, match="EXCEEDS the tolerance") as caught:
        check_onnx_parity(extractor, broken, batch)
    report = caught.value.report
    assert report is not None and not report.ok and report.max_abs > report.tolerance
    assert str(broken) in str(caught.value)
    assert not check_onnx_parity(extractor, broken, batch, raise_on_failure=False).ok


def test_corrupt_file_is_named(small_model: SmallModel, tmp_path: Path) -> None:
    extractor, _, path = small_model
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(OnnxModelError, match="ONNX Runtime cannot load it") as caught:
        check_onnx_parity(extractor, truncated, _batch(1, 64, seed=0))
    assert caught.value.path == str(truncated)
    with pytest.raises(OnnxModelError, match="not found"):
        check_onnx_parity(extractor, tmp_path / "absent.onnx", _batch(1, 64, seed=0))


def test_input_of_another_size_is_refused_clearly(small_model: SmallModel) -> None:
    extractor, _, path = small_model
    with pytest.raises(OnnxModelError, match=r"failed on a batch of shape \(1, 3, 72, 72\)"):
        check_onnx_parity(extractor, path, _batch(1, 72, seed=0))


@pytest.fixture(scope="module")
def real_model(tmp_path_factory: pytest.TempPathFactory) -> RealModel:
    if backbones.offline_package_path() is None:
        pytest.skip("the offline mobilenet_v2 weights package is not installed")
    spec = InputSpec()
    extractor, _ = build_extractor("mobilenet_v2", None, spec)
    return extractor, export_onnx(extractor, tmp_path_factory.mktemp("real") / "features.onnx", spec)


@pytest.mark.shared_data
def test_parity_on_real_bottle_images(real_model: RealModel, bottle: Path) -> None:
    extractor, path = real_model
    paths = sorted((bottle / "test" / "broken_large").glob("*.png"))[:1] + sorted(
        (bottle / "train" / "good").glob("*.png"))[:1]
    batch = torch_preprocess_batch([read_rgb(p) for p in paths], InputSpec()).numpy()
    report = check_onnx_parity(extractor, path, batch)
    assert report.ok and report.batch == 2 and report.reference_max > 1.0  # real, non-trivial features


def test_parity_on_real_elpv_images(real_model: RealModel, elpv_images: Path) -> None:
    extractor, path = real_model
    paths = sorted(elpv_images.glob("*.png"))[:2]
    batch = torch_preprocess_batch([read_rgb(p) for p in paths], InputSpec()).numpy()
    report = check_onnx_parity(extractor, path, batch)
    assert report.ok and report.max_rel < 1e-4


class _TwoOutputs(torch.nn.Module):
    """A patch grid and a pooled feature of very different scales (SPADE's pair of outputs)."""

    def __init__(self, global_scale: float = 1000.0) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.global_scale = global_scale

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        grid = self.conv(x)
        return grid.permute(0, 2, 3, 1).contiguous(), grid.mean(dim=(2, 3)) * self.global_scale


def test_parity_checks_every_output_against_its_own_scale(tmp_path: Path) -> None:
    torch.manual_seed(0)
    network = _TwoOutputs()
    path = export_onnx(network, tmp_path / "features.onnx", SMALL, output_names=("features", "global"))
    batch = _batch(2, 64, seed=1)
    report = check_onnx_parity(network, path, batch, providers=["CPUExecutionProvider"],
                               output_names=("features", "global"))
    assert report.ok and report.max_rel < 1e-5
    # The second output off by 1% of its own scale, invisible next to the first one's tolerance alone, fails.
    drifted = _TwoOutputs(global_scale=1010.0)
    drifted.load_state_dict(network.state_dict())
    with pytest.raises(OnnxParityError, match="'global'"):
        check_onnx_parity(drifted, path, batch, providers=["CPUExecutionProvider"],
                          output_names=("features", "global"))
    with pytest.raises(ValueError, match="2 outputs, 1 names"):
        check_onnx_parity(network, path, batch, providers=["CPUExecutionProvider"])
