"""PatchCore patch features: normalised image batch -> patch-feature grid [B, h, w, D], channels last.

As in PatchCore (Roth et al., sec. 3.1): two mid-level stages of an ImageNet backbone, each averaged over its
3x3 local neighbourhood (stride 1, padding 1), the coarser one upsampled bilinearly (align_corners=False) onto
the finer grid, concatenated, and reduced to D channels by an adaptive average over channels.

Choices made here:
- `count_include_pad=True` in the 3x3 average (zero padding counts, border patches are damped), as PatchCore's
  reference code (zero-padded unfold, then an average) and anomalib do. Measured on MVTec bottle with a 10 %
  coreset: pixel AUROC +0.003 for both stage pairs against averaging the real neighbours only
  (benchmarks/results/layer_choice.md); False stays available for comparison.
- The channel reduction is `torch.nn.functional.adaptive_avg_pool1d` over channels, which is a fixed linear
  map; it is stored as a constant [C, D] matrix and applied as one MatMul on the channels-last tensor, which
  exports to ONNX/TensorRT as a plain MatMul.
- Reduction order (`reduction`): "per-stage" is the PatchCore reference's (amazon-science/patchcore-inspection:
  each stage averaged to the same size D first, so both stages weigh alike, then the concatenation averaged to
  D); "concat" averages the concatenation once (a channel can then mix the two stages, and the shallower stage
  gets fewer dimensions), with no MatMul at all when D equals the concatenated channels. Both are one matrix.
  Measured on bottle and ELPV: benchmarks/results/layer_choice.md.
- Only the stages up to the deeper tapped one are kept: the rest of the network is never run, nor exported.
- The output is channels last and contiguous, so the runtime can view it as [B*h*w, D] without a copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torchvision

from ..preprocess import InputSpec
from .backbones import BackboneError, WeightsInfo, check_layers, get_spec, load_backbone, stage_sequence


REDUCTIONS = ("per-stage", "concat")


def adaptive_average_matrix(channels: int, dim: int, expand: bool = False) -> torch.Tensor:
    """float32 [channels, dim] M with x @ M == adaptive_avg_pool1d(x, dim) over the last axis.

    `expand=True` allows dim > channels (channels repeated, as adaptive pooling does)."""
    if not 1 <= dim <= (dim if expand else channels) or channels < 1:
        raise ValueError(f"need 1 <= dim <= channels, got dim={dim}, channels={channels}")
    return _adaptive(channels, dim).to(torch.float32)


def _adaptive(channels: int, dim: int) -> torch.Tensor:
    matrix = torch.zeros(channels, dim, dtype=torch.float64)
    for out in range(dim):
        # The same bin edges as torch's adaptive pooling: floor(i*C/D) to ceil((i+1)*C/D).
        start = (out * channels) // dim
        end = -((-(out + 1) * channels) // dim)
        matrix[start:end, out] = 1.0 / (end - start)
    return matrix


def reduction_matrix(channels: Tuple[int, int], dim: int, order: str) -> Optional[torch.Tensor]:
    """float32 [C1 + C2, dim], the whole channel reduction as one matrix; None when there is nothing to do."""
    concat = channels[0] + channels[1]
    if order == "concat":
        return None if dim == concat else adaptive_average_matrix(concat, dim)
    if order != "per-stage":
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {order!r}")
    per_stage = torch.zeros(concat, 2 * dim, dtype=torch.float64)
    per_stage[:channels[0], :dim] = _adaptive(channels[0], dim)
    per_stage[channels[0]:, dim:] = _adaptive(channels[1], dim)
    return (per_stage @ _adaptive(2 * dim, dim)).to(torch.float32)


class TruncatedBackbone(torch.nn.Module):
    """The backbone's stages up to the deepest tap; forward returns the tapped outputs in depth order."""

    def __init__(self, stages: Sequence[Tuple[str, torch.nn.Module]], taps: Sequence[str]) -> None:
        super().__init__()
        names = [name for name, _ in stages]
        missing = [tap for tap in taps if tap not in names]
        if missing:
            raise BackboneError(f"no stage named {missing[0]!r}; stages are {', '.join(names)}")
        tap_positions = sorted(names.index(tap) for tap in set(taps))
        last = tap_positions[-1]
        self.stage_names: List[str] = names[:last + 1]
        self.taps: Tuple[str, ...] = tuple(names[i] for i in tap_positions)
        self.body = torch.nn.ModuleList([module for _, module in stages[:last + 1]])
        self._tap_positions = frozenset(tap_positions)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        outputs: List[torch.Tensor] = []
        for position, module in enumerate(self.body):
            x = module(x)
            if position in self._tap_positions:
                outputs.append(x)
        return outputs


