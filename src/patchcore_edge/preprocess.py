"""The input transform in OpenCV/numpy: resize the shorter side, centre crop, normalise.

The exporter's torch reference of the same transform is `patchcore_edge.export.transform`; a test keeps the two
equal. Resizing is done in float32 so that no rounding to uint8 separates the two.

Resize rule (both implementations): the shorter side goes to `resize` pixels, the longer side to
`round(long * resize / short)`. Shrinking uses an area (box) filter, each output pixel the overlap-weighted mean
of the input pixels under it (OpenCV INTER_AREA); enlarging uses bilinear interpolation with half-pixel centres
(OpenCV INTER_LINEAR, torch `interpolate(..., align_corners=False)`).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

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


def _area_extent(size: int, resized: int, end: int) -> int:
    """How many leading source pixels decide area-resized cells [0, end) of an axis going from size to resized.

    Cell `end - 1` ends at source position end * size / resized; one pixel more keeps OpenCV's clamp at the
    last source pixel (which would shorten that cell) out of the cells that are kept.
    """
    return min(size, math.ceil(end * size / resized) + 1)


def _aligned_cell(size: int, resized: int, cell: int) -> int:
    """The last area cell at or before `cell` that starts on a whole source pixel (cell k starts at k*size/resized).

    Such cells recur every resized/gcd(size, resized) cells: every 64th for 900 -> 256, every one for 1024 -> 256.
    """
    period = resized // math.gcd(size, resized)
    return cell // period * period


def _area_block(image: np.ndarray, geo: Geometry, rows: Tuple[int, int],
                cols: Tuple[int, int]) -> Optional[np.ndarray]:
    """Area-resized cells rows x cols (half-open ranges) from the source pixels under them only, or None.

    Both ranges must start on cells that begin on a whole source pixel. Passing OpenCV the scale factors instead
    of an output size keeps its cells those of the whole-image resize, so the values are the same. None when
    OpenCV returned fewer cells than asked (it never did in the tests; the caller then resizes the whole image).
    """
    (top, bottom), (left, right) = rows, cols
    y0, x0 = top * geo.height // geo.resized_height, left * geo.width // geo.resized_width
    y1 = _area_extent(geo.height, geo.resized_height, bottom)
    x1 = _area_extent(geo.width, geo.resized_width, right)
    out = cv2.resize(image[y0:y1, x0:x1].astype(np.float32), None, fx=geo.resized_width / geo.width,
                     fy=geo.resized_height / geo.height, interpolation=cv2.INTER_AREA)
    if out.shape[0] < bottom - top or out.shape[1] < right - left:
        return None
    return out[:bottom - top, :right - left]


_helper: Optional[ThreadPoolExecutor] = None
_helper_lock = threading.Lock()


def _helper_thread() -> ThreadPoolExecutor:
    global _helper
    with _helper_lock:
        if _helper is None:
            _helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="patchcore-resize")
        return _helper


def _forget_helper() -> None:
    # A forked child has the executor object but not its thread: work handed to it would never run.
    global _helper, _helper_lock
    _helper, _helper_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_helper)

# Below this many source pixels a second thread costs more than it saves.
_SPLIT_PIXELS = 1 << 18


def _shrink_crop(image: np.ndarray, geo: Geometry, parallel: bool) -> Optional[np.ndarray]:
    """Area-resize only the cells that the crop keeps, as bit-identical bands (two threads if `parallel`)."""
    bottom, right = geo.top + geo.crop, geo.left + geo.crop
    # Cells above/left of the crop can be skipped only from an aligned cell on: a band starting mid-pixel would
    # need fractional cell boundaries, which OpenCV cannot express. Below/right of the crop nothing is needed.
    first_row = _aligned_cell(geo.height, geo.resized_height, geo.top)
    cols = (_aligned_cell(geo.width, geo.resized_width, geo.left), right)
    period = geo.resized_height // math.gcd(geo.height, geo.resized_height)
    cut = first_row + round((bottom - first_row) / 2 / period) * period
    split = parallel and first_row < cut < bottom and geo.height * geo.width >= _SPLIT_PIXELS
    if not split:
        block = _area_block(image, geo, (first_row, bottom), cols)
        return None if block is None else block[geo.top - first_row:, geo.left - cols[0]:]
    # The upper band on the helper thread, the lower one here: cv2.resize releases the GIL, and its own
    # parallel_for splits an area resize of this size into a single stripe, so it would use one core.
    upper = _helper_thread().submit(_area_block, image, geo, (first_row, cut), cols)
    lower = _area_block(image, geo, (cut, bottom), cols)
    top_part = upper.result()
    if top_part is None or lower is None:
        return None
    return np.concatenate([top_part[geo.top - first_row:], lower])[:, geo.left - cols[0]:]


def resize_crop(image_rgb: np.ndarray, spec: InputSpec, parallel: bool = False) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> float32 (crop, crop, 3) in [0, 255], resized and centre-cropped.

    When shrinking, only the area cells the crop keeps are computed, from the source pixels under them (12 % less
    work for 900x900 -> 256 -> 224), with values identical to resizing the whole image and cropping.
    `parallel=True` splits that work over two threads (for latency when the cores are otherwise idle).
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {image_rgb.shape}")
    geo = geometry(image_rgb.shape[0], image_rgb.shape[1], spec)
    shrinking = min(geo.resized_height / geo.height, geo.resized_width / geo.width) < 1.0
    if shrinking:
        cropped = _shrink_crop(image_rgb, geo, parallel)
        if cropped is not None:
            return cropped
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    resized = cv2.resize(image_rgb.astype(np.float32), (geo.resized_width, geo.resized_height),
                         interpolation=interpolation)
    return resized[geo.top:geo.top + spec.crop, geo.left:geo.left + spec.crop]


def preprocess(image_rgb: np.ndarray, spec: InputSpec, parallel: bool = False) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> normalised float32 (3, crop, crop), the network input for one image.

    `parallel=True` resizes on two threads (see `resize_crop`); the result is the same.
    """
    cropped = resize_crop(image_rgb, spec, parallel)
    scale = np.asarray(spec.std, dtype=np.float32) * 255.0
    offset = np.asarray(spec.mean, dtype=np.float32) * 255.0
    # Channels first, then normalise in place: broadcasting over a trailing axis of 3 runs numpy's inner loop
    # three elements at a time (0.69 ms for 224x224 against 0.07 ms this way, same float32 results).
    planar = np.ascontiguousarray(cropped.transpose(2, 0, 1))
    planar -= offset[:, None, None]
    planar /= scale[:, None, None]
    return planar


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
