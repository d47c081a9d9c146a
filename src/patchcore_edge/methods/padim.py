"""PaDiM (Defard et al., "a Patch Distribution Modeling Framework") on the device.

Every grid position has a multivariate Gaussian of the patch embedding (mean mu_p, covariance Sigma_p, fitted in
float64 at export with Sigma_p + 0.01 I). A position's score is the Mahalanobis distance
sqrt((x - mu_p)^T Sigma_p^-1 (x - mu_p)); the image score is the maximum of the upsampled, smoothed map.

The bundle stores mu [h, w, d] and the inverse covariance (precision) [h, w, d, d] in float32. Loading factors
every precision as L L^T (Cholesky, float64): that is the positive-definiteness check, and it turns the score
into ||L^T (x - mu)||, one small matrix-vector product per position whose square can never go negative.
PaDiM assumes aligned parts: grid position p must show the same part of the object in every image.

Numpy and OpenCV only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from ..bundle import BundleError
from ..maps import anomaly_map
from .base import MethodScore, Scorer, ScorerOptions, read_params, require_outputs

if TYPE_CHECKING:
    from ..bundle import Bundle

NAME = "padim"
OUTPUT = "features"  # the embedding [B, h, w, d], the chosen channels only

# Stored precisions must be symmetric to this relative tolerance (float32 rounding of a symmetric float64 matrix
# is exactly symmetric; anything else was damaged or written by something else).
_SYMMETRY_RTOL = 1e-6


class PadimArrayError(ValueError):
    """PaDiM arrays that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class PadimParams:
    """method.params of a PaDiM bundle."""

    d: int  # channels kept (random subset of the embedding, seeded)
    regularisation: float  # added to the covariance diagonal
    max_condition: float  # largest covariance condition number over the positions (checked at export)
    channel_seed: int
    channels: Tuple[int, ...]  # the embedding channels kept, in order (the network applies them)

    def to_manifest(self) -> Dict[str, Any]:
        return {"d": self.d, "regularisation": self.regularisation, "max_condition": self.max_condition,
                "channel_seed": self.channel_seed, "channels": list(self.channels),
                "image_score": "max of the smoothed Mahalanobis map"}

    @classmethod
    def from_manifest(cls, params: Mapping[str, Any]) -> "PadimParams":
        d = params.get("d")
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise PadimArrayError(f"method.params.d must be a positive integer, got {d!r}")
        channels = params.get("channels")
        if (not isinstance(channels, list) or len(channels) != d
                or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in channels)):
            raise PadimArrayError(f"method.params.channels must list {d} channel numbers")
        numbers = {}
        for key in ("regularisation", "max_condition"):
            value = params.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value) or value < 0:
                raise PadimArrayError(f"method.params.{key} must be a non-negative number, got {value!r}")
            numbers[key] = float(value)
        seed = params.get("channel_seed")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise PadimArrayError(f"method.params.channel_seed must be an integer, got {seed!r}")
        return cls(d=d, channel_seed=seed, channels=tuple(int(c) for c in channels), **numbers)


def precision_factors(precision: np.ndarray) -> np.ndarray:
    """float32 [P, d, d] lower-triangular L with L L^T = precision[p], from float32 precisions [P, d, d].

    Raises PadimArrayError naming the first position whose matrix is not symmetric positive definite.
    """
    array = np.asarray(precision)
    if array.ndim != 3 or array.shape[1] != array.shape[2]:
        raise PadimArrayError(f"precision must have shape [positions, d, d], got {array.shape}")
    if not np.isfinite(array).all():
        raise PadimArrayError("precision contains NaN or infinite values")
    wide = array.astype(np.float64)
    asymmetry = np.abs(wide - np.swapaxes(wide, 1, 2)).max(axis=(1, 2))
    scale = np.abs(wide).max(axis=(1, 2))
    bad = np.flatnonzero(asymmetry > _SYMMETRY_RTOL * scale)
    if bad.size:
        raise PadimArrayError(f"precision at position {int(bad[0])} is not symmetric")
    try:
        factors = np.linalg.cholesky(wide)
    except np.linalg.LinAlgError:
        factors = None
    if factors is None or not np.isfinite(factors).all():
        for position in range(wide.shape[0]):  # find the culprit for the message (only on failure)
            try:
                np.linalg.cholesky(wide[position])
            except np.linalg.LinAlgError:
                raise PadimArrayError(f"the covariance at position {position} is not positive definite "
                                      "(its stored inverse has no Cholesky factor)") from None
        raise PadimArrayError("the covariance is not positive definite (no Cholesky factor)")
    return np.ascontiguousarray(factors, dtype=np.float32)


