"""Issue 13: the nearest-neighbour first pass, option by option, on a real bundle's bank and on a 100k bank.

    flock /work/coord/bench.lock python benchmarks/search_options.py BUNDLE [--runs 5] [--out FILE.md]

Features are the bundle's own `features.onnx` (ONNX Runtime, no torch) of MVTec bottle test images (queries) and
training images (the 100k bank: a random 100k subset of all training patches). Every option is a *first pass*:
it names one bank row per patch; its distance is recomputed by `row_distances`, so it is an upper bound of the
exact nearest distance, and `scoring.image_scores`' re-rank makes the image score exact whatever the option (the
table checks it against exact search). Timings: ms per image (784 patches), median over rounds in which the
options take turns, with the thread count stated. The time is the process's CPU time (all its threads), not
wall time: on a machine shared by 8 agents (load 10-17 on 2 cores) wall times were inflated several-fold.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from patchcore_edge.bundle import Bundle  # noqa: E402
from patchcore_edge.imageio import read_rgb  # noqa: E402
from patchcore_edge.preprocess import preprocess  # noqa: E402
from patchcore_edge.scoring import image_scores  # noqa: E402
from patchcore_edge.search import (CellIndex, PatchSearch, blas_threads, build_index, default_cells,  # noqa: E402
                                  row_distances)
from _machine import cpu_model  # noqa: E402

BOTTLE = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"


def features_of(bundle: Bundle, paths: Sequence[Path]) -> np.ndarray:
    import onnxruntime as ort  # type: ignore[import-untyped]

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(bundle.path / bundle.features.onnx_file), options,
                                   providers=["CPUExecutionProvider"])
    out = []
    for path in paths:
        x = preprocess(read_rgb(path), bundle.input_spec)[None]
        grid = session.run([bundle.features.output_name], {bundle.features.input_name: x})[0]
        out.append(grid.reshape(-1, grid.shape[-1]))
    return np.stack(out).astype(np.float32)


def faiss_ivf(bank: np.ndarray, nlist: int, nprobe: int, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    import faiss  # type: ignore[import-untyped]

    faiss.omp_set_num_threads(threads)
    quantizer = faiss.IndexFlatL2(bank.shape[1])
    index = faiss.IndexIVFFlat(quantizer, bank.shape[1], nlist)
    index.cp.seed = 0
    index.train(bank)
    index.add(bank)
    index.nprobe = nprobe

    def search(q: np.ndarray) -> np.ndarray:
        faiss.omp_set_num_threads(threads)
        return index.search(q, 1)[1][:, 0]
    return search


def faiss_hnsw(bank: np.ndarray, ef: int, threads: int, sq8: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    import faiss  # type: ignore[import-untyped]

    faiss.omp_set_num_threads(2)
    index = (faiss.IndexHNSWSQ(bank.shape[1], faiss.ScalarQuantizer.QT_8bit, 16) if sq8
             else faiss.IndexHNSWFlat(bank.shape[1], 16))
    index.hnsw.efConstruction = 200
    if sq8:
        index.train(bank)
    index.add(bank)
    index.hnsw.efSearch = ef

    def search(q: np.ndarray) -> np.ndarray:
        faiss.omp_set_num_threads(threads)
        return index.search(q, 1)[1][:, 0]
    return search


def hnswlib_pass(index: Any, ef: int, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    def search(q: np.ndarray) -> np.ndarray:
        index.set_ef(ef)
        return index.knn_query(q, k=1, num_threads=threads)[0][:, 0].astype(np.int64)
    return search


def projected_pass(bank: np.ndarray, dims: int, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """Low-dimensional PCA projection, BLAS brute force there; the chosen row is then a real bank row."""
    centre = bank.mean(axis=0)
    _, _, vt = np.linalg.svd(bank[:: max(1, bank.shape[0] // 20000)] - centre, full_matrices=False)
    basis = np.ascontiguousarray(vt[:dims].T, dtype=np.float32)
    low = (bank - centre) @ basis
    norms = np.einsum("ij,ij->i", low, low)

    def search(q: np.ndarray) -> np.ndarray:
        with blas_threads(threads):
            ql = (q - centre) @ basis
            values = ql @ low.T
        values *= -2.0
        values += norms
        return values.argmin(axis=1)
    return search


def float16_pass(bank: np.ndarray, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    half = bank.astype(np.float16)
    norms = np.einsum("ij,ij->i", bank, bank)

    def search(q: np.ndarray) -> np.ndarray:
        values = (q.astype(np.float16) @ half.T).astype(np.float32)
        values *= -2.0
        values += norms
        return values.argmin(axis=1)
    return search


def exact_pass(search: PatchSearch, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    def run(q: np.ndarray) -> np.ndarray:
        search.set_threads(threads)
        return search.exact_nearest(q)[1]
    return run


def cells_pass(cells: CellIndex, probes: int) -> Callable[[np.ndarray], np.ndarray]:
    """The runtime's first pass (search.CellIndex): one BLAS thread."""
    def run(q: np.ndarray) -> np.ndarray:
        return cells.nearest_rows(q, probes)
    return run


