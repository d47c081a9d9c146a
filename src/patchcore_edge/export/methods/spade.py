"""SPADE at export: one network with two outputs (pyramid grid, global feature), the fit (the training images'
arrays) and a torch reference scorer, written independently of the runtime's numpy one, for parity."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ...methods.spade import SpadeParams, bytes_per_training_image, leave_one_out_image_scores
from ...preprocess import InputSpec
from ..backbones import get_spec
from ..reference import smooth
from ..transform import torch_preprocess
from .pyramid import build_body, frozen, last_stage, probe_shapes, pyramid_grid

OUTPUTS = ("features", "global")
DEFAULT_K = 50  # the paper's K for MVTec AD
DEFAULT_KAPPA = 1


class SpadeNetwork(torch.nn.Module):
    """Normalised images [B, 3, H, W] -> (pyramid grid [B, h, w, D], global feature [B, G]) in one pass."""

    def __init__(self, body: torch.nn.Module, pyramid_taps: int) -> None:
        super().__init__()
        self.body = body
        self.pyramid_taps = int(pyramid_taps)
        frozen(self)

    def train(self, mode: bool = True) -> "SpadeNetwork":
        return super().train(False)  # batch-norm statistics must never change

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        maps = self.body(x)
        grid = pyramid_grid(maps[:self.pyramid_taps])
        return grid, maps[-1].mean(dim=(2, 3))


def build_spade_network(backbone: str, weights: Union[str, "os.PathLike[str]", None], spec: InputSpec,
                        layers: Union[Sequence[str], None] = None) -> Tuple[SpadeNetwork, Dict[str, Any]]:
    """Pyramid stages (default: PatchCore's pair for the backbone) plus the last stage, pooled."""
    pyramid = list(layers) if layers is not None else list(get_spec(backbone).default_layers)
    body, weights_info, ordered = build_body(backbone, weights, pyramid + [last_stage(backbone)])
    network = SpadeNetwork(body, len(ordered) - 1)
    grid_shape, global_shape = probe_shapes(network, spec)
    info = {"layers": ordered[:-1], "global_layer": ordered[-1], "grid": grid_shape[:2], "dim": grid_shape[2],
            "global_dim": global_shape[0], "weights": weights_info,
            "stride": get_spec(backbone).strides[ordered[0]]}
    return network, info


@dataclass
class SpadeFit:
    arrays: Dict[str, np.ndarray]
    params: SpadeParams
    training_scores: np.ndarray
    bytes_per_image: int


def fit_spade(grids: np.ndarray, global_features: np.ndarray, k: int = DEFAULT_K, kappa: int = DEFAULT_KAPPA,
              gallery_dtype: str = "float32") -> SpadeFit:
    """The bundle arrays: every training image's grid and global feature; K capped at the images there are."""
    n = int(global_features.shape[0])
    if grids.shape[0] != n or n < 1:
        raise ValueError(f"{grids.shape[0]} grids for {n} global features")
    params = SpadeParams(k=min(int(k), n), kappa=int(kappa), images=n, global_dim=int(global_features.shape[1]))
    arrays = {"global_features": np.ascontiguousarray(global_features, dtype=np.float32),
              "gallery": np.ascontiguousarray(grids, dtype=np.dtype(gallery_dtype))}
    return SpadeFit(arrays=arrays, params=params,
                    training_scores=leave_one_out_image_scores(arrays["global_features"], params.k),
                    bytes_per_image=bytes_per_training_image(tuple(grids.shape[1:3]), int(grids.shape[3]),
                                                             params.global_dim, gallery_dtype))


@dataclass
class SpadeReference:
    score: float
    patch_map: np.ndarray  # [h, w]
    crop_map: np.ndarray  # [crop, crop], smoothed


@torch.no_grad()
def reference_spade_scores(network: SpadeNetwork, images_rgb: Sequence[np.ndarray], spec: InputSpec,
                           global_features: np.ndarray, gallery: np.ndarray, params: SpadeParams,
                           sigma: float) -> List[SpadeReference]:
    """SPADE scores with float64 torch.cdist and topk (the runtime uses float32 BLAS candidates)."""
    bank = torch.from_numpy(np.asarray(global_features, dtype=np.float64))
    stored = torch.from_numpy(np.asarray(gallery, dtype=np.float64))
    batch = torch.stack([torch_preprocess(image, spec) for image in images_rgb])
    grids, pooled = network(batch)
    results = []
    for grid, feature in zip(grids.double(), pooled.double()):
        near = torch.cdist(feature[None], bank)[0].topk(params.k, largest=False)
        h, w, d = grid.shape
        patch = torch.cdist(grid.reshape(-1, d), stored[near.indices].reshape(-1, d))
        patch_map = patch.topk(params.kappa, dim=1, largest=False).values.mean(dim=1).reshape(h, w)
        up = F.interpolate(patch_map[None, None], size=(spec.crop, spec.crop), mode="bilinear",
                           align_corners=False)[0, 0]
        results.append(SpadeReference(score=float(near.values.mean()), patch_map=patch_map.numpy(),
                                      crop_map=smooth(up, sigma).numpy()))
    return results