class PadimScorer:
    """Mahalanobis distance per grid position from stored means [h, w, d] and precisions [h, w, d, d]."""

    def __init__(self, mean: np.ndarray, precision: np.ndarray, params: PadimParams,
                 size: Union[int, Tuple[int, int]], sigma: float) -> None:
        """`size`: the network input's side, or (width, height); the image score is taken on a map that size."""
        mean_array = np.asarray(mean)
        precision_array = np.asarray(precision)
        if mean_array.ndim != 3 or mean_array.shape[2] != params.d or mean_array.dtype != np.float32:
            raise PadimArrayError(f"mean is {mean_array.dtype} {mean_array.shape}, the manifest says float32 "
                                  f"[h, w, {params.d}]")
        expected = mean_array.shape + (params.d,)
        if precision_array.shape != expected or precision_array.dtype != np.float32:
            raise PadimArrayError(f"precision is {precision_array.dtype} {precision_array.shape}, expected "
                                  f"float32 {expected} (one d x d matrix per mean)")
        if not np.isfinite(mean_array).all():
            raise PadimArrayError("mean contains NaN or infinite values")
        h, w, d = mean_array.shape
        self.grid = (int(h), int(w))
        self.d = int(d)
        self.mean = np.ascontiguousarray(mean_array.reshape(h * w, d))
        self.factors = precision_factors(precision_array.reshape(h * w, d, d))
        self.params = params
        self.size = size
        self.sigma = float(sigma)

    def distances(self, grids: np.ndarray) -> np.ndarray:
        """float32 [B, h, w] Mahalanobis distances of feature grids [B, h, w, d]."""
        features = np.asarray(grids)
        if features.ndim != 4 or features.shape[1:] != self.grid + (self.d,):
            raise PadimArrayError(f"the network's grid is {features.shape}, the bundle's Gaussians are "
                                  f"[B, {self.grid[0]}, {self.grid[1]}, {self.d}]")
        if not np.isfinite(features).all():
            raise PadimArrayError("the network's features contain NaN or infinite values")
        b = features.shape[0]
        diff = features.reshape(b, -1, self.d).astype(np.float32) - self.mean[None]
        # z_p = L_p^T diff_p for every position: diff as a row vector times L gives exactly that.
        z = np.matmul(diff[:, :, None, :], self.factors[None])[:, :, 0, :]
        squared = np.einsum("bpi,bpi->bp", z, z, dtype=np.float32, optimize=False)
        result: np.ndarray = np.sqrt(squared).reshape(b, *self.grid)
        return result

    def score_batch(self, grids: np.ndarray, valid: Optional[np.ndarray] = None
                    ) -> List[Tuple[float, np.ndarray]]:
        """(image score, patch map [h, w]) per image: the score is the maximum of the smoothed input-size map.

        `valid` (bool [B, h*w]): positions that may score; the others are 0 before the smoothing, so that they
        never give the image score.
        """
        maps = self.distances(grids)
        if valid is not None:
            maps = np.where(np.asarray(valid, dtype=bool).reshape(maps.shape), maps, np.float32(0.0))
        return [(float(anomaly_map(m, self.size, self.sigma).max()), m) for m in maps]


def gaussian_bytes(grid: Tuple[int, int], d: int) -> int:
    """Bundle bytes of the Gaussians (float32 means and precisions)."""
    return int(grid[0] * grid[1] * (d + d * d) * 4)


class PadimMethod(Scorer):
    """PaDiM as a bundle's scoring method: reads and checks the Gaussians, adapts `PadimScorer` to `Scorer`."""

    name = NAME

    @classmethod
    def caveats(cls, bundle: "Bundle") -> List[str]:
        assumes = bundle.method.params.get("assumes")
        if not isinstance(assumes, str):
            return []
        return [f"PaDiM assumes {assumes}; parts that move or turn in the image score as anomalies"]

    def __init__(self, core: PadimScorer) -> None:
        self.core = core

    @classmethod
    def load(cls, bundle: "Bundle", options: ScorerOptions) -> "PadimMethod":
        params = read_params(bundle, PadimParams.from_manifest, (PadimArrayError,))
        require_outputs(bundle, (OUTPUT,))
        expected = (*bundle.features.grid, bundle.features.dim)
        if params.d != bundle.features.dim:
            raise BundleError(f"{bundle.path / 'manifest.json'}: method.params.d={params.d} but the network gives {bundle.features.dim} "
                              "channels; re-export the bundle")
        mean = bundle.method_array("mean")
        precision = bundle.method_array("precision")
        arrays = bundle.method.arrays
        if mean.shape != expected:
            raise BundleError(f"{bundle.path / arrays['mean'].file}: mean has shape {mean.shape}, the network's grid "
                              f"is {expected}; re-export the bundle")
        spec = bundle.input_spec
        try:
            core = PadimScorer(mean, precision, params, (spec.width, spec.height), bundle.map_sigma)
        except PadimArrayError as error:
            raise BundleError(f"{bundle.path / arrays['precision'].file}: {error}; re-export the bundle") from None
        return cls(core)

    def score(self, outputs: Mapping[str, np.ndarray], valid: Optional[np.ndarray] = None) -> List[MethodScore]:
        try:
            scored = self.core.score_batch(outputs[OUTPUT], valid)
        except PadimArrayError as error:
            raise BundleError(f"{error}; re-export the bundle") from None
        return [MethodScore(score=score, patch_map=patch_map, details={"max_patch_distance": float(patch_map.max())})
                for score, patch_map in scored]

    @classmethod
    def resident_bytes(cls, bundle: "Bundle", search_threads: int = 1) -> Dict[str, int]:
        h, w, d = bundle.method.arrays["mean"].shape
        positions = h * w
        # The precisions are replaced by their float32 Cholesky factors; the check at load holds two float64
        # copies of them for a moment.
        return {"mean": positions * d * 4, "precision_factors": positions * d * d * 4,
                "load_check_float64": 2 * positions * d * d * 8}
