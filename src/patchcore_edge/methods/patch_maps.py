"""Anomaly maps and image scores of the trained patch-encoder methods (Patch SVDD, multi-scale), numpy only.

Each scale gives a grid of patch distances (nearest training embedding); patch (i, j) of a scale with
`kernel` and `stride` covers pixels [stride*i, stride*i + kernel) on each axis. Every pixel receives the mean
distance of the patches that cover it; the scales are combined by product (Patch SVDD) or sum (multi-scale);
the image score is the map's maximum, or the maximum over windows of the map's local mean (multi-scale).

All of this is computed on "cells": squares of the greatest common divisor of every stride, kernel and window
in pixels, on which the pixel map is constant. A cell map [H / cell, W / cell] is the pixel map exactly.

Every step (sums in a fixed order, division by a constant count, product of non-negative values, sum, max) is
monotone in each patch distance even in float32 rounding. The image score from a mix of approximate distances
(each >= the exact one, see search.py) and exact ones is therefore never below the exact score, and equal to it
once every patch under the winning location is exact: `rerank_scores` builds on that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

COMBINES = ("product", "sum")


@dataclass(frozen=True)
class Scale:
    """One encoder's patches: the network output holding their grid, patch size and stride in pixels."""

    output: str
    kernel: int
    stride: int


@dataclass(frozen=True)
class Window:
    """Image score over square windows of `size` pixels moved by `stride` pixels (local mean, then max)."""

    size: int
    stride: int


def box_sums(values: np.ndarray, size: int, axis: int) -> np.ndarray:
    """out[u] = sum of values[u - size + 1 .. u] (out of range: nothing) along `axis`; length n + size - 1.

    Plain shifted additions in a fixed order, so each output is monotone in each input under rounding.
    """
    shape = list(values.shape)
    shape[axis] += size - 1
    out = np.zeros(shape, dtype=np.float32)
    for shift in range(size):
        index = [slice(None)] * values.ndim
        index[axis] = slice(shift, shift + values.shape[axis])
        out[tuple(index)] += values
    return out


def _spread(grid: np.ndarray, step: int) -> np.ndarray:
    """Patch values at every `step`-th cell (zeros between), the last patch on the last placed cell."""
    rows, cols = grid.shape[-2:]
    placed = np.zeros(grid.shape[:-2] + ((rows - 1) * step + 1, (cols - 1) * step + 1), dtype=np.float32)
    placed[..., ::step, ::step] = grid
    return placed


def cover_mean(grid: np.ndarray, kernel_cells: int, stride_cells: int) -> np.ndarray:
    """Per-cell mean of the patch values [..., h, w] whose patches (kernel_cells wide, stride_cells apart)
    cover the cell: [..., (h - 1) * stride + kernel, (w - 1) * stride + kernel]."""
    values = np.asarray(grid, dtype=np.float32)
    sums = box_sums(box_sums(_spread(values, stride_cells), kernel_cells, -2), kernel_cells, -1)
    ones = np.ones(values.shape[-2:], dtype=np.float32)
    counts = box_sums(box_sums(_spread(ones, stride_cells), kernel_cells, 0), kernel_cells, 1)
    mean: np.ndarray = sums / counts
    return mean


