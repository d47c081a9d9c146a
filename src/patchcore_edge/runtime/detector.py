"""The runtime API: load a bundle, turn images into scores, decisions and anomaly maps. No torch.

    detector = Detector.load("bundle/")
    result = detector.predict(read_rgb("part.png"))
    result.score, result.is_anomalous, result.anomaly_map
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Hashable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..bundle import BundleError, calibration_files, check_files, load_array, read_manifest
from ..calibration.model import load_for_bundle
from ..imageio import ImageReadError
from ..preprocess import (Geometry, InputSpec, Tile, geometry, map_to_image, patch_validity, preprocess,
                          region_mask, stitch_maps)
from ..scoring import anomaly_map, image_scores
from ..search import IndexFileError, PatchSearch, load_index, validate_neighbours
from .backends import FeatureBackend, open_backend


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


StreamItem = Tuple[Hashable, Union[np.ndarray, ImageReadError]]


class Detector:
    """A loaded bundle: feature backend + memory bank search + scoring (+ calibration when present)."""

    def __init__(self, bundle_dir: Path, manifest: Dict[str, Any], backend: FeatureBackend, backend_note: str,
                 search: PatchSearch, neighbours: np.ndarray, calibration: Any = None) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.backend = backend
        self.backend_note = backend_note
        self.search = search
        self.neighbours = neighbours
        self.calibration = calibration
        self.spec = InputSpec.from_manifest(manifest["input"])
        self.grid = tuple(manifest["features"]["grid"])
        self.rerank = int(manifest["score"]["rerank"])
        self.sigma = float(manifest["score"]["gaussian_sigma"])

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @classmethod
    def load(cls, bundle_dir: Union[str, Path], backend: str = "auto", ef: Optional[int] = None,
             exact_search: bool = False, threads: Optional[int] = None, verify: bool = True,
             calibration: bool = True) -> "Detector":
        """Validate and load a bundle. Raises BundleError naming the file and the fix when anything is off.

        calibration=False ignores the bundle's calibration (decisions stay None): the calibrate command uses it,
        so that it can replace a damaged calibration file.
        """
        folder = Path(bundle_dir)
        manifest = read_manifest(folder, verify_files=False)
        if verify:
            check_files(folder, manifest, skip=() if calibration else calibration_files(manifest))
        dim = int(manifest["features"]["dim"])
        size = int(manifest["coreset"]["size"])
        b = int(manifest["score"]["reweight_neighbours"])
        bank = load_array(folder, "memory_bank.npy", np.float32, (size, dim))
        neighbours = load_array(folder, "bank_neighbours.npy", np.int32, (size, b))
        try:
            neighbours = validate_neighbours(neighbours, size)
            index = None if exact_search else load_index(folder / "index.hnsw", dim, size, bank=bank)
            search = PatchSearch(bank, index, ef=ef or int(manifest["index"]["ef"]), threads=threads)
        except IndexFileError as error:
            raise BundleError(f"{error}; re-export the bundle") from None
        except ValueError as error:
            raise BundleError(f"{folder}: {error}; re-export the bundle") from None
        features_backend, note = open_backend(folder, manifest, backend, threads)
        try:
            current = load_for_bundle(folder, manifest) if calibration else None
        except (OSError, ValueError) as error:
            raise BundleError(f"{error}; roll the calibration back with `patchcore-edge calibrate BUNDLE --rollback` "
                              "or calibrate again") from None
        return cls(folder, manifest, features_backend, note, search, neighbours, current)

    # ------------------------------------------------------------------------------------------ prediction

    def predict(self, image_rgb: np.ndarray, maps: bool = True) -> Result:
        return self.predict_batch([image_rgb], maps=maps)[0]

    def predict_batch(self, images: Sequence[np.ndarray], maps: bool = True) -> List[Result]:
        if self.spec.tile is not None:
            return [self._predict_tiled(image, maps) for image in images]
        start = time.perf_counter()
        # Two threads for the resize: nothing else runs meanwhile here (`stream` overlaps it with inference
        # instead, so its producer keeps to one).
        batch = np.stack([preprocess(image, self.spec, parallel=True) for image in images])
        geometries = [geometry(image.shape[0], image.shape[1], self.spec) for image in images]
        preprocess_ms = (time.perf_counter() - start) * 1000 / len(images)
        results = self._infer(batch, geometries, maps)
        for result in results:
            result.timing_ms = {"preprocess": preprocess_ms, **result.timing_ms}
        return results

    # --- tiling (issue 18): every tile scored as an image; image score the maximum, maps stitched (maximum)
    def _predict_tiled(self, image: np.ndarray, maps: bool) -> Result:
        tiles, pieces = self.spec.pieces(image)
        start = time.perf_counter()
        batch = np.stack([preprocess(piece, self.spec) for piece in pieces])
        geometries = [geometry(p.shape[0], p.shape[1], self.spec) for p in pieces]
        preprocess_ms = (time.perf_counter() - start) * 1000
        parts = self._infer(batch, geometries, maps, whole=(image.shape[0], image.shape[1]), tiles=tiles)
        worst = max(parts, key=lambda part: part.score)
        result = Result(score=worst.score, max_patch_distance=worst.max_patch_distance,
                        image_size=(image.shape[0], image.shape[1]))
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
        grid = self.backend.features(batch)
        features_ms = (time.perf_counter() - start) * 1000 / n
        if grid.shape[:3] != (n, *self.grid):
            raise BundleError(f"{self.bundle_dir}: the feature backend returned {grid.shape}, the manifest says "
                              f"[{n}, {self.grid[0]}, {self.grid[1]}, D]; re-export the bundle")
        start = time.perf_counter()
        valid = self._validity(geometries, whole, tiles)
        scored = image_scores(grid.reshape(n, -1, grid.shape[-1]), self.search, self.neighbours, self.rerank,
                              valid=valid)
        search_ms = (time.perf_counter() - start) * 1000 / n
        results = []
        for patch, geo in zip(scored, geometries):
            start = time.perf_counter()
            result = Result(score=float(patch.score), max_patch_distance=float(patch.max_distance),
                            image_size=(geo.height, geo.width))
            if maps:
                input_map = anomaly_map(patch.patch_distances.reshape(self.grid),
                                        (self.spec.width, self.spec.height), self.sigma)
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
        masks = [patch_validity(geo, self.grid, roi) for geo, roi in zip(geometries, rois)]
        if all(m is None for m in masks):
            return None
        size = self.grid[0] * self.grid[1]
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
