"""The runtime API: load a bundle, turn images into scores, decisions and anomaly maps. No torch.

    from patchcore_edge import Detector

    with Detector.load("bundle/") as detector:
        result = detector.predict("part.png")          # a path or an RGB uint8 array
        result.score, result.is_anomalous, result.anomaly_map
        result.save("out/")                             # heat map, overlay, mask PNGs as `run -o` writes them

Data flow: image -> preprocess -> backend (network outputs by name) -> the bundle's method (image score and
patch map) -> pixel map -> calibration decision -> Result.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Hashable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import __version__
from ..bundle import Bundle, BundleError
from ..cpu import available_cores
from ..decision import REDO_CALIBRATION, Calibration, load_for_bundle, setup_mismatch
from ..imageio import ImageReadError, read_rgb
from ..maps import anomaly_map, map_reach_cells
from ..methods import Scorer, ScorerOptions, UnknownMethod, scorer_class
from ..preprocess import (Geometry, Tile, geometry, map_to_image, patch_validity, preprocess, region_mask,
                          stitch_maps)
from ..search import blas_threads
from .backends import FeatureBackend, open_backend
from .outputs import MapScale, MapWriter, map_scale_for

ImageLike = Union[str, "os.PathLike[str]", np.ndarray]


@dataclass
class Result:
    """What the runtime says about one image."""

    score: float
    anomaly_map: Optional[np.ndarray] = None
    normalised_score: Optional[float] = None
    is_anomalous: Optional[bool] = None
    mask: Optional[np.ndarray] = None
    timing_ms: Dict[str, float] = field(default_factory=dict)
    max_patch_distance: float = 0.0
    image_size: Tuple[int, int] = (0, 0)
    details: Dict[str, float] = field(default_factory=dict)
    source: Optional[str] = None
    image: Optional[np.ndarray] = field(default=None, repr=False)
    map_scale: Optional[MapScale] = field(default=None, repr=False)

    def save(self, folder: Union[str, "os.PathLike[str]"], name: Optional[str] = None, overlay: bool = True
             ) -> Dict[str, str]:
        """Write the heat map, the overlay (when the image is known) and the mask as `run -o` does.

        Files are named after `name`, else the source file's stem; returns {kind: path} of what was written.
        """
        if name is None:
            name = Path(self.source).stem if self.source else "image"
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        writer = MapWriter(out, self.map_scale, heatmaps=True, overlays=overlay, workers=0)
        written = writer.write(name, self.anomaly_map, self.mask, self.image if overlay else None, self.score)
        writer.close()
        return written


StreamItem = Tuple[Hashable, Union[np.ndarray, ImageReadError]]


def _as_image(item: ImageLike) -> Tuple[np.ndarray, Optional[str]]:
    if isinstance(item, np.ndarray):
        return item, None
    return read_rgb(item), str(item)


class Detector:
    """A loaded bundle: feature backend + the bundle's scoring method (+ calibration when present)."""

    def __init__(self, bundle: Bundle, backend: FeatureBackend, backend_note: str, scorer: Scorer,
                 calibration: Optional[Calibration] = None, threads: Optional[int] = None) -> None:
        self.bundle = bundle
        self.backend = backend
        self.backend_note = backend_note
        self.scorer = scorer
        # A calibration made with another backend, engine, precision, search setting or version is not applied:
        # scores still flow, decisions do not, and `calibration_refused` says why and what to do (issue 11, 1).
        self.calibration_refused: Optional[str] = None
        problem = None if calibration is None else setup_mismatch(calibration, self.scored_with)
        if problem is not None:
            self.calibration_refused = f"calibration not applied, no decisions: {problem}; {REDO_CALIBRATION}"
            calibration = None
        self.calibration = calibration
        self.spec = bundle.input_spec
        self.sigma = bundle.map_sigma
        # The pre-processing's second thread (`predict_batch`) only when the budget has a second core.
        self.threads = threads or available_cores()
        self.map_scale = map_scale_for(bundle, calibration)

    @property
    def bundle_dir(self) -> Path:
        return self.bundle.path

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def scored_with(self) -> Dict[str, Any]:
        """What this detector's scores depend on beyond the bundle's files (recorded by calibrate, compared on load)."""
        engine = getattr(self.backend, "engine_file", None)
        return {"backend": self.backend.name, "engine_file": engine,
                "engine_sha256": self.bundle.file_sha256(engine) if engine and self.bundle.has_file(engine) else None,
                "precision": getattr(self.backend, "precision", "fp32"), "method": dict(self.scorer.settings()),
                "toolkit_version": __version__}

    @classmethod
    def load(cls, bundle_dir: Union[str, Path, Bundle], backend: str = "auto", ef: Optional[int] = None,
             exact_search: bool = False, threads: Optional[int] = None, verify: bool = True,
             ignore_calibration: bool = False) -> "Detector":
        """Validate and load a bundle. Raises BundleError naming the file and the fix when anything is off.

        ignore_calibration=True leaves the bundle's calibration unread (decisions stay None): the calibrate
        command uses it, so that it can replace a damaged calibration file. A calibration made with another
        set-up (backend, engine, precision, search settings, version) is not applied: `calibration_refused`.
        """
        # A Bundle already loaded by the caller is used as it is: its files were verified once, not twice.
        bundle = (bundle_dir if isinstance(bundle_dir, Bundle)
                  else Bundle.load(bundle_dir, verify=verify, verify_calibration=not ignore_calibration))
        # One budget for the whole runtime (`threads`, default: the cores this process may use, never the machine's
        # count, which `taskset` or a cpuset may cut). The stages run one after the other, so each gets the budget:
        # pre-processing 2 threads when the budget has 2 (else 1); the network (ONNX Runtime intra-op) all of it;
        # the search 1 thread for its first pass and re-rank (many small BLAS calls: a second thread costs more
        # than it saves, and spinning BLAS workers would slow what follows), the budget for exact searches of more
        # than 256 patches (exact-search mode). Nothing spins after a stage ends (ORT: force_spinning_stop).
        threads = threads or available_cores()
        try:
            method = scorer_class(bundle.method.name)
        except UnknownMethod as error:
            raise BundleError(f"{bundle.path}: {error}") from None
        try:
            current = None if ignore_calibration else load_for_bundle(bundle)
        except (OSError, ValueError) as error:
            raise BundleError(f"{error}; roll the calibration back with `patchcore-edge calibrate BUNDLE --rollback` "
                              "or calibrate again") from None
        # With a pixel threshold the method makes its map exact wherever a mask can appear (issue 11, item 3).
        level = current.pixel.threshold if current is not None and current.pixel is not None else None
        reach = map_reach_cells(bundle.features.grid, bundle.input_spec.crop, bundle.map_sigma)
        scorer = method.load(bundle, ScorerOptions(ef=ef, exact_search=exact_search, threads=threads,
                                                   exact_map_above=level, exact_map_reach=reach))
        features_backend, note = open_backend(bundle, backend, threads)
        return cls(bundle, features_backend, note, scorer, current, threads)

    def __enter__(self) -> "Detector":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ prediction

    def predict(self, image: ImageLike, maps: bool = True) -> Result:
        """Score one image: a path (any format `imageio.read_rgb` reads) or an RGB uint8 array [H, W, 3]."""
        return self.predict_batch([image], maps=maps)[0]

    def predict_batch(self, images: Sequence[ImageLike], maps: bool = True) -> List[Result]:
        """Score images (paths or RGB arrays) in one batch through the network and the method (a tiled bundle:
        each image is a batch of its tiles)."""
        loaded = [_as_image(item) for item in images]
        if self.spec.tile is not None:
            return [self._predict_tiled(image, source, maps) for image, source in loaded]
        start = time.perf_counter()
        # Two threads for the resize when the budget has two: nothing else runs meanwhile here (`stream` overlaps
        # it with inference instead, so its producer keeps to one).
        batch = np.stack([preprocess(image, self.spec, parallel=self.threads >= 2) for image, _ in loaded])
        geometries = [geometry(image.shape[0], image.shape[1], self.spec) for image, _ in loaded]
        preprocess_ms = (time.perf_counter() - start) * 1000 / len(loaded)
        results = self._infer(batch, geometries, maps)
        for result, (image, source) in zip(results, loaded):
            result.timing_ms = {"preprocess": preprocess_ms, **result.timing_ms}
            result.source = source
            result.image = image
        return results

    # --- tiling (issue 18): every tile scored as an image; image score the maximum, maps stitched (maximum)
    def _predict_tiled(self, image: np.ndarray, source: Optional[str], maps: bool) -> Result:
        tiles, pieces = self.spec.pieces(image)
        start = time.perf_counter()
        batch = np.stack([preprocess(piece, self.spec) for piece in pieces])
        geometries = [geometry(p.shape[0], p.shape[1], self.spec) for p in pieces]
        preprocess_ms = (time.perf_counter() - start) * 1000
        parts = self._infer(batch, geometries, maps, whole=(image.shape[0], image.shape[1]), tiles=tiles)
        worst = max(parts, key=lambda part: part.score)
        result = Result(score=worst.score, max_patch_distance=worst.max_patch_distance,
                        image_size=(image.shape[0], image.shape[1]), details=dict(worst.details),
                        source=source, image=image, map_scale=self.map_scale)
        if maps:
            result.anomaly_map = self._honour_region(
                stitch_maps([p.anomaly_map for p in parts if p.anomaly_map is not None], tiles, image.shape[0],
                            image.shape[1]))
        self._decide(result)
        result.timing_ms = {"preprocess": preprocess_ms,
                            **{k: sum(p.timing_ms[k] for p in parts) for k in worst.timing_ms}}
        return result

    def _honour_region(self, image_map: np.ndarray) -> np.ndarray:
        mask = region_mask(image_map.shape[0], image_map.shape[1], self.spec)
        return image_map if mask is None else np.where(mask, image_map, np.float32(0.0))
    # ---

    def _infer(self, batch: np.ndarray, geometries: Sequence[Geometry], maps: bool,
               whole: Optional[Tuple[int, int]] = None, tiles: Optional[Sequence[Tile]] = None) -> List[Result]:
        """Score a prepared batch. With `tiles`, the batch holds the tiles of one `whole` (H, W) image: the
        region of interest is then placed in whole-image coordinates and decisions are left to the caller."""
        n = batch.shape[0]
        start = time.perf_counter()
        outputs = self.backend.run(batch)
        features_ms = (time.perf_counter() - start) * 1000 / n
        start = time.perf_counter()
        valid = self._validity(geometries, whole, tiles)
        scored = self.scorer.score(outputs, valid=valid)
        search_ms = (time.perf_counter() - start) * 1000 / n
        results = []
        for method_score, geo in zip(scored, geometries):
            start = time.perf_counter()
            result = Result(score=float(method_score.score),
                            max_patch_distance=float(method_score.details.get("max_patch_distance", 0.0)),
                            image_size=(geo.height, geo.width), details=dict(method_score.details),
                            map_scale=self.map_scale)
            if maps:
                size = (self.spec.width, self.spec.height)
                # One BLAS thread for the map's small products: a pool would keep spinning into the next network run.
                with blas_threads(1):
                    input_map = anomaly_map(method_score.patch_map, size, self.sigma)
                result.anomaly_map = map_to_image(input_map, geo)
                if tiles is None:
                    result.anomaly_map = self._honour_region(result.anomaly_map)
            map_ms = (time.perf_counter() - start) * 1000
            result.timing_ms = {"features": features_ms, "search_score": search_ms, "map": map_ms}
            if tiles is None:
                self._decide(result)
            results.append(result)
        return results

    def _validity(self, geometries: Sequence[Geometry], whole: Optional[Tuple[int, int]],
                  tiles: Optional[Sequence[Tile]]) -> Optional[np.ndarray]:
        """bool [B, P] patches that may score (letterbox padding and outside the ROI never do), or None."""
        if tiles is None:
            rois = [region_mask(geo.height, geo.width, self.spec) for geo in geometries]
        else:  # the ROI is drawn on the whole image: each tile tests its patch centres against its part of it
            assert whole is not None
            full = region_mask(whole[0], whole[1], self.spec)
            rois = [None if full is None else full[t.top:t.top + t.height, t.left:t.left + t.width] for t in tiles]
        grid = self.bundle.features.grid
        masks = [patch_validity(geo, grid, roi) for geo, roi in zip(geometries, rois)]
        if all(m is None for m in masks):
            return None
        size = grid[0] * grid[1]
        return np.stack([np.ones(size, bool) if m is None else m for m in masks])

    def _decide(self, result: Result) -> None:
        if self.calibration is not None:
            result.normalised_score = float(self.calibration.normalise(result.score))
            result.is_anomalous = bool(self.calibration.decide(result.score))
            if result.anomaly_map is not None:
                # A part judged good gets an empty mask: a map region above the pixel threshold on a part
                # below the image threshold would contradict the decision the line acts on.
                result.mask = (self.calibration.mask(result.anomaly_map) if result.is_anomalous
                               else np.zeros(result.anomaly_map.shape, dtype=bool))

    def stream(self, items: Iterable[StreamItem], batch_size: int = 1, maps: bool = True,
               queue_size: int = 4) -> Iterator[Tuple[Hashable, Union[Result, ImageReadError]]]:
        """Score a stream of (key, image) in order; decoding/pre-processing of the next batch overlaps inference.

        Items that are ImageReadError (an unreadable file) pass through as they are, in order.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.spec.tile is not None:  # each image is a batch of tiles already
            for key, item in items:
                yield key, item if isinstance(item, ImageReadError) else self.predict(item, maps)
            return
        prepared: "queue.Queue[Any]" = queue.Queue(maxsize=queue_size)
        done = object()
        stop = threading.Event()

        def producer() -> None:
            pending: List[Tuple[Hashable, Any]] = []

            def flush() -> None:
                if pending:
                    start = time.perf_counter()
                    inputs = [preprocess(image, self.spec) for _, image in pending]
                    geos = [geometry(image.shape[0], image.shape[1], self.spec) for _, image in pending]
                    elapsed = (time.perf_counter() - start) * 1000 / len(pending)
                    prepared.put(("batch", [k for k, _ in pending], np.stack(inputs), geos, elapsed))
                    pending.clear()

            try:
                for key, item in items:
                    if stop.is_set():
                        return
                    if isinstance(item, ImageReadError):
                        flush()
                        prepared.put(("error", key, item))
                        continue
                    try:
                        geometry(item.shape[0], item.shape[1], self.spec)
                        if item.ndim != 3 or item.shape[2] != 3:
                            raise ValueError(f"expected an RGB image, got shape {item.shape}")
                    except (ValueError, IndexError, AttributeError) as error:
                        flush()
                        prepared.put(("error", key, ImageReadError(str(key), str(error))))
                        continue
                    pending.append((key, item))
                    if len(pending) == batch_size:
                        flush()
                flush()
            except BaseException as error:  # surface producer failures in the consumer, not in a dead thread
                prepared.put(("raise", error))
            finally:
                prepared.put(done)

        worker = threading.Thread(target=producer, name="patchcore-preprocess", daemon=True)
        worker.start()
        try:
            while True:
                entry = prepared.get()
                if entry is done:
                    break
                if entry[0] == "raise":
                    raise entry[1]
                if entry[0] == "error":
                    yield entry[1], entry[2]
                    continue
                _, keys, batch, geos, preprocess_ms = entry
                for key, result in zip(keys, self._infer(batch, geos, maps)):
                    result.timing_ms = {"preprocess": preprocess_ms, **result.timing_ms}
                    yield key, result
        finally:
            stop.set()
            while worker.is_alive():
                try:
                    prepared.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)

    def close(self) -> None:
        self.backend.close()
