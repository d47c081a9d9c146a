"""Patch SVDD and multi-scale patch learning on the device: the bundle's per-scale banks + HNSW indexes ->
exact image score (patch_maps.rerank_scores) and the pixel map (mean over covering patches). numpy + hnswlib.

The network (features.onnx) outputs one embedding grid per scale ([B, h, w, dim], recorded in
features.output_shapes); features.grid is the map's cell grid (cells of features.stride pixels, on which the
pixel map is constant). The patch map handed to the runtime is already at network-input resolution, and the
bundle's gaussian_sigma is 0, so the runtime's upsampling and smoothing leave the paper's map as it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional

import numpy as np

from ..bundle import BundleError
from ..search import DEFAULT_EF, IndexFileError, PatchSearch, index_resident_bytes, load_index
from .base import MethodScore, Scorer, ScorerOptions
from .nearest_patch import NearestPatchScorer
from .patch_maps import MapLayout, Scale, parse_params, scale_grids

if TYPE_CHECKING:
    from ..bundle import Bundle

REEXPORT = "re-export the bundle"


def _bank_key(scale: Scale) -> str:
    return f"bank_{scale.output}"


class TrainedPatchScorer(Scorer):
    """Shared by both methods; a subclass fixes the name and how its scales combine."""

    combine: str = ""

    def __init__(self, scorer: NearestPatchScorer, layout: MapLayout, exact_map_above: Optional[float],
                 exact_map_reach: int) -> None:
        self.scorer = scorer
        self.layout = layout
        self.exact_map_above = exact_map_above
        self.exact_map_reach = int(exact_map_reach)

    @classmethod
    def load(cls, bundle: "Bundle", options: ScorerOptions) -> "TrainedPatchScorer":
        where = bundle.path / "manifest.json"
        try:
            scales, combine, window = parse_params(dict(bundle.method.params))
        except ValueError as error:
            raise BundleError(f"{where}: {error}; {REEXPORT}") from None
        if combine != cls.combine:
            raise BundleError(f"{where}: method {cls.name} combines its scales by {cls.combine}, the bundle says "
                              f"{combine!r}; {REEXPORT}")
        outputs = list(bundle.features.outputs)
        if outputs != [s.output for s in scales]:
            raise BundleError(f"{where}: the network has outputs {outputs}, the method has {len(scales)} scales "
                              f"{[s.output for s in scales]}; {REEXPORT}")
        spec = bundle.input_spec
        try:
            layout = MapLayout(scales, scale_grids(scales, spec.height, spec.width), combine, window)
        except ValueError as error:
            raise BundleError(f"{where}: {error}; {REEXPORT}") from None
        if layout.cells != bundle.features.grid or layout.cell != bundle.features.stride:
            raise BundleError(f"{where}: features.grid {list(bundle.features.grid)} / stride "
                              f"{bundle.features.stride} disagree with the method's cells {list(layout.cells)} of "
                              f"{layout.cell} px; {REEXPORT}")
        index_params = bundle.method.params.get("index")
        ef = options.ef or (int(index_params["ef"]) if isinstance(index_params, Mapping)
                            and isinstance(index_params.get("ef"), int) else DEFAULT_EF)
        searches: List[PatchSearch] = []
        for scale in scales:
            key = _bank_key(scale)
            if key not in bundle.method.arrays:
                raise BundleError(f"{where}: method.arrays has no {key} for scale {scale.output}; {REEXPORT}")
            bank = bundle.method_array(key)
            if bank.ndim != 2 or bank.dtype != np.float32 or bank.shape[1] != bundle.features.dim:
                raise BundleError(f"{bundle.path}: {key} is {bank.shape} {bank.dtype}, the network gives "
                                  f"{bundle.features.dim}-d float32 embeddings; {REEXPORT}")
            if not np.isfinite(bank).all():
                raise BundleError(f"{bundle.path}: {key} holds NaN or infinite values; {REEXPORT}")
            try:
                index = None if options.exact_search else load_index(
                    bundle.method_file(f"index_{scale.output}"), bank.shape[1], bank.shape[0], bank=bank)
                searches.append(PatchSearch(bank, index, ef=ef, threads=options.threads))
            except IndexFileError as error:
                raise BundleError(f"{error}; {REEXPORT}") from None
            except (KeyError, ValueError) as error:
                raise BundleError(f"{bundle.path}: scale {scale.output}: {error}; {REEXPORT}") from None
        scorer = NearestPatchScorer(scales, searches, combine, window, exact_search=options.exact_search)
        return cls(scorer, layout, options.exact_map_above, options.exact_map_reach)

    @classmethod
    def resident_bytes(cls, bundle: "Bundle", search_threads: int = 1) -> Dict[str, int]:
        index = bundle.method.params.get("index")
        m = int(index.get("M", 16)) if isinstance(index, Mapping) else 16
        found: Dict[str, int] = {}
        for key, record in bundle.method.arrays.items():
            count, dim = int(record.shape[0]), int(record.shape[-1])
            # The bank, its squared norms and its centred copy (PatchSearch keeps both beside it), the index.
            found[key] = 2 * count * dim * 4 + count * 4
            found[key.replace("bank_", "index_")] = index_resident_bytes(count, dim, m, search_threads)
        return found

    def score(self, outputs: Mapping[str, np.ndarray], valid: Optional[np.ndarray] = None) -> List[MethodScore]:
        if valid is not None and not np.asarray(valid).all():
            raise BundleError(f"method {self.name} cannot leave positions out (letterbox padding, a region of "
                              "interest); export it with --fit squash or crop and no --roi")
        for scale, (h, w), search in zip(self.layout.scales, self.layout.grids, self.scorer.searches):
            grid = outputs.get(scale.output)
            if grid is None or grid.ndim != 4 or tuple(grid.shape[1:]) != (h, w, search.dim):
                shape = None if grid is None else tuple(grid.shape)
                raise BundleError(f"the network's output {scale.output} is {shape}, the bundle says "
                                  f"[B, {h}, {w}, {search.dim}]; {REEXPORT}")
        cell = self.layout.cell
        results = []
        for found in self.scorer.score(outputs, exact_above=self.exact_map_above, reach=self.exact_map_reach):
            pixels = np.repeat(np.repeat(found.cell_map, cell, axis=0), cell, axis=1)
            results.append(MethodScore(score=found.score, patch_map=np.ascontiguousarray(pixels, np.float32),
                                       details={"max_patch_distance": float(found.cell_map.max()),
                                                **found.details}))
        return results

    @classmethod
    def caveats(cls, bundle: "Bundle") -> List[str]:
        training = bundle.method.params.get("training")
        if not isinstance(training, Mapping):
            return []
        return [f"{cls.name}: encoders trained {training.get('steps_done')} steps in "
                f"{float(training.get('seconds', 0.0)) / 60:.1f} min on {training.get('device')} (stopped by "
                f"{training.get('stopped_by')}); the papers train far longer, so their numbers do not apply"]

    def settings(self) -> Dict[str, Any]:
        first = self.scorer.searches[0]
        return {"ef": first.ef, "exact_search": self.scorer.exact_search}


class PatchSVDDScorer(TrainedPatchScorer):
    name = "patch_svdd"
    combine = "product"


class MultiscaleScorer(TrainedPatchScorer):
    name = "multiscale"
    combine = "sum"
