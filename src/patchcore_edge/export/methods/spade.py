"""SPADE at export: one network with two outputs (pyramid grid, global feature), the fit (the training images'
arrays) and a torch reference scorer, written independently of the runtime's numpy one, for parity."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ...methods.spade import (GALLERY_DTYPES, GLOBAL_OUTPUT, GRID_OUTPUT, SpadeParams, bytes_per_training_image,
                              exact_knn, leave_one_out_image_scores)
from ...preprocess import InputSpec
from ..backbones import BackboneError, get_spec
from ..reference import smooth
from ..transform import torch_preprocess
from .base import FittedMethod, Log, MethodExporter, MethodExportError, MethodParameter, MethodSettings, NetworkInfo
from .base import Progress
from .pyramid import backbone_manifest, build_body, frozen, last_stage, probe_shapes, pyramid_grid

OUTPUTS = (GRID_OUTPUT, GLOBAL_OUTPUT)
# Training images scored as new parts against the others: their maps give the heat-map range and measure the
# error a float16 gallery causes.
FLOAT16_CHECK_IMAGES = 8
DEFAULT_K = 50  # the paper's K for MVTec AD
DEFAULT_KAPPA = 1


class SpadeNetwork(torch.nn.Module):
    """Normalised images [B, 3, H, W] -> (pyramid grid [B, h, w, D], global feature [B, G]) in one pass."""

    def __init__(self, body: torch.nn.Module, pyramid_taps: int) -> None:
        super().__init__()
        self.body = body
        self.pyramid_taps = int(pyramid_taps)
        frozen(self)

    def train(self, mode: bool = True) -> "SpadeNetwork":
        return super().train(False)  # batch-norm statistics must never change

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        maps = self.body(x)
        grid = pyramid_grid(maps[:self.pyramid_taps])
        return grid, maps[-1].mean(dim=(2, 3))


def build_spade_network(backbone: str, weights: Union[str, "os.PathLike[str]", None], spec: InputSpec,
                        layers: Union[Sequence[str], None] = None) -> Tuple[SpadeNetwork, Dict[str, Any]]:
    """Pyramid stages (default: PatchCore's pair for the backbone) plus the last stage, pooled."""
    pyramid = list(layers) if layers is not None else list(get_spec(backbone).default_layers)
    body, weights_info, ordered = build_body(backbone, weights, pyramid + [last_stage(backbone)])
    network = SpadeNetwork(body, len(ordered) - 1)
    grid_shape, global_shape = probe_shapes(network, spec)
    info = {"layers": ordered[:-1], "global_layer": ordered[-1], "grid": grid_shape[:2], "dim": grid_shape[2],
            "global_dim": global_shape[0], "weights": weights_info,
            "stride": get_spec(backbone).strides[ordered[0]]}
    return network, info


@dataclass
class SpadeFit:
    arrays: Dict[str, np.ndarray]
    params: SpadeParams
    training_scores: np.ndarray
    bytes_per_image: int


def fit_spade(grids: np.ndarray, global_features: np.ndarray, k: int = DEFAULT_K, kappa: int = DEFAULT_KAPPA,
              gallery_dtype: str = "float32") -> SpadeFit:
    """The bundle arrays: every training image's grid and global feature; K capped at the images there are."""
    n = int(global_features.shape[0])
    if grids.shape[0] != n or n < 1:
        raise ValueError(f"{grids.shape[0]} grids for {n} global features")
    params = SpadeParams(k=min(int(k), n), kappa=int(kappa), images=n, global_dim=int(global_features.shape[1]))
    arrays = {"global_features": np.ascontiguousarray(global_features, dtype=np.float32),
              "gallery": np.ascontiguousarray(grids, dtype=np.dtype(gallery_dtype))}
    return SpadeFit(arrays=arrays, params=params,
                    training_scores=leave_one_out_image_scores(arrays["global_features"], params.k),
                    bytes_per_image=bytes_per_training_image(tuple(grids.shape[1:3]), int(grids.shape[3]),
                                                             params.global_dim, gallery_dtype))


@dataclass
class SpadeReference:
    score: float
    patch_map: np.ndarray  # [h, w]
    crop_map: np.ndarray  # [crop, crop], smoothed


@torch.no_grad()
def reference_spade_scores(network: SpadeNetwork, images_rgb: Sequence[np.ndarray], spec: InputSpec,
                           global_features: np.ndarray, gallery: np.ndarray, params: SpadeParams,
                           sigma: float) -> List[SpadeReference]:
    """SPADE scores with float64 torch.cdist and topk (the runtime uses float32 BLAS candidates)."""
    bank = torch.from_numpy(np.asarray(global_features, dtype=np.float64))
    stored = torch.from_numpy(np.asarray(gallery, dtype=np.float64))
    batch = torch.stack([torch_preprocess(image, spec) for image in images_rgb])
    grids, pooled = network(batch)
    results = []
    for grid, feature in zip(grids.double(), pooled.double()):
        near = torch.cdist(feature[None], bank)[0].topk(params.k, largest=False)
        h, w, d = grid.shape
        patch = torch.cdist(grid.reshape(-1, d), stored[near.indices].reshape(-1, d))
        patch_map = patch.topk(params.kappa, dim=1, largest=False).values.mean(dim=1).reshape(h, w)
        up = F.interpolate(patch_map[None, None], size=(spec.height, spec.width), mode="bilinear",
                           align_corners=False)[0, 0]
        results.append(SpadeReference(score=float(near.values.mean()), patch_map=patch_map.numpy(),
                                      crop_map=smooth(up, sigma).numpy()))
    return results


def leave_one_out_maps(global_features: np.ndarray, grids: np.ndarray, params: SpadeParams, images: int,
                       dtype: str) -> np.ndarray:
    """float64 [images, h*w]: the first `images` training images' patch maps, each scored as a new part against
    its K nearest *other* training images, with the gallery stored as `dtype`."""
    n = int(global_features.shape[0])
    count, k = min(images, n), min(params.k, n - 1)
    dim = grids.shape[-1]
    if count < 1 or k < 1:
        return np.zeros((0, grids.shape[1] * grids.shape[2]))
    _, rows = exact_knn(global_features[:count], global_features, k + 1)
    maps = []
    for i in range(count):
        others = [int(r) for r in rows[i] if r != i][:k]
        query = np.ascontiguousarray(grids[i].reshape(-1, dim), dtype=np.float32)
        gallery = np.ascontiguousarray(grids[others].reshape(-1, dim).astype(dtype), dtype=np.float32)
        maps.append(exact_knn(query, gallery, min(params.kappa, gallery.shape[0]))[0].mean(axis=1, dtype=np.float64))
    return np.stack(maps)


def float16_error(exact: np.ndarray, rounded: np.ndarray) -> Dict[str, Any]:
    """What storing the gallery in float16 does to the scores: leave-one-out maps with the float32 gallery
    (`exact`) and with its float16 rounding (`rounded`). The image score uses the float32 global features only,
    so float16 cannot change it; the map difference is relative to the float32 map's maximum."""
    worst = max((float(np.abs(r - e).max() / max(float(e.max()), 1e-12)) for e, r in zip(exact, rounded)),
                default=None)
    return {"images": int(len(exact)), "max_relative_map_difference": worst,
            "max_relative_image_score_difference": 0.0}


class SpadeExporter(MethodExporter):
    name = "spade"
    summary = "SPADE: K nearest training images by global feature, then their pyramid grids"
    parameters = (
        MethodParameter("k", int, DEFAULT_K, "nearest training images (capped by the images there are)",
                        minimum=1),
        MethodParameter("kappa", int, DEFAULT_KAPPA, "nearest gallery features averaged per position", minimum=1),
        MethodParameter("gallery_dtype", str, "float32", "gallery storage (float16 halves it; error measured)",
                        choices=GALLERY_DTYPES),
    )

    def network(self, settings: MethodSettings, spec: InputSpec,
                training_images: Sequence[np.ndarray]) -> Tuple[torch.nn.Module, NetworkInfo]:
        backbone = self.backbone(settings.backbone)
        try:
            network, info = build_spade_network(backbone, settings.weights, spec, settings.layers)
        except BackboneError as error:
            raise MethodExportError(str(error)) from None
        return network, NetworkInfo(
            outputs=OUTPUTS, dim=int(info["dim"]), grid=(int(info["grid"][0]), int(info["grid"][1])),
            stride=int(info["stride"]), backbone=backbone_manifest(backbone, info["weights"]),
            layers=tuple(info["layers"]),
            # Pyramid features are not averaged over a neighbourhood (PatchCore's 3 x 3 is not applied).
            extra={"local_neighbourhood": 1, "global_layer": info["global_layer"],
                   "global_dim": int(info["global_dim"])})

    def fit(self, outputs: Dict[str, np.ndarray], images: int, settings: MethodSettings, progress: Progress,
            log: Log) -> FittedMethod:
        given = settings.method_params
        k, kappa = int(given.get("k", DEFAULT_K)), int(given.get("kappa", DEFAULT_KAPPA))
        dtype = str(given.get("gallery_dtype", "float32"))
        grids, pooled = outputs[GRID_OUTPUT], outputs[GLOBAL_OUTPUT]
        start = time.perf_counter()
        progress("gallery", 0, 1)
        fitted = fit_spade(grids, pooled, k=k, kappa=kappa, gallery_dtype=dtype)
        held_out = leave_one_out_maps(fitted.arrays["global_features"], grids, fitted.params,
                                      FLOAT16_CHECK_IMAGES, dtype)
        error: Optional[Dict[str, Any]] = None
        if dtype == "float16":
            exact = leave_one_out_maps(fitted.arrays["global_features"], grids, fitted.params,
                                       FLOAT16_CHECK_IMAGES, "float32")
            error = float16_error(exact, held_out)
        progress("gallery", 1, 1)
        params = {**fitted.params.to_manifest(), "k_requested": k, "gallery_dtype": dtype, "float16_error": error}
        n, h, w, dim = fitted.arrays["gallery"].shape
        gallery_mb = fitted.arrays["gallery"].nbytes / 2**20
        lines = {
            "gallery": f"{n} training images x {h} x {w} x {dim} {dtype} ({gallery_mb:.1f} MB), global "
                       f"features {n} x {fitted.params.global_dim}",
            "per image": f"{fitted.bytes_per_image / 2**20:.3f} MiB of bundle per training image",
            "k, kappa": f"K={fitted.params.k}" + (f" (asked {k}, capped by the {n} images)" if k > n else "")
                        + f", kappa={kappa}",
        }
        if error is not None:
            lines["float16 error"] = (f"max relative map difference {error['max_relative_map_difference']:.2e} on "
                                      f"{error['images']} training images (image scores unchanged)")
        # The heat-map range: patch distances are on another scale than SPADE's image score (global features).
        top = float(held_out.max()) if held_out.size else 0.0
        return FittedMethod(arrays=fitted.arrays, params=params, training_scores=fitted.training_scores,
                            map_range=(0.0, 2.0 * top) if top > 0 else None,
                            summary={"patches": int(n * h * w), "bank_mb": gallery_mb, "lines": lines,
                                     "seconds": {"gallery": time.perf_counter() - start}})
