"""Which coreset selection an export runs, how large the bank may be, and what the manifest records about it.

Methods (measured in benchmarks/results/coreset.md):
- "exact": the pruned exact greedy (export/coreset.py), a 2-approximation of the optimal coverage radius;
  fast while the pruning pays (bottle, 164k patches at 10 %: about 10-26 s here), slow on textures
  (1,425 s for 600k tile patches at 10 %) since its work grows with N x size;
- "partitioned": the greedy inside k-means cells of ~16k points, merged by radius (export/coreset_cells.py),
  work N x size / cells, several centres per pass; 600k ELPV patches at 10 % in about 20 s of CPU, radius
  a few % above the exact greedy's; the cells can run on a Dask cluster (export/distributed.py);
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
from .coreset_cells import CellRunner, partitioned_greedy, run_in_process

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
                   runner: CellRunner = run_in_process, progress: Optional[Progress] = None) -> CoresetResult:
    """`size` bank rows of `features` [N, D] by `method`, timed, with the coverage radius where affordable."""
    n = int(features.shape[0])
    chosen = choose_method(n, size, method, device)
    start = time.perf_counter()
    bound: Optional[float] = None
    used_cells = 1
    if chosen == "exact":
        indices = greedy_coreset(features, size, projection_dim=projection_dim, seed=seed, device=device,
                                 progress=progress)
    else:
        if device.split(":")[0] != "cpu":
            raise CoresetInputError("the partitioned selection runs on the CPU; use --coreset-method exact "
                                    f"for device {device!r}")
        points, _ = selection_points(features, projection_dim, seed)
        selection = partitioned_greedy(points, size, seed=seed, cells=cells, runner=runner, progress=progress)
        indices, used_cells = selection.indices, selection.cells
        if points.shape[1] == features.shape[1]:  # a bound in the feature space itself, not a projection
            bound = selection.radius_bound
    seconds = time.perf_counter() - start
    radius = coverage_radius(features, indices) if float(n) * size <= EXACT_WORK_LIMIT else None
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