class PatchAggregator(torch.nn.Module):
    """(finer [B,C1,h,w], coarser [B,C2,h',w']) -> [B, h, w, D]: 3x3 average, upsample, concat, reduce."""

    reduction: Optional[torch.Tensor]

    def __init__(self, channels: Tuple[int, int], feature_dim: Optional[int] = None,
                 count_include_pad: bool = True, reduction: str = "concat") -> None:
        super().__init__()
        concat = int(channels[0]) + int(channels[1])
        dim = concat if feature_dim is None else int(feature_dim)
        if not 1 <= dim <= concat:
            raise ValueError(f"feature dim must be between 1 and {concat} (the two stages have "
                             f"{channels[0]}+{channels[1]} channels), got {dim}")
        self.channels = (int(channels[0]), int(channels[1]))
        self.feature_dim = dim
        self.count_include_pad = bool(count_include_pad)
        self.pool = torch.nn.AvgPool2d(kernel_size=3, stride=1, padding=1,
                                       count_include_pad=count_include_pad)
        self.reduction_order = reduction
        self.register_buffer("reduction", reduction_matrix(self.channels, dim, reduction))

    def forward(self, finer: torch.Tensor, coarser: torch.Tensor) -> torch.Tensor:
        finer = self.pool(finer)
        coarser = self.pool(coarser)
        coarser = F.interpolate(coarser, size=finer.shape[-2:], mode="bilinear", align_corners=False)
        grid = torch.cat([finer, coarser], dim=1).permute(0, 2, 3, 1)
        if self.reduction is not None:
            grid = torch.matmul(grid, self.reduction)
        return grid.contiguous()


class PatchFeatureExtractor(torch.nn.Module):
    """Normalised images [B, 3, H, W] float32 -> patch features [B, h, w, D] float32 (channels last).

    Always in eval mode: PatchCore never trains the backbone, and a stray `.train()` would make batch-norm use
    batch statistics, changing every feature silently.
    """

    def __init__(self, backbone: TruncatedBackbone, aggregator: PatchAggregator) -> None:
        super().__init__()
        if len(backbone.taps) != 2:
            raise ValueError(f"need a backbone with exactly two taps, got {backbone.taps}")
        self.backbone = backbone
        self.aggregator = aggregator
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> PatchFeatureExtractor:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        finer, coarser = self.backbone(x)
        grid: torch.Tensor = self.aggregator(finer, coarser)
        return grid


