"""`patchcore-edge export NOMINAL_DIR -o BUNDLE_DIR` (torch is imported only when the command runs)."""

from __future__ import annotations

from pathlib import Path
import json
from typing import Dict, Optional, Tuple

import click

from ..bundle import BundleError
from ..methods import method_names
from ..preprocess import FITS, checked_roi
from ..progress import StageBars

BACKBONE_CHOICES = ("mobilenet_v2", "resnet18", "wide_resnet50_2", "efficientnet_lite0", "efficientnet_lite1",
                    "efficientnet_lite2")


def read_roi(path: Path) -> Tuple[Tuple[float, float], ...]:
    """The polygon of a region-of-interest file; a one-line error naming the file otherwise."""
    try:
        points = json.loads(path.read_text(encoding="utf-8"))["polygon"]
        polygon = tuple((float(x), float(y)) for x, y in points)
    except OSError as error:
        raise click.ClickException(f"{path}: cannot read the region of interest ({error.strerror or error})")
    except (ValueError, KeyError, TypeError):
        raise click.ClickException(f'{path}: expected JSON {{"polygon": [[x, y], ...]}} with x, y in [0, 1]') from None
    try:
        return checked_roi(polygon)
    except ValueError as error:
        raise click.ClickException(f"{path}: {error}") from None


@click.command("export")
@click.argument("nominal_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Bundle folder to create.")
@click.option("--method", type=click.Choice(method_names()), default="patchcore", show_default=True,
              help="Scoring method of the bundle (README: which to pick when).")
@click.option("--method-param", "method_params", multiple=True, metavar="NAME=VALUE",
              help="One of the method's own parameters (repeatable); a wrong name is refused with the list of "
                   "those the method takes.")
@click.option("--backbone", type=click.Choice(BACKBONE_CHOICES), default=None,
              help="ImageNet backbone. Default: the method's measured one (PatchCore: efficientnet_lite1, from the "
                   "[export] extra; the others: mobilenet_v2).")
@click.option("--reduction", type=click.Choice(("per-stage", "concat")), default=None,
              help="How the two stages' channels become the patch feature (PatchCore). Default: the backbone's "
                   "measured order (efficientnet_lite1: concat; mobilenet_v2: per-stage).")
@click.option("--weights", default=None, metavar="FILE|random",
              help="ImageNet weights (torchvision state_dict .pth). Default: the backbone's offline package (mobilenet_v2, "
                   "efficientnet_lite0/1/2), "
                   "else torchvision's cache. 'random' asks for untrained weights (for tests only).")
@click.option("--fit", type=click.Choice(FITS), default="squash", show_default=True,
              help="How the image fills the network input: squash (whole image, aspect ignored), letterbox "
                   "(whole image, aspect kept, padding never scores), crop (centre crop, MVTec protocol: the "
                   "border is never inspected).")
@click.option("--input-size", type=(int, int), default=None, metavar="W H",
              help="Network input width and height (default: --crop x --crop); e.g. 448 224 for 2:1 parts.")
@click.option("--resize", type=click.IntRange(16, 4096), default=256, show_default=True, help="--fit crop: shorter image side before the crop.")
@click.option("--crop", type=click.IntRange(16, 4096), default=224, show_default=True, help="Side of the square network input.")
@click.option("--tile", type=int, default=None, metavar="SIZE",
              help="Cut each image into SIZE x SIZE tiles (native resolution) scored one by one: for large frames.")
@click.option("--tile-overlap", type=int, default=0, show_default=True, metavar="PIXELS",
              help="Overlap between neighbouring tiles.")
@click.option("--roi", "roi_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Region of interest: a JSON file {\"polygon\": [[x, y], ...]} with x, y in [0, 1] of the image "
                   "width/height. Outside it nothing scores and masks stay empty.")
@click.option("--feature-dim", type=click.IntRange(1), default=None, help="Patch feature channels (default: the backbone's).")
@click.option("--coreset-ratio", default=0.1, show_default=True, help="Fraction of patches kept in the bank.")
@click.option("--coreset-size", type=int, default=None, help="Absolute bank size (overrides --coreset-ratio).")
@click.option("--projection-dim", type=click.IntRange(1), default=128, show_default=True, help="Random projection dim for the coreset.")
@click.option("--coreset-method", type=click.Choice(("auto", "exact", "partitioned")), default="auto",
              show_default=True, help="exact greedy, or greedy in k-means cells (fast at any size); auto picks.")
@click.option("--device-profile", default=None, metavar="NAME",
              help="Cap the bank so the bundle fits this board's memory budget (see `devices list`).")
