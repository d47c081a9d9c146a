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
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from ..maps import anomaly_map

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

    def __init__(self, mean: np.ndarray, precision: np.ndarray, params: PadimParams, crop: int,
                 sigma: float) -> None:
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
        self.crop = int(crop)
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

    def score_batch(self, grids: np.ndarray) -> List[Tuple[float, np.ndarray]]:
        """(image score, patch map [h, w]) per image: the score is the maximum of the smoothed crop-size map."""
        maps = self.distances(grids)
        return [(float(anomaly_map(m, self.crop, self.sigma).max()), m) for m in maps]


def gaussian_bytes(grid: Tuple[int, int], d: int) -> int:
    """Bundle bytes of the Gaussians (float32 means and precisions)."""
    return int(grid[0] * grid[1] * (d + d * d) * 4)
