"""What the `run` command writes: one JSON line per image, heat-map / overlay / mask PNGs, the end summary.

JSON line fields (a field that does not apply is left out, never null):
  path              the input key: a path as given, or `line.mp4#frame=000123`
  index             position in the run, from 0
  width, height     original image size in pixels
  score             image anomaly score (patch-distance units, Euclidean)
  normalised_score  calibrated bundles only: score / image threshold (the threshold reads 1.0)
  anomalous         calibrated bundles only: true when the score is over the calibrated threshold
  defect_pixels     when a mask was computed: number of pixels in it
  timing_ms         the detector's per-stage times for this image
  outputs           {"heatmap": ..., "overlay": ..., "mask": ...} file paths written for this image
  error             failed inputs only (with path and index): the reason, in words

Heat-map colour scale: fixed for the whole run, never per image (a per-image min-max would paint every good
image red). A map value v gets the colour JET((v - low) / (high - low)), clipped to [0, 1], where [low, high]
is, in this order of preference:
  1. `--map-range LOW HIGH` when given;
  2. calibrated bundle: [0, 2 x pixel threshold], so the threshold sits mid-scale: green is the threshold,
     yellow to red is over it, cyan to blue under it;
  3. manifest score.map_range as given (methods whose image score is not on the map's scale: SPADE);
  4. calibrated bundle without a pixel threshold: [0, 2 x image threshold];
  5. uncalibrated: [0, 2 x the highest nominal value the bundle records]: score.training_scores (max), else
     coreset.coverage_radius (every training patch lies within it);
  6. none of these: [0, 2 x the first image's score], with a warning (calibrate for a stable scale).
The range used is written to OUTDIR/run.json.

Every PNG is written atomically (temporary file in the same folder, then rename): a reader never sees half a
file. PNG encoding dominates the cost of writing (about 30 ms for a 900x900 heat map at zlib level 1 on the
development machine); `MapWriter(workers=N)` moves it off the inference thread (cv2.imencode releases the
GIL).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

from patchcore_edge.imageio import ImageReadError
from patchcore_edge.runtime.sources import FrameKey

log = logging.getLogger(__name__)

PNG_COMPRESSION = 1  # zlib level: 1 is ~2x faster than OpenCV's default 3 for a few % larger heat maps
OVERLAY_ALPHA = 0.5  # weight of the heat map over the image
SUFFIXES = {"heatmap": ".heatmap.png", "overlay": ".overlay.png", "mask": ".mask.png"}


@dataclass(frozen=True)
class MapScale:
    """The fixed value range mapped onto the colour map, and where it came from."""

    low: float
    high: float
    source: str

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.high > self.low):
            raise ValueError(f"heat-map range needs finite low < high, got [{self.low}, {self.high}]")

    def to_json(self) -> Dict[str, Any]:
        return {"low": self.low, "high": self.high, "source": self.source, "colormap": "JET"}


def _positive(value: Any) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _field(record: Any, name: str) -> Any:
    if record is None:
        return None
    if isinstance(record, Mapping):
        return record.get(name)
    return getattr(record, name, None)


def map_scale_for(bundle: Any, calibration: Any = None,
                  override: Optional[Tuple[float, float]] = None) -> Optional[MapScale]:
    """The run's heat-map range (see the module docstring); None when the bundle records nothing to use."""
    if override is not None:
        return MapScale(float(override[0]), float(override[1]), "--map-range")
    # Calibration records (patchcore_edge/decision.py) hold them as pixel.threshold and image.threshold.
    pixel = _positive(_field(_field(calibration, "pixel"), "threshold")) if calibration is not None else None
    if pixel is not None:
        return MapScale(0.0, 2.0 * pixel, "calibration pixel.threshold x 2")
    # A manifest map range comes before the image threshold: it is recorded by methods whose image score is not
    # on the map's scale (SPADE: a distance between global features).
    given = bundle.map_range
    if given is not None:
        try:
            return MapScale(float(given[0]), float(given[1]), "manifest score.map_range")
        except ValueError:
            pass
    image = _positive(_field(_field(calibration, "image"), "threshold")) if calibration is not None else None
    if image is not None:
        return MapScale(0.0, 2.0 * image, "calibration image.threshold x 2")
    top = _positive((bundle.training_scores or {}).get("max"))
    if top is not None:
        return MapScale(0.0, 2.0 * top, "manifest score.training_scores max x 2")
    radius = _positive(bundle.coverage_radius)
    if radius is not None:
        return MapScale(0.0, 2.0 * radius, "manifest coreset.coverage_radius x 2")
    return None


