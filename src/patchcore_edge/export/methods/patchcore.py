"""PatchCore (Roth et al.) at export: mid-level patch features -> greedy k-center coreset memory bank, the bank's
self-neighbours for the re-weighting and leave-one-image-out training scores.

No search index is written (bundle format 3): the runtime's first pass, the bank's k-means cells, is derived from
the bank when the bundle loads (`search.CellIndex`), so the bank is the whole model. Format 2 bundles carried an
hnswlib index that the runtime no longer read, at 1.4x the bank's bytes (bottle: 8.7 MB beside 6.3 MB) and 133 s of a 600k-patch export."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Dict, Sequence, Tuple

import numpy as np
import torch

from ... import search
from ...preprocess import InputSpec
from ..backbones import PATCHCORE_BACKBONE, BackboneError
from ..coreset import CoresetInputError, coreset_size
from .. import coreset_select
from ..coreset_select import CoresetResult, capped_size, select_coreset
from ..distributed import DaskUnavailable, dask_client, dask_runner
from ..features import build_extractor
from ..heldout import leave_one_image_out_scores
from .base import FittedMethod, Log, MethodExporter, MethodExportError, MethodSettings, NetworkInfo, Progress

OUTPUT = "features"


class PatchCoreExporter(MethodExporter):
    name = "patchcore"
    default_backbone = PATCHCORE_BACKBONE

    def network(self, settings: MethodSettings, spec: InputSpec,
                training_images: Sequence[np.ndarray]) -> Tuple[torch.nn.Module, NetworkInfo]:
        try:
            extractor, info = build_extractor(self.backbone(settings.backbone), settings.weights, spec, settings.feature_dim,
                                              reduction=settings.reduction, layers=settings.layers)
        except BackboneError as error:
            raise MethodExportError(str(error)) from None
        self._grid = info.grid
        # float32 weights: what features.onnx will weigh, for the device-profile size cap.
        self._network_bytes = 4 * sum(int(p.numel()) for p in extractor.parameters())
        return extractor, NetworkInfo(outputs=(OUTPUT,), dim=int(info.feature_dim), grid=info.grid,
                                      stride=int(info.stride), backbone=info.backbone_manifest(),
                                      layers=tuple(info.layers), extra=info.extra_manifest())

    def fit(self, outputs: Dict[str, np.ndarray], images: int, settings: MethodSettings, progress: Progress,
            log: Log) -> FittedMethod:
        grid = outputs[OUTPUT]
        features = np.ascontiguousarray(grid.reshape(-1, grid.shape[-1]), dtype=np.float32)
        patches_per_image = int(grid.shape[1] * grid.shape[2])
        seconds: Dict[str, float] = {}
        try:
            selection, size_note = self._select(settings, features, grid,
                                                lambda done, total: progress("coreset", done, total))
        except CoresetInputError as error:
            raise MethodExportError(f"coreset: {error}") from None
        seconds["coreset"] = selection.seconds
        selected = selection.indices
        radius = selection.radius
        bank = np.ascontiguousarray(features[selected], dtype=np.float32)

        start = time.perf_counter()
        progress("index", 0, 2)
        b = min(settings.reweight_neighbours, bank.shape[0])
        neighbours = search.bank_neighbours(bank, b).astype(np.int32)
        progress("index", 1, 2)
        held_out = leave_one_image_out_scores(features, patches_per_image, selected, bank, neighbours,
                                              pieces_per_image=settings.pieces_per_image or None)
        progress("index", 2, 2)
        seconds["index"] = time.perf_counter() - start
        patches = int(features.shape[0])
        params: Dict[str, Any] = {
            "reweight_neighbours": int(b), "rerank": int(settings.rerank),
            "coreset": {"size": int(bank.shape[0]), "patches": patches,
                        "ratio": float(bank.shape[0] / max(1, patches)),
                        "projection_dim": int(settings.projection_dim), "seed": int(settings.seed),
                        **selection.to_manifest(), "size_limit": size_note or None},
            # Built by the runtime from the bank (no file): recorded so that a reader knows what searches it.
            "first_pass": {"kind": "kmeans_cells", "cells": search.default_cells(int(bank.shape[0]))},
        }
        return FittedMethod(
            arrays={"memory_bank": bank, "bank_neighbours": neighbours},
            params=params,
            summary={"patches": patches, "coreset_size": int(bank.shape[0]), "bank_mb": bank.nbytes / 2**20,
                     "coverage_radius": radius, "seconds": seconds,
                     "coreset_note": f"{selection.method}, radius {selection.radius_text()}"
                                     + (f"; {size_note}" if size_note else "")},
            training_scores=held_out)

    def _select(self, settings: MethodSettings, features: np.ndarray, grid: np.ndarray,
                progress: Callable[[int, int], None]) -> Tuple[CoresetResult, str]:
        """The coreset by settings.coreset_method, capped by the device profile, on Dask when asked."""
        ratio = None if settings.coreset_size is not None else settings.coreset_ratio
        size = coreset_size(features.shape[0], ratio=ratio, size=settings.coreset_size)
        note = ""
        if settings.device_profile:
            limit, reason = coreset_select.bank_size_limit(settings.device_profile, int(grid.shape[-1]),
                                            (int(grid.shape[1]), int(grid.shape[2])), int(settings.crop),
                                            self._network_bytes, settings.hnsw_m or search.DEFAULT_M,
                                            settings.reweight_neighbours)
            if limit < size:
                note = f"capped from {size:,} to {limit:,} by the {reason}"
            size = capped_size(size, limit)
        method = settings.coreset_method
        if settings.dask and method == "auto":
            method = "partitioned"  # the selection that runs on a cluster
        client_context: Any = contextlib.nullcontext(None)
        if settings.dask and method == "partitioned":
            client_context = dask_client(settings.dask)
        try:
            with client_context as client:
                result = select_coreset(features, size, method=method, projection_dim=settings.projection_dim,
                                        seed=settings.seed, device=settings.device,
                                        runner=None if client is None else dask_runner(client),
                                        progress=progress)
        except DaskUnavailable as error:
            raise MethodExportError(str(error)) from None
        return result, note
