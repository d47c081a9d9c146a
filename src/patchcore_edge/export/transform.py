"""The torch reference of the input transform in `patchcore_edge.preprocess` (resize, centre crop, normalise).

Written independently of the OpenCV version on purpose: the parity test between the two is what guarantees
that the bank (built from this transform at export) and the runtime (OpenCV on the device) see the same
pixels.

- Shrinking is an area (box) filter written as two overlap-weight matrices, `A_h @ image @ A_w^T`, where
  `A[i, j]` is the length of the overlap between output cell i (source interval `[i*s, (i+1)*s)`,
  `s = in/out`) and source pixel j, divided by `s`. This is what OpenCV's INTER_AREA computes, without its
  1e-3 sliver cut-off.
- Enlarging is bilinear with half-pixel centres (`align_corners=False`, no antialias), as OpenCV's
  INTER_LINEAR.
- The shorter side goes to `spec.resize`, the longer to `round(long * resize / short)`; the centre crop offset
  is `round((size - crop) / 2)` as in torchvision's CenterCrop.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..preprocess import InputSpec


def _resized_size(height: int, width: int, resize: int) -> Tuple[int, int]:
    short = min(height, width)
    new_h = resize if height == short else int(round(height * resize / short))
    new_w = resize if width == short else int(round(width * resize / short))
    return new_h, new_w


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


def _resize_chw(image: torch.Tensor, new_h: int, new_w: int) -> torch.Tensor:
    """float64 [3, H, W] -> float64 [3, new_h, new_w]: area filter when shrinking, bilinear otherwise."""
    height, width = image.shape[-2:]
    if (new_h, new_w) == (height, width):
        return image
    if new_h < height or new_w < width:
        # The shorter-side rule scales both axes alike, so one shrinking axis means both shrink (or stay).
        a_h = area_matrix(height, new_h)
        a_w = area_matrix(width, new_w)
        return a_h @ image @ a_w.T
    return F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False,
                         antialias=False)[0]


def torch_preprocess(image_rgb: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> normalised float32 tensor [3, crop, crop], the network input for one image."""
    if not isinstance(image_rgb, np.ndarray) or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        shape = getattr(image_rgb, "shape", None)
        raise ValueError(f"expected an RGB image array of shape (H, W, 3), got {shape}")
    if image_rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image, got pixel type {image_rgb.dtype}")
    height, width = image_rgb.shape[:2]
    if height < 1 or width < 1:
        raise ValueError(f"empty image ({height}x{width})")
    new_h, new_w = _resized_size(height, width, spec.resize)

    # float64 throughout the resize: this is the reference, its rounding must not eat into the parity budget.
    image = torch.from_numpy(np.ascontiguousarray(image_rgb)).permute(2, 0, 1).to(torch.float64)
    resized = _resize_chw(image, new_h, new_w)

    top = int(round((new_h - spec.crop) / 2.0))
    left = int(round((new_w - spec.crop) / 2.0))
    cropped = resized[:, top:top + spec.crop, left:left + spec.crop]

    mean = torch.tensor(spec.mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float64).view(3, 1, 1)
    return ((cropped / 255.0 - mean) / std).to(torch.float32).contiguous()


def torch_preprocess_batch(images_rgb: Sequence[np.ndarray], spec: InputSpec) -> torch.Tensor:
    """A list of RGB uint8 images (any sizes) -> float32 tensor [B, 3, crop, crop]."""
    if len(images_rgb) == 0:
        raise ValueError("torch_preprocess_batch needs at least one image")
    return torch.stack([torch_preprocess(image, spec) for image in images_rgb])
