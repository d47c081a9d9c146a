"""PaDiM at export: the multi-stage embedding with a seeded random subset of d channels (one network output),
the per-position Gaussian fit in float64 with its conditioning checked, and a torch reference scorer."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ...maps import anomaly_map
from ...methods.padim import OUTPUT, PadimParams, gaussian_bytes
from ...preprocess import InputSpec
from ..backbones import BackboneError, get_spec
from ..reference import smooth
from ..transform import torch_preprocess
from .base import FittedMethod, Log, MethodExporter, MethodExportError, MethodParameter, MethodSettings, NetworkInfo
from .base import Progress
from .pyramid import backbone_manifest, build_body, frozen, probe_shapes, pyramid_grid

OUTPUTS = (OUTPUT,)
REGULARISATION = 0.01  # the paper's epsilon I
# Above this the float32 runtime would lose the distance to rounding (float32 has ~7 digits).
MAX_CONDITION = 1e6
# Stages per backbone: three consecutive scales as the paper's layer1-3, kept at stride 8 on mobilenet_v2 so
# that a 224 input has 28 x 28 Gaussians (stride 4 would quadruple the bundle).
DEFAULT_LAYERS = {"mobilenet_v2": ("features.6", "features.10", "features.13"),
                  "resnet18": ("layer1", "layer2", "layer3"), "wide_resnet50_2": ("layer1", "layer2", "layer3")}
DEFAULT_D = {"mobilenet_v2": 64, "resnet18": 100, "wide_resnet50_2": 550}  # resnets: the paper's d


class PadimFitError(ValueError):
    """A Gaussian fit that the runtime could not use; the message says why and what to change."""


class PadimNetwork(torch.nn.Module):
    """Normalised images [B, 3, H, W] -> embedding [B, h, w, d]: stages on one grid, d chosen channels."""

    channels: torch.Tensor

    def __init__(self, body: torch.nn.Module, channels: Sequence[int]) -> None:
        super().__init__()
        self.body = body
        self.register_buffer("channels", torch.tensor(list(channels), dtype=torch.int64))
        frozen(self)

    def train(self, mode: bool = True) -> "PadimNetwork":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.index_select(pyramid_grid(self.body(x)), 3, self.channels).contiguous()


def choose_channels(total: int, d: int, seed: int) -> List[int]:
    if not 1 <= d <= total:
        raise PadimFitError(f"d must be between 1 and {total} (the embedding's channels), got {d}")
    return sorted(int(c) for c in np.random.default_rng(seed).choice(total, size=d, replace=False))


def build_padim_network(backbone: str, weights: Union[str, "os.PathLike[str]", None], spec: InputSpec,
                        d: Union[int, None] = None, seed: int = 0, layers: Union[Sequence[str], None] = None
                        ) -> Tuple[PadimNetwork, Dict[str, Any]]:
    taps = list(layers) if layers is not None else list(DEFAULT_LAYERS[backbone])
    body, weights_info, ordered = build_body(backbone, weights, taps)
    total = sum(shape[0] for shape in probe_shapes(body, spec))
    channels = choose_channels(total, int(d if d is not None else min(DEFAULT_D[backbone], total)), seed)
    network = PadimNetwork(body, channels)
    (shape,) = probe_shapes(network, spec)
    return network, {"layers": ordered, "grid": shape[:2], "dim": shape[2], "channels": channels,
                     "embedding_dim": total, "seed": int(seed), "weights": weights_info,
                     "stride": get_spec(backbone).strides[ordered[0]]}


@dataclass
class PadimFit:
    arrays: Dict[str, np.ndarray]  # mean float32 [h, w, d], precision float32 [h, w, d, d]
    params: PadimParams
    conditions: np.ndarray  # covariance condition number per position [h, w]


def fit_padim(grids: np.ndarray, channels: Sequence[int], seed: int,
              regularisation: float = REGULARISATION, max_condition: float = MAX_CONDITION) -> PadimFit:
    """Per-position mean and regularised covariance of grids [N, h, w, d] in float64, inverted in float64."""
    n, h, w, d = grids.shape
    if n < 2:
        raise PadimFitError(f"a covariance needs at least 2 images, got {n}")
    x = np.asarray(grids, dtype=np.float64).reshape(n, h * w, d)
    mean = x.mean(axis=0)
    centred = x - mean[None]
    covariance = np.einsum("npi,npj->pij", centred, centred, optimize=True) / (n - 1)
    covariance += regularisation * np.eye(d)[None]
    eigenvalues = np.linalg.eigvalsh(covariance)
    if not np.isfinite(eigenvalues).all() or eigenvalues[:, 0].min() <= 0:
        raise PadimFitError("a covariance is not positive definite even after regularisation (non-finite "
                            "features?)")
    conditions = eigenvalues[:, -1] / eigenvalues[:, 0]
    worst = float(conditions.max())
    if worst > max_condition:
        raise PadimFitError(f"covariance condition number {worst:.3g} at position {int(conditions.argmax())} "
                            f"exceeds {max_condition:.0e}; raise the regularisation or lower d")
    precision = np.linalg.inv(covariance)
    precision = 0.5 * (precision + np.swapaxes(precision, 1, 2))  # exactly symmetric before rounding
    params = PadimParams(d=int(d), regularisation=float(regularisation), max_condition=worst,
                         channel_seed=int(seed), channels=tuple(int(c) for c in channels))
    arrays = {"mean": mean.reshape(h, w, d).astype(np.float32),
              "precision": precision.reshape(h, w, d, d).astype(np.float32)}
    return PadimFit(arrays=arrays, params=params, conditions=conditions.reshape(h, w))


@dataclass
class PadimReference:
    score: float
    patch_map: np.ndarray
    crop_map: np.ndarray


@torch.no_grad()
def reference_padim_scores(network: PadimNetwork, images_rgb: Sequence[np.ndarray], spec: InputSpec,
                           mean: np.ndarray, precision: np.ndarray, sigma: float) -> List[PadimReference]:
    """Mahalanobis distances as the quadratic form diff^T P diff in float64 (the runtime uses Cholesky)."""
    mu = torch.from_numpy(np.asarray(mean, dtype=np.float64))
    p = torch.from_numpy(np.asarray(precision, dtype=np.float64))
    batch = torch.stack([torch_preprocess(image, spec) for image in images_rgb])
    results = []
    for grid in network(batch).double():
        diff = grid - mu
        distances = torch.einsum("hwi,hwij,hwj->hw", diff, p, diff).clamp_min(0).sqrt()
        up = F.interpolate(distances[None, None], size=(spec.height, spec.width), mode="bilinear",
                           align_corners=False)[0, 0]
        crop_map = smooth(up, sigma)
        results.append(PadimReference(score=float(crop_map.max()), patch_map=distances.numpy(),
                                      crop_map=crop_map.numpy()))
    return results


def leave_one_out_distances(grids: np.ndarray, regularisation: float = REGULARISATION) -> np.ndarray:
    """float64 [N, h, w]: each training image's Mahalanobis map under the Gaussians fitted without it.

    Exact, without N refits: with delta = x_i - mu and S the scatter matrix, leaving image i out gives
    C_-i = B - a delta delta^T, B = S / (n - 2) + eps I, a = n / ((n - 1)(n - 2)), and x_i - mu_-i =
    delta n / (n - 1); Sherman-Morrison then gives D^2 = (n / (n - 1))^2 q / (1 - a q) with q = delta^T B^-1 delta
    (1 - a q > 0 because C_-i is positive definite). One inversion of B per position serves every image.
    """
    n, h, w, d = grids.shape
    if n < 3:
        raise PadimFitError(f"leave-one-out scores need at least 3 images, got {n}")
    x = np.asarray(grids, dtype=np.float64).reshape(n, h * w, d).transpose(1, 0, 2)  # [P, n, d]
    delta = x - x.mean(axis=1, keepdims=True)
    scatter = np.matmul(delta.transpose(0, 2, 1), delta)  # [P, d, d]
    inverse = np.linalg.inv(scatter / (n - 2) + regularisation * np.eye(d)[None])
    q = np.einsum("pni,pni->pn", np.matmul(delta, inverse), delta)
    a = n / ((n - 1) * (n - 2))
    squared = (n / (n - 1)) ** 2 * q / (1.0 - a * q)
    distances: np.ndarray = np.sqrt(np.clip(squared, 0.0, None)).T.reshape(n, h, w)
    return distances


class PadimExporter(MethodExporter):
    name = "padim"
    summary = "PaDiM: a Gaussian per grid position, Mahalanobis distance (aligned parts only)"
    parameters = (
        MethodParameter("d", int, None, "channels kept, chosen at random with --seed (default: the backbone's: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_D.items()) + ")", minimum=1),
        MethodParameter("regularisation", float, REGULARISATION, "added to every covariance's diagonal",
                        minimum=0.0),
    )

    def network(self, settings: MethodSettings, spec: InputSpec,
                training_images: Sequence[np.ndarray]) -> Tuple[torch.nn.Module, NetworkInfo]:
        backbone = self.backbone(settings.backbone)
        if backbone not in DEFAULT_LAYERS:
            raise MethodExportError(f"PaDiM has no default stages and d for {backbone}; choose one of "
                                    f"--backbone {', '.join(DEFAULT_LAYERS)}")
        try:
            network, info = build_padim_network(backbone, settings.weights, spec,
                                                d=settings.method_params.get("d"), seed=settings.seed,
                                                layers=settings.layers)
        except (BackboneError, PadimFitError) as error:
            raise MethodExportError(f"padim: {error}") from None
        self._spec = spec
        self._info = info
        return network, NetworkInfo(
            outputs=OUTPUTS, dim=int(info["dim"]), grid=(int(info["grid"][0]), int(info["grid"][1])),
            stride=int(info["stride"]), backbone=backbone_manifest(backbone, info["weights"]),
            layers=tuple(info["layers"]),
            extra={"local_neighbourhood": 1, "embedding_dim": int(info["embedding_dim"])})

    def fit(self, outputs: Dict[str, np.ndarray], images: int, settings: MethodSettings, progress: Progress,
            log: Log) -> FittedMethod:
        grids = outputs[OUTPUT]
        regularisation = float(settings.method_params.get("regularisation", REGULARISATION))
        start = time.perf_counter()
        progress("gaussians", 0, 2)
        try:
            fitted = fit_padim(grids, self._info["channels"], settings.seed, regularisation=regularisation)
            progress("gaussians", 1, 2)
            held_out = leave_one_out_distances(grids, regularisation)
        except PadimFitError as error:
            raise MethodExportError(f"padim: {error}") from None
        size = (self._spec.width, self._spec.height)
        # As the runtime scores a new part: the maximum of the upsampled, smoothed map.
        training_scores = np.array([float(anomaly_map(m.astype(np.float32), size, settings.gaussian_sigma).max())
                                    for m in held_out])
        progress("gaussians", 2, 2)
        n, h, w, d = grids.shape
        params = {**fitted.params.to_manifest(), "embedding_dim": int(self._info["embedding_dim"]),
                  "assumes": "aligned parts: a grid position shows the same part of the object in every image"}
        megabytes = gaussian_bytes((h, w), d) / 2**20
        lines = {
            "gaussians": f"{h} x {w} positions, d={d} of {self._info['embedding_dim']} channels (seed "
                         f"{settings.seed}), regularisation {regularisation:g}",
            "bundle arrays": f"{megabytes:.1f} MB (mean + precision, float32), independent of the {n} images",
            "conditioning": f"largest covariance condition number {fitted.params.max_condition:.3g} "
                            f"(limit {MAX_CONDITION:.0e})",
            "note": "PaDiM assumes aligned parts (the same position shows the same part in every image)",
        }
        return FittedMethod(arrays=fitted.arrays, params=params, training_scores=training_scores,
                            summary={"patches": int(n * h * w), "bank_mb": megabytes, "lines": lines,
                                     "seconds": {"gaussians": time.perf_counter() - start}})
