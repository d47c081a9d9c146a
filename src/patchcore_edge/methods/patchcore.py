"""PatchCore (Roth et al.) on the device: memory bank -> exact re-weighted image score, patch map.

The score math lives in `patchcore_edge.scoring` (the re-ranked exact maximum and the re-weighting); this
module reads the method's arrays from the bundle, checks them against each other and the network, and adapts
the math to the `Scorer` interface.

The first pass is the bank's k-means cells (`search.CellIndex`, derived from the bank when the bundle loads:
4x cheaper than an hnswlib index at the same recall on the bottle bank, issue 13), so the bundle carries no index
file (format 3; a format 2 bundle's `index.hnsw` is verified with the other files but not read). `ef` (`--ef`) is
the number of cells probed per patch here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional

import numpy as np

from ..bundle import BundleError
from ..scoring import PatchScores, image_scores
from ..search import (PatchSearch, cell_index_resident_bytes, check_neighbours_sample, default_cells,
                      search_bank_bytes, validate_neighbours)
from .base import MethodScore, Scorer, ScorerOptions

if TYPE_CHECKING:
    from ..bundle import Bundle

NAME = "patchcore"


def _positive_int(params: Mapping[str, Any], key: str, where: str, name: str = "",
                  most: Optional[int] = None) -> int:
    """params[key] as an int in 1..most (no bound for None); `name` is its path in method.params (default key)."""
    value = params.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (most is not None and value > most):
        wanted = "a positive integer" if most is None else f"an integer in 1..{most}"
        raise BundleError(f"{where}: method.params.{name or key} must be {wanted}, got {value!r}; re-export "
                          "the bundle")
    return int(value)


def _first_pass_cells(params: Mapping[str, Any], count: int, where: str) -> int:
    """The k-means cells the bundle's `first_pass` records (format 3), checked against the bank; bundles from
    before format 3 record none and get the default for their bank size."""
    if "first_pass" not in params:
        return default_cells(count)
    first_pass = params["first_pass"]
    if not isinstance(first_pass, dict) or first_pass.get("kind") != "kmeans_cells":
        raise BundleError(f"{where}: method.params.first_pass must be {{\"kind\": \"kmeans_cells\", \"cells\": N}}, "
                          f"got {first_pass!r}; re-export the bundle")
    return _positive_int(first_pass, "cells", where, name="first_pass.cells", most=count)  # at most a cell per row


class PatchCoreScorer(Scorer):
    name = NAME

    def __init__(self, search: PatchSearch, neighbours: np.ndarray, rerank: int, grid: tuple,
                 output_name: str, exact_map_above: Optional[float] = None, exact_map_reach: int = 0) -> None:
        self.search = search
        self.neighbours = neighbours
        self.rerank = int(rerank)
        self.grid = (int(grid[0]), int(grid[1]))
        self.output_name = output_name
        self.exact_map_above = exact_map_above
        self.exact_map_reach = int(exact_map_reach)

    @classmethod
    def load(cls, bundle: "Bundle", options: ScorerOptions) -> "PatchCoreScorer":
        where = str(bundle.path / "manifest.json")
        params = bundle.method.params
        rerank = _positive_int(params, "rerank", where)
        b = _positive_int(params, "reweight_neighbours", where)
        bank = bundle.method_array("memory_bank")
        if bank.ndim != 2 or bank.shape[1] != bundle.features.dim or bank.dtype != np.float32:
            raise BundleError(f"{bundle.path}: memory bank {bank.shape} {bank.dtype} does not match the network's "
                              f"{bundle.features.dim}-d float32 features; re-export the bundle")
        neighbours = bundle.method_array("bank_neighbours")
        if neighbours.shape != (bank.shape[0], b):
            raise BundleError(f"{bundle.path}: bank_neighbours has shape {neighbours.shape}, expected "
                              f"{(bank.shape[0], b)}; re-export the bundle")
        try:
            neighbours = validate_neighbours(neighbours, bank.shape[0])
            check_neighbours_sample(bank, neighbours)
            cells = _first_pass_cells(params, int(bank.shape[0]), where)
            search = (PatchSearch(bank, None, threads=options.threads) if options.exact_search
                      else PatchSearch.with_cells(bank, probes=options.ef, cells=cells, threads=options.threads))
        except ValueError as error:
            raise BundleError(f"{bundle.path}: {error}; re-export the bundle") from None
        return cls(search, neighbours, rerank, bundle.features.grid, bundle.features.output_name,
                   options.exact_map_above, options.exact_map_reach)

    @classmethod
    def resident_bytes(cls, bundle: "Bundle", search_threads: int = 1) -> Dict[str, int]:
        count, dim = bundle.method.arrays["memory_bank"].shape
        b = bundle.method.arrays["bank_neighbours"].shape[1]
        return {"bank": search_bank_bytes(count, dim, cells=True), "index": cell_index_resident_bytes(count, dim),
                "neighbours": count * b * 4}

    def patch_scores(self, grid: np.ndarray, valid: Optional[np.ndarray] = None) -> List[PatchScores]:
        """The full PatchCore record of a batch of feature grids [B, h, w, D] (`valid`: see Scorer.score)."""
        n = grid.shape[0]
        return image_scores(grid.reshape(n, -1, grid.shape[-1]), self.search, self.neighbours, self.rerank,
                            valid=valid, exact_above=self.exact_map_above, grid=self.grid,
                            reach=self.exact_map_reach)

    def score(self, outputs: Mapping[str, np.ndarray], valid: Optional[np.ndarray] = None) -> List[MethodScore]:
        grid = outputs[self.output_name]
        if grid.ndim != 4 or grid.shape[1:3] != self.grid or grid.shape[3] != self.search.dim:
            raise BundleError(f"the feature network returned {grid.shape}, the bundle says "
                              f"[B, {self.grid[0]}, {self.grid[1]}, {self.search.dim}]; re-export the bundle")
        return [MethodScore(score=float(p.score), patch_map=p.patch_distances.reshape(self.grid),
                            details={"max_patch_distance": float(p.max_distance), "weight": float(p.weight),
                                     "reranked": float(p.reranked)})
                for p in self.patch_scores(grid, valid)]

    def settings(self) -> Dict[str, object]:
        return {"search": "exact" if self.search.is_exact else "cells",
                "probes": None if self.search.is_exact else self.search.ef, "exact_search": self.search.is_exact}
