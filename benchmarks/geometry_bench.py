"""Benchmark (issue 18, issue 11 item 5): input geometry, backbones and channel-reduction order, measured with
the product itself (`export_bundle` -> `Detector` (ONNX Runtime, HNSW + exact re-rank) -> `evaluate`).

    python benchmarks/geometry_bench.py --experiments backbones strips tiles

Experiments (each writes its own section of benchmarks/results/geometry.md):
- `backbones`: every (backbone, stages, dim, reduction order, fit) candidate on two kinds of images together:
  MVTec bottle (object-like; the first --train train/good images, every test image, pixel masks) and ELPV
  solar cells (texture-like; image labels only: probability 0 good, 1 defective; no masks exist). Columns:
  image AUROC, pixel AUROC, AUPRO@0.3 (bottle only), features ms/image and whole predict ms/image (ONNX
  Runtime CPU, batch 1, median), MMACs of the exported network (conv + matmul, counted with hooks), bundle MB.
- `strips`: elongated parts made from bottle: 1:2 (450x900) and 1:4 (225x900) strips. Training strips from
  train/good images at three heights; test strips from every test image, centred on the defect's centroid row
  (good images: the middle row), the mask cut the same way. Every --fit; "ends" = defect regions whose
  centroid lies in the outer quarter at either short end, recall = share of them whose maximum map value
  exceeds the 99th percentile of the good strips' map values.
- `tiles`: bottle upscaled 3x (2700x2700); --tile 672 (every tile goes into the 224 input at the original
  bottle resolution) against the whole image squashed to 224 (9x coarser). Few images: it is slow here.

Images are written under --scratch (default out/geometry_bench/, git-ignored): MVTec images never enter the
repository. Numbers: 2-core shared machine, state the load (printed) when quoting them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import cv2  # noqa: E402

from _machine import cpu_model  # noqa: E402
from patchcore_edge.evaluation.dataset import discover_mvtec  # noqa: E402
from patchcore_edge.evaluation.evaluate import evaluate  # noqa: E402
from patchcore_edge.export.pipeline import ExportOptions, export_bundle  # noqa: E402
from patchcore_edge.runtime.detector import Detector  # noqa: E402

BOTTLE = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"
RESULTS = REPO / "benchmarks" / "results" / "geometry.md"
THREADS = [2]  # ONNX Runtime / torch threads (--threads): 1 for accuracy runs niced on the shared machine
ROW_LOG: List[Path] = []  # every outcome is appended here as one JSON line, so a stopped run keeps its rows


@dataclass(frozen=True)
class Config:
    label: str
    backbone: str = "mobilenet_v2"
    layers: Optional[Tuple[str, str]] = None
    dim: Optional[int] = None
    reduction: Optional[str] = None
    fit: str = "squash"
    size: Optional[Tuple[int, int]] = None
    tile: Optional[int] = None
    tile_overlap: int = 0


@dataclass
class Outcome:
    config: Config
    data: str
    metrics: Dict[str, Optional[float]] = field(default_factory=dict)
    features_ms: float = float("nan")
    predict_ms: float = float("nan")
    mmacs: float = float("nan")
    bundle_mb: float = float("nan")
    extra: Dict[str, Any] = field(default_factory=dict)


BACKBONE_CONFIGS = [
    Config("mobilenet_v2 6+10 96 crop (before)", fit="crop", reduction="concat"),
    Config("mobilenet_v2 6+10 96 squash", reduction="concat"),
    Config("mobilenet_v2 6+10 96 squash per-stage", reduction="per-stage"),
    Config("mobilenet_v2 6+10 96 squash 256", size=(256, 256), reduction="concat"),
    Config("mobilenet_v2 6+10 96 squash 256 per-stage", size=(256, 256), reduction="per-stage"),
    Config("mobilenet_v2 6+13 96 squash", layers=("features.6", "features.13"), reduction="concat"),
    Config("mobilenet_v2 6+13 128 squash per-stage", layers=("features.6", "features.13"), dim=128,
           reduction="per-stage"),
    Config("efficientnet_lite0 4+10 152 squash", backbone="efficientnet_lite0", reduction="concat"),
    Config("efficientnet_lite0 4+10 152 squash per-stage", backbone="efficientnet_lite0",
           reduction="per-stage"),
    Config("efficientnet_lite0 4+7 120 squash", backbone="efficientnet_lite0", layers=("blocks.4", "blocks.7"),
           dim=120, reduction="concat"),
    Config("efficientnet_lite1 6+14 152 squash", backbone="efficientnet_lite1", reduction="concat"),
    Config("efficientnet_lite2 6+14 168 squash", backbone="efficientnet_lite2", reduction="concat"),
    # 12-16: every Lite with its stride-16 tap at the middle or the end of the stride-16 blocks, per-stage.
    Config("efficientnet_lite0 4+7 120 squash per-stage", backbone="efficientnet_lite0",
           layers=("blocks.4", "blocks.7"), dim=120, reduction="per-stage"),
    Config("efficientnet_lite1 6+10 120 squash per-stage", backbone="efficientnet_lite1",
           layers=("blocks.6", "blocks.10"), dim=120, reduction="per-stage"),
    Config("efficientnet_lite1 6+14 152 squash per-stage", backbone="efficientnet_lite1", reduction="per-stage"),
    Config("efficientnet_lite2 6+10 136 squash per-stage", backbone="efficientnet_lite2",
           layers=("blocks.6", "blocks.10"), dim=136, reduction="per-stage"),
    Config("efficientnet_lite2 6+14 168 squash per-stage", backbone="efficientnet_lite2", reduction="per-stage"),
    # Session 6: PatchCore's default since (geometry.md); appended so that the numbers of the rows above stay.
    Config("efficientnet_lite1 6+10 120 squash concat (default)", backbone="efficientnet_lite1", reduction="concat"),
]
# Labels without "per-stage" use the concatenation order (the order before issue 11 item 5).
STRIP_FITS = [Config("crop", fit="crop"), Config("squash 224", fit="squash"),
              Config("letterbox 224", fit="letterbox")]


# ------------------------------------------------------------------------------------------------- data sets

def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        cv2.imwrite(str(path), image)


def _spaced(items: Sequence[Any], count: int) -> List[Any]:
    if count >= len(items):
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, count).round()]


def bottle_subset(root: Path, train: int) -> Path:
    """MVTec layout: the first `train` train/good images (links), the whole test set and masks (links)."""
    target = root / f"bottle-{train}"
    for path in sorted((BOTTLE / "train" / "good").glob("*.png"))[:train]:
        link = target / "train" / "good" / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(path)
    for folder in ("test", "ground_truth"):
        link = target / folder
        if not link.exists():
            link.symlink_to(BOTTLE / folder)
    return target


def elpv_subset(root: Path, train: int, test: int) -> Path:
    import elpv_dataset

    labels = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    rows = [line.split() for line in labels.read_text().splitlines() if line.strip()]
    good = [r[0] for r in rows if float(r[1]) == 0.0]
    bad = [r[0] for r in rows if float(r[1]) == 1.0]
    target = root / "elpv"
    images = labels.parent
    for name in _spaced(good[::2], train):
        _write(target / "train" / "good" / Path(name).name, cv2.imread(str(images / name), cv2.IMREAD_UNCHANGED))
    for name in _spaced(good[1::2], test):
        _write(target / "test" / "good" / Path(name).name, cv2.imread(str(images / name), cv2.IMREAD_UNCHANGED))
    for name in _spaced(bad, test):
        _write(target / "test" / "defect" / Path(name).name, cv2.imread(str(images / name), cv2.IMREAD_UNCHANGED))
    return target


def strip_set(root: Path, ratio: int, train: int) -> Path:
    """Bottle strips of height 900 / ratio (full width 900), as described in the module docstring."""
    height = 900 // ratio
    target = root / f"strips-1to{ratio}"
    for path in sorted((BOTTLE / "train" / "good").glob("*.png"))[:train]:
        image = cv2.imread(str(path))
        for k, top in enumerate(np.linspace(900 // 4 - height // 2, 3 * 900 // 4 - height // 2, 3).astype(int)):
            _write(target / "train" / "good" / f"{path.stem}_{k}.png", image[top:top + height])
    for folder in sorted((BOTTLE / "test").iterdir()):
        for path in sorted(folder.glob("*.png")):
            image = cv2.imread(str(path))
            if folder.name == "good":
                top = 450 - height // 2
                _write(target / "test" / "good" / path.name, image[top:top + height])
                continue
            mask = cv2.imread(str(BOTTLE / "ground_truth" / folder.name / f"{path.stem}_mask.png"),
                              cv2.IMREAD_GRAYSCALE)
            rows = np.flatnonzero(mask.any(axis=1))
            centre = int(rows.mean()) if rows.size else 450
            top = int(np.clip(centre - height // 2, 0, 900 - height))
            _write(target / "test" / folder.name / path.name, image[top:top + height])
            _write(target / "ground_truth" / folder.name / f"{path.stem}_mask.png", mask[top:top + height])
    return target


def upscaled_set(root: Path, train: int, test: int, factor: int = 3) -> Path:
    target = root / f"bottle-x{factor}-{train}"

    def up(path: Path, flags: int = cv2.IMREAD_COLOR, interpolation: int = cv2.INTER_CUBIC) -> np.ndarray:
        image = cv2.imread(str(path), flags)
        return cv2.resize(image, None, fx=factor, fy=factor, interpolation=interpolation)

    for path in sorted((BOTTLE / "train" / "good").glob("*.png"))[:train]:
        _write(target / "train" / "good" / path.name, up(path))
    for folder in sorted((BOTTLE / "test").iterdir()):
        for path in _spaced(sorted(folder.glob("*.png")), test):
            _write(target / "test" / folder.name / path.name, up(path))
            if folder.name != "good":
                mask = BOTTLE / "ground_truth" / folder.name / f"{path.stem}_mask.png"
                _write(target / "ground_truth" / folder.name / mask.name,
                       up(mask, cv2.IMREAD_GRAYSCALE, cv2.INTER_NEAREST))
    return target


# ------------------------------------------------------------------------------------------------- measuring

def count_mmacs(config: Config) -> float:
    """Multiply-accumulates of the exported network for one image (convolutions and matrix products), counted
    with forward hooks on the torch extractor (random weights: the count does not depend on them)."""
    import torch

    from patchcore_edge.export.features import build_extractor
    from patchcore_edge.preprocess import InputSpec

    spec = InputSpec(fit=config.fit, size=config.size)
    extractor, _ = build_extractor(config.backbone, "random", spec, config.dim, layers=config.layers,
                                   reduction=config.reduction)
    total = [0]

    def conv_hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        weight = module.weight  # type: ignore[union-attr]
        total[0] += int(output.numel()) * int(weight[0].numel())

    hooks = [m.register_forward_hook(conv_hook) for m in extractor.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        grid = extractor(torch.zeros(1, 3, spec.height, spec.width))
    for hook in hooks:
        hook.remove()
    reduction = extractor.aggregator.reduction
    if reduction is not None:
        total[0] += int(grid.numel()) * int(reduction.shape[0])
    return total[0] / 1e6


def run_config(config: Config, data: Path, scratch: Path, coreset: float, pixel_size: Optional[int],
               label: str) -> Outcome:
    bundle = scratch / "bundles" / f"{label}-{config.label.replace(' ', '_').replace('(', '').replace(')', '')}"
    options = ExportOptions(nominal_dir=data / "train" / "good", output=bundle, backbone=config.backbone,
                            feature_dim=config.dim, coreset_ratio=coreset, engine=False, force=True,
                            fit=config.fit, input_size=config.size, tile=config.tile,
                            tile_overlap=config.tile_overlap, reduction=config.reduction, layers=config.layers)
    start = time.perf_counter()
    export_bundle(options)
    export_s = time.perf_counter() - start
    detector = Detector.load(bundle, backend="onnxruntime", threads=THREADS[0])
    try:
        report = evaluate(detector, discover_mvtec(data), pixel_size=pixel_size)
    finally:
        detector.close()
    outcome = Outcome(config, label)
    outcome.metrics = {k: report["metrics"][k] for k in ("image_auroc", "pixel_auroc", "aupro")}
    outcome.features_ms = float(report["timing"]["stages_ms_median"].get("features", float("nan")))
    outcome.predict_ms = float(report["timing"]["predict_ms_median"])
    outcome.mmacs = count_mmacs(config)
    outcome.bundle_mb = sum(f.stat().st_size for f in bundle.iterdir() if f.is_file()) / 2**20
    outcome.extra = {"export_s": export_s, "inspected": report.get("inspected_fraction"), "bundle": bundle,
                     "per_defect": {d["defect"]: {k: d.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")}
                                    for d in report.get("per_defect", [])}}
    shown = ", ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in outcome.metrics.items())
    if ROW_LOG:
        import json

        with ROW_LOG[0].open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"data": label, "config": config.label, **outcome.metrics,
                                     "features_ms": outcome.features_ms, "predict_ms": outcome.predict_ms,
                                     "mmacs": outcome.mmacs, "bundle_mb": outcome.bundle_mb, "export_s": export_s,
                                     "inspected": outcome.extra["inspected"], "bundle": str(bundle),
                                     "per_defect": outcome.extra["per_defect"],
                                     "load": os.getloadavg()[0], "time": time.strftime("%H:%M:%S")}) + "\n")
    print(f"[{label}] {config.label}: {shown}; features {outcome.features_ms:.1f} ms, predict "
          f"{outcome.predict_ms:.1f} ms, {outcome.mmacs:.0f} MMAC, {outcome.bundle_mb:.1f} MB, export "
          f"{export_s:.0f}s (load {os.getloadavg()[0]:.1f})", flush=True)
    return outcome


def end_recall(outcome: Outcome, data: Path) -> Dict[str, float]:
    """Recall of defect regions near the strip ends at the 99th percentile of good strips' map values."""
    detector = Detector.load(outcome.extra["bundle"], backend="onnxruntime", threads=THREADS[0])
    dataset = discover_mvtec(data)
    good_values: List[np.ndarray] = []
    regions: List[Tuple[bool, float]] = []  # (near an end, region maximum)
    try:
        for sample in dataset.samples:
            image = cv2.cvtColor(cv2.imread(str(sample.path)), cv2.COLOR_BGR2RGB)
            amap = detector.predict(image).anomaly_map
            assert amap is not None
            if sample.mask_path is None:
                good_values.append(amap[::4, ::4].ravel())
                continue
            mask = cv2.imread(str(sample.mask_path), cv2.IMREAD_GRAYSCALE) > 127
            count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
            width = mask.shape[1]
            for region in range(1, count):
                xs = np.flatnonzero((labels == region).any(axis=0))
                centre = xs.mean()
                regions.append((centre < width / 4 or centre > 3 * width / 4,
                                float(amap[labels == region].max())))
    finally:
        detector.close()
    threshold = float(np.quantile(np.concatenate(good_values), 0.99))
    ends = [value for near, value in regions if near]
    middle = [value for near, value in regions if not near]
    return {"end_regions": len(ends), "end_recall": float(np.mean([v > threshold for v in ends])) if ends else
            float("nan"), "middle_recall": float(np.mean([v > threshold for v in middle])) if middle else
            float("nan")}