@click.option("--dask", "dask_address", default=None, metavar="SCHEDULER|local",
              help="Run the feature pass and the coreset's cells on a Dask cluster (needs the [dask] extra); local = 2 processes.")
@click.option("--device", default="cpu", show_default=True, help="torch device: cpu, cuda, cuda:1 ...")
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--ef", type=click.IntRange(1), default=None,
              help="Patch SVDD / multi-scale: HNSW search breadth recorded as the runtime default (PatchCore has no "
                   "index to record it in: set its cells probed per patch with `run --ef`).")
@click.option("--engine/--no-engine", default=True, show_default=True,
              help="Build a TensorRT engine when TensorRT and a GPU are present.")
@click.option("--force", is_flag=True, help="Replace an existing bundle (only a bundle: any other folder is refused).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def export_command(nominal_dir: Path, output: Path, method: str, method_params: Tuple[str, ...], backbone: Optional[str],
                   reduction: Optional[str], weights: Optional[str], fit: str,
                   input_size: Optional[Tuple[int, int]], resize: int, crop: int, tile: Optional[int],
                   tile_overlap: int, roi_file: Optional[Path],
                   feature_dim: Optional[int], coreset_ratio: float, coreset_size: Optional[int], projection_dim: int,
                   coreset_method: str, device_profile: Optional[str], dask_address: Optional[str], device: str, seed: int, batch_size: int, ef: Optional[int], engine: bool, force: bool,
                   quiet: bool) -> None:
    """Build a bundle (PatchCore by default, see --method) from a folder of defect-free images."""
    if ef is not None and method == "patchcore":
        # Refused, not ignored: a user who sets it expects it to take effect.
        raise click.UsageError("--ef is recorded only by methods with an HNSW index; PatchCore's first pass is set "
                               "at run time: `patchcore-edge run BUNDLE ... --ef N` (k-means cells probed per patch)")
    if reduction is not None and method != "patchcore":
        raise click.UsageError(f"--reduction shapes PatchCore's patch vectors; --method {method} forms its own "
                               "from the backbone's stages (drop --reduction)")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise click.ClickException("export needs torch: pip install 'patchcore-edge[export]'") from None
    # Only now: the exporter imports torch, which the runtime commands must not need.
    from ..export.pipeline import ExportError, ExportOptions, export_bundle

    options = ExportOptions(nominal_dir=nominal_dir, output=output, method=method, method_params=method_params,
                            backbone=backbone, reduction=reduction, weights=weights,
                            fit=fit, input_size=input_size, tile=tile, tile_overlap=tile_overlap,
                            roi=None if roi_file is None else read_roi(roi_file),
                            resize=resize, crop=crop, feature_dim=feature_dim, coreset_ratio=coreset_ratio,
                            coreset_size=coreset_size, projection_dim=projection_dim, device=device, seed=seed,
                            batch_size=batch_size, ef=ef, engine=engine, force=force,
                            coreset_method=coreset_method, device_profile=device_profile, dask=dask_address)
    bars = StageBars(label=lambda stage: f"{stage:<8}", quiet=quiet)
    try:
        summary = export_bundle(options, progress=bars, log=lambda message: click.echo(message, err=True))
    except (ExportError, BundleError) as error:
        bars.close()
        raise click.ClickException(str(error)) from None
    except OSError as error:  # a full disk or a read-only folder while writing the staging bundle
        bars.close()
        where = error.filename or output
        raise click.ClickException(f"{where}: {error.strerror or error}; no bundle was written") from None
    bars.close()
    rows: Dict[str, str] = {
        "bundle": str(summary.bundle),
        "images": f"{summary.images} used, {len(summary.skipped)} skipped",
    }
    if summary.method_lines:  # a method that states its own rows (SPADE, PaDiM)
        rows.update({"method": summary.method, **summary.method_lines})
    else:
        rows.update({
            "patches": f"{summary.patches:,} x {summary.feature_dim} dims",
            "coreset": f"{summary.coreset_size:,} vectors ({summary.bank_mb:.1f} MB)",
            "coverage radius": "n/a" if summary.coverage_radius is None else f"{summary.coverage_radius:.4f}",
            "selection": summary.coreset_note,
        })
    rows.update({
        "onnx parity": f"max |onnx - torch| = {summary.onnx_max_abs_diff:.2e}",
        "engine": summary.engine_note,
        "time": ", ".join(f"{k} {v:.1f}s" for k, v in summary.seconds.items()),
    })
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        click.echo(f"{key:<{width}}  {value}")
