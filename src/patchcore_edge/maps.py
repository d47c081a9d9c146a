"""Pixel anomaly maps from a method's patch map: upsample to the network input, Gaussian smoothing.

Shared by every method; the runtime then maps the result back onto the original image (`preprocess.map_to_image`).
Numpy and OpenCV only.
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import cv2
import numpy as np

DEFAULT_SIGMA = 4.0


def gaussian_kernel_size(sigma: float) -> int:
    """Kernel size of the PatchCore reference: radius int(4 sigma + 0.5) (scipy's truncate=4), 33 for sigma 4."""
    return 2 * int(4.0 * sigma + 0.5) + 1


def anomaly_map(patch_distances: np.ndarray, crop: Union[int, Tuple[int, int]],
                sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """Patch distances [h, w] -> float32 [crop, crop] pixel anomaly map ([height, width] for crop=(width, height)).

    As amazon-science/patchcore-inspection (RescaleSegmentor): bilinear upsampling with half-pixel centres
    (OpenCV INTER_LINEAR == torch interpolate(mode="bilinear", align_corners=False)), then a Gaussian blur
    with sigma in crop pixels, kernel 2 * int(4 sigma + 0.5) + 1 and scipy.ndimage's "reflect" border
    (edge pixel repeated: OpenCV BORDER_REFLECT). anomalib differs: nearest upsampling and torch "reflect"
    (edge not repeated, BORDER_REFLECT_101). sigma <= 0 skips the blur.
    """
    grid = np.asarray(patch_distances)
    if grid.ndim != 2 or grid.shape[0] < 1 or grid.shape[1] < 1:
        raise ValueError(f"patch distances must be a 2-D grid [h, w], got shape {grid.shape}")
    width, height = (int(crop), int(crop)) if isinstance(crop, (int, np.integer)) else (int(crop[0]), int(crop[1]))
    if min(width, height) < 1:
        raise ValueError(f"crop must be >= 1, got {crop}")
    grid = np.ascontiguousarray(grid, dtype=np.float32)
    if not np.isfinite(grid).all():
        raise ValueError("patch distances contain NaN or infinite values")
    upsampled = cv2.resize(grid, (width, height), interpolation=cv2.INTER_LINEAR)
    if sigma <= 0:
        return upsampled
    size = gaussian_kernel_size(float(sigma))
    return cv2.GaussianBlur(upsampled, (size, size), sigmaX=float(sigma), sigmaY=float(sigma),
                            borderType=cv2.BORDER_REFLECT)


def map_reach_cells(grid: tuple, crop: int, sigma: float = DEFAULT_SIGMA) -> int:
    """How many patch cells away a patch distance can still move a pixel of the image's anomaly map.

    A map pixel is a weighted mean (weights >= 0, sum 1) of patch distances: bilinear upsampling reaches 1 cell,
    the blur int(4 sigma + 0.5) crop pixels, and `preprocess.map_to_image` (edge replication, then a linear
    resize) 1 more pixel; one extra pixel of margin. The runtime re-checks patches within twice this reach of any
    patch above the pixel threshold (`scoring.image_scores`), which makes calibrated masks exact.
    """
    cell = float(crop) / max(int(grid[0]), int(grid[1]))
    pixels = (int(4.0 * sigma + 0.5) if sigma > 0 else 0) + 2
    return int(math.ceil(pixels / cell)) + 1