def colourise(anomaly_map: np.ndarray, scale: MapScale) -> np.ndarray:
    """float (H, W) map -> BGR uint8 (H, W, 3) with the JET colour map over the fixed range."""
    if anomaly_map.ndim != 2:
        raise ValueError(f"anomaly map must be 2-D, got shape {anomaly_map.shape}")
    gain = np.float32(255.0 / (scale.high - scale.low))
    unit = (anomaly_map.astype(np.float32) - np.float32(scale.low)) * gain
    levels = np.clip(unit + 0.5, 0, 255).astype(np.uint8)
    heat: np.ndarray = cv2.applyColorMap(levels, cv2.COLORMAP_JET)
    return heat


def blend(image_rgb: np.ndarray, heat_bgr: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The heat map blended over the image, BGR uint8."""
    if image_rgb.shape[:2] != heat_bgr.shape[:2]:
        raise ValueError(f"image {image_rgb.shape[:2]} and heat map {heat_bgr.shape[:2]} differ in size")
    image_bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    return cv2.addWeighted(image_bgr, 1.0 - alpha, heat_bgr, alpha, 0.0)


def mask_image(mask: np.ndarray) -> np.ndarray:
    """bool (H, W) -> uint8 0/255 single channel."""
    return np.where(mask, np.uint8(255), np.uint8(0)).astype(np.uint8)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that it appears whole or not at all: temporary file in the same folder, then rename.

    No fsync: this protects readers and crashes of the process, not a power cut (fsync per image costs too
    much on a Jetson's eMMC/SD card).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        try:
            temporary.unlink()
        except OSError:
            pass
        raise


def encode_png(image: np.ndarray, path: Path) -> bytes:
    ok, encoded = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise OSError(f"{path}: PNG encoding failed for an array of shape {image.shape}")
    return encoded.tobytes()


def write_png(path: Path, image: np.ndarray) -> None:
    atomic_write_bytes(path, encode_png(image, path))


class OutputError(Exception):
    """An output file that could not be written; the message names it."""


class MapWriter:
    """Writes heat map, overlay and mask PNGs under `outdir`, named after the frame's output name.

    `workers` > 0 encodes and writes in that many background threads, at most 2 x workers images pending, so
    memory stays bounded; a write error is raised (as OutputError) by the next `write` or by `close`.
    With scale None, the first map written fixes the scale (see the module docstring).
    """

    def __init__(self, outdir: Path, scale: Optional[MapScale], heatmaps: bool = True, overlays: bool = False,
                 workers: int = 1) -> None:
        self.outdir = Path(outdir)
        self.scale = scale
        self.heatmaps = heatmaps
        self.overlays = overlays
        self._pool = (ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png")
                      if workers > 0 else None)
        self._slots = threading.BoundedSemaphore(2 * workers) if workers > 0 else None
        self._pending: List[Future[None]] = []
        self._error: Optional[BaseException] = None

    def paths(self, name: str) -> Dict[str, Path]:
        paths = {kind: self.outdir / (name + suffix) for kind, suffix in SUFFIXES.items()}
        root = self.outdir.resolve()
        for path in paths.values():
            # Output names come from sources.py without ".."; this keeps any other name out too.
            if not path.resolve().is_relative_to(root):
                raise OutputError(f"{path}: output name {name!r} leads outside the output folder {self.outdir}")
        return paths

    def _check(self) -> None:
        still: List[Future[None]] = []
        for future in self._pending:
            if future.done():
                error = future.exception()
                if error is not None and self._error is None:
                    self._error = error
            else:
                still.append(future)
        self._pending = still
        if self._error is not None:
            raise OutputError(str(self._error)) from self._error

    def write(self, name: str, anomaly_map: Optional[np.ndarray], mask: Optional[np.ndarray] = None,
              image_rgb: Optional[np.ndarray] = None, score: Optional[float] = None) -> Dict[str, str]:
        """Queue the PNGs of one image; returns {kind: path} of the files it writes."""
        return self.submit(name, anomaly_map, mask, image_rgb, score)[0]

    def submit(self, name: str, anomaly_map: Optional[np.ndarray], mask: Optional[np.ndarray] = None,
               image_rgb: Optional[np.ndarray] = None, score: Optional[float] = None
               ) -> Tuple[Dict[str, str], "Optional[Future[None]]"]:
        """Like `write`, plus the pending write (None when written inline or nothing to write): a record lists
        the files only once it is done, so a JSON line never names a file that was not written."""
        self._check()
        jobs: List[Tuple[Path, str]] = []
        paths = self.paths(name)
        if anomaly_map is not None and (self.heatmaps or (self.overlays and image_rgb is not None)):
            if self.scale is None:
                self.scale = MapScale(0.0, 2.0 * (_positive(score) or float(anomaly_map.max()) or 1.0),
                                      "first image score x 2 (the bundle records no range)")
                log.warning("heat maps: the bundle records no score range; using [0, %.4g] from the first "
                            "image for the whole run (calibrate the bundle or pass --map-range)",
                            self.scale.high)
            if self.heatmaps:
                jobs.append((paths["heatmap"], "heatmap"))
            if self.overlays and image_rgb is not None:
                jobs.append((paths["overlay"], "overlay"))
        if mask is not None:
            jobs.append((paths["mask"], "mask"))
        if not jobs:
            return {}, None
        scale = self.scale
        work = (anomaly_map, mask, image_rgb, scale, jobs)
        future: "Optional[Future[None]]" = None
        if self._pool is None or self._slots is None:
            self._render(*work)
        else:
            self._slots.acquire()
            future = self._pool.submit(self._render, *work)
            future.add_done_callback(lambda _: self._slots.release())  # type: ignore[union-attr]
            self._pending.append(future)
        return {kind: str(path) for path, kind in jobs}, future

    @staticmethod
    def _render(anomaly_map: Optional[np.ndarray], mask: Optional[np.ndarray],
                image_rgb: Optional[np.ndarray], scale: Optional[MapScale],
                jobs: List[Tuple[Path, str]]) -> None:
        heat = colourise(anomaly_map, scale) if anomaly_map is not None and scale is not None else None
        for path, kind in jobs:
            try:
                if kind == "heatmap" and heat is not None:
                    write_png(path, heat)
                elif kind == "overlay" and heat is not None and image_rgb is not None:
                    write_png(path, blend(image_rgb, heat))
                elif kind == "mask" and mask is not None:
                    write_png(path, mask_image(mask))
            except OSError as error:
                raise OutputError(f"cannot write {path}: {error.strerror or error}") from error

    def close(self) -> None:
        """Wait for pending writes; raise the first write error."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._check()


def _f32(value: Any) -> Optional[float]:
    """A float32 as the shortest decimal that reads back to the same float32 (no float64 noise digits)."""
    number = np.float32(value)
    return float(str(number)) if np.isfinite(number) else None


def result_record(frame: FrameKey, result: Any, height: int, width: int,
                  outputs: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """The JSON-line dict of one scored image (see the module docstring)."""
    record: Dict[str, Any] = {"path": frame.key, "index": frame.index, "width": int(width),
                              "height": int(height)}
    score = _f32(result.score)
    if score is None:
        record["error"] = f"non-finite anomaly score ({result.score})"
        return record
    record["score"] = score
    normalised = getattr(result, "normalised_score", None)
    if normalised is not None:
        record["normalised_score"] = _f32(normalised)
    decision = getattr(result, "is_anomalous", None)
    if decision is not None:
        record["anomalous"] = bool(decision)
    mask = getattr(result, "mask", None)
    if mask is not None:
        record["defect_pixels"] = int(np.count_nonzero(mask))
    timing = getattr(result, "timing_ms", None) or {}
    record["timing_ms"] = {stage: round(float(ms), 3) for stage, ms in timing.items()}
    if outputs:
        record["outputs"] = dict(outputs)
    return record


def error_record(frame: FrameKey, error: ImageReadError) -> Dict[str, Any]:
    return {"path": frame.key, "index": frame.index, "error": error.reason}


class JsonLinesWriter:
    """One JSON object per line, flushed after each, to stdout or a file.

    A file is written as the run goes (not atomically): a long run or a camera stream can be followed with
    `tail -f`, and a crash leaves every line before it intact.
    """

    def __init__(self, target: Optional[Path] = None, stream: Optional[IO[str]] = None) -> None:
        self._owned = target is not None
        self.target = target
        if target is not None:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            self._stream: IO[str] = open(target, "w", encoding="utf-8")
        else:
            self._stream = stream if stream is not None else sys.stdout
        self.lines = 0
        self._good_bytes = 0

    def write(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, allow_nan=False) + "\n"
        try:
            self._stream.write(line)
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as error:
            if self.target is None:
                raise
            self._cut_partial_line()
            raise OutputError(f"cannot write {self.target}: {error.strerror or error} (the {self.lines} lines "
                              "before are complete)") from None
        self.lines += 1
        self._good_bytes += len(line.encode("utf-8"))

    def _cut_partial_line(self) -> None:
        # A full disk can leave half a line: cut the file back to the last complete one, so every line parses.
        try:
            os.truncate(str(self.target), self._good_bytes)
        except OSError:
            pass

    def close(self) -> None:
        if self._owned:
            try:
                self._stream.close()
            except OSError:
                self._cut_partial_line()  # buffered bytes that could not be written: the lines stay whole


@dataclass
class RunStats:
    """Counts and latencies of a run; latencies kept in a fixed-size uniform reservoir so that a camera
    running for days does not grow memory (median/p95 are then estimates over a uniform sample)."""

    reservoir_size: int = 100_000
    images: int = 0
    failures: int = 0
    anomalous: int = 0
    calibrated: bool = False
    skipped: int = 0
    latencies: List[float] = field(default_factory=list)
    _seen: int = 0
    _rng: random.Random = field(default_factory=lambda: random.Random(0))

    def add_result(self, record: Mapping[str, Any]) -> None:
        if "error" in record:
            self.failures += 1
            return
        self.images += 1
        if "anomalous" in record:
            self.calibrated = True
            self.anomalous += int(bool(record["anomalous"]))
        timing = record.get("timing_ms") or {}
        if timing:
            self._keep(float(sum(timing.values())))

    def add_error(self) -> None:
        self.failures += 1

    def _keep(self, latency: float) -> None:
        self._seen += 1
        if len(self.latencies) < self.reservoir_size:
            self.latencies.append(latency)
            return
        slot = self._rng.randrange(self._seen)
        if slot < self.reservoir_size:
            self.latencies[slot] = latency

    def latency_quantiles(self) -> Optional[Tuple[float, float]]:
        if not self.latencies:
            return None
        values = np.asarray(self.latencies, dtype=np.float64)
        return float(np.median(values)), float(np.percentile(values, 95))


def format_summary(stats: RunStats, wall_s: float, backend: str = "", batch_size: int = 1,
                   outdir: Optional[Path] = None, interrupted: bool = False) -> str:
    """The one-screen end-of-run summary (for stderr)."""
    lines = ["", "patchcore-edge run summary" + (" (interrupted)" if interrupted else "")]
    lines.append(f"  images scored      {stats.images}")
    lines.append(f"  failed inputs      {stats.failures}")
    if stats.skipped:
        lines.append(f"  skipped non-images {stats.skipped}")
    if stats.calibrated:
        share = 100.0 * stats.anomalous / stats.images if stats.images else 0.0
        lines.append(f"  anomalous          {stats.anomalous} ({share:.1f} %)")
    else:
        lines.append("  anomalous          - (bundle not calibrated: scores only)")
    quantiles = stats.latency_quantiles()
    if quantiles is not None:
        lines.append(f"  latency ms         median {quantiles[0]:.1f}, p95 {quantiles[1]:.1f} "
                     "(sum of detector stages per image)")
    rate = stats.images / wall_s if wall_s > 0 else 0.0
    lines.append(f"  throughput         {rate:.1f} images/s ({wall_s:.2f} s wall)")
    if backend:
        lines.append(f"  backend            {backend}, batch {batch_size}")
    if outdir is not None:
        lines.append(f"  outputs            {outdir}")
    return "\n".join(lines)


__all__ = ["MapScale", "map_scale_for", "colourise", "blend", "mask_image", "atomic_write_bytes", "write_png",
           "MapWriter", "OutputError", "result_record", "error_record", "JsonLinesWriter", "RunStats",
           "format_summary", "SUFFIXES", "PNG_COMPRESSION", "OVERLAY_ALPHA"]
