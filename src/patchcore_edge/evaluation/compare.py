"""Several bundles on one test set: a row per bundle (which model, its accuracy, speed, size and coverage).

Rows are built from `evaluate`'s reports. A bundle that could not be loaded or scored gets a row with the
reason, so one broken bundle never loses the other bundles' numbers.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .. import __version__
from ..bundle import Bundle, BundleError
from .dataset import EvalDataset
from .evaluate import absent_metrics, dataset_summary, format_value
from .metrics import DEFAULT_FPR_LIMIT

COMPARISON_VERSION = 1
MB = 1e6


def size_on_disk(folder: Path) -> Optional[int]:
    """Bytes of the regular files under `folder`, links not followed (what copying the bundle to a board
    costs); None when the folder cannot be listed."""
    if not folder.is_dir():
        return None
    total = 0
    for parent, _folders, files in os.walk(folder):
        for name in files:
            try:
                info = os.lstat(os.path.join(parent, name))
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


def _row(bundle_path: Path, described: Mapping[str, Any], fit: Optional[str]) -> Dict[str, Any]:
    method = described.get("method") or {}
    size = size_on_disk(bundle_path)
    return {
        "bundle": str(bundle_path), "method": method.get("name"), "method_params": method.get("params"),
        "backbone": (described.get("backbone") or {}).get("name"), "fit": fit,
        "image_auroc": None, "pixel_auroc": None, "aupro": None, "reasons": {},
        "latency_ms_median": None, "stages_ms_median": {},
        "size_mb": None if size is None else size / MB, "inspected_fraction": None,
        "caveats": [], "error": None, "report": None,
    }


def report_row(bundle_path: Path, report: Dict[str, Any]) -> Dict[str, Any]:
    """The row of a bundle that was scored: its `evaluate` report, summed up (the report is kept whole)."""
    inspected = report.get("inspected_fraction") or {}
    row = _row(bundle_path, report.get("bundle") or {}, inspected.get("fit"))
    metrics, timing = report["metrics"], report["timing"]
    row.update({
        "image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"],
        "aupro": metrics["aupro"], "reasons": dict(metrics["reasons"]),
        "latency_ms_median": timing["predict_ms_median"],
        "stages_ms_median": dict(timing["stages_ms_median"]),
        "inspected_fraction": inspected.get("median"),
        "caveats": list(report.get("caveats") or []), "report": report,
    })
    return row


def failed_row(bundle_path: Path, reason: str) -> Dict[str, Any]:
    """The row of a bundle that could not be evaluated: why, and what its manifest says if it reads."""
    try:
        bundle = Bundle.load(bundle_path, verify=False, verify_calibration=False)
        described: Mapping[str, Any] = bundle.describe()
        fit: Optional[str] = bundle.input_spec.fit
    except (BundleError, OSError, ValueError):
        described, fit = {}, None
    row = _row(bundle_path, described, fit)
    row["error"] = reason
    return row


def comparison(dataset: EvalDataset, rows: Sequence[Dict[str, Any]],
               settings: Mapping[str, Any]) -> Dict[str, Any]:
    """The JSON report of a comparison: the test set, the settings shared by every bundle, one row each."""
    return {"report_version": COMPARISON_VERSION, "toolkit_version": __version__,
            "dataset": dataset_summary(dataset), "settings": dict(settings), "rows": list(rows)}


# ---------------------------------------------------------------------------------------------- Markdown


def _text(value: Any) -> str:
    return "?" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def comparison_markdown(report: Mapping[str, Any]) -> str:
    """One table, a row per bundle; under it the metrics that are absent and why, and the methods' caveats."""
    rows = report["rows"]
    scored = [r for r in rows if r["error"] is None]
    limit = scored[0]["report"]["pixel_evaluation"]["aupro_fpr_limit"] if scored else DEFAULT_FPR_LIMIT
    resolution = (scored[0]["report"]["pixel_evaluation"]["resolution"] if scored else "?")
    data = report["dataset"]
    counts = ", ".join(f"{k} {v}" for k, v in data["counts"].items())
    lines = [
        f"## patchcore-edge eval: {len(rows)} bundles on {data['root']}",
        "",
        f"- test images: {counts}; backend {report['settings'].get('backend', '?')}",
        (f"- pixel metrics at {resolution} (exact; AUPRO up to FPR {limit:g}); ms/image: median time of one "
         "image through the detector; size: the bundle's files on disk; inspected: median fraction of each "
         "image the bundle's input geometry lets the network see"),
        "",
        (f"| bundle | method | backbone | fit | image AUROC | pixel AUROC | AUPRO@{limit:g} | ms/image "
         "| size MB | inspected | note |"),
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    caveats: List[str] = []
    for row in rows:
        note = "" if row["error"] is None else f"not evaluated: {_text(row['error'])}"
        cells = [_text(row[key]) for key in ("bundle", "method", "backbone", "fit")]
        cells += [format_value(row[key]) for key in ("image_auroc", "pixel_auroc", "aupro")]
        cells += [format_value(row["latency_ms_median"], 1), format_value(row["size_mb"], 2),
                  format_value(row["inspected_fraction"], 3), note]
        lines.append("| " + " | ".join(cells) + " |")
        caveats += [f"caveat ({row['bundle']}, {row['method']}): {c}" for c in row["caveats"]]
    notes = absent_metrics(row["reasons"] for row in rows)
    if notes:
        lines += [""] + notes
    if caveats:
        lines += [""] + caveats
    return "\n".join(lines) + "\n"

