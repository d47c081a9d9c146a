"""The input transform in OpenCV/numpy: resize the shorter side, centre crop, normalise.

The exporter's torch reference of the same transform is `patchcore_edge.export.transform`; a test keeps the two
equal. Resizing is done in float32 so that no rounding to uint8 separates the two.

Resize rule (both implementations): the shorter side goes to `resize` pixels, the longer side to
`round(long * resize / short)`. Shrinking uses an area (box) filter, each output pixel the overlap-weighted mean
of the input pixels under it (OpenCV INTER_AREA); enlarging uses bilinear interpolation with half-pixel centres
(OpenCV INTER_LINEAR, torch `interpolate(..., align_corners=False)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

import cv2
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """How an RGB image becomes the network input."""

    resize: int = 256
    crop: int = 224
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if not (isinstance(self.resize, int) and isinstance(self.crop, int)):
            raise ValueError("resize and crop must be integers")
        if not 16 <= self.crop <= self.resize <= 4096:
            raise ValueError(f"need 16 <= crop <= resize <= 4096, got crop={self.crop}, resize={self.resize}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std positive")

    def to_manifest(self) -> Dict[str, Any]:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std),
                "channel_order": "RGB", "layout": "NCHW", "resize_rule": "shorter-side; area down, bilinear up"}

    @classmethod
    def from_manifest(cls, entry: Dict[str, Any]) -> "InputSpec":
        return cls(resize=int(entry["resize"]), crop=int(entry["crop"]),
                   mean=tuple(float(v) for v in entry["mean"]),  # type: ignore[arg-type]
                   std=tuple(float(v) for v in entry["std"]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Geometry:
    """Where the network input sits in the original image: resized size and crop offset."""

    height: int
    width: int
    resized_height: int
    resized_width: int
    top: int
    left: int
    crop: int


def geometry(height: int, width: int, spec: InputSpec) -> Geometry:
    if height < 1 or width < 1:
        raise ValueError(f"empty image ({height}x{width})")
    short = min(height, width)
    resized_h = spec.resize if height == short else int(round(height * spec.resize / short))
    resized_w = spec.resize if width == short else int(round(width * spec.resize / short))
    # Same rounding as torchvision's CenterCrop, so both implementations crop the same pixels.
    top = int(round((resized_h - spec.crop) / 2.0))
    left = int(round((resized_w - spec.crop) / 2.0))
    return Geometry(height, width, resized_h, resized_w, top, left, spec.crop)


def resize_crop(image_rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> float32 (crop, crop, 3) in [0, 255], resized and centre-cropped."""
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {image_rgb.shape}")
    geo = geometry(image_rgb.shape[0], image_rgb.shape[1], spec)
    shrinking = min(geo.resized_height / geo.height, geo.resized_width / geo.width) < 1.0
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    resized = cv2.resize(image_rgb.astype(np.float32), (geo.resized_width, geo.resized_height),
                         interpolation=interpolation)
    return resized[geo.top:geo.top + spec.crop, geo.left:geo.left + spec.crop]


def preprocess(image_rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> normalised float32 (3, crop, crop), the network input for one image."""
    cropped = resize_crop(image_rgb, spec)
    scale = np.asarray(spec.std, dtype=np.float32) * 255.0
    offset = np.asarray(spec.mean, dtype=np.float32) * 255.0
    normalised = (cropped - offset) / scale
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


def map_to_image(crop_map: np.ndarray, geo: Geometry) -> np.ndarray:
    """A (crop, crop) map over the network input -> an (H, W) map over the original image.

    The border outside the centre crop was never seen by the network; it takes the value of the nearest crop pixel
    (edge replication) rather than zero, which would pass it off as confidently normal.
    """
    bottom = geo.resized_height - geo.top - geo.crop
    right = geo.resized_width - geo.left - geo.crop
    canvas = cv2.copyMakeBorder(np.asarray(crop_map, dtype=np.float32), geo.top, bottom, geo.left, right,
                                cv2.BORDER_REPLICATE)
    if (geo.resized_height, geo.resized_width) == (geo.height, geo.width):
        return canvas
    return cv2.resize(canvas, (geo.width, geo.height), interpolation=cv2.INTER_LINEAR)