def timed(options: Dict[str, Callable[[np.ndarray], np.ndarray]], queries: np.ndarray, rounds: int
          ) -> Dict[str, float]:
    times: Dict[str, List[float]] = {name: [] for name in options}
    for name, call in options.items():
        call(queries[0])
    for _ in range(rounds):
        for name, call in options.items():
            start = time.process_time()
            for q in queries:
                call(q)
            times[name].append((time.process_time() - start) * 1000 / len(queries))
    return {name: statistics.median(values) for name, values in times.items()}


def quality(call: Callable[[np.ndarray], np.ndarray], bank: np.ndarray, queries: np.ndarray,
            exact: np.ndarray) -> Dict[str, float]:
    flat = queries.reshape(-1, queries.shape[-1])
    rows = np.concatenate([call(q) for q in queries]).astype(np.int64)
    found = row_distances(flat, bank[rows])
    excess = found / np.maximum(exact, 1e-12) - 1.0
    return {"recall": float(np.mean(found <= exact)), "excess_max": float(excess.max()),
            "excess_mean": float(excess.mean())}


def score_check(bank: np.ndarray, index: Any, queries: np.ndarray, ef: int) -> str:
    neighbours = np.tile(np.arange(bank.shape[0], dtype=np.int32)[:, None], (1, 1))
    fast = PatchSearch(bank, index, ef=ef, threads=1) if index is not None else PatchSearch.with_cells(bank, threads=1)
    exact = PatchSearch(bank, None, threads=1)
    a = image_scores(queries, fast, neighbours)
    b = image_scores(queries, exact, neighbours)
    equal = sum(x.score == y.score and x.argmax == y.argmax for x, y in zip(a, b))
    return f"{equal}/{len(a)} image scores bit-identical to exact search (re-ranked {sorted({x.reranked for x in a})})"


