"""`patchcore-edge eval BUNDLE DATASET_DIR`: a bundle's metrics on a labelled test set, JSON + Markdown."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import click
import cv2
import numpy as np

from ..bundle import BundleError
from ..imageio import ImageReadError, read_rgb
from ..runtime.backends import BACKEND_CHOICES
from ..evaluation.dataset import DatasetError, EvalDataset, Sample, check_masks, discover_mvtec, discover_plain, load_mask
from ..evaluation.evaluate import evaluate, report_markdown


def load_detector(bundle: Path, backend: str, ef: Optional[int], exact_search: bool,
                  threads: Optional[int]) -> Any:
    from ..runtime.detector import Detector

    return Detector.load(bundle, backend=backend, ef=ef, exact_search=exact_search, threads=threads)


def _dataset(dataset_dir: Optional[Path], good: Optional[Path], bad: Optional[Path]) -> EvalDataset:
    if dataset_dir is not None and (good or bad):
        raise click.UsageError("give either DATASET_DIR (MVTec AD layout) or --good DIR --bad DIR, not both")
    if dataset_dir is None and not (good and bad):
        raise click.UsageError("give DATASET_DIR (MVTec AD category folder) or both --good DIR and --bad DIR")
    if dataset_dir is not None:
        return discover_mvtec(dataset_dir)
    assert good is not None and bad is not None
    return discover_plain(good, bad)


# ---------------------------------------------------------------------------------------------- overlays


def _extremes(report: Dict[str, Any], top: int) -> List[Tuple[str, int, Dict[str, Any]]]:
    """(kind, rank, image entry): the highest-scored good images and the lowest-scored anomalous ones."""
    images = report["images"]
    good = sorted((i for i in images if i["label"] == 0), key=lambda i: -i["score"])[:top]
    bad = sorted((i for i in images if i["label"] == 1), key=lambda i: i["score"])[:top]
    return ([("false_alarm", rank, i) for rank, i in enumerate(good, 1)]
            + [("miss", rank, i) for rank, i in enumerate(bad, 1)])


def _overlay(image_rgb: np.ndarray, anomaly_map: np.ndarray, mask: Optional[np.ndarray], low: float,
             high: float, caption: str) -> np.ndarray:
    scaled = np.clip((anomaly_map - low) / max(high - low, 1e-12), 0.0, 1.0)
    heat = cv2.applyColorMap((scaled * 255.0 + 0.5).astype(np.uint8), cv2.COLORMAP_JET)
    picture = cv2.addWeighted(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), 0.55, heat, 0.45, 0.0)
    thickness = max(1, round(max(picture.shape[:2]) / 300))
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(picture, contours, -1, (0, 255, 0), thickness)
    scale = max(picture.shape[1] / 900.0, 0.4)
    origin = (int(10 * scale), int(30 * scale))
    # Dark outline under white text keeps the caption readable on any part of the colour map.
    cv2.putText(picture, caption, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale, (0, 0, 0), thickness + 2,
                cv2.LINE_AA)
    cv2.putText(picture, caption, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale, (255, 255, 255), thickness,
                cv2.LINE_AA)
    return picture


def write_overlays(detector: Any, dataset: EvalDataset, report: Dict[str, Any], out_dir: Path,
                   top: int) -> Dict[str, Any]:
    """Heat-map overlays of the worst good images (false alarms) and worst defects (misses), scored again.

    All overlays share one colour scale (from the 1st percentile to the maximum over the maps shown) so that
    their colours compare; the ground-truth outline is drawn in green.
    """
    by_name = {dataset.name(s): s for s in dataset.samples}
    picks = []
    for kind, rank, entry in _extremes(report, top):
        sample: Sample = by_name[entry["file"]]
        image = read_rgb(sample.path)
        result = detector.predict(image)
        if result.anomaly_map is None:
            raise click.ClickException("--save-maps: the detector returned no anomaly maps")
        mask = load_mask(sample.mask_path, image.shape[:2], sample.path) if sample.mask_path else None
        picks.append((kind, rank, entry, sample, image, result.anomaly_map, mask))
    if not picks:
        return {"dir": str(out_dir), "scale": None, "files": []}
    low = float(min(np.percentile(p[5], 1) for p in picks))
    high = float(max(p[5].max() for p in picks))
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for kind, rank, entry, sample, image, amap, mask in picks:
        caption = (f"{kind.replace('_', ' ')} #{rank}: {sample.defect}/{sample.path.name} "
                   f"score {entry['score']:.4g}")
        safe_stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{sample.defect}_{sample.path.stem}")
        target = out_dir / f"{kind}_{rank:02d}_{safe_stem}.png"
        ok, encoded = cv2.imencode(".png", _overlay(image, amap, mask, low, high, caption))
        if not ok:
            raise click.ClickException(f"{target}: PNG encoding failed")
        target.write_bytes(encoded.tobytes())
        files.append({"file": target.name, "kind": kind, "rank": rank, "source": entry["file"],
                      "score": entry["score"]})
    return {"dir": str(out_dir), "scale": [low, high], "files": files}


# ---------------------------------------------------------------------------------------------- command


@click.command("eval")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("dataset_dir", required=False, type=click.Path(path_type=Path))
@click.option("--good", type=click.Path(path_type=Path),
              help="Folder of defect-free test images (plain layout).")
@click.option("--bad", type=click.Path(path_type=Path),
              help="Folder of anomalous test images (plain layout).")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option("--ef", type=click.IntRange(min=1), default=None,
              help="HNSW search breadth (default: the bundle's).")
@click.option("--exact-search", is_flag=True, help="Exact nearest-neighbour search instead of HNSW.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for inference and search.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--pixel-size", type=click.IntRange(min=16), default=None,
              help="Compute pixel metrics on maps and masks shrunk to this longer side "
                   "(default: native resolution).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the JSON report here.")
@click.option("--save-maps", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write heat-map overlays of the highest-scored good and lowest-scored anomalous "
                   "images here.")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True,
              help="How many images of each kind --save-maps writes.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def eval_command(bundle: Path, dataset_dir: Optional[Path], good: Optional[Path], bad: Optional[Path],
                 backend: str, ef: Optional[int], exact_search: bool, threads: Optional[int], batch_size: int,
                 pixel_size: Optional[int], report_path: Optional[Path], save_maps: Optional[Path], top: int,
                 quiet: bool) -> None:
    """Image AUROC, pixel AUROC, AUPRO@0.3 and best F1 of BUNDLE on a labelled test set, per defect too.

    DATASET_DIR is one MVTec AD category (test/good, test/<defect>, ground_truth/<defect>/<name>_mask.png);
    or give --good DIR --bad DIR (image metrics only). Prints a Markdown table; --report writes the full JSON.
    """
    try:
        dataset = _dataset(dataset_dir, good, bad)
    except DatasetError as error:
        raise click.ClickException(str(error)) from None
    for warning in dataset.warnings:
        click.echo(f"warning: {warning}", err=True)
    problems = check_masks(dataset)
    if problems:
        listed = "\n".join(f"  {p}" for p in problems)
        raise click.ClickException(f"ground-truth masks that cannot be used:\n{listed}")
    try:
        detector = load_detector(bundle, backend, ef, exact_search, threads)
    except (BundleError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    assumes = detector.bundle.method.params.get("assumes")  # PaDiM: aligned parts
    if isinstance(assumes, str):
        click.echo(f"note: {detector.bundle.method.name} assumes {assumes}; parts that move or turn "
                   "in the image score as anomalies", err=True)
    try:
        report = _run(detector, dataset, pixel_size, batch_size, quiet)
        report["settings"] = {"bundle": str(bundle), "backend": backend, "ef": ef,
                              "exact_search": exact_search, "threads": threads, "batch_size": batch_size,
                              "pixel_size": pixel_size}
        if save_maps is not None:
            report["overlays"] = write_overlays(detector, dataset, report, save_maps, top)
    except (DatasetError, ImageReadError, BundleError) as error:
        raise click.ClickException(str(error)) from None
    finally:
        if callable(getattr(detector, "close", None)):
            detector.close()
    for skipped in report["skipped"]:
        click.echo(f"warning: skipped {skipped['file']}: {skipped['reason']}", err=True)
    if report_path is not None:
        _write_json(report_path, report)
        click.echo(f"report written to {report_path}", err=True)
    click.echo(report_markdown(report), nl=False)


def _run(detector: Any, dataset: EvalDataset, pixel_size: Optional[int], batch_size: int,
         quiet: bool) -> Dict[str, Any]:
    if quiet:
        return evaluate(detector, dataset, pixel_size=pixel_size, batch_size=batch_size)
    total = len(dataset.samples)
    with click.progressbar(length=total, label="scoring", file=sys.stderr, show_pos=True,
                           show_eta=True) as bar:
        state = {"done": 0}

        def progress(done: int, _total: int, _name: str) -> None:
            bar.update(done - state["done"])
            state["done"] = done

        return evaluate(detector, dataset, pixel_size=pixel_size, progress=progress, batch_size=batch_size)


def _write_json(path: Path, report: Dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except OSError as error:
        raise click.ClickException(f"{path}: cannot write the report ({error.strerror or error})") from None
