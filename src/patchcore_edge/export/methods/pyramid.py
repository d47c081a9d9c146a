"""Several backbone stages on one grid: each upsampled bilinearly onto the finest tapped grid, concatenated,
channels last. SPADE and PaDiM both use it (neither averages neighbourhoods, unlike PatchCore's head)."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
import torchvision
import torch.nn.functional as F

from ...preprocess import InputSpec
from ..backbones import BackboneError, WeightsInfo, get_spec, load_backbone, stage_sequence
from ..features import TruncatedBackbone


def pyramid_grid(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stage outputs [B, C_i, h_i, w_i] (finest first) -> [B, h, w, sum C_i] on the first one's grid."""
    size = maps[0].shape[-2:]
    upsampled = [maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
    return torch.cat(upsampled, dim=1).permute(0, 2, 3, 1).contiguous()


def build_body(backbone: str, weights: Union[str, "os.PathLike[str]", None], taps: Sequence[str]
               ) -> Tuple[TruncatedBackbone, WeightsInfo, List[str]]:
    """The backbone cut after its deepest tap; also returns the taps ordered by depth."""
    spec = get_spec(backbone)
    unknown = [tap for tap in taps if tap not in spec.strides]
    if unknown:
        raise BackboneError(f"{backbone} has no stage {unknown[0]!r}; choose from {', '.join(spec.strides)}")
    model, info = load_backbone(backbone, weights)
    body = TruncatedBackbone(stage_sequence(backbone, model), list(taps))
    return body.eval(), info, list(body.taps)


def last_stage(backbone: str) -> str:
    """The backbone's deepest stage (SPADE's global feature)."""
    return list(get_spec(backbone).strides)[-1]


def probe_shapes(module: torch.nn.Module, spec: InputSpec) -> List[Tuple[int, ...]]:
    with torch.no_grad():
        out = module.eval()(torch.zeros(1, 3, spec.height, spec.width))
    tensors: List[torch.Tensor] = list(out) if isinstance(out, (tuple, list)) else [out]
    return [tuple(int(v) for v in t.shape[1:]) for t in tensors]


def backbone_manifest(backbone: str, weights: WeightsInfo) -> Dict[str, Any]:
    """The manifest's `backbone` section (as PatchCore's extractor records it)."""
    return {"name": backbone, "torchvision": torchvision.__version__, "weights": weights.to_manifest()}


def frozen(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    return module.eval()


__all__ = ["pyramid_grid", "build_body", "last_stage", "probe_shapes", "backbone_manifest", "frozen"]