def predict_timing(log: Path, runs: int, threads: int, repeats: int = 3) -> List[str]:
    """Median ms of `Detector.predict` per bundle in `log` (rows.jsonl): 5 warm-up calls, then `repeats` x `runs`
    timed calls, the repeats round-robin over the bundles so that a load change hits every bundle alike."""
    import json

    from patchcore_edge.imageio import read_rgb

    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    latest = {(e["config"], e["data"]): e for e in entries}  # a rerun replaces an earlier row
    images = {"bottle": read_rgb(sorted((BOTTLE / "test" / "broken_small").glob("*.png"))[0])}
    detectors = []
    for (config, data), entry in latest.items():
        if data not in images:  # ELPV (scripts/prepare_elpv.py out/elpv-mono): its first defective cell
            images[data] = read_rgb(sorted((REPO / "out" / "elpv-mono" / "test" / "defect").glob("*.png"))[0])
        detector = Detector.load(entry["bundle"], backend="onnxruntime", threads=threads)
        for _ in range(5):
            detector.predict(images[data])
        detectors.append((config, data, detector, [], []))
    before = os.getloadavg()
    for _ in range(repeats):
        for config, data, detector, medians, every in detectors:
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                detector.predict(images[data])
                times.append((time.perf_counter() - start) * 1000)
            medians.append(statistics.median(times))
            every.extend(times)
    after = os.getloadavg()
    lines = [f"`Detector.predict` (map included), ONNX Runtime CPU {threads} thread(s), HNSW + exact re-rank, batch 1, "
             f"one test image per data set (bottle broken_small 900x900; ELPV defect cell 300x300), 5 warm-up "
             f"calls, {repeats} x {runs} timed calls round-robin; load average {before[0]:.2f} / {before[1]:.2f} "
             f"before, {after[0]:.2f} / {after[1]:.2f} after.", "",
             "| candidate | data | predict ms, median of all runs | lowest repeat median |", "| --- | --- | ---: | ---: |"]
    for config, data, detector, medians, every in detectors:
        lines.append(f"| {config} | {data} | {statistics.median(every):.1f} | {min(medians):.1f} |")
        print(lines[-1], flush=True)
        detector.close()
    return lines