@dataclass(frozen=True)
class ExtractorInfo:
    """Everything the bundle manifest records about the extractor."""

    backbone: str
    layers: Tuple[str, str]
    layer_channels: Tuple[int, int]
    layer_strides: Tuple[int, int]
    feature_dim: int
    grid: Tuple[int, int]
    stride: int
    count_include_pad: bool
    weights: WeightsInfo
    reduction_order: str = "concat"

    @property
    def concat_dim(self) -> int:
        return self.layer_channels[0] + self.layer_channels[1]

    def backbone_manifest(self) -> Dict[str, Any]:
        return {"name": self.backbone, "torchvision": torchvision.__version__,
                "weights": self.weights.to_manifest()}

    def extra_manifest(self) -> Dict[str, Any]:
        if self.reduction_order == "per-stage":
            reduction = (f"per stage: adaptive average over channels {self.layer_channels[0]} -> "
                         f"{self.feature_dim} and {self.layer_channels[1]} -> {self.feature_dim}, then "
                         f"{2 * self.feature_dim} -> {self.feature_dim} (PatchCore reference order)")
        else:
            reduction = ("none" if self.feature_dim == self.concat_dim
                         else f"adaptive average over channels {self.concat_dim} -> {self.feature_dim}")
        return {"layer_channels": list(self.layer_channels), "layer_strides": list(self.layer_strides),
                "concat_dim": self.concat_dim, "reduction": reduction, "reduction_order": self.reduction_order,
                "count_include_pad": self.count_include_pad, "upsample": "bilinear, align_corners=False"}

    def to_manifest(self) -> Dict[str, Any]:
        return {"backbone": self.backbone_manifest(), "layers": list(self.layers), "dim": self.feature_dim,
                "grid": list(self.grid), "stride": self.stride, **self.extra_manifest()}


def default_feature_dim(backbone: str, concat_dim: int) -> int:
    """The backbone's default dim, capped at the channels the chosen stages have."""
    return min(get_spec(backbone).default_feature_dim, concat_dim)


def build_extractor(backbone: str, weights: Union[str, os.PathLike[str], None], spec: InputSpec,
                    feature_dim: Optional[int] = None, *, layers: Optional[Tuple[str, str]] = None,
                    count_include_pad: bool = True, reduction: Optional[str] = None
                    ) -> Tuple[PatchFeatureExtractor, ExtractorInfo]:
    """Load the backbone, cut it after the deeper stage, add the PatchCore head; CPU, eval mode.

    `weights`: a state_dict file, None (offline package / torchvision cache) or "random" (tests only).
    `layers`: (finer, coarser) torchvision module paths; default the backbone's stride-8/stride-16 pair.
    `feature_dim`: None for the backbone's default dim, capped at the two stages' channels.
    """
    backbone_spec = get_spec(backbone)
    finer, coarser = check_layers(backbone, layers if layers is not None else backbone_spec.default_layers)
    model, weights_info = load_backbone(backbone, weights)
    body = TruncatedBackbone(stage_sequence(backbone, model), (finer, coarser))
    del model  # the stages past `coarser` are no longer referenced and are freed

    with torch.no_grad():
        probe = body.eval()(torch.zeros(1, 3, spec.height, spec.width))
    channels = (int(probe[0].shape[1]), int(probe[1].shape[1]))
    dim = default_feature_dim(backbone, sum(channels)) if feature_dim is None else int(feature_dim)
    if not 1 <= dim <= sum(channels):
        raise BackboneError(f"feature dim must be between 1 and {sum(channels)} for {backbone} "
                            f"{finer}+{coarser} ({channels[0]}+{channels[1]} channels), got {dim}")
    # The order measured for the backbone (BackboneSpec.default_reduction; layer_choice.md, geometry.md).
    order = backbone_spec.default_reduction if reduction is None else reduction
    if order not in REDUCTIONS:
        raise BackboneError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {order!r}")
    aggregator = PatchAggregator(channels, dim, count_include_pad=count_include_pad, reduction=order)
    extractor = PatchFeatureExtractor(body, aggregator)
    info = ExtractorInfo(
        backbone=backbone, layers=(finer, coarser), layer_channels=channels,
        layer_strides=(backbone_spec.strides[finer], backbone_spec.strides[coarser]),
        feature_dim=dim, grid=(int(probe[0].shape[2]), int(probe[0].shape[3])),
        stride=backbone_spec.strides[finer], count_include_pad=count_include_pad, weights=weights_info,
        reduction_order=order)
    return extractor, info
