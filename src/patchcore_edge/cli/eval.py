"""`patchcore-edge eval BUNDLE... DATASET_DIR`: bundles' metrics on a labelled test set, JSON + Markdown (one
bundle: per defect type; several: a comparison table, a row per bundle)."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import click
import cv2
import numpy as np

from ..bundle import MANIFEST, BundleError
from ..imageio import ImageReadError, read_rgb
from ..runtime.backends import BACKEND_CHOICES
from ..runtime.detector import Detector
from ..evaluation.dataset import DatasetError, EvalDataset, Sample, check_masks, discover_mvtec, discover_plain, load_mask
from ..evaluation.compare import comparison, comparison_markdown, failed_row, report_row
from ..evaluation.evaluate import evaluate, report_markdown


def load_detector(bundle: Path, backend: str, ef: Optional[int], exact_search: bool,
                  threads: Optional[int]) -> Any:
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


@dataclass(frozen=True)
class EvalSettings:
    """The scoring choices every bundle of one `eval` shares (recorded in the report as `settings`)."""

    backend: str = "auto"
    ef: Optional[int] = None
    exact_search: bool = False
    threads: Optional[int] = None
    batch_size: int = 1
    pixel_size: Optional[int] = None


def _is_bundle(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def _split_paths(paths: Sequence[Path], plain: bool) -> Tuple[List[Path], Optional[Path]]:
    """(bundles, DATASET_DIR): BUNDLE [DATASET_DIR], BUNDLE... DATASET_DIR, or BUNDLE... with --good/--bad.

    With several paths the last one is the test set, unless --good/--bad are given and it is a bundle too; a
    bundle is a folder with a manifest.json, which tells a misplaced bundle or test set apart.
    """
    if len(paths) == 1:
        return [paths[0]], None
    if plain and _is_bundle(paths[-1]):
        bundles, dataset_dir = list(paths), None
    elif _is_bundle(paths[-1]):
        raise click.UsageError(f"{paths[-1]}: this is a bundle (it has {MANIFEST}), but with several paths "
                               "the last one is the test set: give BUNDLE... DATASET_DIR, or --good DIR "
                               "--bad DIR")
    else:
        bundles, dataset_dir = list(paths[:-1]), paths[-1]
    if len(bundles) > 1:  # one bundle keeps its original form: its loader names what is wrong with it
        for path in bundles:
            if not _is_bundle(path):
                problem = "not found" if not path.exists() else f"not a bundle (no {MANIFEST})"
                raise click.UsageError(f"{path}: {problem}; give the bundles first and the test set "
                                       "(DATASET_DIR) last")
    return bundles, dataset_dir


@click.command("eval")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path),
                metavar="BUNDLE... [DATASET_DIR]")
@click.option("--good", type=click.Path(path_type=Path),
              help="Folder of defect-free test images (plain layout).")
@click.option("--bad", type=click.Path(path_type=Path),
              help="Folder of anomalous test images (plain layout).")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option("--ef", type=click.IntRange(min=1), default=None,
              help="First-pass search breadth: PatchCore, k-means cells probed per patch (default: 3, "
                   "all cells of a small bank); other methods, HNSW ef (default: the bundle's).")
@click.option("--exact-search", is_flag=True,
              help="Exact nearest-neighbour search for every patch instead of the first pass + exact re-rank.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for inference and search.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--pixel-size", type=click.IntRange(min=16), default=None,
              help="Compute pixel metrics on maps and masks shrunk to this longer side "
                   "(default: native resolution).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the JSON report here (several bundles: every row).")
@click.option("--save-maps", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write heat-map overlays of the highest-scored good and lowest-scored anomalous "
                   "images here (one bundle only).")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True,
              help="How many images of each kind --save-maps writes.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def eval_command(paths: Tuple[Path, ...], good: Optional[Path], bad: Optional[Path], backend: str,
                 ef: Optional[int], exact_search: bool, threads: Optional[int], batch_size: int,
                 pixel_size: Optional[int], report_path: Optional[Path], save_maps: Optional[Path], top: int,
                 quiet: bool) -> None:
    """Image AUROC, pixel AUROC, AUPRO@0.3 and best F1 of BUNDLE on a labelled test set, per defect too.

    DATASET_DIR is one MVTec AD category (test/good, test/<defect>, ground_truth/<defect>/<name>_mask.png);
    or give --good DIR --bad DIR (image metrics only). Prints a Markdown table; --report writes the full JSON.

    Several bundles (BUNDLE... DATASET_DIR: the last path is the test set) print one comparison table, a row
    per bundle: method, backbone, fit, image and pixel AUROC, AUPRO, median ms/image, size on disk, inspected
    fraction; a bundle that cannot be evaluated gets a row saying why (exit status 1).
    """
    bundles, dataset_dir = _split_paths(paths, good is not None or bad is not None)
    if len(bundles) > 1 and save_maps is not None:
        raise click.UsageError("--save-maps writes the overlays of one bundle: give one bundle")
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
    settings = EvalSettings(backend, ef, exact_search, threads, batch_size, pixel_size)
    if len(bundles) == 1:
        _evaluate_one(bundles[0], dataset, settings, report_path, save_maps, top, quiet)
    else:
        _compare(bundles, dataset, settings, report_path, quiet)


def _load(bundle: Path, settings: EvalSettings) -> Any:
    return load_detector(bundle, settings.backend, settings.ef, settings.exact_search, settings.threads)


def _evaluate_one(bundle: Path, dataset: EvalDataset, settings: EvalSettings, report_path: Optional[Path],
                  save_maps: Optional[Path], top: int, quiet: bool) -> None:
    try:
        detector = _load(bundle, settings)
    except (BundleError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    try:
        report = _run(detector, dataset, settings, quiet)
        report["settings"] = {"bundle": str(bundle), **asdict(settings)}
        if save_maps is not None:
            report["overlays"] = write_overlays(detector, dataset, report, save_maps, top)
    except (DatasetError, ImageReadError, BundleError) as error:
        raise click.ClickException(str(error)) from None
    finally:
        _close(detector)
    for skipped in report["skipped"]:
        click.echo(f"warning: skipped {skipped['file']}: {skipped['reason']}", err=True)
    if report_path is not None:
        _write_json(report_path, report)
        click.echo(f"report written to {report_path}", err=True)
    click.echo(report_markdown(report), nl=False)


def _compare(bundles: Sequence[Path], dataset: EvalDataset, settings: EvalSettings,
             report_path: Optional[Path], quiet: bool) -> None:
    rows = []
    skipped: Dict[str, str] = {}
    for bundle in bundles:
        try:
            detector = _load(bundle, settings)
        except (BundleError, ValueError) as error:
            rows.append(failed_row(bundle, str(error)))
            continue
        try:
            report = _run(detector, dataset, settings, quiet, label=f"scoring {bundle}")
            rows.append(report_row(bundle, report))
            skipped.update((s["file"], s["reason"]) for s in report["skipped"])
        except DatasetError as error:  # the test set itself is wrong: no bundle's numbers would mean anything
            raise click.ClickException(str(error)) from None
        except (ImageReadError, BundleError, ValueError) as error:
            rows.append(failed_row(bundle, str(error)))
        finally:
            _close(detector)
    for name, reason in skipped.items():
        click.echo(f"warning: skipped {name}: {reason}", err=True)
    report = comparison(dataset, rows, {"bundles": [str(b) for b in bundles], **asdict(settings)})
    if report_path is not None:
        _write_json(report_path, report)
        click.echo(f"report written to {report_path}", err=True)
    click.echo(comparison_markdown(report), nl=False)
    failed = [row for row in rows if row["error"] is not None]
    if failed:
        click.echo(f"error: {len(failed)} of {len(rows)} bundles could not be evaluated (see their rows)",
                   err=True)
        click.get_current_context().exit(1)


def _close(detector: Any) -> None:
    if callable(getattr(detector, "close", None)):
        detector.close()


def _run(detector: Any, dataset: EvalDataset, settings: EvalSettings, quiet: bool,
         label: str = "scoring") -> Dict[str, Any]:
    if quiet:
        return evaluate(detector, dataset, pixel_size=settings.pixel_size, batch_size=settings.batch_size)
    total = len(dataset.samples)
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True,
                           show_eta=True) as bar:
        state = {"done": 0}

        def progress(done: int, _total: int, _name: str) -> None:
            bar.update(done - state["done"])
            state["done"] = done

        return evaluate(detector, dataset, pixel_size=settings.pixel_size, progress=progress,
                        batch_size=settings.batch_size)


def _write_json(path: Path, report: Dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except OSError as error:
        raise click.ClickException(f"{path}: cannot write the report ({error.strerror or error})") from None