# --------------------------------------------------------------------------------------------------- report

def _f(value: Optional[float]) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"


def table(outcomes: List[Outcome], datasets: List[str]) -> List[str]:
    head = "| candidate | " + " | ".join(
        f"{d} image AUROC | {d} pixel AUROC | {d} AUPRO" for d in datasets) + \
        " | mean image AUROC | features ms | predict ms | MMAC | bundle MB |"
    lines = [head, "|" + " --- |" * (1 + 3 * len(datasets) + 5)]
    by_config: Dict[str, Dict[str, Outcome]] = {}
    for outcome in outcomes:
        by_config.setdefault(outcome.config.label, {})[outcome.data] = outcome
    for label, per_data in by_config.items():
        cells = []
        images = []
        for d in datasets:
            o = per_data.get(d)
            m = o.metrics if o else {}
            cells += [_f(m.get("image_auroc")), _f(m.get("pixel_auroc")), _f(m.get("aupro"))]
            if m.get("image_auroc") is not None:
                images.append(float(m["image_auroc"]))  # type: ignore[arg-type]
        first = next(iter(per_data.values()))
        ms = statistics.median([o.features_ms for o in per_data.values()])
        predict = statistics.median([o.predict_ms for o in per_data.values()])
        lines.append(f"| {label} | " + " | ".join(cells) +
                     f" | {_f(float(np.mean(images)) if images else None)} | {ms:.1f} | {predict:.1f} | "
                     f"{first.mmacs:.0f} | {first.bundle_mb:.1f} |")
    return lines


