"""Benchmark: Patch SVDD and multi-scale bundles made and scored by the real CLI, after a time-boxed CPU training
(issue 16), next to a PatchCore bundle on the same images.

    python benchmarks/trained_methods.py --method patch_svdd --minutes 5 [--data DIR] [--crop 224]
    python benchmarks/trained_methods.py --method patch_svdd --steps 260 --checkpoint CK --name N
    python benchmarks/trained_methods.py --patchcore BUNDLE          # eval an existing PatchCore bundle only

A schedule fixed by --steps gives the same weights whatever the machine's load (the training is seeded);
--minutes is then only a safety cap (0: none). --checkpoint resumes a run (e.g. 10 minutes' worth of steps,
then more steps to reach 30). Training runs under `nice -n 10` with one thread; the record keeps the steps
done, the training's CPU and wall seconds (from the manifest) and the export process's CPU seconds.

For each method: `patchcore-edge export DATA/train/good --method M --method-param minutes=N ...` (timed, its
stderr kept), the bundle's size on disk, then `patchcore-edge eval BUNDLE DATA --report R` (image/pixel AUROC,
AUPRO) under `nice -n 10`, and the median predict latency at batch 1 over the test images as a short run under
`flock /work/coord/bench.lock` when that lock file exists.
One JSON line per run goes to out/trained_methods/results.jsonl (git-ignored), with `uptime` before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"
LOCK = Path("/work/coord/bench.lock")
CLI = [sys.executable, "-c", "import sys; from patchcore_edge.cli import main; sys.argv[0] = 'patchcore-edge'; main()"]


def uptime() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[:3].__str__()


USE_LOCK = True


def run(args: List[str], locked: bool = False, nice: int = 0) -> subprocess.CompletedProcess:
    command = list(args)
    if nice:
        command = ["nice", "-n", str(nice)] + command
    if locked and USE_LOCK and LOCK.exists():
        command = ["flock", str(LOCK)] + command
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run(command, env=env, capture_output=True, text=True)


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def evaluate(bundle: Path, data: Path, report: Path) -> Dict[str, Any]:
    """Accuracy by `patchcore-edge eval` under `nice -n 10` without the lock (its pixel metrics at native
    resolution take minutes, too long to hold the shared lock; its own predict timing is then under load),
    then the latency as a separate short run under the lock (`latency`)."""
    done = run(CLI + ["eval", str(bundle), str(data), "--report", str(report)], nice=10)
    if done.returncode != 0:
        raise SystemExit(f"eval failed: {done.stderr[-2000:]}")
    found = json.loads(report.read_text())
    row = found["rows"][0] if "rows" in found else found
    return {"metrics": row.get("metrics"), "timing_unlocked": row.get("timing"), "eval_stdout": done.stdout[-3000:],
            "latency": latency(bundle, data)}


LATENCY = """
import json, statistics, sys, time
from pathlib import Path
from patchcore_edge.imageio import read_rgb
from patchcore_edge.runtime.detector import Detector
bundle, data = sys.argv[1], Path(sys.argv[2])
images = [read_rgb(p) for p in sorted((data / "test").glob("*/*.png"))]
load = open("/proc/loadavg").read().split()[:3]
with Detector.load(bundle) as detector:
    for image in images[:3]:
        detector.predict(image)  # warm-up
    ms = []
    for image in images:
        t0 = time.perf_counter()
        detector.predict(image)
        ms.append((time.perf_counter() - t0) * 1000)
print(json.dumps({"images": len(ms), "median_ms": statistics.median(ms), "p90_ms": sorted(ms)[int(0.9 * len(ms))],
                  "load_before": load, "load_after": open("/proc/loadavg").read().split()[:3]}))
"""


def latency(bundle: Path, data: Path) -> Dict[str, Any]:
    """Median wall ms of Detector.predict (decoded image in, batch 1, the bundle's default threads) over every
    test image, after 3 warm-up images, under the bench lock when it exists."""
    done = run([sys.executable, "-c", LATENCY, str(bundle), str(data)], locked=True)
    if done.returncode != 0:
        return {"error": done.stderr[-1000:]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), locked=USE_LOCK and LOCK.exists())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("patch_svdd", "multiscale"))
    parser.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget (0: none)")
    parser.add_argument("--steps", type=int, default=100000, help="training steps (the schedule, when fixed)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="resume from / save to this file")
    parser.add_argument("--param", action="append", default=[], help="more --method-param K=V for export")
    parser.add_argument("--name", default=None, help="bundle / report name (default from the settings)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--max-bank", type=int, default=20000)
    parser.add_argument("--coreset-ratio", type=float, default=1.0)
    parser.add_argument("--patchcore", type=Path, default=None, help="evaluate this PatchCore bundle instead")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="evaluate this trained bundle (exported before) instead of exporting one")
    parser.add_argument("--no-lock", action="store_true", help="do not wait for the shared benchmark lock")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "trained_methods")
    args = parser.parse_args()
    global USE_LOCK
    USE_LOCK = not args.no_lock
    args.out.mkdir(parents=True, exist_ok=True)
    record: Dict[str, Any] = {"load_before": uptime(), "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    record["bench_lock"] = USE_LOCK
    if args.patchcore is not None or args.bundle is not None:
        given = args.patchcore if args.patchcore is not None else args.bundle
        manifest = json.loads((given / "manifest.json").read_text())
        record.update(method=manifest["method"]["name"], bundle=str(given), bundle_mb=folder_mb(given),
                      training=manifest["method"]["params"].get("training"),
                      banks=manifest["method"]["params"].get("banks"))
        record.update(evaluate(given, args.data, args.out / f"{given.name}.eval.json"))
    else:
        name = args.name or f"{args.method}_{args.minutes:g}min_cr{args.coreset_ratio:g}"
        bundle = args.out / name
        params = [f"minutes={args.minutes}", f"steps={args.steps}", f"max_bank={args.max_bank}",
                  f"coreset_ratio={args.coreset_ratio}", *args.param]
        if args.checkpoint is not None:
            params.append(f"checkpoint={args.checkpoint}")
        command = CLI + ["export", str(args.data / "train" / "good"), "-o", str(bundle), "--method", args.method,
                         "--crop", str(args.crop), "--no-engine", "--force"]
        for p in params:
            command += ["--method-param", p]
        start = time.perf_counter()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = run(command, nice=10)
        export_s = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        record["export_cpu_s"] = round((after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime), 1)
        record["load_after_export"] = uptime()
        (args.out / f"{name}.export.log").write_text(done.stderr + done.stdout)
        if done.returncode != 0:
            raise SystemExit(f"export failed: {done.stderr[-2000:]}")
        manifest = json.loads((bundle / "manifest.json").read_text())
        record.update(method=args.method, minutes=args.minutes, crop=args.crop, params=params,
                      export_s=export_s, export_summary=done.stdout[-2000:], bundle_mb=folder_mb(bundle),
                      training=manifest["method"]["params"]["training"],
                      banks=manifest["method"]["params"]["banks"])
        record.update(evaluate(bundle, args.data, args.out / f"{name}.eval.json"))
    record["load_after"] = uptime()
    with (args.out / "results.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "eval_stdout"}, indent=1))


if __name__ == "__main__":
    main()
