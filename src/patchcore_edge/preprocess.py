"""The input transform in OpenCV/numpy: fit the image into the network input, normalise; map results back.

The exporter's torch reference of the same transform is `patchcore_edge.export.transform`; a test keeps the two
equal. Resizing is done in float32 so that no rounding to uint8 separates the two.

Fit modes (`InputSpec.fit`), the network input being `width x height`:
- `crop` (the MVTec protocol): the shorter side goes to `resize` pixels, the longer side to
  `round(long * resize / short)`, then the centre `width x height` window is kept. The border is never seen.
- `squash`: the whole image resized to `width x height`, aspect ratio ignored.
- `letterbox`: the whole image scaled by `min(width / w, height / h)` (aspect kept), centred, the rest padded
  with the mean colour (0 after normalisation). Padding is marked invalid: it never scores (`patch_validity`).

Each axis is resampled on its own: shrinking uses an area (box) filter, each output pixel the overlap-weighted
mean of the input pixels under it (OpenCV INTER_AREA); enlarging uses bilinear interpolation with half-pixel
centres (OpenCV INTER_LINEAR, torch `interpolate(..., align_corners=False)`). Squash can shrink one axis and
enlarge the other; it then runs one pass per axis.

`Geometry` places the network input in the resized image: input pixel (y, x) is resized pixel (y + top, x + left)
(top/left negative for letterbox padding), which is all `map_to_image` and `patch_validity` need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

from .cpu import helper_thread

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FITS = ("crop", "squash", "letterbox")
FIT_HELP = {"crop": "shorter side to --resize, centre window kept (MVTec protocol; the border is never seen)",
            "squash": "the whole image resized to the input size, aspect ratio ignored",
            "letterbox": "the whole image, aspect kept, padded; the padding never scores"}


def checked_roi(points: Sequence[Sequence[float]]) -> Tuple[Tuple[float, float], ...]:
    """A region-of-interest polygon as (x, y) fractions of the image size; ValueError unless it has at least 3
    points, each inside [0, 1]."""
    polygon = tuple((float(x), float(y)) for x, y in points)
    if len(polygon) < 3 or not all(0.0 <= v <= 1.0 and math.isfinite(v) for p in polygon for v in p):
        raise ValueError("roi needs at least 3 (x, y) points inside [0, 1]")
    return polygon


@dataclass(frozen=True)
class InputSpec:
    """How an RGB image becomes the network input: fit mode, input size, normalisation.

    `crop` is the side of a square input; `size=(width, height)` sets any input size (`crop` then holds the
    shorter side). `resize` (the
    shorter side before the centre crop) matters for `fit="crop"` only. `roi`, optional, is a polygon in
    original-image coordinates normalised to [0, 1] ((x, y) pairs): patches outside it never score and the map
    is zero there.
    """

    resize: int = 256
    crop: int = 224
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    fit: str = "crop"
    size: Optional[Tuple[int, int]] = None
    roi: Optional[Tuple[Tuple[float, float], ...]] = None
    tile: Optional[int] = None
    tile_overlap: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.resize, int) and isinstance(self.crop, int)):
            raise ValueError("resize and crop must be integers")
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {', '.join(FITS)}, got {self.fit!r}")
        if self.size is not None:
            if len(self.size) != 2 or not all(isinstance(v, int) for v in self.size):
                raise ValueError(f"size must be two integers (width, height), got {self.size!r}")
            width, height = int(self.size[0]), int(self.size[1])
            # One spelling per input: a square size is `crop`; a non-square one records its shorter side there.
            object.__setattr__(self, "size", None if width == height else (width, height))
            object.__setattr__(self, "crop", min(width, height))
        if not (16 <= min(self.width, self.height) and max(self.width, self.height) <= 4096):
            raise ValueError(f"input sides must be between 16 and 4096, got {self.width}x{self.height}")
        if self.fit == "crop" and not max(self.width, self.height) <= self.resize <= 4096:
            raise ValueError(f"need 16 <= crop <= resize <= 4096, got input {self.width}x{self.height}, "
                             f"resize={self.resize}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std positive")
        if self.roi is not None:
            object.__setattr__(self, "roi", checked_roi(self.roi))
        if self.tile is not None:
            tile_boxes(self.tile, self.tile, self.tile, self.tile_overlap)  # validates tile and overlap
        elif self.tile_overlap:
            raise ValueError("tile_overlap needs a tile size")

    @property
    def width(self) -> int:
        return self.crop if self.size is None else self.size[0]

    @property
    def height(self) -> int:
        return self.crop if self.size is None else self.size[1]

    def to_manifest(self) -> Dict[str, Any]:
        entry: Dict[str, Any] = {
            "fit": self.fit, "size": [self.width, self.height], "resize": self.resize, "mean": list(self.mean),
            "std": list(self.std), "channel_order": "RGB", "layout": "NCHW",
            "resize_rule": "per axis: area down, bilinear up", "fit_rule": FIT_HELP[self.fit],
            "roi": None if self.roi is None else [list(p) for p in self.roi],
            "tile": None if self.tile is None else {"size": self.tile, "overlap": self.tile_overlap}}
        if self.width == self.height:
            entry["crop"] = self.width  # readers of format 1 manifests
        return entry

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any]) -> "InputSpec":
        width, height = input_size(entry)
        roi = entry.get("roi")
        tile = entry.get("tile")
        return cls(resize=int(entry.get("resize", max(width, height))), crop=min(width, height),
                   size=None if width == height else (width, height), fit=str(entry.get("fit", "crop")),
                   mean=tuple(float(v) for v in entry["mean"]),  # type: ignore[arg-type]
                   std=tuple(float(v) for v in entry["std"]),  # type: ignore[arg-type]
                   roi=None if roi is None else tuple((float(x), float(y)) for x, y in roi),
                   tile=None if tile is None else int(tile["size"]),
                   tile_overlap=0 if tile is None else int(tile["overlap"]))

    def describe(self) -> str:
        """One line for `export` and `run`: what the network sees and why."""
        text = f"fit {self.fit} to {self.width}x{self.height}: {FIT_HELP[self.fit]}"
        if self.fit == "crop":
            text += f" (resize {self.resize})"
        if self.tile is not None:
            text += f"; each {self.tile}x{self.tile} tile (overlap {self.tile_overlap} px) of the image"
        return text + ("; region of interest set" if self.roi is not None else "")

    def pieces(self, image: np.ndarray) -> Tuple[List["Tile"], List[np.ndarray]]:
        """The image itself, or its tiles when tiling: what goes through the network one by one."""
        height, width = image.shape[:2]
        if self.tile is None:
            return [Tile(0, 0, height, width)], [image]
        tiles = tile_boxes(height, width, self.tile, self.tile_overlap)
        return tiles, cut_tiles(image, tiles)


def input_size(entry: Mapping[str, Any]) -> Tuple[int, int]:
    """(width, height) of the network input from a manifest's input section (format 1 had only `crop`)."""
    if "size" in entry:
        width, height = (int(v) for v in entry["size"])
        return width, height
    crop = int(entry["crop"])
    return crop, crop