def write_section(name: str, body: List[str]) -> None:
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Input geometry and backbones\n"
    marker = f"## Run: {name}"
    start = text.find(marker)
    if start >= 0:
        end = text.find("\n## Run: ", start + 1)
        text = text[:start] + text[end + 1:] if end >= 0 else text[:start]
    text = text.rstrip("\n") + "\n\n" + "\n".join([marker, ""] + body) + "\n"
    RESULTS.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=["backbones", "strips"],
                        choices=("backbones", "strips", "tiles", "macs", "timing", "predict_timing"))
    parser.add_argument("--runs", type=int, default=30, help="timed runs per repeat (--experiments timing)")
    parser.add_argument("--repeats", type=int, default=3, help="round-robin repeats (--experiments predict_timing)")
    parser.add_argument("--configs", type=int, nargs="+", default=None,
                        help="indices into: " + "; ".join(f"{i}: {c.label}" for i, c in enumerate(BACKBONE_CONFIGS)))
    parser.add_argument("--train", type=int, default=60, help="training images per data set")
    parser.add_argument("--elpv-test", type=int, default=40, help="ELPV test images per class")
    parser.add_argument("--coreset", type=float, default=0.1)
    parser.add_argument("--strip-ratios", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--strip-train", type=int, default=20, help="train/good images cut into 3 strips each")
    parser.add_argument("--strip-fits", nargs="+", default=None,
                        help="fits to run on the strips (crop, squash, letterbox, aspect); default: all")
    parser.add_argument("--tile-train", type=int, default=12, help="training images of the 3x bottle (--experiments tiles)")
    parser.add_argument("--tile-pixel-size", type=int, default=900,
                        help="longer side of the pixel metrics on the 3x bottle (2700 px); 0: native")
    parser.add_argument("--pixel-size", type=int, default=256, help="longer side of the pixel metrics; 0: native")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads")
    parser.add_argument("--elpv-dir", type=Path, default=None,
                        help="a prepared ELPV folder (scripts/prepare_elpv.py) instead of the built-in selection")
    parser.add_argument("--data", nargs="+", default=["bottle", "elpv"], choices=("bottle", "elpv"),
                        help="data sets of --experiments backbones")
    parser.add_argument("--scratch", type=Path, default=REPO / "out" / "geometry_bench")
    parser.add_argument("--tag", default="", help="suffix of the result sections (keeps earlier runs' sections)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    THREADS[0] = args.threads
    if args.pixel_size == 0:
        args.pixel_size = None
    ROW_LOG.append(args.scratch / "rows.jsonl")
    if not BOTTLE.is_dir():
        sys.exit(f"{BOTTLE}: MVTec AD bottle not found (expected ../shared/data beside the repository)")
    scratch = args.scratch
    scratch.mkdir(parents=True, exist_ok=True)
    started, load = time.perf_counter(), os.getloadavg()[0]
    command = "python benchmarks/geometry_bench.py " + " ".join(sys.argv[1:])
    header = [f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
              f"{load:.1f} at start). Machine: {cpu_model()}, no GPU, shared by several agents.",
              f"Coreset {args.coreset:.0%} (greedy, seed 0), HNSW + exact re-rank, ONNX Runtime CPU {args.threads} thread(s), "
              f"batch 1; pixel metrics at {'native size' if args.pixel_size is None else f'longer side {args.pixel_size} px'}; ms are medians over the test images.",
              ""]

    if "macs" in args.experiments:
        for config in BACKBONE_CONFIGS:
            print(f"{config.label}: {count_mmacs(config):.0f} MMAC", flush=True)

    if "timing" in args.experiments:
        # Features network alone, every config in one process, repeats round-robin: run it under the shared
        # timing lock (flock /work/coord/bench.lock ...) so that other helpers' timings do not overlap it.
        from layer_choice import time_extractors

        from patchcore_edge.export.backbones import get_spec
        from patchcore_edge.export.features import build_extractor
        from patchcore_edge.imageio import read_rgb
        from patchcore_edge.preprocess import InputSpec, preprocess

        chosen = [BACKBONE_CONFIGS[i] for i in (args.configs if args.configs is not None
                                                 else range(len(BACKBONE_CONFIGS)))]
        image = read_rgb(sorted((BOTTLE / "test" / "broken_large").glob("*.png"))[0])
        rows = ["| candidate | features ms, lowest repeat median | features ms, median of all runs | ONNX MB | MMAC |",
                "| --- | ---: | ---: | ---: | ---: |"]
        before = os.getloadavg()[0]
        prepared = []
        for config in chosen:
            weights = get_spec(config.backbone)
            spec = InputSpec(fit=config.fit, size=config.size, mean=weights.mean, std=weights.std)
            extractor, _ = build_extractor(config.backbone, None, spec, config.dim, layers=config.layers,
                                           reduction=config.reduction)
            prepared.append((extractor, spec, preprocess(image, spec)))
        for config, (best, median, onnx_mb) in zip(chosen, time_extractors(prepared, args.runs)):
            rows.append(f"| {config.label} | {best:.2f} | {median:.2f} | {onnx_mb:.2f} | {count_mmacs(config):.0f} |")
            print(rows[-1], flush=True)
        write_section("timing" + args.tag, header + [
            f"Features network only (ONNX Runtime CPU, 2 intra-op threads, batch 1, one bottle image), 10 warm-up "
            f"runs then 3 x {args.runs} timed runs per candidate, the repeats round-robin; load average {before:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after.", ""] + rows)

    if "predict_timing" in args.experiments:
        # Whole `Detector.predict` (read image in memory, preprocess, network, search, map) of every bundle the
        # backbones experiment logged in --scratch/rows.jsonl, on one test image of its own data set. Run it under
        # the shared timing lock (flock /work/coord/bench.lock ...).
        rows = predict_timing(args.scratch / "rows.jsonl", args.runs, args.threads, args.repeats)
        write_section("predict timing" + args.tag, header + rows)

    if "backbones" in args.experiments:
        every = {"bottle": lambda: bottle_subset(scratch, args.train),
                 "elpv": lambda: args.elpv_dir if args.elpv_dir else elpv_subset(scratch, args.train, args.elpv_test)}
        data = {name: every[name]() for name in args.data}
        outcomes = []
        chosen = args.configs if args.configs is not None else range(len(BACKBONE_CONFIGS))
        for index in chosen:
            config = BACKBONE_CONFIGS[index]
            for name, folder in data.items():
                outcomes.append(run_config(config, folder, scratch, args.coreset, args.pixel_size, name))
        def count(folder: Path, sub: str) -> int:
            return len([f for f in (folder / sub).rglob("*") if f.is_file() or f.is_symlink()])

        sizes = "; ".join(f"{name} {count(folder, 'train/good')} train/good, {count(folder, 'test')} test"
                          for name, folder in data.items())
        body = header + [f"Data: {sizes} (bottle with masks; ELPV has none: pixel n/a).", ""]
        write_section("backbones" + args.tag, body + table(outcomes, ["bottle", "elpv"]) +
                      ["", f"({(time.perf_counter() - started) / 60:.1f} min, load {os.getloadavg()[0]:.1f} at end)"])

    if "strips" in args.experiments:
        rows = ["| strip | fit | inspected (median) | image AUROC | pixel AUROC | AUPRO | end regions | "
                "end recall @ good p99 | middle recall | predict ms |", "|" + " --- |" * 10]
        for ratio in args.strip_ratios:
            data_dir = strip_set(scratch, ratio, args.strip_train)
            fits = STRIP_FITS + [Config(f"squash {224 * ratio}x224", fit="squash", size=(224 * ratio, 224))]
            if args.strip_fits:
                fits = [c for c in fits if (c.size is not None and "aspect" in args.strip_fits) or
                        (c.size is None and c.fit in args.strip_fits)]
            for config in fits:
                outcome = run_config(config, data_dir, scratch, args.coreset, args.pixel_size, f"strip1to{ratio}")
                recall = end_recall(outcome, data_dir)
                inspected = outcome.extra["inspected"] or {}
                m = outcome.metrics
                rows.append(f"| 1:{ratio} | {config.label} | {_f(inspected.get('median'))} | "
                            f"{_f(m['image_auroc'])} | {_f(m['pixel_auroc'])} | {_f(m['aupro'])} | "
                            f"{recall['end_regions']} | {_f(recall['end_recall'])} | "
                            f"{_f(recall['middle_recall'])} | {outcome.predict_ms:.1f} |")
                print(rows[-1], flush=True)
        write_section("strips" + args.tag, header + rows)

    if "tiles" in args.experiments:
        data_dir = upscaled_set(scratch, train=args.tile_train, test=6)
        rows = ["| geometry | image AUROC | pixel AUROC | AUPRO | pixel AUROC / AUPRO per defect | predict ms |",
                "| --- | --- | --- | --- | --- | --- |"]
        for config in (Config("squash 224 (whole 2700x2700 image)"),
                       Config("tile 672, overlap 64, squash 224 per tile", tile=672, tile_overlap=64)):
            outcome = run_config(config, data_dir, scratch, args.coreset, args.tile_pixel_size or None,
                                 "bottle_x3")
            m = outcome.metrics
            per = "; ".join(f"{d} {_f(v['pixel_auroc'])} / {_f(v['aupro'])}"
                            for d, v in outcome.extra["per_defect"].items())
            rows.append(f"| {config.label} | {_f(m['image_auroc'])} | {_f(m['pixel_auroc'])} | {_f(m['aupro'])} | "
                        f"{per} | {outcome.predict_ms:.0f} |")
            print(rows[-1], flush=True)
        header[1] = header[1].split("; pixel metrics")[0] + "; ms are medians over the test images."
        write_section("tiles" + args.tag, header + [f"Data: bottle x3, {args.tile_train} train images, 6 test images per "
                                         f"test folder; coreset {args.coreset:.0%} for both; pixel metrics at longer side "
                                         f"{args.tile_pixel_size or 'native'}.", ""] + rows)


if __name__ == "__main__":
    main()
