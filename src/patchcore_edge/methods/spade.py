"""SPADE (Cohen and Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid Correspondences") on the device.

Image level: the mean Euclidean distance from the image's global feature (last backbone stage, global average
pooled) to its K nearest training images. Pixel level: each grid position's mean distance to its kappa nearest
features in the *gallery*, the pyramid grids of those K images only. Both searches are exact: K and the training
set are small, and an approximate index per gallery would cost more to build than the search itself.

Numpy only. The arrays come from the bundle: global features float32 [N, G] and per-image grids [N, h, w, D]
(float32, or float16 to halve the bundle; distances are computed in float32 either way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..bundle import BundleError
from ..search import as_bank, blas_threads, row_distances, squared_norms
from .base import MethodScore, Scorer, ScorerOptions, read_params, require_outputs

if TYPE_CHECKING:
    from ..bundle import Bundle

NAME = "spade"
# The network's two outputs (one forward pass): the pyramid grid [B, h, w, D] and the global feature [B, G].
GRID_OUTPUT = "features"
GLOBAL_OUTPUT = "global"

# Distance blocks (queries x rows) stay under this many float32 values (64 MiB), as in search.py.
_BLOCK_VALUES = 16 * 1024 * 1024
GALLERY_DTYPES = ("float32", "float16")


class SpadeArrayError(ValueError):
    """SPADE arrays that disagree with each other or with the recorded params; the message says how."""


def exact_knn(queries: np.ndarray, rows: np.ndarray, k: int, threads: Optional[int] = None
              ) -> Tuple[np.ndarray, np.ndarray]:
    """The k nearest rows of every query, exactly: (distances float32 [n, k] ascending, rows int64 [n, k]).

    Candidates come from the BLAS expansion ||r - c||^2 - 2 (q - c).(r - c) on rows centred on their mean c
    (smaller norms, smaller cancellation error); the distances returned are recomputed directly from the
    query and the row by `search.row_distances`, the kernel every other search uses.
    """
    data = as_bank(rows, "search rows")
    count, dim = data.shape
    q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must have shape [n, {dim}], got {np.asarray(queries).shape}")
    if not 1 <= k <= count:
        raise ValueError(f"need 1 <= k <= {count} (the rows searched), got k={k}")
    if not np.isfinite(q).all():
        raise ValueError("query features contain NaN or infinite values (broken model output?)")
    centre = data.mean(axis=0, dtype=np.float64).astype(np.float32)
    centred = data - centre
    norms = squared_norms(centred)
    n = q.shape[0]
    distances = np.empty((n, k), dtype=np.float32)
    chosen_rows = np.empty((n, k), dtype=np.int64)
    step = int(max(1, _BLOCK_VALUES // count))
    with blas_threads(threads):
        for start in range(0, n, step):
            stop = min(n, start + step)
            block = (q[start:stop] - centre) @ centred.T
            block *= -2.0
            block += norms[None, :]
            if k < count:
                chosen = np.argpartition(block, k - 1, axis=1)[:, :k]
            else:
                chosen = np.broadcast_to(np.arange(count), (stop - start, count))
            exact = row_distances(np.repeat(q[start:stop], k, axis=0), data[chosen.ravel()]).reshape(-1, k)
            order = np.lexsort((chosen, exact), axis=1)  # by distance, ties by row number
            distances[start:stop] = np.take_along_axis(exact, order, axis=1)
            chosen_rows[start:stop] = np.take_along_axis(chosen, order, axis=1)
    return distances, chosen_rows


@dataclass(frozen=True)
class SpadeParams:
    """What the manifest records about a SPADE bundle (method.params)."""

    k: int  # training images whose grids form the gallery (and whose distances make the image score)
    kappa: int  # gallery features averaged per test position
    images: int  # training images stored
    global_dim: int

    def to_manifest(self) -> Dict[str, Any]:
        return {"k": self.k, "kappa": self.kappa, "images": self.images, "global_dim": self.global_dim,
                "distance": "euclidean"}

    @classmethod
    def from_manifest(cls, params: Mapping[str, Any]) -> "SpadeParams":
        values = {}
        for key in ("k", "kappa", "images", "global_dim"):
            value = params.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpadeArrayError(f"method.params.{key} must be a positive integer, got {value!r}")
            values[key] = int(value)
        if values["k"] > values["images"]:
            raise SpadeArrayError(f"method.params.k={values['k']} exceeds the {values['images']} training images")
        return cls(**values)


@dataclass(frozen=True)
class SpadeScore:
    score: float  # mean distance to the K nearest training images
    patch_map: np.ndarray  # float32 [h, w]: mean distance to the kappa nearest gallery features
    nearest_images: np.ndarray  # int64 [K], nearest first


class SpadeScorer:
    """Scores images from their global feature [G] and pyramid grid [h, w, D] against the training arrays."""

    def __init__(self, global_features: np.ndarray, gallery: np.ndarray, params: SpadeParams,
                 threads: Optional[int] = None) -> None:
        global_array = np.asarray(global_features)
        gallery_array = np.asarray(gallery)
        expected_global = (params.images, params.global_dim)
        if global_array.shape != expected_global or global_array.dtype != np.float32:
            raise SpadeArrayError(f"global features are {global_array.dtype} {global_array.shape}, the manifest "
                                  f"says float32 {expected_global}")
        if (gallery_array.ndim != 4 or gallery_array.shape[0] != params.images
                or gallery_array.dtype.name not in GALLERY_DTYPES or min(gallery_array.shape) < 1):
            raise SpadeArrayError(f"gallery is {gallery_array.dtype} {gallery_array.shape}, the manifest says "
                                  f"[{params.images}, h, w, D] of {' or '.join(GALLERY_DTYPES)}")
        if not np.isfinite(global_array).all() or not np.isfinite(gallery_array).all():
            raise SpadeArrayError("SPADE arrays contain NaN or infinite values")
        self.global_features = np.ascontiguousarray(global_array)
        self.gallery = np.ascontiguousarray(gallery_array)
        self.params = params
        self.threads = threads

    @property
    def grid(self) -> Tuple[int, int]:
        return int(self.gallery.shape[1]), int(self.gallery.shape[2])

    @property
    def dim(self) -> int:
        return int(self.gallery.shape[3])

    def check_outputs(self, global_batch: np.ndarray, grids: np.ndarray) -> None:
        h, w = self.grid
        if global_batch.ndim != 2 or global_batch.shape[1] != self.params.global_dim:
            raise SpadeArrayError(f"the network's global feature is {global_batch.shape}, the bundle holds "
                                  f"[B, {self.params.global_dim}]")
        if grids.shape[1:] != (h, w, self.dim) or grids.shape[0] != global_batch.shape[0]:
            raise SpadeArrayError(f"the network's grid is {grids.shape}, the bundle's gallery is "
                                  f"[B, {h}, {w}, {self.dim}]")

    def score_batch(self, global_batch: np.ndarray, grids: np.ndarray) -> List[SpadeScore]:
        """global_batch float32 [B, G], grids float32 [B, h, w, D] -> one SpadeScore per image."""
        global_batch = np.asarray(global_batch)
        grids = np.asarray(grids)
        self.check_outputs(global_batch, grids)
        k, kappa = self.params.k, self.params.kappa
        image_distances, nearest = exact_knn(global_batch, self.global_features, k, self.threads)
        h, w = self.grid
        results = []
        for i in range(grids.shape[0]):
            # The gallery in float32: float16 storage halves the bundle, not the arithmetic's precision.
            gallery = self.gallery[nearest[i]].reshape(-1, self.dim).astype(np.float32, copy=False)
            patch_distances, _ = exact_knn(grids[i].reshape(-1, self.dim), gallery, min(kappa, gallery.shape[0]),
                                           self.threads)
            patch_map = patch_distances.mean(axis=1, dtype=np.float64).astype(np.float32).reshape(h, w)
            results.append(SpadeScore(score=float(image_distances[i].mean(dtype=np.float64)),
                                      patch_map=patch_map, nearest_images=nearest[i].copy()))
        return results


def bytes_per_training_image(grid: Tuple[int, int], dim: int, global_dim: int, gallery_dtype: str = "float32"
                             ) -> int:
    """Bundle (and resident) bytes one training image adds: its grid plus its global feature."""
    return int(grid[0] * grid[1] * dim * np.dtype(gallery_dtype).itemsize + global_dim * 4)


def leave_one_out_image_scores(global_features: np.ndarray, k: int) -> np.ndarray:
    """Image scores of the training images, each against the others (what a new good part should score)."""
    data = np.asarray(global_features, dtype=np.float32)
    n = data.shape[0]
    if n < 2:
        return np.zeros(0, dtype=np.float64)
    kk = min(k, n - 1)
    distances, rows = exact_knn(data, data, kk + 1)
    # Drop each image's own row (distance 0, or tied with a duplicate: drop the own row if present, else the last).
    own = rows == np.arange(n)[:, None]
    keep = ~own
    keep[~own.any(axis=1), -1] = False
    kept = distances[keep].reshape(n, kk)
    scores: np.ndarray = kept.mean(axis=1, dtype=np.float64)
    return scores


class SpadeMethod(Scorer):
    """SPADE as a bundle's scoring method: reads and checks the arrays, adapts `SpadeScorer` to `Scorer`."""

    name = NAME

    def __init__(self, core: SpadeScorer) -> None:
        self.core = core

    @classmethod
    def load(cls, bundle: "Bundle", options: ScorerOptions) -> "SpadeMethod":
        params = read_params(bundle, SpadeParams.from_manifest, (SpadeArrayError,))
        require_outputs(bundle, (GRID_OUTPUT, GLOBAL_OUTPUT))
        global_features = bundle.method_array("global_features")  # dtype and shape as method.arrays records
        gallery = bundle.method_array("gallery")
        gallery_file = bundle.path / bundle.method.arrays["gallery"].file
        expected = (params.images, *bundle.features.grid, bundle.features.dim)
        if gallery.shape != expected:
            raise BundleError(f"{gallery_file}: gallery has shape {gallery.shape}, the manifest says {expected} "
                              "(method.params.images x features.grid x features.dim); re-export the bundle")
        try:
            core = SpadeScorer(global_features, gallery, params, threads=options.threads)
        except SpadeArrayError as error:
            raise BundleError(f"{gallery_file}: {error}; re-export the bundle") from None
        return cls(core)

    def score(self, outputs: Mapping[str, np.ndarray], valid: Optional[np.ndarray] = None) -> List[MethodScore]:
        try:
            scored = self.core.score_batch(outputs[GLOBAL_OUTPUT], outputs[GRID_OUTPUT])
        except SpadeArrayError as error:
            raise BundleError(f"{error}; re-export the bundle") from None
        results = []
        for i, item in enumerate(scored):
            patch_map = item.patch_map
            if valid is not None:
                # Padding and positions outside the ROI get 0 on the map. The image score cannot honour `valid`:
                # it is the distance between global features, which the network pools over its whole input.
                # Letterbox padding is the same in training and on the line, so it shifts both alike; an ROI,
                # though, restricts the map only, not what the image score sees.
                patch_map = np.where(np.asarray(valid[i]).reshape(self.core.grid), patch_map, np.float32(0.0))
            results.append(MethodScore(score=item.score, patch_map=patch_map,
                                       details={"max_patch_distance": float(patch_map.max()),
                                                "nearest_image": float(item.nearest_images[0])}))
        return results

    @classmethod
    def resident_bytes(cls, bundle: "Bundle", search_threads: int = 1) -> Dict[str, int]:
        arrays = super().resident_bytes(bundle, search_threads)
        images, h, w, dim = bundle.method.arrays["gallery"].shape
        k = bundle.method.params.get("k")
        k = min(int(k), images) if isinstance(k, int) and not isinstance(k, bool) and k > 0 else images
        # Per image scored: the K nearest images' grids in float32 and their centred copy (`exact_knn`).
        return {**arrays, "gallery_search": 2 * k * h * w * dim * 4 + k * h * w * 4}

    @classmethod
    def memory_advice(cls, bundle: "Bundle") -> Optional[str]:
        record = bundle.method.arrays["gallery"]
        images, h, w, dim = record.shape
        per_image = bytes_per_training_image((h, w), dim, int(bundle.method.arrays["global_features"].shape[1]),
                                             record.dtype)
        half = "" if record.dtype == "float16" else " or --method-param gallery_dtype=float16 (halves the gallery)"
        return (f"the SPADE gallery holds {images} training images of {h} x {w} x {dim} {record.dtype} "
                f"({per_image / 2**20:.2f} MiB each): re-export with fewer training images{half}, a smaller "
                "input or backbone, or pick a larger board")
