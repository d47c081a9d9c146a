"""`patchcore-edge calibrate`: set thresholds from good (and defect) parts, check them, roll them back.

    patchcore-edge calibrate BUNDLE NOMINAL_DIR [--defects DIR [--masks DIR]] [--false-alarm-rate 0.01]
                             [--confidence 0.95] [--optimise f1|recall] [--report-dir DIR]
    patchcore-edge calibrate BUNDLE --rollback
    patchcore-edge calibrate BUNDLE --check NEW_NOMINAL_DIR

Exit status: 0 done; 1 error (message says what to do); 3 --check found the false-alarm rate above the target.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import click

from ..bundle import Bundle, BundleError, bundle_lock
from ..calibration import calibrate as flow
from ..calibration import report
from ..calibration.report import findings_text
from ..decision import CalibrationError
from ..progress import StageBars

CHECK_FAILED_EXIT = 3


def _echo_findings(findings: Any) -> None:
    for line in findings_text(findings):
        click.echo(line.strip() if not line.startswith("      ") else line, err=True)


def _check_report_dir(report_dir: Path, bundle: Path, inputs: "list[Path]") -> None:
    """The report's histogram.png inside an image folder would be read as a part next time; inside the bundle it
    would be an unlisted file."""
    target = report_dir.resolve()
    for folder in [bundle, *inputs]:
        root = folder.resolve()
        if target == root or target.is_relative_to(root):
            raise click.UsageError(f"--report-dir {report_dir}: lies inside {folder}; its histogram.png would be "
                                   "read as a part (or as a bundle file) next time: choose a folder outside it")


@click.command("calibrate")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("nominal_dir", required=False, type=click.Path(path_type=Path))
@click.option("--defects", "defects_dir", type=click.Path(path_type=Path), default=None,
              help="Folder of defective parts (sub-folders allowed): reports recall, enables --optimise.")
@click.option("--masks", "masks_dir", type=click.Path(path_type=Path), default=None,
              help="Defect masks, same sub-folders as --defects, named <stem>_mask.png or <stem>.png: sets the "
                   "pixel threshold by best pixel F1.")
@click.option("--false-alarm-rate", default=0.01, show_default=True,
              type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
              help="Largest acceptable fraction of good parts flagged as defective.")
@click.option("--confidence", default=0.95, show_default=True,
              type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
              help="How sure the false-alarm guarantee must be.")
@click.option("--optimise", type=click.Choice(["f1", "recall"]), default=None,
              help="With --defects: f1 = best image F1 (may break the false-alarm target); recall = highest recall "
                   "that keeps the target (the default threshold).")
@click.option("--min-defect-area", type=click.IntRange(1), default=None,
              help="Smallest defect region shown in masks, in image pixels (default: a quarter of a feature cell).")
@click.option("--report-dir", type=click.Path(path_type=Path), default=None,
              help="Write histogram.png, scores.csv and summary.txt here.")
@click.option("--rollback", is_flag=True, help="Swap back to the previous calibration.")
@click.option("--check", "check_dir", type=click.Path(path_type=Path), default=None, metavar="NEW_NOMINAL_DIR",
              help="Score new good parts against the current calibration; the bundle is not changed.")
@click.option("--dry-run", is_flag=True, help="Compute and report, but do not write into the bundle.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True,
              help="Feature backend.")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1, 256))
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def calibrate_command(bundle: Path, nominal_dir: Optional[Path], defects_dir: Optional[Path],
                      masks_dir: Optional[Path], false_alarm_rate: float, confidence: float, optimise: Optional[str],
                      min_defect_area: Optional[int], report_dir: Optional[Path], rollback: bool,
                      check_dir: Optional[Path], dry_run: bool, backend: str, batch_size: int, quiet: bool) -> None:
    """Set the thresholds of BUNDLE from images of good parts in NOMINAL_DIR (and defects, optionally).

    The image threshold keeps the false-alarm rate at or below --false-alarm-rate with the stated --confidence,
    whatever the score distribution (that needs 299 good images for 1 % at 95 %; with fewer, the highest good
    score is used and the rate it does guarantee is reported).
    """
    modes = sum([rollback, check_dir is not None, nominal_dir is not None])
    if modes == 0:
        hint = " (--defects alone is not enough: thresholds are set from good parts)" if defects_dir else ""
        raise click.UsageError(f"give NOMINAL_DIR, a folder of images of good parts{hint}; or --check DIR; "
                               "or --rollback")
    if modes > 1:
        raise click.UsageError("use one of: NOMINAL_DIR (calibrate), --check DIR, --rollback")
    if report_dir is not None:
        _check_report_dir(report_dir, bundle, [d for d in (nominal_dir, defects_dir, masks_dir, check_dir) if d])
    progress = StageBars(label=lambda stage: f"scoring {stage} images", quiet=quiet)
    try:
        if rollback:
            current, previous = flow.rollback(Bundle.load(bundle, verify=False))
            click.echo(f"rolled back: {current} is now the current calibration ({previous} kept as previous; "
                       "--rollback again to undo)")
            return
        # Verified here once; the detector reuses the loaded bundle.
        loaded = Bundle.load(bundle, verify_calibration=check_dir is not None)
        detector = flow.load_detector(loaded, backend)
        try:
            if check_dir is not None:
                outcome = flow.check(detector, loaded, check_dir, batch_size=batch_size, progress=progress)
                progress.close()
                _echo_findings(outcome.findings)
                click.echo(report.check_summary(outcome, findings=False), nl=False)
                if report_dir is not None:
                    report.write_check_report(report_dir, outcome)
                    click.echo(f"report: {report_dir}")
                if outcome.verdict == "above target":
                    click.get_current_context().exit(CHECK_FAILED_EXIT)
                return
            assert nominal_dir is not None
            options = flow.CalibrationOptions(
                nominal_dir=nominal_dir, defects_dir=defects_dir, masks_dir=masks_dir,
                false_alarm_rate=false_alarm_rate, confidence=confidence, optimise=optimise,
                min_defect_area=min_defect_area, batch_size=batch_size)
            result = flow.calibrate(detector, loaded, options, progress=progress)
        finally:
            progress.close()
            close = getattr(detector, "close", None)
            if close is not None:
                close()
        if not dry_run:
            with bundle_lock(bundle, "calibrate"):
                result.written = flow.write_calibration(loaded.reload(), result.calibration)
        _echo_findings(result.findings)
        click.echo(report.calibration_summary(result, findings=False), nl=False)
        if report_dir is not None:
            report.write_report(report_dir, result)
            click.echo(f"report: {report_dir}")
    except (CalibrationError, BundleError) as error:
        progress.close()
        raise click.ClickException(str(error)) from None
    except OSError as error:
        progress.close()
        where = getattr(error, "filename", None) or report_dir or bundle
        raise click.ClickException(f"{where}: {error.strerror or error}") from None
