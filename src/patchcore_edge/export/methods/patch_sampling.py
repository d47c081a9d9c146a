"""Where training patches come from: anchor positions and the second (and third) patch of each pair.

Positions are (row, col) of a patch's top-left corner, int64 [n, 2], always inside the image
(0 <= row <= height - kernel). Sampling is vectorised: the offset of the second patch is drawn first and the
anchor is then drawn uniformly among the positions where both patches fit, so no pair is ever rejected.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

# The 8 neighbours in the 3x3 grid around a patch, class k = NEIGHBOURS[k] as (d_row, d_col), row-major.
NEIGHBOURS = np.array([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)], dtype=np.int64)
ANGLE_CLASSES = 12  # 0, 30, ..., 330 degrees


def angle_offsets(distance: float) -> np.ndarray:
    """(d_row, d_col) int64 [12, 2] of the 12 directions at `distance` pixels: class k at k * 30 degrees,
    counter-clockwise from +col (image rows grow downwards, hence the minus on the row)."""
    angles = np.deg2rad(30.0 * np.arange(ANGLE_CLASSES))
    rows = -np.rint(distance * np.sin(angles))
    cols = np.rint(distance * np.cos(angles))
    return np.stack([rows, cols], axis=1).astype(np.int64)


def _anchors_for(rng: np.random.Generator, offsets: np.ndarray, height: int, width: int, kernel: int) -> np.ndarray:
    """Uniform anchors such that anchor and anchor + offset both fit in the image."""
    limits = np.array([height - kernel, width - kernel], dtype=np.int64)
    low = np.maximum(0, -offsets)
    high = limits - np.maximum(0, offsets)
    if (high < low).any():
        raise ValueError(f"a {kernel}-pixel patch pair with offset up to {np.abs(offsets).max()} does not fit "
                         f"in a {height}x{width} image")
    return low + np.floor(rng.random(offsets.shape) * (high - low + 1)).astype(np.int64)


def svdd_pairs(rng: np.random.Generator, n: int, height: int, width: int,
               kernel: int) -> Tuple[np.ndarray, np.ndarray]:
    """Patch SVDD's pairs: the second patch moved by a non-zero jitter of at most max(1, kernel // 32)
    pixels per axis (the 3x3 neighbourhood for 32-pixel patches)."""
    jitter = max(1, kernel // 32)
    span = 2 * jitter + 1
    # Draw among the span^2 - 1 non-zero offsets directly.
    codes = rng.integers(0, span * span - 1, size=n)
    codes = codes + (codes >= (span * span) // 2)
    offsets = np.stack([codes // span - jitter, codes % span - jitter], axis=1).astype(np.int64)
    anchors = _anchors_for(rng, offsets, height, width, kernel)
    return anchors, anchors + offsets


def neighbour_pairs(rng: np.random.Generator, n: int, height: int, width: int,
                    kernel: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patch SVDD's relative-position task: (anchor, second, class 0..7). The second patch is the class's
    neighbour in a 3x3 grid of cells 3/4 kernel apart, jittered by up to kernel // 4 per axis (so the task
    cannot be solved from the seam alone)."""
    labels = rng.integers(0, len(NEIGHBOURS), size=n)
    jitter = kernel // 4
    offsets = NEIGHBOURS[labels] * (3 * kernel // 4) + rng.integers(-jitter, jitter + 1, size=(n, 2))
    anchors = _anchors_for(rng, offsets, height, width, kernel)
    return anchors, anchors + offsets, labels


def angle_pairs(rng: np.random.Generator, n: int, height: int, width: int,
                kernel: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The multi-scale method's relative-angle task: (anchor, second, class 0..11), the second patch at
    3/4 kernel in direction class * 30 degrees."""
    labels = rng.integers(0, ANGLE_CLASSES, size=n)
    offsets = angle_offsets(0.75 * kernel)[labels]
    anchors = _anchors_for(rng, offsets, height, width, kernel)
    return anchors, anchors + offsets, labels


def near_far_triplets(rng: np.random.Generator, n: int, height: int, width: int,
                      kernel: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(anchor, near, far): near as an SVDD pair, far at least one kernel away on some axis (no overlap)."""
    anchors, near = svdd_pairs(rng, n, height, width, kernel)
    far = np.empty_like(anchors)
    todo = np.arange(n)
    limits = np.array([height - kernel + 1, width - kernel + 1])
    for _ in range(1000):
        if todo.size == 0:
            break
        candidates = np.floor(rng.random((todo.size, 2)) * limits).astype(np.int64)
        apart = np.abs(candidates - anchors[todo]).max(axis=1) >= kernel
        far[todo[apart]] = candidates[apart]
        todo = todo[~apart]
    if todo.size:
        raise ValueError(f"a {height}x{width} image has no room for two {kernel}-pixel patches apart")
    return anchors, near, far


def crop_patches(images: torch.Tensor, image_index: np.ndarray, positions: np.ndarray, kernel: int) -> torch.Tensor:
    """Patches [n, 3, kernel, kernel] cut from images [B, 3, H, W] at (image_index[i], positions[i])."""
    device = images.device
    index = torch.as_tensor(image_index, dtype=torch.long, device=device)
    offsets = torch.arange(kernel, device=device)
    rows = torch.as_tensor(positions[:, 0], dtype=torch.long, device=device)[:, None] + offsets[None, :]
    cols = torch.as_tensor(positions[:, 1], dtype=torch.long, device=device)[:, None] + offsets[None, :]
    channels_last = images.permute(0, 2, 3, 1)
    patches = channels_last[index[:, None, None], rows[:, :, None], cols[:, None, :]]  # [n, K, K, 3]
    # Left in channels-last memory (no .contiguous()): the CPU convolutions (oneDNN) run about 1.3x faster
    # on it than on NCHW, forward and backward, for the same values.
    return patches.permute(0, 3, 1, 2)
