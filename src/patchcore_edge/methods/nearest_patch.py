"""Scorer of the trained patch-encoder methods: nearest training embedding per patch and scale (HNSW with the
exact re-rank of patch_maps.rerank_scores), maps combined as the method's params say. numpy + hnswlib only."""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..search import PatchSearch
from .patch_maps import MapLayout, MapScore, Scale, Window, rerank_scores


class NearestPatchScorer:
    """Scores batches of embedding grids {output: [B, h, w, D]} against one memory bank per scale."""

    def __init__(self, scales: Sequence[Scale], searches: Sequence[PatchSearch], combine: str,
                 window: Optional[Window] = None, exact_search: bool = False) -> None:
        if len(scales) != len(searches):
            raise ValueError("need one memory bank per scale")
        self.scales = list(scales)
        self.searches = list(searches)
        self.combine = combine
        self.window = window
        self.exact_search = bool(exact_search) or all(s.is_exact for s in self.searches)
        self._layouts: Dict[Tuple[Tuple[int, int], ...], MapLayout] = {}

    def layout(self, grids: Sequence[Tuple[int, int]]) -> MapLayout:
        key = tuple((int(h), int(w)) for h, w in grids)
        if key not in self._layouts:
            self._layouts[key] = MapLayout(self.scales, key, self.combine, self.window)
        return self._layouts[key]

    def score(self, outputs: Mapping[str, np.ndarray]) -> List[MapScore]:
        grids = []
        for scale, search in zip(self.scales, self.searches):
            if scale.output not in outputs:
                raise ValueError(f"the network has no output {scale.output!r} (has {sorted(outputs)})")
            grid = np.asarray(outputs[scale.output])
            if grid.ndim != 4 or grid.shape[3] != search.dim:
                raise ValueError(f"output {scale.output!r} must be [B, h, w, {search.dim}], got {grid.shape}")
            grids.append(np.ascontiguousarray(grid, dtype=np.float32))
        batch = grids[0].shape[0]
        if any(g.shape[0] != batch for g in grids):
            raise ValueError("the network's outputs disagree on the batch size")
        layout = self.layout([g.shape[1:3] for g in grids])
        approx = []
        for grid, search in zip(grids, self.searches):
            flat = grid.reshape(-1, grid.shape[3])
            found = search.exact_nearest(flat) if self.exact_search else search.nearest(flat)
            approx.append(found[0].reshape(grid.shape[:3]))

        def exact_for(grid: np.ndarray, search: PatchSearch):  # type: ignore[no-untyped-def]
            def run(image: int, patches: np.ndarray) -> np.ndarray:
                return search.exact_nearest(grid[image].reshape(-1, grid.shape[3])[patches])[0]
            return run

        return rerank_scores(layout, approx, [exact_for(g, s) for g, s in zip(grids, self.searches)],
                             all_exact=self.exact_search)
