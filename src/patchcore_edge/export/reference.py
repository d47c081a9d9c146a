"""A torch reference scorer: the same PatchCore arithmetic as the runtime, written independently, exact search.

Used by the parity tests (runtime vs torch) and by benchmarks; never by the runtime itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..preprocess import InputSpec
from .transform import torch_preprocess


@dataclass
class ReferenceScore:
    score: float
    max_distance: float
    patch_distances: np.ndarray  # [h, w]
    crop_map: np.ndarray  # [crop, crop], before mapping back to the image geometry


def gaussian_kernel_1d(sigma: float) -> torch.Tensor:
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return kernel / kernel.sum()


def _pad_symmetric(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Pad by mirroring with the edge pixel repeated (scipy.ndimage "reflect", OpenCV BORDER_REFLECT)."""
    size = x.shape[dim]
    if radius > size:  # wider than one mirror: not needed for maps of at least 16 pixels; refuse to guess
        raise ValueError(f"Gaussian radius {radius} exceeds the map size {size}")
    before = x.narrow(dim, 0, radius).flip(dim)
    after = x.narrow(dim, size - radius, radius).flip(dim)
    return torch.cat([before, x, after], dim=dim)


def smooth(crop_map: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, kernel 2 * int(4 sigma + 0.5) + 1, edge-repeating mirror border (PatchCore's
    scipy.ndimage.gaussian_filter)."""
    if sigma <= 0:
        return crop_map
    kernel = gaussian_kernel_1d(sigma).to(crop_map.dtype)
    radius = kernel.numel() // 2
    x = crop_map[None, None]
    x = F.conv2d(_pad_symmetric(x, radius, 3), kernel.view(1, 1, 1, -1))
    x = F.conv2d(_pad_symmetric(x, radius, 2), kernel.view(1, 1, -1, 1))
    return x[0, 0]


@torch.no_grad()
def reference_scores(extractor: torch.nn.Module, images_rgb: Sequence[np.ndarray], spec: InputSpec,
                     bank: np.ndarray, neighbours: np.ndarray, sigma: float,
                     valid: Optional[Sequence[Optional[np.ndarray]]] = None) -> List[ReferenceScore]:
    """PatchCore scores with exact nearest neighbours, in float64 for the distances (the reference is exact).

    `valid`: per image, None or bool [h * w] of the patches that may score (the others count as distance 0)."""
    bank64 = torch.from_numpy(np.asarray(bank, dtype=np.float64))
    neighbours_t = torch.from_numpy(np.asarray(neighbours, dtype=np.int64))
    batch = torch.stack([torch_preprocess(image, spec) for image in images_rgb])
    grid = extractor.eval()(batch).double()  # [B, h, w, D]
    results = []
    for position, features in enumerate(grid):
        h, w, d = features.shape
        patches = features.reshape(-1, d)
        distances = torch.cdist(patches, bank64)  # [P, M]
        nearest, nearest_index = distances.min(dim=1)
        if valid is not None and valid[position] is not None:
            nearest = torch.where(torch.from_numpy(np.asarray(valid[position], bool)), nearest, 0.0)
        worst = int(torch.argmax(nearest))
        max_distance = nearest[worst]
        support = bank64[neighbours_t[nearest_index[worst]]]  # b nearest bank vectors of m*, m* first
        support_distances = torch.linalg.norm(patches[worst] - support, dim=1)
        weight = 1.0 - torch.softmax(support_distances, dim=0)[0]
        upsampled = F.interpolate(nearest.reshape(1, 1, h, w), size=(spec.height, spec.width), mode="bilinear",
                                  align_corners=False)[0, 0]
        results.append(ReferenceScore(
            score=float(weight * max_distance), max_distance=float(max_distance),
            patch_distances=nearest.reshape(h, w).numpy().astype(np.float32),
            crop_map=smooth(upsampled, sigma).numpy().astype(np.float32)))
    return results
