"""Torch reference of the trained patch-encoder methods' scores, written independently of the numpy runtime
(pixel-level maps by transposed convolution, exact nearest embeddings by cdist): the parity tests compare
the two on real images."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from ...methods.patch_maps import Scale, Window


def pixel_mean_map(distances: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """[B, h, w] patch values -> [B, H, W]: each pixel the mean over the patches covering it."""
    ones = torch.ones(1, 1, kernel, kernel, dtype=distances.dtype)
    sums = F.conv_transpose2d(distances[:, None], ones, stride=stride)
    counts = F.conv_transpose2d(torch.ones_like(distances[:1, None]), ones, stride=stride)
    return (sums / counts)[:, 0]


def reference_scores(network: torch.nn.Module, images: torch.Tensor, banks: Sequence[np.ndarray],
                     scales: Sequence[Scale], combine: str,
                     window: Optional[Window] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(image scores [B], pixel maps [B, H, W]) with exact nearest-embedding distances."""
    with torch.no_grad():
        grids = network(images)
        maps: List[torch.Tensor] = []
        for grid, bank, scale in zip(grids, banks, scales):
            flat = grid.reshape(-1, grid.shape[3]).double()
            nearest = torch.cdist(flat, torch.from_numpy(np.asarray(bank)).double()).min(dim=1).values
            maps.append(pixel_mean_map(nearest.reshape(grid.shape[:3]), scale.kernel, scale.stride))
        combined = maps[0]
        for other in maps[1:]:
            combined = combined * other if combine == "product" else combined + other
        if window is None:
            scores = combined.flatten(1).max(dim=1).values
        else:
            scores = F.avg_pool2d(combined[:, None], window.size, window.stride).flatten(1).max(dim=1).values
    return scores.numpy(), combined.float().numpy()
