"""Pixel anomaly maps from a method's patch map: upsample to the network input, Gaussian smoothing.

Shared by every method; the runtime then maps the result back onto the original image (`preprocess.map_to_image`).
Both steps are linear and act on each axis alone, so the map is computed as two small products with per-axis
weights, taken once per grid and size from the OpenCV calls that define it, run on an identity matrix.
Numpy and OpenCV only.
"""

from __future__ import annotations

import math
from functools import lru_cache
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

    Computed as rows @ grid @ cols.T with the per-axis weights of those two OpenCV calls (`axis_weights`): equal to
    running them up to float32 rounding, and 6x cheaper for a 28 x 28 grid at 224 px (0.05 against 0.3 ms; the
    blur's 33 taps per pixel become 28 per axis on the grid; benchmarks/results/runtime_vs_anomalib.md, session 8).
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
    rows = axis_weights(grid.shape[0], height, float(sigma))
    cols_t = axis_weights(grid.shape[1], width, float(sigma)).T
    # The narrow product first ([height, h] @ [h, w]), then the one to the full width.
    result: np.ndarray = (rows @ grid) @ cols_t
    return result


@lru_cache(maxsize=16)
def axis_weights(cells: int, size: int, sigma: float) -> np.ndarray:
    """The weights of `anomaly_map` along one axis, float32 [size, cells] (read-only): column i is what a unit value
    at patch cell i becomes over the `size` pixels, by the same OpenCV calls (bilinear resize, then the Gaussian blur
    with its border) applied to an identity matrix. Each row is a weighted mean (weights >= 0, summing to 1)."""
    values = cv2.resize(np.eye(cells, dtype=np.float32), (cells, size), interpolation=cv2.INTER_LINEAR)
    if sigma > 0:
        kernel = gaussian_kernel_size(sigma)
        # A 1-wide kernel across: the columns (the impulses) never mix.
        values = cv2.GaussianBlur(values, (1, kernel), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    weights = np.ascontiguousarray(values, dtype=np.float32)
    weights.flags.writeable = False
    return weights


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
