"""Which coreset selection an export runs, how large the bank may be, and what the manifest records about it.

Methods (measured in benchmarks/results/coreset.md):
- "exact": the exact greedy, a 2-approximation of the optimal coverage radius. On the CPU it is the cell
  greedy on one cell (export/coreset_cells.py: the plain rule, several centres per pass, its coverage radius
  free): bottle, 164k patches at 10 %, 9 s of one core; 600k tile-like ELPV patches 98 s, where the pruned
  loop of export/coreset.py needed ~1,400 s (its pruning stops paying on textures). On a torch accelerator
  the plain loop of export/coreset.py;
- "partitioned": the greedy inside k-means cells of ~16k points, merged by radius (export/coreset_cells.py),
  work N x size / cells; 600k ELPV patches at 10 % in about 8-20 s of CPU, radius +7.6 % over the exact
  greedy's there (+0.6 % on bottle); the cells can run on a Dask cluster (export/distributed.py);
- "auto": exact while N x size <= EXACT_WORK_LIMIT (or on a GPU, where the plain loop is cheap), else
  partitioned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from ..bundle import Bundle
from ..devices.memory import estimate_memory
from ..devices.profiles import ProfileError, get_profile
from .coreset import CoresetInputError, FeatureArray, Progress, coverage_radius, greedy_coreset, selection_points
from .coreset_cells import CellRunner, partitioned_greedy

METHODS = ("auto", "exact", "partitioned")
# N x size up to which "auto" runs the exact greedy and the export measures the exact coverage radius: bottle
# at 10 % is 2.7e9. Beyond, the exact radius alone costs minutes (an N x size distance pass).
EXACT_WORK_LIMIT = 4e9


@dataclass
class CoresetResult:
    indices: np.ndarray
    method: str
    seconds: float
    radius: Optional[float]  # coverage radius in the feature space (exact), where measured
    radius_bound: Optional[float]  # an upper bound of it from the selection itself, where there is one
    cells: int

    def to_manifest(self) -> Dict[str, Any]:
        return {"method": f"greedy k-center, {self.method}", "selection": self.method,
                "cells": int(self.cells), "seconds": round(float(self.seconds), 3),
                "coverage_radius": self.radius, "coverage_radius_bound": self.radius_bound}

    def radius_text(self) -> str:
        if self.radius is not None:
            return f"{self.radius:.4f}"
        if self.radius_bound is not None:
            return f"<= {self.radius_bound:.4f} (own-cell bound; exact radius not measured at this size)"
        return "n/a (not measured at this size)"


def choose_method(num_patches: int, size: int, method: str = "auto", device: str = "cpu") -> str:
    if method not in METHODS:
        raise CoresetInputError(f"coreset method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "auto":
        return method
    if device.split(":")[0] != "cpu" or float(num_patches) * size <= EXACT_WORK_LIMIT:
        return "exact"
    return "partitioned"


def select_coreset(features: FeatureArray, size: int, method: str = "auto", projection_dim: int = 128,
                   seed: int = 0, device: str = "cpu", cells: Optional[int] = None,
                   runner: Optional[CellRunner] = None, progress: Optional[Progress] = None) -> CoresetResult:
    """`size` bank rows of `features` [N, D] by `method`, timed, with the coverage radius where affordable."""
    n = int(features.shape[0])
    chosen = choose_method(n, size, method, device)
    start = time.perf_counter()
    bound: Optional[float] = None
    used_cells = 1
    on_cpu = device.split(":")[0] == "cpu"
    if chosen == "exact" and not on_cpu:
        indices = greedy_coreset(features, size, projection_dim=projection_dim, seed=seed, device=device,
                                 progress=progress)
    else:
        if not on_cpu:
            raise CoresetInputError("the partitioned selection runs on the CPU; use --coreset-method exact "
                                    f"for device {device!r}")
        points, _ = selection_points(features, projection_dim, seed)
        # On the CPU the exact greedy is the cell greedy on one cell (the same rule, several centres per pass):
        # 9 s instead of 17 s on bottle, 98 s instead of ~1,400 s on 600k tile-like patches.
        selection = partitioned_greedy(points, size, seed=seed, cells=1 if chosen == "exact" else cells,
                                       runner=runner, progress=progress)
        indices, used_cells = selection.indices, selection.cells
        if points.shape[1] == features.shape[1]:  # a bound in the feature space itself, not a projection
            bound = selection.radius_bound
    seconds = time.perf_counter() - start
    radius: Optional[float] = None
    if bound is not None and used_cells == 1:
        radius = bound  # one cell: the largest key left out is the coverage radius itself
    elif float(n) * size <= EXACT_WORK_LIMIT:
        radius = coverage_radius(features, indices)
    return CoresetResult(indices=indices, method=chosen, seconds=seconds, radius=radius, radius_bound=bound,
                         cells=used_cells)


# ----------------------------------------------------------------------------------------------- size cap


def bank_size_limit(profile_name: str, dim: int, grid: Tuple[int, int], crop: int, onnx_bytes: int,
                    index_m: int, reweight_neighbours: int, variant: Optional[str] = None) -> Tuple[int, str]:
    """The largest bank (rows) whose bundle fits the device profile's memory budget, and why that many.

    Uses devices/memory.py's estimate on a draft manifest (the ONNX size estimated from the weights) and the
    profile's own `coreset_max` where it sets one; the smaller wins.
    """
    try:
        profile = get_profile(profile_name)
    except ProfileError as error:
        raise CoresetInputError(str(error)) from None

    def estimate(count: int) -> Mapping[str, Any]:
        draft = Bundle.draft(dim=dim, grid=grid, crop=crop, onnx_bytes=onnx_bytes,
                             arrays={"memory_bank": ("float32", (count, dim)),
                                     "bank_neighbours": ("int32", (count, reweight_neighbours))},
                             params={"index": {"M": index_m}, "reweight_neighbours": reweight_neighbours})
        return estimate_memory(draft, profile, variant=variant, measure_activations=False)

    if estimate(1)["budget"] is None:
        raise CoresetInputError(f"device profile {profile_name} has no memory size to fit a bank into")
    if not estimate(1)["fits"]:
        raise CoresetInputError(f"device profile {profile_name}: even a 1-row bank does not fit its memory "
                                "budget")
    low, high = 1, 1 << 26
    while low < high:  # the largest count that fits: memory grows with count
        middle = (low + high + 1) // 2
        if estimate(middle)["fits"]:
            low = middle
        else:
            high = middle - 1
    budget_mib = int(estimate(1)["budget"]) / 2**20
    limit, reason = low, f"memory budget of {profile_name} ({budget_mib:.0f} MiB)"
    profile_max = profile.defaults.get("coreset_max")
    if isinstance(profile_max, int) and 1 <= profile_max < limit:
        limit, reason = profile_max, f"coreset_max of profile {profile_name}"
    return limit, reason


def capped_size(size: int, limit: Optional[int]) -> int:
    return size if limit is None else max(1, min(size, int(limit)))

