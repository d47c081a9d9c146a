"""runtime_bench.py --anomalib ONNX: our bundle and anomalib 2.7's exported PatchCore, in one process, side by side.

Both run on ONNX Runtime's CPU provider with the same thread count, on images decoded beforehand (decoding is
not timed for either). Ours: `Detector.predict_batch` with maps, its own per-stage `timing_ms`. anomalib's:
its whole exported graph (resize + normalise, MobileNetV2, exact `cdist` search, score, anomaly map) after the
uint8 -> float [0, 1] CHW conversion its input needs (timed as its pre-processing). Passes interleave the
variants (ours b1, anomalib b1, ours b8, anomalib b8; anomalib once per round when its graph has a fixed batch, as
anomalib 2.7's export has); each figure is the median over the passes of the mean ms
per image in a pass (wall time; the CPU time of the process, all its threads, beside it). Then the same with a competing load that this benchmark starts itself: one process that
keeps one core busy (a Python spin loop), stopped at the end.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

from patchcore_edge.imageio import read_rgb
from patchcore_edge.runtime.detector import Detector

STAGES = ("preprocess", "features", "search_score", "map")
BATCHES = (1, 8)
RSS_CHILD = """
import sys, numpy as np
from patchcore_edge.imageio import read_rgb
from patchcore_edge.runtime.detector import Detector
paths = sys.argv[2:]
with Detector.load(sys.argv[1], backend="onnxruntime") as d:
    for p in paths:
        d.predict_batch([read_rgb(p)])