def bench(name: str, bank: np.ndarray, index: Any, queries: np.ndarray, rounds: int, small: bool) -> List[str]:
    search = PatchSearch(bank, index)
    exact_rows = np.concatenate([search.exact_nearest(q)[1] for q in queries])
    exact = row_distances(queries.reshape(-1, queries.shape[-1]), bank[exact_rows])
    nlist = int(4 * np.sqrt(bank.shape[0]))
    options: Dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    k = default_cells(bank.shape[0])
    for count in sorted({k // 2, k, 2 * k}):
        start = time.process_time()
        cells = CellIndex(bank, count)
        built = (time.process_time() - start) * 1000
        for probes in (2, 3, 4):
            options[f"k-means cells {count} (built in {built:.0f} CPU ms), {probes} probes, 1 thr"] = cells_pass(
                cells, probes)
    options["float32 BLAS brute force, 1 thr"] = exact_pass(search, 1)
    for ef in (8, 16, 32, 64):
        options[f"hnswlib ef {ef}, 1 thr"] = hnswlib_pass(index, ef, 1)
    try:
        for threads in (1,):
            for nprobe in (4, 8, 16):
                options[f"faiss IVFFlat nlist {nlist} nprobe {nprobe}, {threads} thr"] = faiss_ivf(
                    bank, nlist, nprobe, threads)
        for ef in ((16, 32) if small else ()):
            options[f"faiss HNSWFlat M 16 ef {ef}, 1 thr"] = faiss_hnsw(bank, ef, 1)
            options[f"faiss HNSW-SQ8 M 16 ef {ef}, 1 thr"] = faiss_hnsw(bank, ef, 1, sq8=True)
    except ImportError:
        pass
    options["PCA 16-d projection + BLAS, 1 thr"] = projected_pass(bank, 16, 1)
    options["PCA 32-d projection + BLAS, 1 thr"] = projected_pass(bank, 32, 1)
    # The whole search as the runtime runs it: first pass + exact re-rank (scoring.image_scores), one image a call.
    neighbours = np.tile(np.arange(bank.shape[0], dtype=np.int32)[:, None], (1, 1))
    runtime = PatchSearch.with_cells(bank, threads=1)
    whole: Dict[str, Callable[[np.ndarray], Any]] = {
        f"runtime search: cells {runtime.index.cells}, {runtime.ef} probes + exact re-rank (image_scores), 1 thr":
            lambda q: image_scores(q[None], runtime, neighbours),
        "hnswlib ef 32 + exact re-rank (image_scores), 1 thr":
            lambda q: image_scores(q[None], PatchSearch(bank, index, ef=32, threads=1), neighbours)}
    times = timed({**options, **whole}, queries, rounds)
    # numpy has no float16 BLAS kernel (a generic loop): one call, for the record.
    half = float16_pass(bank, 1)
    start = time.process_time()
    half(queries[0])
    half_ms = (time.process_time() - start) * 1000
    base = times["float32 BLAS brute force, 1 thr"]
    lines = [f"## {name}", "", "| first pass | CPU ms per image | vs float32 brute force 1 thr | recall@1 "
             "(distance equal to exact) | worst / mean over-estimate |", "|---|---|---|---|---|"]
    for option, ms in times.items():
        if option in whole:
            lines.append(f"| **{option}** | {ms:.2f} | **{base / ms:.1f}x** | image score exact | - |")
            continue
        q = quality(options[option], bank, queries, exact)
        lines.append(f"| {option} | {ms:.2f} | {base / ms:.1f}x | {q['recall']:.4f} | "
                     f"{q['excess_max']:.3f} / {q['excess_mean']:.1e} |")
    lines += ["", f"float16 bank with numpy matmul (no float16 BLAS in numpy): {half_ms:.0f} CPU ms for one image.",
              "", "Image scores (hnswlib ef 16 first pass + the exact re-rank): "
              + score_check(bank, index, queries, 16),
              "", "Image scores (the runtime's default: k-means cells, default probes, + the exact re-rank): "
              + score_check(bank, None, queries, 0), ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--data", type=Path, default=BOTTLE)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--queries", type=int, default=12)
    parser.add_argument("--extra", nargs=3, action="append", default=[], metavar=("NAME", "BUNDLE", "DATA"),
                        help="another bank: a bundle and a folder whose test/*/*.png give the queries")
    parser.add_argument("--no-100k", action="store_true", help="skip the 100k bank")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    load = [os.getloadavg()[0]]
    lines = [f"# Search first-pass options (issue 13)", "",
             f"- Machine: {cpu_model()}, {os.cpu_count()} logical CPUs shared with other agents",
             f"- Command: `{' '.join(sys.argv)}`",
             f"- Queries: {args.queries} test images x their patches per bank; CPU ms per image, median of {args.runs} "
             "rounds in which the options take turns", ""]
    first = None
    for name, bundle_dir, data in [("bottle", str(args.bundle), str(args.data)), *args.extra]:
        bundle = Bundle.load(Path(bundle_dir))
        tests = sorted((Path(data) / "test").glob("*/*.png"))
        pick = np.random.default_rng(0).choice(len(tests), min(args.queries, len(tests)), replace=False)
        queries = features_of(bundle, [tests[i] for i in sorted(pick)])
        bank = np.ascontiguousarray(bundle.method_array("memory_bank"), dtype=np.float32)
        # PatchCore bundles no longer carry an hnswlib index (the runtime's first pass is the cells); built here
        # for the comparison, as for the 100k bank.
        index = build_index(bank, threads=2)
        lines += bench(f"{name} bank {bank.shape[0]} x {bank.shape[1]} (bundle {bundle_dir})", bank, index, queries,
                       args.runs, True)
        first = first or (bundle, queries)
    if not args.no_100k:
        bundle, queries = first
        train = features_of(bundle, sorted((args.data / "train" / "good").glob("*.png")))
        flat = train.reshape(-1, train.shape[-1])
        big = np.ascontiguousarray(flat[np.sort(np.random.default_rng(1).choice(flat.shape[0], 100_000,
                                                                                  replace=False))])
        start = time.time()
        big_index = build_index(big, threads=2)
        lines.append(f"100k hnswlib index built in {time.time() - start:.0f} s (2 threads)")
        lines += bench(f"100k x {big.shape[1]} bank (random subset of the bottle training patches)", big, big_index,
                       queries, args.runs, False)
    load.append(os.getloadavg()[0])
    lines.insert(4, f"- Load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f}; "
                    f"uptime after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
