"""Scorer of the trained patch-encoder methods: nearest training embedding per patch and scale (HNSW with the
exact re-rank of patch_maps.rerank_scores), maps combined as the method's params say. numpy + hnswlib only."""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..search import PatchSearch
from .patch_maps import MapLayout, MapScore, Scale, Window, box_sums, rerank_scores


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

    def score(self, outputs: Mapping[str, np.ndarray], exact_above: Optional[float] = None,
              reach: int = 0) -> List[MapScore]:
        """Scores and cell maps of a batch. With `exact_above` (a pixel threshold), every patch that covers a
        cell within `reach` cells of a cell above it in the approximate map is searched exactly too: the map
        is then exact wherever it can decide a mask (approximate distances only over-estimate, and the map is
        monotone in them, so a cell above the threshold in the exact map is above it in the approximate one)."""
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
        if exact_above is not None and not self.exact_search:
            self._exact_near_threshold(layout, grids, approx, float(exact_above), int(reach))

        def exact_for(grid: np.ndarray, search: PatchSearch):  # type: ignore[no-untyped-def]
            def run(image: int, patches: np.ndarray) -> np.ndarray:
                return search.exact_nearest(grid[image].reshape(-1, grid.shape[3])[patches])[0]
            return run

        return rerank_scores(layout, approx, [exact_for(g, s) for g, s in zip(grids, self.searches)],
                             all_exact=self.exact_search)

    def _exact_near_threshold(self, layout: MapLayout, grids: Sequence[np.ndarray], approx: List[np.ndarray],
                              level: float, reach: int) -> None:
        hot = layout.cell_map(approx) > level  # [B, cells_h, cells_w]
        if not hot.any():
            return
        size = 2 * reach + 1  # dilate by `reach` cells: a box sum centred on each cell
        near = box_sums(box_sums(hot.astype(np.float32), size, -2), size, -1)[:, reach:reach + hot.shape[1],
                                                                             reach:reach + hot.shape[2]] > 0
        for scale, grid, search, distances in zip(self.scales, grids, self.searches, approx):
            k, s = scale.kernel // layout.cell, scale.stride // layout.cell
            # Patch (i, j) covers cells [i s, i s + k): it is needed when any of them is near a hot cell.
            covered = box_sums(box_sums(near.astype(np.float32), k, -2), k, -1)
            needed = covered[:, k - 1::s, k - 1::s][:, :distances.shape[1], :distances.shape[2]] > 0
            flat = needed.reshape(-1)
            if flat.any():
                queries = grid.reshape(-1, grid.shape[3])[flat]
                values = distances.reshape(-1)
                values[flat] = np.minimum(values[flat], search.exact_nearest(queries)[0])
