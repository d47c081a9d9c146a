"""Our greedy coreset against anomalib 2.7's own KCenterGreedy (the package, not a copy), on bottle's patches.

Run with the interpreter of a virtual env that has anomalib 2.7 (torch) and numpy, from the repository root:
    PYTHONPATH=src /work/venv-anomalib/bin/python benchmarks/coreset_anomalib27.py --steps 50,350 --images 20
It prints one JSON line per measurement (results: benchmarks/results/coreset.md):
  - ours: select_coreset, what `export` runs (on bottle at 10 %: the exact greedy as the one-cell greedy, numpy,
    one thread) on all bottle patches, and its radius;
  - anomalib: KCenterGreedy(embedding, 0.1).select_coreset_idxs() run for a few and for more steps on all
    patches (every step is the same full pass over N x its projection, so the difference gives the time per
    step, and the full run is extrapolated), and run complete on the first --images images, radius included.
Features: the default extractor's 96-d bottle features from benchmarks/coreset_bench.py's cache.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

CACHE = Path("/tmp/patchcore_edge_bench/bottle_train_mobilenet_v2_96.npy")


def emit(record: dict) -> None:
    record["load"] = round(os.getloadavg()[0], 2)
    print(json.dumps(record), flush=True)


def anomalib_select(features: np.ndarray, ratio: float, steps: int = 0) -> tuple:
    """anomalib's KCenterGreedy on `features`, seeded through torch; `steps` > 0 stops it after that many."""
    import torch
    from anomalib.models.components.sampling import KCenterGreedy

    torch.manual_seed(0)
    sampler = KCenterGreedy(embedding=torch.from_numpy(features), sampling_ratio=ratio)
    if steps:
        sampler.coreset_size = steps
    start = time.perf_counter()
    indices = np.asarray(sampler.select_coreset_idxs(), dtype=np.int64)
    return indices, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=lambda v: [int(s) for s in v.split(",")], default=[50, 350])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for anomalib")
    args = parser.parse_args()
    import anomalib
    import torch

    from patchcore_edge.export.coreset import coverage_radius
    from patchcore_edge.export.coreset_select import select_coreset

    torch.set_num_threads(args.threads)
    features = np.ascontiguousarray(np.load(CACHE, allow_pickle=False))
    n, size = len(features), int(len(features) * args.ratio)
    start, cpu = time.perf_counter(), time.process_time()
    ours = select_coreset(features, size)
    emit({"what": f"ours select_coreset ({ours.method}, {ours.cells} cell(s)), all bottle", "n": n, "size": size,
          "wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
          "radius": coverage_radius(features, ours.indices), "radius_recorded": ours.radius})
    few, many = args.steps
    _, t_few = anomalib_select(features, args.ratio, few)
    _, t_many = anomalib_select(features, args.ratio, many)
    per_step = (t_many - t_few) / (many - few)
    emit({"what": f"anomalib {anomalib.__version__} KCenterGreedy, all bottle, partial", "n": n,
          "steps": [few, many], "seconds": [t_few, t_many], "per_step_ms": per_step * 1e3,
          "full_run_s_extrapolated": t_few + per_step * (int(n * args.ratio) - few), "torch_threads": args.threads})
    sub = np.ascontiguousarray(features[:args.images * 784])
    indices, seconds = anomalib_select(sub, args.ratio)
    start = time.perf_counter()
    ours_sub = select_coreset(sub, len(indices)).indices
    ours_seconds = time.perf_counter() - start
    emit({"what": f"first {args.images} images, complete", "n": len(sub), "size": len(indices),
          "anomalib_s": seconds, "anomalib_radius": coverage_radius(sub, indices),
          "anomalib_unique": int(np.unique(indices).size),
          "ours_s": ours_seconds, "ours_radius": coverage_radius(sub, ours_sub)})


if __name__ == "__main__":
    main()
