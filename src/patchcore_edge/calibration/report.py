"""What a calibration or a check tells the technician: a text summary, a CSV of every image, a PNG histogram.

The histogram is drawn with OpenCV (no plotting library on the device): scores on the normalised axis, where the
threshold always sits at 1.0.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ..bundle import write_file_atomic
from .calibrate import CalibrationOutcome, CheckOutcome, Finding, ScoredImage
from ..decision import Calibration

NOMINAL_BGR = (60, 160, 60)
DEFECT_BGR = (50, 50, 210)
THRESHOLD_BGR = (200, 90, 20)
INK = (40, 40, 40)
GRID = (225, 225, 225)


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2%}"


# ---------------------------------------------------------------------------------------------- text


def calibration_summary(outcome: CalibrationOutcome, findings: bool = True) -> str:
    """The calibration in a few lines (with the warnings and notes unless findings=False)."""
    cal = outcome.calibration
    image = cal.image
    lines = [
        f"Calibration{' written: ' + outcome.written if outcome.written else ' (not written)'}",
        (f"  images: {image.n_nominal} nominal used, {image.n_defect} defect, {len(outcome.excluded)} left out, "
        f"{len(outcome.skipped)} skipped"),
        f"  image threshold: {image.threshold:.6g} (normalised 1.0; method {image.method})",
        f"  target: false-alarm rate <= {_pct(image.target_false_alarm_rate)} with {image.confidence:.0%} confidence",
    ]
    if image.guarantee_met:
        lines.append(f"  guarantee: MET. With {image.confidence:.0%} confidence the false-alarm rate is at most "
                     f"{_pct(image.guaranteed_false_alarm_rate)} (expected {_pct(image.expected_false_alarm_rate)})")
    else:
        lines.append(f"  guarantee: NOT MET with {image.n_nominal} images ({image.n_required} needed). What these "
                     f"images do guarantee at {image.confidence:.0%} confidence: a false-alarm rate <= "
                     f"{_pct(image.guaranteed_false_alarm_rate)}")
    lines.append(f"  certificate: {image.certificate_text()}")
    lines.append(f"  nominal calibration images above the threshold: {_pct(image.empirical_false_alarm_rate)}")
    if image.n_defect:
        lines.append(f"  defects: recall {_pct(image.recall)}, precision {_pct(image.precision)}, F1 "
                     f"{image.f1:.3f} (precision and F1 depend on the mix of good and defect images given)")
    if cal.pixel is not None:
        pixel = cal.pixel
        extra = f", pixel F1 {pixel.f1:.3f}" if pixel.f1 is not None else ""
        lines.append(f"  pixel threshold: {pixel.threshold:.6g} ({pixel.method}{extra}), minimum defect area "
                     f"{pixel.min_defect_area} px")
        if pixel.guaranteed_mask_rate is not None:
            lines.append(f"    good parts showing a defect region: <= {_pct(pixel.guaranteed_mask_rate)} with "
                         f"{image.confidence:.0%} confidence (calibration images: "
                         f"{_pct(pixel.nominal_images_reaching_area)})")
    else:
        lines.append("  pixel threshold: none")
    q = cal.nominal_scores
    lines.append(f"  nominal scores: median {q['q50']:.4g}, IQR {q['q25']:.4g}..{q['q75']:.4g}, max {q['max']:.4g}")
    if findings:
        lines += findings_text(outcome.findings)
    return "\n".join(lines) + "\n"


def check_summary(outcome: CheckOutcome, findings: bool = True) -> str:
    """The check in a few lines (with the warnings and notes unless findings=False)."""
    cal = outcome.calibration
    low, high = outcome.interval
    target = cal.image.target_false_alarm_rate
    n = len(outcome.images)
    meaning = {
        "above target": "the false-alarm rate is above the target: recalibrate (or look at what changed)",
        "within target": "the false-alarm rate is shown to be within the target",
        "consistent": "consistent with the target (more images would narrow the interval)",
    }[outcome.verdict]
    lines = [
        f"Check of the current calibration ({cal.created_utc or 'undated'}) on {n} new good part(s)",
        f"  false alarms: {outcome.false_alarms} of {n} = {_pct(outcome.observed_rate)}",
        (f"  {outcome.confidence:.0%} interval (exact Clopper-Pearson): {_pct(low)} .. {_pct(high)}; target "
        f"{_pct(target)}"),
        f"  verdict: {outcome.verdict.upper()}: {meaning}",
    ]
    if outcome.images_with_mask is not None:
        lines.append(f"  good parts showing a defect region: {outcome.images_with_mask} of {n}")
    if outcome.skipped:
        lines.append(f"  skipped: {len(outcome.skipped)} file(s)")
    if findings:
        lines += findings_text(outcome.findings)
    return "\n".join(lines) + "\n"


def findings_text(findings: Sequence[Finding], max_paths: int = 5) -> List[str]:
    """One line per finding (severity, code, message) and up to max_paths of the files concerned."""
    lines: List[str] = []
    for finding in findings:
        lines.append(f"  {finding.severity.upper()} [{finding.code}]: {finding.message}")
        for path in finding.paths[:max_paths]:
            lines.append(f"      {path}")
        if len(finding.paths) > max_paths:
            lines.append(f"      ... and {len(finding.paths) - max_paths} more (see scores.csv)")
    return lines


# ---------------------------------------------------------------------------------------------- CSV


def write_scores_csv(path: Path, images: Sequence[ScoredImage], calibration: Calibration,
                     skipped: Sequence[object] = ()) -> None:
    """One row per image: file, set, raw score, normalised score, decision, flags; then the skipped files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "set", "score", "normalised", "decision", "flags", "sha256"])
        for image in sorted(images, key=lambda i: -i.score):
            writer.writerow([str(image.path), image.group, f"{image.score:.6g}",
                             f"{calibration.normalise(image.score):.4f}",
                             "anomalous" if calibration.decide(image.score) else "good", "; ".join(image.flags),
                             image.sha256])
        for error in skipped:
            reason = getattr(error, "reason", str(error))
            writer.writerow([str(getattr(error, "path", "")), "skipped", "", "", "", reason, ""])