class MapLayout:
    """The cell geometry of a method: how each scale's grid maps onto cells, and the score windows."""

    def __init__(self, scales: Sequence[Scale], grids: Sequence[Tuple[int, int]], combine: str,
                 window: Optional[Window] = None) -> None:
        if not scales or len(scales) != len(grids):
            raise ValueError("need one grid shape per scale")
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        sizes = [v for s in scales for v in (s.kernel, s.stride)]
        if window is not None:
            sizes += [window.size, window.stride]
        if min(sizes) < 1:
            raise ValueError(f"kernels, strides and window sizes must be >= 1, got {sizes}")
        self.cell = int(reduce(math.gcd, sizes))
        self.scales = list(scales)
        self.grids = [(int(h), int(w)) for h, w in grids]
        self.combine = combine
        self.window = window
        shapes = {((h - 1) * s.stride + s.kernel, (w - 1) * s.stride + s.kernel)
                  for s, (h, w) in zip(self.scales, self.grids)}
        if len(shapes) != 1:
            raise ValueError(f"the scales' patches cover different image areas {sorted(shapes)}")
        self.image_size: Tuple[int, int] = shapes.pop()
        self.cells = (self.image_size[0] // self.cell, self.image_size[1] // self.cell)
        if window is not None and min(self.image_size) < window.size:
            raise ValueError(f"score window {window.size} is larger than the image {self.image_size}")

    def cell_map(self, distances: Sequence[np.ndarray]) -> np.ndarray:
        """Combined map [..., H / cell, W / cell] from each scale's distances [..., h, w]."""
        maps = [cover_mean(d, s.kernel // self.cell, s.stride // self.cell) for s, d in zip(self.scales, distances)]
        combined = maps[0]
        for other in maps[1:]:
            combined = combined * other if self.combine == "product" else combined + other
        return combined

    def location_values(self, cell_map: np.ndarray) -> np.ndarray:
        """Values whose maximum is the image score: the cells, or the windows' local means."""
        if self.window is None:
            return cell_map
        size, step = self.window.size // self.cell, self.window.stride // self.cell
        sums = box_sums(box_sums(cell_map, size, -2), size, -1)
        valid = sums[..., size - 1:cell_map.shape[-2], size - 1:cell_map.shape[-1]]
        means: np.ndarray = valid[..., ::step, ::step] / np.float32(size * size)
        return means

    def location_cells(self, row: int, col: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """Cell rows and columns [first, last] of a location."""
        if self.window is None:
            return (row, row), (col, col)
        size, step = self.window.size // self.cell, self.window.stride // self.cell
        return (row * step, row * step + size - 1), (col * step, col * step + size - 1)

    def contributors(self, row: int, col: int) -> List[Tuple[slice, slice]]:
        """Per scale, the block of patches whose distances enter the value of location (row, col)."""
        rows, cols = self.location_cells(row, col)
        blocks = []
        for scale, (h, w) in zip(self.scales, self.grids):
            k, s = scale.kernel // self.cell, scale.stride // self.cell
            blocks.append((slice(max(0, -(-(rows[0] - k + 1) // s)), min(h - 1, rows[1] // s) + 1),
                           slice(max(0, -(-(cols[0] - k + 1) // s)), min(w - 1, cols[1] // s) + 1)))
        return blocks


def scale_grids(scales: Sequence[Scale], height: int, width: int) -> List[Tuple[int, int]]:
    """Each scale's patch grid on a height x width input, or ValueError when its patches do not tile it exactly
    (then some pixels would be covered by no patch, or by a different number of patches per scale)."""
    grids = []
    for s in scales:
        if min(height, width) < s.kernel or (height - s.kernel) % s.stride or (width - s.kernel) % s.stride:
            raise ValueError(f"{s.kernel}-pixel patches {s.stride} apart do not tile {width} x {height}")
        grids.append(((height - s.kernel) // s.stride + 1, (width - s.kernel) // s.stride + 1))
    return grids


ExactSearch = Callable[[int, np.ndarray], np.ndarray]


def parse_params(params: Dict[str, Any]) -> Tuple[List[Scale], str, Optional[Window]]:
    """The method's manifest params {"scales": [{"output", "kernel", "stride"}], "combine", "window"}, checked."""
    try:
        scales = [Scale(output=str(s["output"]), kernel=int(s["kernel"]), stride=int(s["stride"]))
                  for s in params["scales"]]
        combine = str(params["combine"])
        raw = params.get("window")
        window = None if raw is None else Window(size=int(raw["size"]), stride=int(raw["stride"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"method params are malformed ({error!r})") from None
    if not scales or len({s.output for s in scales}) != len(scales):
        raise ValueError("method params need at least one scale, each with its own output")
    if combine not in COMBINES:
        raise ValueError(f"method params: combine must be one of {COMBINES}, got {combine!r}")
    return scales, combine, window


def to_params(scales: Sequence[Scale], combine: str, window: Optional[Window]) -> Dict[str, Any]:
    return {"scales": [{"output": s.output, "kernel": s.kernel, "stride": s.stride} for s in scales],
            "combine": combine, "window": None if window is None else {"size": window.size, "stride": window.stride}}


@dataclass(frozen=True)
class MapScore:
    score: float
    cell_map: np.ndarray  # float32 [H / cell, W / cell]
    details: Dict[str, float]


def rerank_scores(layout: MapLayout, approx: Sequence[np.ndarray], exact_search: Sequence[ExactSearch],
                  all_exact: bool = False) -> List[MapScore]:
    """Exact image scores from approximate distances per scale [B, h, w] (each >= the exact distance).

    exact_search[k](queries_index) -> exact distances for scale k: called with (image, flat patch indices)
    and returning float32 distances. Round r searches exactly every patch under the 2^r best locations that
    still hold an approximate distance; it stops when the best location holds exact distances only: its value
    is then exact and every other location's value is an upper bound no larger than it.
    """
    batch = approx[0].shape[0]
    results = []
    for image in range(batch):
        distances = [a[image].astype(np.float32, copy=True) for a in approx]
        exact = [np.full(d.shape, all_exact, dtype=bool) for d in distances]
        top, rounds = 1, 0
        while True:
            values = layout.location_values(layout.cell_map(distances))
            order = np.argsort(-values, axis=None, kind="stable")
            best = tuple(int(v) for v in np.unravel_index(int(order[0]), values.shape))
            if all(e[block].all() for e, block in zip(exact, layout.contributors(*best))):
                break
            wanted = [np.zeros(d.shape, dtype=bool) for d in distances]
            for flat in order[:top]:
                for mask, block in zip(wanted, layout.contributors(*(int(v) for v in np.unravel_index(int(flat), values.shape)))):
                    mask[block] = True
            for k, (mask, known) in enumerate(zip(wanted, exact)):
                todo = np.flatnonzero(mask & ~known)
                if todo.size:
                    found = np.asarray(exact_search[k](image, todo), dtype=np.float32)
                    flat_d = distances[k].reshape(-1)
                    # Both are distances to real bank rows; the smaller is the better answer.
                    flat_d[todo] = np.minimum(flat_d[todo], found)
                    known.reshape(-1)[todo] = True
            top, rounds = top * 2, rounds + 1
        cell_map = layout.cell_map(distances)
        score = float(layout.location_values(cell_map)[best])
        results.append(MapScore(score=score, cell_map=cell_map,
                                details={"reranked": float(sum(int(e.sum()) for e in exact)),
                                         "rounds": float(rounds)}))
    return results
