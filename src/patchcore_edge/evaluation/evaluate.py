"""Score a labelled dataset with the runtime and compute the metrics, overall and per defect type.

`evaluate` only needs a detector with `predict(image_rgb) -> Result` (`score`, `anomaly_map` at the image's
own geometry); `predict_batch` is used when batch_size > 1. Maps are not kept: each one is reduced to its
pixel statistics (`PixelEntry`) as soon as it is scored.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

from .. import __version__
from ..imageio import ImageReadError, read_rgb
from ..methods import UnknownMethod, scorer_class
from ..preprocess import inspected_fraction
from .dataset import GOOD, EvalDataset, Sample, load_mask
from .metrics import DEFAULT_FPR_LIMIT, Metric, PixelEntry, auroc, best_f1, pixel_entry, pixel_metrics

REPORT_VERSION = 1
Progress = Callable[[int, int, str], None]


def reduce_to(anomaly_map: np.ndarray, mask: Optional[np.ndarray],
              pixel_size: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Shrink a map (area average) and its mask (pixel anomalous when >= half its area was) so that the longer
    side is at most `pixel_size`; never enlarges."""
    h, w = anomaly_map.shape
    scale = pixel_size / max(h, w)
    if scale >= 1.0:
        return anomaly_map, mask
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(anomaly_map.astype(np.float32, copy=False), size, interpolation=cv2.INTER_AREA)
    if mask is None:
        return small, None
    coverage = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    return small, coverage >= 0.5


def _metric_block(scores: np.ndarray, labels: np.ndarray, entries: Sequence[PixelEntry],
                  pixel_reason: Optional[str], fpr_limit: float) -> Dict[str, Any]:
    image_auroc = auroc(scores, labels)
    f1 = best_f1(scores, labels)
    if pixel_reason is None:
        pix_auroc, pro = pixel_metrics(entries, fpr_limit)
    else:
        pix_auroc = pro = Metric(None, pixel_reason)
    reasons = {name: m.reason for name, m in (("image_auroc", image_auroc), ("pixel_auroc", pix_auroc),
                                              ("aupro", pro), ("image_f1", f1)) if m.reason}
    return {
        "n_good": int((labels == 0).sum()), "n_anomalous": int(labels.sum()),
        "n_pixel_images": len(entries),
        "image_auroc": image_auroc.value, "pixel_auroc": pix_auroc.value, "aupro": pro.value,
        "image_f1": f1.f1, "image_f1_threshold": f1.threshold,
        "reasons": reasons,
    }


def method_caveats(bundle: Any) -> List[str]:
    """The bundle's method's own warnings about its numbers (`Scorer.caveats`); none for an unknown bundle."""
    if bundle is None:
        return []
    try:
        return [str(c) for c in scorer_class(bundle.method.name).caveats(bundle)]
    except UnknownMethod:
        return []


def _median(values: Sequence[float]) -> Optional[float]:
    return float(statistics.median(values)) if values else None