# ---------------------------------------------------------------------------------------------- histogram


def _nice_step(span: float, ticks: int) -> float:
    raw = span / max(1, ticks)
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if factor * power >= raw:
            return float(factor * power)
    return float(10 * power)


def _text(canvas: np.ndarray, text: str, origin: Tuple[int, int], scale: float = 0.45,
          color: Tuple[int, int, int] = INK,
          thickness: int = 1) -> None:
    cv2.putText(canvas, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, color, thickness, cv2.LINE_AA)


def histogram_image(nominal: Sequence[float], defects: Sequence[float], threshold: float, title: str = "",
                    width: int = 960, height: int = 540, bins: int = 40) -> np.ndarray:
    """BGR uint8 image: histograms of normalised nominal and defect scores with the threshold line at 1.0."""
    if threshold <= 0:
        raise ValueError("threshold must be positive")
    good = np.asarray(nominal, dtype=np.float64) / threshold
    bad = np.asarray(defects, dtype=np.float64) / threshold
    values = np.concatenate([good, bad, [1.0]])
    low, high = float(values.min()), float(values.max())
    pad = 0.05 * max(high - low, 1e-6)
    low, high = max(0.0, low - pad), high + pad
    edges = np.linspace(low, high, bins + 1)
    good_counts = np.histogram(good, edges)[0]
    bad_counts = np.histogram(bad, edges)[0]
    top_count = max(1, int(max(good_counts.max(initial=0), bad_counts.max(initial=0))))
    # Round the count axis up to a whole tick, so the tallest bar stays below the top line.
    step = _nice_step(top_count, 5)
    top = math.ceil(top_count / step) * step

    canvas = np.full((height, width, 3), 255, np.uint8)
    left, right, upper, lower = 70, width - 20, 60, height - 60
    plot_w, plot_h = right - left, lower - upper

    def x_of(value: float) -> int:
        return round(left + (value - low) / (high - low) * plot_w)

    def y_of(count: float) -> int:
        return round(lower - count / top * plot_h)

    count = 0.0
    while count <= top + 1e-9:
        y = y_of(count)
        cv2.line(canvas, (left, y), (right, y), GRID, 1)
        _text(canvas, f"{count:g}", (8, y + 5))
        count += step
    x_step = _nice_step(high - low, 8)
    tick = math.ceil(low / x_step) * x_step
    while tick <= high + 1e-12:
        x = x_of(tick)
        cv2.line(canvas, (x, lower), (x, lower + 6), INK, 1)
        _text(canvas, f"{tick:g}", (x - 12, lower + 22))
        tick += x_step

    # Bars side by side in each bin, so neither set hides the other.
    for counts, color, offset in ((good_counts, NOMINAL_BGR, 0), (bad_counts, DEFECT_BGR, 1)):
        for i, value in enumerate(counts):
            if value == 0:
                continue
            x0, x1 = x_of(edges[i]), x_of(edges[i + 1])
            half = max(1, (x1 - x0) // 2)
            start = x0 + offset * half
            cv2.rectangle(canvas, (start + 1, y_of(value)), (start + half - 1, lower), color, -1)
    cv2.line(canvas, (left, lower), (right, lower), INK, 1)
    cv2.line(canvas, (left, upper), (left, lower), INK, 1)

    xt = x_of(1.0)
    for y in range(upper, lower, 12):
        cv2.line(canvas, (xt, y), (xt, min(lower, y + 6)), THRESHOLD_BGR, 2)
    _text(canvas, f"threshold = 1.0 (score {threshold:.4g})", (min(xt + 6, width - 260), upper + 14),
          color=THRESHOLD_BGR)
    _text(canvas, "normalised score (score / threshold); anomalous when > 1.0", (left, height - 14))
    _text(canvas, "images", (8, upper - 14))
    _text(canvas, title, (left, 28), scale=0.6, thickness=1)
    legend_x = right - 220
    cv2.rectangle(canvas, (legend_x, upper - 38), (legend_x + 14, upper - 26), NOMINAL_BGR, -1)
    _text(canvas, f"good parts ({good.size})", (legend_x + 20, upper - 27))
    if bad.size:
        cv2.rectangle(canvas, (legend_x, upper - 20), (legend_x + 14, upper - 8), DEFECT_BGR, -1)
        _text(canvas, f"defects ({bad.size})", (legend_x + 20, upper - 9))
    return canvas


def write_png(path: Path, image: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    write_file_atomic(path, encoded.tobytes())


# ---------------------------------------------------------------------------------------------- files


def write_report(report_dir: Path, outcome: CalibrationOutcome) -> List[Path]:
    """histogram.png, scores.csv, summary.txt and a copy of the calibration JSON in report_dir."""
    folder = Path(report_dir)
    folder.mkdir(parents=True, exist_ok=True)
    cal = outcome.calibration
    title = (f"{cal.image.n_nominal} good, {cal.image.n_defect} defect images; target false-alarm rate "
             f"{_pct(cal.image.target_false_alarm_rate)} at {cal.image.confidence:.0%} confidence")
    histogram = histogram_image([i.score for i in outcome.nominal], [i.score for i in outcome.defects],
                                cal.image.threshold, title)
    paths = [folder / "histogram.png", folder / "scores.csv", folder / "summary.txt", folder / "calibration.json"]
    write_png(paths[0], histogram)
    write_scores_csv(paths[1], [*outcome.nominal, *outcome.defects, *outcome.excluded], cal, outcome.skipped)
    write_file_atomic(paths[2], calibration_summary(outcome).encode("utf-8"))
    write_file_atomic(paths[3], cal.to_json_bytes())
    return paths


def write_check_report(report_dir: Path, outcome: CheckOutcome) -> List[Path]:
    """histogram.png, scores.csv and summary.txt for a --check run."""
    folder = Path(report_dir)
    folder.mkdir(parents=True, exist_ok=True)
    cal = outcome.calibration
    title = (f"check: {outcome.false_alarms} false alarm(s) in {len(outcome.images)} new good parts "
             f"(target {_pct(cal.image.target_false_alarm_rate)})")
    paths = [folder / "histogram.png", folder / "scores.csv", folder / "summary.txt"]
    write_png(paths[0], histogram_image([i.score for i in outcome.images], [], cal.image.threshold, title))
    write_scores_csv(paths[1], outcome.images, cal, outcome.skipped)
    write_file_atomic(paths[2], check_summary(outcome).encode("utf-8"))
    return paths