print("torch" in sys.modules, [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
"""


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def ours_pass(detector: Detector, images: Sequence[np.ndarray], batch: int) -> Dict[str, float]:
    sums: Dict[str, float] = defaultdict(float)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(images), batch):
        for result in detector.predict_batch(images[i:i + batch], maps=True):
            for key in STAGES:
                sums[key] += result.timing_ms.get(key, 0.0)
    out = {key: sums[key] / len(images) for key in STAGES}
    out["total"] = (time.perf_counter() - start) * 1000 / len(images)
    out["cpu"] = (time.process_time() - cpu) * 1000 / len(images)
    return out


def anomalib_pass(session: Any, name: str, images: Sequence[np.ndarray], batch: int) -> Dict[str, float]:
    # anomalib's to_onnx(input_size=...) pins the batch of its probe input (2): such a graph runs at that batch.
    fixed = session.get_inputs()[0].shape[0]
    batch = fixed if isinstance(fixed, int) else batch
    images = images[:len(images) - len(images) % batch]
    prep = run = 0.0
    cpu = time.process_time()
    for i in range(0, len(images), batch):
        start = time.perf_counter()
        x = np.stack([np.ascontiguousarray(im.transpose(2, 0, 1), dtype=np.float32) for im in images[i:i + batch]])
        x *= np.float32(1.0 / 255.0)
        middle = time.perf_counter()
        session.run(None, {name: x})
        prep += middle - start
        run += time.perf_counter() - middle
    n = len(images)
    return {"preprocess": prep * 1000 / n, "graph": run * 1000 / n, "total": (prep + run) * 1000 / n,
            "cpu": (time.process_time() - cpu) * 1000 / n}


def median(passes: List[Dict[str, float]]) -> Dict[str, float]:
    return {key: statistics.median(p[key] for p in passes) for key in passes[0]}


def condition(detector: Detector, session: Any, name: str, images: Sequence[np.ndarray], runs: int,
              busy: bool) -> Dict[str, Any]:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        time.sleep(0.5 if busy else 0.0)
        for batch in BATCHES:  # warm-up
            ours_pass(detector, images[:8], batch)
            anomalib_pass(session, name, images[:8], batch)
        before = uptime()
        passes: Dict[str, List[Dict[str, float]]] = defaultdict(list)
        # A graph with a fixed batch runs at that batch whatever is asked: one anomalib pass per round then serves
        # both of our batch sizes (it is the slow one: this halves the run).
        fixed = isinstance(session.get_inputs()[0].shape[0], int)
        for _ in range(runs):
            for batch in BATCHES:
                passes[f"ours b{batch}"].append(ours_pass(detector, images, batch))
                if not fixed or batch == BATCHES[0]:
                    passes[f"anomalib b{batch}"].append(anomalib_pass(session, name, images, batch))
        if fixed:
            passes[f"anomalib b{BATCHES[-1]}"] = passes[f"anomalib b{BATCHES[0]}"]
        return {"medians": {key: median(value) for key, value in passes.items()}, "uptime": [before, uptime()]}
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


def peak_rss_mb(bundle: Path, paths: Sequence[Path]) -> str:
    done = subprocess.run([sys.executable, "-c", RSS_CHILD, str(bundle), *map(str, paths)], capture_output=True,
                          text=True, check=True)
    torch_loaded, kib = done.stdout.split()
    return f"{int(kib) * 1024 / 1e6:.0f} MB (torch imported: {torch_loaded.lower()})"


def _first_pass(detector: Detector) -> str:
    index = getattr(getattr(detector.scorer, "search", None), "index", None)
    kernel = getattr(index, "kernel", None)
    return "hnswlib" if kernel is None else f"k-means cells, {kernel}"


def side_by_side(args: Any, paths: Sequence[Path]) -> None:
    reason = None
    try:
        import onnxruntime as ort  # type: ignore[import-untyped]
    except ImportError:
        reason = "onnxruntime is not installed"
    if reason is None and not args.anomalib.is_file():
        reason = f"{args.anomalib}: no such file (export it with benchmarks/anomalib_export.py)"
    if reason is not None:
        print(f"side by side with anomalib skipped: {reason}")
        return
    images = [read_rgb(p) for p in paths]
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(args.anomalib), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    import patchcore_edge
    detector = Detector.load(args.bundle, backend="onnxruntime", threads=args.threads)
    exact = Detector.load(args.bundle, backend="onnxruntime", threads=args.threads, exact_search=True)
    equal = sum(a.score == b.score for a, b in zip(detector.predict_batch(images, maps=False),
                                                   exact.predict_batch(images, maps=False)))
    exact.close()
    blocks = [(label, busy) for label, busy in (("quiet", False), ("one core kept busy by a spin loop", True))
              if args.condition in ("both", "busy" if busy else "quiet")]
    results = {label: condition(detector, session, name, images, args.runs, busy) for label, busy in blocks}
    detector.close()
    rss = peak_rss_mb(args.bundle, paths)
    lines = ["# Side by side with anomalib 2.7's exported PatchCore (issue 13)", "",
             f"- Command: `{sys.executable} benchmarks/runtime_bench.py {' '.join(args.argv)}`",
             f"- patchcore_edge imported from {Path(patchcore_edge.__file__).parent}; onnxruntime {ort.__version__}, "
             f"{args.threads} threads for both; {len(images)} bottle test images, decoded beforehand; maps on",
             f"- Our first pass: {_first_pass(detector)}",
             f"- anomalib model: `{args.anomalib}` ({_anomalib_note(args.anomalib)})",
             f"- Our image scores equal to exact search: {equal}/{len(images)}",
             f"- Peak resident memory of a fresh runtime process (load, score every image at batch 1): {rss}",
             f"- Median of {args.runs} interleaved passes per variant (ms per image).", ""]
    if args.condition != "both":
        lines.append(f"- This file holds the `{args.condition}` block only (`--condition {args.condition}`).\n")
    for label, r in results.items():
        m = r["medians"]
        lines += [f"## {label}", "", f"uptime before: `{r['uptime'][0]}`; after: `{r['uptime'][1]}`", "",
                  "| variant | preprocess | features | search+score | map | total | anomalib total / ours | CPU ms "
                  "(all threads) | anomalib CPU / ours |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for batch in BATCHES:
            ours, theirs = m[f"ours b{batch}"], m[f"anomalib b{batch}"]
            lines.append(f"| ours, batch {batch} | " + " | ".join(f"{ours[k]:.2f}" for k in STAGES)
                         + f" | **{ours['total']:.2f}** | **{theirs['total'] / ours['total']:.2f}x** | {ours['cpu']:.2f} | "
                         f"{theirs['cpu'] / ours['cpu']:.2f}x |")
            fixed = session.get_inputs()[0].shape[0]
            lines.append(f"| anomalib ONNX, batch {fixed if isinstance(fixed, int) else batch} | {theirs['preprocess']:.2f} | whole graph "
                         f"{theirs['graph']:.2f} | - | - | {theirs['total']:.2f} | | {theirs['cpu']:.2f} | |")
        ours = m["ours b1"]
        eight = m["ours b8"]
        lines += ["", f"(search+score+map) / features: batch 1 "
                      f"{(ours['search_score'] + ours['map']) / ours['features']:.2f}, batch 8 "
                      f"{(eight['search_score'] + eight['map']) / eight['features']:.2f}", ""]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"report written to {args.out}")


def _anomalib_note(onnx: Path) -> str:
    record = onnx.parent.parent.parent / "anomalib_export.json"
    if not record.is_file():
        return "made by benchmarks/anomalib_export.py"
    info = json.loads(record.read_text())
    return (f"anomalib {info['anomalib']}, bank {info['memory_bank']}, input {info['input_size']}, "
            f"made by benchmarks/anomalib_export.py")
