"""SPADE and PaDiM next to PatchCore, each from a real bundle made by `patchcore-edge export --method ...`.

    flock /work/coord/bench.lock nice -n 10 env OMP_NUM_THREADS=1 \
        python benchmarks/methods_bench.py [--datasets bottle elpv] [--elpv-train 200 --elpv-test 50]

For every data set (MVTec bottle; ELPV solar cells from the `elpv-dataset` package, image labels only) and
method, the bundle is exported by the command line (the export's wall time and its stage times are recorded),
then evaluated with the package's own `evaluate` on a runtime `Detector` (ONNX Runtime): image AUROC, pixel
AUROC and AUPRO where there are masks, median per-stage latency (Result.timing_ms) and the bundle's size.
Writes benchmarks/results/methods.md (the hand-written reading at its end must be redone from the new table).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from _machine import cpu_model  # noqa: E402
from geometry_bench import BOTTLE, bottle_subset, elpv_subset  # noqa: E402
from patchcore_edge.evaluation.dataset import discover_mvtec  # noqa: E402
from patchcore_edge.evaluation.evaluate import evaluate  # noqa: E402
from patchcore_edge.runtime.detector import Detector  # noqa: E402

METHODS = {"patchcore": [], "spade": [], "padim": []}  # defaults: K=50, kappa=1, float32; PaDiM d=64
STAGES = ("preprocess", "features", "search_score", "map")
RESULTS = REPO / "benchmarks" / "results" / "methods.md"


def export(method: str, train: Path, bundle: Path, pixel_args: List[str]) -> Dict[str, Any]:
    command = [str(Path(sys.executable).parent / "patchcore-edge"), "export", str(train), "-o", str(bundle),
               "--method", method, "--no-engine", "--force", "-q", *METHODS[method]]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    stages = re.search(r"^time\s+(.*)$", done.stdout, re.M)
    return {"export_s": wall, "export_stages": stages.group(1) if stages else "", "stdout": done.stdout}


def measure(name: str, data: Path, method: str, scratch: Path, pixel_size: Optional[int],
            reuse: bool = False) -> Dict[str, Any]:
    bundle = scratch / "bundles" / f"{name}-{method}"
    saved = scratch / f"{name}-{method}.json"
    if reuse and saved.is_file():  # a row measured by an earlier run of this script (its load is in the row)
        row = json.loads(saved.read_text())
        row.pop("report", None)
        row["reused"] = True
        return row
    row: Dict[str, Any] = {"data": name, "method": method, **export(method, data / "train" / "good", bundle, [])}
    with Detector.load(bundle, backend="onnxruntime") as detector:
        report = evaluate(detector, discover_mvtec(data), pixel_size=pixel_size)
        row["params"] = {k: v for k, v in detector.bundle.method.params.items() if k != "channels"}
    metrics = report["metrics"]
    row.update({k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")})
    row["stages_ms"] = {k: report["timing"]["stages_ms_median"].get(k) for k in STAGES}
    row["predict_ms"] = report["timing"]["predict_ms_median"]
    row["bundle_mb"] = sum(f.stat().st_size for f in bundle.iterdir() if f.is_file()) / 2**20
    row["images"] = (metrics.get("n_good"), metrics.get("n_anomalous"))
    row["load"] = os.getloadavg()[0]
    (scratch / f"{name}-{method}.json").write_text(json.dumps({**row, "report": report}, indent=1, default=str))
    print(f"[{name}] {method}: image {row['image_auroc']}, pixel {row['pixel_auroc']}, aupro {row['aupro']}, "
          f"stages {row['stages_ms']}, {row['bundle_mb']:.1f} MB, export {row['export_s']:.0f}s "
          f"({row['export_stages']}), load {row['load']:.1f}", flush=True)
    return row


def _f(value: Optional[float], digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(rows: List[Dict[str, Any]]) -> List[str]:
    lines = ["| data | method | image AUROC | pixel AUROC | AUPRO@0.3 | preprocess ms | network ms | scorer ms | "
             "map ms | bundle MB | export s (stages) | load |", "| " + " | ".join(["---"] * 12) + " |"]
    for row in rows:
        stages = row["stages_ms"]
        lines.append(f"| {row['data']} | {row['method']} | {_f(row['image_auroc'])} | {_f(row['pixel_auroc'])} | "
                     f"{_f(row['aupro'])} | " + " | ".join(_f(stages.get(k), 1) for k in STAGES)
                     + f" | {row['bundle_mb']:.1f} | {row['export_s']:.0f} ({row['export_stages']}) | "
                     f"{row['load']:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["bottle", "elpv"], choices=("bottle", "elpv"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--elpv-train", type=int, default=200)
    parser.add_argument("--elpv-test", type=int, default=50, help="ELPV test images per class")
    parser.add_argument("--pixel-size", type=int, default=None, help="pixel metrics size (default: native)")
    parser.add_argument("--scratch", type=Path, default=REPO / "out" / "methods_bench")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--reuse", nargs="*", default=[], metavar="DATA-METHOD",
                        help="rows to take from an earlier run's JSON in --scratch, e.g. bottle-patchcore")
    args = parser.parse_args()
    scratch = args.scratch
    scratch.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()
    data = {"bottle": bottle_subset(scratch, 10_000),
            "elpv": elpv_subset(scratch, args.elpv_train, args.elpv_test)}
    rows = [measure(name, data[name], method, scratch, args.pixel_size, f"{name}-{method}" in args.reuse)
            for name in args.datasets for method in args.methods]
    load_after = os.getloadavg()
    header = [
        "# SPADE and PaDiM next to PatchCore, from real bundles (`patchcore-edge export --method ...`)", "",
        f"- machine: {cpu_model()}, 2 logical cores shared with other engineers' jobs, no GPU; torch CPU, "
        "ONNX Runtime CPU (the Detector's default: all cores this process may use)",
        f"- command: `flock /work/coord/bench.lock nice -n 10 env OMP_NUM_THREADS=1 python "
        f"benchmarks/methods_bench.py {' '.join(sys.argv[1:])}` ({started}); load average (1/5/15 min) "
        f"before {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f}, after "
        f"{load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f}; one run per bundle (latencies are medians "
        "over the test images, batch 1)",
        "- bundles: the export defaults (MobileNetV2 offline weights, fit squash to 224 x 224, stride-8 grid "
        "28 x 28, map sigma 4 px); PatchCore coreset 10 %; SPADE K=50, kappa=1, float32 gallery; PaDiM d=64 of "
        "192 channels (seed 0), regularisation 0.01",
        f"- data: bottle = all 209 train/good, 83 test images, pixel metrics at native 900 x 900; ELPV = "
        f"{args.elpv_train} good cells for training, {args.elpv_test} good + {args.elpv_test} defective "
        "(probability 1.0) for test, no masks (pixel metrics n/a)",
        "- stage ms: Result.timing_ms medians (network = ONNX Runtime, scorer = the method's numpy scorer); "
        "bundle MB: every file of the bundle; export s: wall time of the command (its stage times in brackets); "
        "load: the 1-minute load average when the row's evaluation ended",
        "",
    ]
    args.out.write_text("\n".join(header + table(rows)) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
