"""The torch reference of the input transform in `patchcore_edge.preprocess` (fit, resize, normalise).

The resampling is written independently of the OpenCV version on purpose: the parity test between the two is
what guarantees that the bank (built from this transform at export) and the runtime (OpenCV on the device) see
the same pixels. The integer geometry (resized size, crop offset, letterbox padding) is shared:
`preprocess.geometry`.

- Every axis is resampled by a matrix, `R_h @ image @ R_w^T`, in float64.
- Shrinking an axis: `A[i, j]` is the length of the overlap between output cell i (source interval
  `[i*s, (i+1)*s)`, `s = in/out`) and source pixel j, divided by `s`. This is what OpenCV's INTER_AREA
  computes, without its 1e-3 sliver cut-off.
- Enlarging an axis: bilinear with half-pixel centres (`align_corners=False`, no antialias, edge clamped), as
  OpenCV's INTER_LINEAR.
- Letterbox padding is 0 after normalisation (the mean colour).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..preprocess import InputSpec, geometry


def area_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """float64 [size_out, size_in]: row i averages the source pixels under output cell i, by overlap."""
    scale = size_in / size_out
    starts = torch.arange(size_out, dtype=torch.float64) * scale
    ends = starts + scale
    left = torch.arange(size_in, dtype=torch.float64)
    overlap = (torch.minimum(ends[:, None], left[None, :] + 1.0)
               - torch.maximum(starts[:, None], left[None, :])).clamp_min(0.0)
    # Rows sum to `scale` up to rounding; dividing by the actual sum keeps a constant image exactly constant.
    return overlap / overlap.sum(dim=1, keepdim=True)


def bilinear_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """float64 [size_out, size_in]: half-pixel-centre linear interpolation, source positions clamped."""
    position = ((torch.arange(size_out, dtype=torch.float64) + 0.5) * (size_in / size_out) - 0.5)
    position = position.clamp(0.0, size_in - 1.0)
    low = position.floor().to(torch.int64)
    high = (low + 1).clamp_max(size_in - 1)
    frac = position - low.to(torch.float64)
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    matrix[rows, low] += 1.0 - frac
    matrix[rows, high] += frac
    return matrix


def axis_matrix(size_in: int, size_out: int) -> torch.Tensor:
    if size_out < size_in:
        return area_matrix(size_in, size_out)
    if size_out > size_in:
        return bilinear_matrix(size_in, size_out)
    return torch.eye(size_in, dtype=torch.float64)


def torch_preprocess(image_rgb: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> normalised float32 tensor [3, height, width], the network input for one image."""
    if not isinstance(image_rgb, np.ndarray) or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        shape = getattr(image_rgb, "shape", None)
        raise ValueError(f"expected an RGB image array of shape (H, W, 3), got {shape}")
    if image_rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image, got pixel type {image_rgb.dtype}")
    height, width = image_rgb.shape[:2]
    if height < 1 or width < 1:
        raise ValueError(f"empty image ({height}x{width})")
    geo = geometry(height, width, spec)

    # float64 throughout the resize: this is the reference, its rounding must not eat into the parity budget.
    image = torch.from_numpy(np.ascontiguousarray(image_rgb)).permute(2, 0, 1).to(torch.float64)
    resized = axis_matrix(height, geo.resized_height) @ image @ axis_matrix(width, geo.resized_width).T

    mean = torch.tensor(spec.mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float64).view(3, 1, 1)
    normalised = (resized / 255.0 - mean) / std
    out = torch.zeros(3, geo.input_height, geo.input_width, dtype=torch.float64)
    # Input pixel (y, x) is resized pixel (y + top, x + left); copy the overlap of the two rectangles.
    y0, x0 = max(0, geo.top), max(0, geo.left)
    y1 = min(geo.resized_height, geo.top + geo.input_height)
    x1 = min(geo.resized_width, geo.left + geo.input_width)
    out[:, y0 - geo.top:y1 - geo.top, x0 - geo.left:x1 - geo.left] = normalised[:, y0:y1, x0:x1]
    return out.to(torch.float32).contiguous()


def torch_preprocess_batch(images_rgb: Sequence[np.ndarray], spec: InputSpec) -> torch.Tensor:
    """A list of RGB uint8 images (any sizes) -> float32 tensor [B, 3, height, width]."""
    if len(images_rgb) == 0:
        raise ValueError("torch_preprocess_batch needs at least one image")
    return torch.stack([torch_preprocess(image, spec) for image in images_rgb])