def evaluate(detector: Any, dataset: EvalDataset, pixel_size: Optional[int] = None,
             progress: Optional[Progress] = None, batch_size: int = 1,
             fpr_limit: float = DEFAULT_FPR_LIMIT) -> Dict[str, Any]:
    """Score every image of `dataset` with `detector`; return the report (JSON-ready dict).

    Unreadable images are skipped and listed under "skipped"; a mask whose size differs from its image raises
    DatasetError (the ground truth is wrong, so no metric would mean anything).
    """
    if pixel_size is not None and pixel_size < 1:
        raise ValueError(f"pixel_size must be positive, got {pixel_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    samples = list(dataset.samples)
    scored: List[Tuple[Sample, float]] = []
    entries: Dict[int, PixelEntry] = {}  # index into `scored` -> pixel statistics
    skipped: List[Dict[str, str]] = []
    map_shapes: set = set()
    missing_maps = 0
    read_ms: List[float] = []
    predict_ms: List[float] = []
    stages: Dict[str, List[float]] = {}
    spec = getattr(detector, "spec", None)
    inspected: List[float] = []  # per image, the fraction that can score (geometry and region of interest)
    start = time.perf_counter()

    for first in range(0, len(samples), batch_size):
        batch: List[Tuple[Sample, np.ndarray, Optional[np.ndarray]]] = []
        for sample in samples[first:first + batch_size]:
            t0 = time.perf_counter()
            try:
                image = read_rgb(sample.path)
            except ImageReadError as error:
                skipped.append({"file": dataset.name(sample), "reason": error.reason})
                continue
            mask = load_mask(sample.mask_path, image.shape[:2], sample.path) if sample.mask_path else None
            read_ms.append((time.perf_counter() - t0) * 1000)
            batch.append((sample, image, mask))
        done = min(first + batch_size, len(samples))
        if not batch:
            if progress is not None:
                progress(done, len(samples), dataset.name(samples[done - 1]))
            continue
        t0 = time.perf_counter()
        if batch_size == 1:
            results = [detector.predict(batch[0][1])]
        else:
            results = list(detector.predict_batch([image for _, image, _ in batch]))
        predict_ms.extend([(time.perf_counter() - t0) * 1000 / len(batch)] * len(batch))
        for (sample, image, mask), result in zip(batch, results):
            for stage, ms in (getattr(result, "timing_ms", None) or {}).items():
                stages.setdefault(stage, []).append(float(ms))
            scored.append((sample, float(result.score)))
            if spec is not None:
                inspected.append(inspected_fraction(image.shape[0], image.shape[1], spec))
            amap = getattr(result, "anomaly_map", None)
            usable_for_pixels = sample.label == 0 or mask is not None
            if amap is None:
                missing_maps += usable_for_pixels
            elif usable_for_pixels:
                if amap.shape != image.shape[:2]:
                    raise ValueError(f"{sample.path}: the detector returned a {amap.shape} anomaly map for a "
                                     f"{image.shape[:2]} image; maps must have the image's geometry")
                if pixel_size is not None:
                    amap, mask = reduce_to(amap, mask, pixel_size)
                map_shapes.add(f"{amap.shape[1]}x{amap.shape[0]}")
                entries[len(scored) - 1] = pixel_entry(amap, mask)
        if progress is not None:
            progress(done, len(samples), dataset.name(samples[done - 1]))
    scoring_s = time.perf_counter() - start

    t0 = time.perf_counter()
    pixel_reason = _pixel_reason(dataset, entries, missing_maps)
    scores = np.array([s for _, s in scored], dtype=np.float64)
    labels = np.array([sample.label for sample, _ in scored], dtype=np.int64)
    defects = np.array([sample.defect for sample, _ in scored], dtype=object)
    overall = _metric_block(scores, labels, list(entries.values()), pixel_reason, fpr_limit)
    per_defect = []
    for defect in dataset.defects:
        keep = (defects == GOOD) | (defects == defect)
        subset = [entries[i] for i in map(int, np.flatnonzero(keep)) if i in entries]
        block = _metric_block(scores[keep], labels[keep], subset, pixel_reason, fpr_limit)
        per_defect.append({"defect": defect, **block})
    metrics_s = time.perf_counter() - t0

    n_scored = len(scored)
    return {
        "report_version": REPORT_VERSION,
        "toolkit_version": __version__,
        "dataset": dataset_summary(dataset),
        "bundle": detector.bundle.describe() if getattr(detector, "bundle", None) is not None else {},
        "caveats": method_caveats(getattr(detector, "bundle", None)),
        "backend": getattr(detector, "backend_name", None),
        "pixel_evaluation": {
            "resolution": ("native resolution" if pixel_size is None
                           else f"reduced resolution (longer side at most {pixel_size} px)"),
            "pixel_size": pixel_size,
            "map_sizes": sorted(map_shapes),
            "reduction": (None if pixel_size is None else
                          "maps: area average; masks: pixel anomalous when >= 50% of its area was"),
            "exact": True,
            "aupro_fpr_limit": fpr_limit,
            "aupro_connectivity": 8,
        },
        "metrics": overall,
        "inspected_fraction": None if not inspected else {
            "min": float(min(inspected)), "median": float(statistics.median(inspected)),
            "max": float(max(inspected)), "fit": getattr(spec, "fit", None),
            "roi": getattr(spec, "roi", None) is not None},
        "per_defect": per_defect,
        "images": [{"file": dataset.name(sample), "defect": sample.defect, "label": sample.label,
                    "score": score, "pixel_metrics": i in entries}
                   for i, (sample, score) in enumerate(scored)],
        "skipped": skipped,
        "timing": {
            "images": n_scored, "batch_size": batch_size, "scoring_s": scoring_s, "metrics_s": metrics_s,
            "images_per_s": n_scored / scoring_s if scoring_s > 0 and n_scored else None,
            "read_ms_median": _median(read_ms), "predict_ms_median": _median(predict_ms),
            "predict_ms_mean": float(np.mean(predict_ms)) if predict_ms else None,
            "stages_ms_median": {k: _median(v) for k, v in stages.items()},
        },
    }


def dataset_summary(dataset: EvalDataset) -> Dict[str, Any]:
    """The test set as reports record it: where, which layout, how many images of each kind."""
    return {"root": str(dataset.root), "layout": dataset.layout, "counts": dataset.counts(),
            "with_masks": sum(1 for s in dataset.samples if s.mask_path is not None),
            "warnings": list(dataset.warnings)}


def _pixel_reason(dataset: EvalDataset, entries: Dict[int, PixelEntry], missing_maps: int) -> Optional[str]:
    if missing_maps:
        return f"the detector returned no anomaly map for {missing_maps} image(s)"
    if not any(s.mask_path is not None for s in dataset.samples):
        return "no ground-truth masks" + (" (plain --good/--bad layout)" if dataset.layout == "plain" else "")
    if not entries:
        return "no image with a map and a ground truth was scored"
    return None


# ---------------------------------------------------------------------------------------------- Markdown


def format_value(value: Optional[float], digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def absent_metrics(reasons: Iterable[Mapping[str, str]]) -> List[str]:
    """"n/a: METRIC: REASON" lines, each once, from the `reasons` of several metric blocks."""
    lines: List[str] = []
    for block in reasons:
        for metric, reason in block.items():
            line = f"n/a: {metric}: {reason}"
            if line not in lines:
                lines.append(line)
    return lines


def _inspected_line(entry: Optional[Dict[str, Any]]) -> str:
    if not entry:
        return "- inspected fraction of each image: unknown"
    blind = "" if entry["min"] >= 1.0 else " (the rest is never looked at: a defect there cannot be found)"
    roi = ", outside the region of interest excluded" if entry.get("roi") else ""
    return (f"- inspected fraction of each image: median {entry['median']:.3f}, min {entry['min']:.3f} "
            f"(fit {entry['fit']}{roi}){blind}")


def report_markdown(report: Dict[str, Any]) -> str:
    """The report's metrics as a Markdown table: all images, then each defect type against the good images."""
    data = report["dataset"]
    bundle = report.get("bundle") or {}
    backbone = bundle["backbone"].get("name", "?") if isinstance(bundle.get("backbone"), dict) else "?"
    counts = ", ".join(f"{k} {v}" for k, v in data["counts"].items())
    limit = report["pixel_evaluation"]["aupro_fpr_limit"]
    method = (bundle.get("method") or {}).get("name", "?")
    skipped = f"; skipped {len(report['skipped'])}" if report["skipped"] else ""
    lines = [
        f"## patchcore-edge eval: {data['root']}",
        "",
        f"- model: backbone {backbone}, method {method}; backend: {report.get('backend') or '?'}",
        (f"- pixel metrics at {report['pixel_evaluation']['resolution']} "
         f"(exact; AUPRO up to FPR {limit:g}, 8-connected regions)"),
        f"- images scored: {report['timing']['images']} (found: {counts}){skipped}",
        _inspected_line(report.get("inspected_fraction")),
        "",
        (f"| subset | good | anomalous | image AUROC | pixel AUROC | AUPRO@{limit:g} | best F1 "
         "| F1 threshold |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = [("all", report["metrics"])] + [(d["defect"], d) for d in report["per_defect"]]
    for name, block in rows:
        lines.append(f"| {name} | {block['n_good']} | {block['n_anomalous']} | "
                     f"{format_value(block['image_auroc'])} | {format_value(block['pixel_auroc'])} | "
                     f"{format_value(block['aupro'])} | "
                     f"{format_value(block['image_f1'])} | {format_value(block['image_f1_threshold'], 5)} |")
    notes = absent_metrics(block["reasons"] for _, block in rows)
    if notes:
        lines += [""] + notes
    caveats = report.get("caveats") or []
    if caveats:
        lines += [""] + [f"caveat ({method}): {caveat}" for caveat in caveats]
    return "\n".join(lines) + "\n"
