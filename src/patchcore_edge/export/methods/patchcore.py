"""PatchCore (Roth et al.) at export: mid-level patch features -> greedy k-center coreset memory bank, the bank's
self-neighbours for the re-weighting, an HNSW index, and leave-one-image-out training scores."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

import numpy as np
import torch

from ... import search
from ...preprocess import InputSpec
from ..backbones import BackboneError
from ..coreset import CoresetInputError, coreset_size, coverage_radius, greedy_coreset
from ..features import build_extractor
from ..heldout import leave_one_image_out_scores
from .base import FittedMethod, Log, MethodExporter, MethodSettings, NetworkInfo, Progress

OUTPUT = "features"


class MethodExportError(ValueError):
    """A method's fit that cannot go on; the message says why."""


class PatchCoreExporter(MethodExporter):
    name = "patchcore"

    def network(self, settings: MethodSettings, spec: InputSpec,
                training_images: Sequence[np.ndarray]) -> Tuple[torch.nn.Module, NetworkInfo]:
        try:
            extractor, info = build_extractor(settings.backbone, settings.weights, spec, settings.feature_dim,
                                              reduction=settings.reduction, layers=settings.layers)
        except BackboneError as error:
            raise MethodExportError(str(error)) from None
        self._grid = info.grid
        return extractor, NetworkInfo(outputs=(OUTPUT,), dim=int(info.feature_dim), grid=info.grid,
                                      stride=int(info.stride), backbone=info.backbone_manifest(),
                                      layers=tuple(info.layers), extra=info.extra_manifest())

    def fit(self, outputs: Dict[str, np.ndarray], images: int, settings: MethodSettings, progress: Progress,
            log: Log) -> FittedMethod:
        grid = outputs[OUTPUT]
        features = np.ascontiguousarray(grid.reshape(-1, grid.shape[-1]), dtype=np.float32)
        patches_per_image = int(grid.shape[1] * grid.shape[2])
        seconds: Dict[str, float] = {}
        start = time.perf_counter()
        try:
            ratio = None if settings.coreset_size is not None else settings.coreset_ratio
            size = coreset_size(features.shape[0], ratio=ratio, size=settings.coreset_size)
            selected = greedy_coreset(features, size, projection_dim=settings.projection_dim, seed=settings.seed,
                                      device=settings.device,
                                      progress=lambda done, total: progress("coreset", done, total))
        except CoresetInputError as error:
            raise MethodExportError(f"coreset: {error}") from None
        seconds["coreset"] = time.perf_counter() - start
        bank = np.ascontiguousarray(features[selected], dtype=np.float32)
        # The exact radius costs a pass of N x size distances: worth it for a summary line up to a few hundred
        # thousand patches, not beyond.
        radius = coverage_radius(features, selected) if features.shape[0] * size <= 4e9 else None

        start = time.perf_counter()
        b = min(settings.reweight_neighbours, bank.shape[0])
        neighbours = search.bank_neighbours(bank, b).astype(np.int32)
        held_out = leave_one_image_out_scores(features, patches_per_image, selected, bank, neighbours)
        index_params = {
            "M": settings.hnsw_m or search.DEFAULT_M,
            "ef_construction": settings.ef_construction or search.DEFAULT_EF_CONSTRUCTION,
            "ef": settings.ef or search.DEFAULT_EF,
        }
        index = search.build_index(bank, m=index_params["M"], ef_construction=index_params["ef_construction"],
                                   seed=settings.seed)
        with tempfile.TemporaryDirectory(prefix="patchcore-index-") as folder:
            path = Path(folder) / "index.hnsw"
            search.save_index(index, path)
            index_bytes = path.read_bytes()
        seconds["index"] = time.perf_counter() - start
        patches = int(features.shape[0])
        params: Dict[str, Any] = {
            "reweight_neighbours": int(b), "rerank": int(settings.rerank),
            "coreset": {"method": "greedy k-center", "size": int(bank.shape[0]), "patches": patches,
                        "ratio": float(bank.shape[0] / max(1, patches)),
                        "projection_dim": int(settings.projection_dim), "seed": int(settings.seed),
                        "coverage_radius": radius},
            "index": {"library": "hnswlib", "space": "l2", **index_params, "seed": int(settings.seed)},
        }
        return FittedMethod(
            arrays={"memory_bank": bank, "bank_neighbours": neighbours},
            files={"index.hnsw": index_bytes}, file_roles={"index": "index.hnsw"}, params=params,
            summary={"patches": patches, "coreset_size": int(bank.shape[0]), "bank_mb": bank.nbytes / 2**20,
                     "coverage_radius": radius, "seconds": seconds},
            training_scores=held_out)