@dataclass(frozen=True)
class Geometry:
    """Where the network input sits in the original image.

    The image (height x width) is resized to resized_height x resized_width; input pixel (y, x) is resized pixel
    (y + top, x + left). Crop: top/left >= 0. Letterbox: top/left <= 0 (padding). Squash: both 0.
    """

    height: int
    width: int
    resized_height: int
    resized_width: int
    top: int
    left: int
    input_height: int
    input_width: int

    @property
    def inspected_fraction(self) -> float:
        """The fraction of the original image the network sees (1.0 unless cropped)."""
        rows = min(self.resized_height, self.top + self.input_height) - max(0, self.top)
        cols = min(self.resized_width, self.left + self.input_width) - max(0, self.left)
        return rows * cols / float(self.resized_height * self.resized_width)


def geometry(height: int, width: int, spec: InputSpec) -> Geometry:
    if height < 1 or width < 1:
        raise ValueError(f"empty image ({height}x{width})")
    in_h, in_w = spec.height, spec.width
    if spec.fit == "squash":
        return Geometry(height, width, in_h, in_w, 0, 0, in_h, in_w)
    if spec.fit == "letterbox":
        scale = min(in_w / width, in_h / height)
        resized_h = max(1, min(in_h, int(round(height * scale))))
        resized_w = max(1, min(in_w, int(round(width * scale))))
        return Geometry(height, width, resized_h, resized_w, -((in_h - resized_h) // 2),
                        -((in_w - resized_w) // 2), in_h, in_w)
    short = min(height, width)
    resized_h = spec.resize if height == short else int(round(height * spec.resize / short))
    resized_w = spec.resize if width == short else int(round(width * spec.resize / short))
    # Same rounding as torchvision's CenterCrop, so both implementations crop the same pixels.
    top = int(round((resized_h - in_h) / 2.0))
    left = int(round((resized_w - in_w) / 2.0))
    return Geometry(height, width, resized_h, resized_w, top, left, in_h, in_w)


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


# Below this many source pixels a second thread costs more than it saves.
_SPLIT_PIXELS = 1 << 18


def _shrink_crop(image: np.ndarray, geo: Geometry, parallel: bool) -> Optional[np.ndarray]:
    """Area-resize only the cells that the crop keeps, as bit-identical bands (two threads if `parallel`)."""
    bottom, right = geo.top + geo.input_height, geo.left + geo.input_width
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
    upper = helper_thread().submit(_area_block, image, geo, (first_row, cut), cols)
    lower = _area_block(image, geo, (cut, bottom), cols)
    top_part = upper.result()
    if top_part is None or lower is None:
        return None
    return np.concatenate([top_part[geo.top - first_row:], lower])[:, geo.left - cols[0]:]


def _resize_axes(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 (H, W, 3) -> (height, width, 3); area filter on a shrinking axis, bilinear on an enlarging one."""
    src_h, src_w = image.shape[:2]
    shrink = height < src_h or width < src_w
    enlarge = height > src_h or width > src_w
    if not (shrink or enlarge):
        return image
    if shrink and enlarge:  # squash only: one pass per axis, each with its own filter
        if height < src_h:
            image = cv2.resize(image, (src_w, height), interpolation=cv2.INTER_AREA)
            return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        image = cv2.resize(image, (width, src_h), interpolation=cv2.INTER_AREA)
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_crop(image_rgb: np.ndarray, spec: InputSpec, parallel: bool = False) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> float32 (height, width, 3) in [0, 255]: the image fitted into the network input.

    Crop mode, when shrinking: only the area cells the crop keeps are computed, from the source pixels under them
    (12 % less work for 900x900 -> 256 -> 224), with values identical to resizing the whole image and cropping.
    `parallel=True` splits that work (crop, and squash shrinking both axes) over two threads, in two row bands whose
    values are those of the one-piece resize (for latency when the cores are otherwise idle; the default bottle
    bundle's squash 900 -> 224 runs the float conversion and the area filter of each band on its own core).
    Letterbox padding holds the mean colour, so it is 0 after normalisation.
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {image_rgb.shape}")
    geo = geometry(image_rgb.shape[0], image_rgb.shape[1], spec)
    # Crop (aspect kept: both axes shrink together) and squash shrinking both axes (geometry: top = left = 0, the
    # "crop" the whole resized image) go through the banded area resize: the same values, on two threads if asked.
    if spec.fit == "crop":
        shrinking = min(geo.resized_height / geo.height, geo.resized_width / geo.width) < 1.0
    else:
        shrinking = spec.fit == "squash" and geo.resized_height < geo.height and geo.resized_width < geo.width
    if shrinking:
        cropped = _shrink_crop(image_rgb, geo, parallel)
        if cropped is not None:
            return cropped
    resized = _resize_axes(image_rgb.astype(np.float32), geo.resized_height, geo.resized_width)
    if spec.fit == "crop":
        return resized[geo.top:geo.top + geo.input_height, geo.left:geo.left + geo.input_width]
    if spec.fit == "squash":
        return resized
    canvas = np.empty((geo.input_height, geo.input_width, 3), np.float32)
    canvas[...] = np.asarray(spec.mean, dtype=np.float32) * 255.0
    canvas[-geo.top:-geo.top + geo.resized_height, -geo.left:-geo.left + geo.resized_width] = resized
    return canvas


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


def map_to_image(input_map: np.ndarray, geo: Geometry) -> np.ndarray:
    """A (input_height, input_width) map over the network input -> an (H, W) map over the original image.

    Crop: the border outside the centre crop was never seen by the network; it takes the value of the nearest
    crop pixel (edge replication) rather than zero, which would pass it off as confidently normal.
    Letterbox: the padding is cut away. `region_mask` zeroes what lies outside a region of interest.
    """
    values = np.asarray(input_map, dtype=np.float32)
    if values.shape != (geo.input_height, geo.input_width):
        raise ValueError(f"map shape {values.shape} is not the input's ({geo.input_height}, {geo.input_width})")
    # Cut where the input extends beyond the resized image (padding), replicate where it falls short (crop).
    values = values[max(0, -geo.top):geo.resized_height - geo.top, max(0, -geo.left):geo.resized_width - geo.left]
    top, left = max(0, geo.top), max(0, geo.left)
    bottom = geo.resized_height - top - values.shape[0]
    right = geo.resized_width - left - values.shape[1]
    canvas = values if top == bottom == left == right == 0 else cv2.copyMakeBorder(
        np.ascontiguousarray(values), top, bottom, left, right, cv2.BORDER_REPLICATE)
    if (geo.resized_height, geo.resized_width) == (geo.height, geo.width):
        return np.ascontiguousarray(canvas)
    return cv2.resize(canvas, (geo.width, geo.height), interpolation=cv2.INTER_LINEAR)


def region_mask(height: int, width: int, spec: InputSpec) -> Optional[np.ndarray]:
    """bool (H, W): True inside the region of interest, None when the spec has none (everything counts)."""
    if spec.roi is None:
        return None
    points = np.asarray(spec.roi, dtype=np.float64) * np.array([width, height], dtype=np.float64)
    mask = np.zeros((height, width), np.uint8)
    # Pixel centres are at integer coordinates in OpenCV's rasteriser: shift by half a pixel.
    cv2.fillPoly(mask, [np.round((points - 0.5) * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def patch_validity(geo: Geometry, grid: Tuple[int, int], roi: Optional[np.ndarray] = None
                   ) -> Optional[np.ndarray]:
    """bool [h * w]: the patches whose centre falls on the image (not letterbox padding) and inside `roi` (bool
    (H, W) over the image of `geo`, see `region_mask`). None when every patch counts (no padding, no ROI)."""
    padded = geo.top < 0 or geo.left < 0
    if not padded and roi is None:
        return None
    h, w = grid
    # Patch centres in input pixels (half-pixel centres, as the bilinear map upsampling assumes).
    ys = (np.arange(h) + 0.5) * geo.input_height / h - 0.5
    xs = (np.arange(w) + 0.5) * geo.input_width / w - 0.5
    ry, rx = ys + geo.top, xs + geo.left  # in resized-image pixels
    inside_y = (ry >= -0.5) & (ry <= geo.resized_height - 0.5)
    inside_x = (rx >= -0.5) & (rx <= geo.resized_width - 0.5)
    valid = inside_y[:, None] & inside_x[None, :]
    if roi is not None:
        oy = np.clip(np.floor((ry + 0.5) * geo.height / geo.resized_height), 0, geo.height - 1).astype(np.int64)
        ox = np.clip(np.floor((rx + 0.5) * geo.width / geo.resized_width), 0, geo.width - 1).astype(np.int64)
        valid &= roi[oy[:, None], ox[None, :]]
    return valid.ravel()


# The region-of-interest share is measured on a raster with this longer side (exact enough for a report line).
_FRACTION_RASTER = 512


def inspected_fraction(height: int, width: int, spec: InputSpec) -> float:
    """The fraction of an image of this size that can score: what the network sees (1.0 for squash, letterbox
    and tiles; the centre window for crop), and of that only the part inside the region of interest."""
    geo = geometry(height, width, spec)
    seen = 1.0 if spec.tile is not None else geo.inspected_fraction
    if spec.roi is None:
        return seen
    # The ROI raster at a reduced size, and the rows/columns the crop window keeps, both in image fractions.
    scale = min(1.0, _FRACTION_RASTER / max(height, width))
    h, w = max(1, int(round(height * scale))), max(1, int(round(width * scale)))
    inside = region_mask(h, w, spec)
    assert inside is not None
    if spec.tile is None and spec.fit == "crop":
        rows = slice(int(round(max(0, geo.top) * h / geo.resized_height)),
                     int(round(min(geo.resized_height, geo.top + geo.input_height) * h / geo.resized_height)))
        cols = slice(int(round(max(0, geo.left) * w / geo.resized_width)),
                     int(round(min(geo.resized_width, geo.left + geo.input_width) * w / geo.resized_width)))
        return float(inside[rows, cols].sum()) / float(h * w)
    return float(inside.mean())


# ---------------------------------------------------------------------------------------------------- tiling

@dataclass(frozen=True)
class Tile:
    """One tile of a large image: rows [top, top + height), columns [left, left + width)."""

    top: int
    left: int
    height: int
    width: int


def _starts(length: int, tile: int, overlap: int) -> List[int]:
    if length <= tile:
        return [0]
    step = tile - overlap
    count = math.ceil((length - tile) / step) + 1
    # Spread the tiles evenly so that the last one ends on the border instead of sticking out.
    return [int(round(i * (length - tile) / (count - 1))) for i in range(count)]


def tile_boxes(height: int, width: int, tile: int, overlap: int) -> List[Tile]:
    """Overlapping tiles of side `tile` (or the image side where smaller) covering the whole image."""
    if tile < 16 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 16 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    return [Tile(top, left, min(tile, height), min(tile, width))
            for top in _starts(height, tile, overlap) for left in _starts(width, tile, overlap)]


def cut_tiles(image: np.ndarray, tiles: Sequence[Tile]) -> List[np.ndarray]:
    return [image[t.top:t.top + t.height, t.left:t.left + t.width] for t in tiles]


def stitch_maps(maps: Sequence[np.ndarray], tiles: Sequence[Tile], height: int, width: int) -> np.ndarray:
    """Tile maps -> one (H, W) map; where tiles overlap the higher value wins (a defect seen by one tile
    stays visible, and a tile's damped border never hides its neighbour's view)."""
    out = np.zeros((height, width), np.float32)
    for values, t in zip(maps, tiles):
        view = out[t.top:t.top + t.height, t.left:t.left + t.width]
        np.maximum(view, values, out=view)
    return out
