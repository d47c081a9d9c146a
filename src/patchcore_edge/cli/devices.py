"""`patchcore-edge devices ...` (profiles, detection, memory fit) and `patchcore-edge engine build`.

The lead registers `devices_group` and `engine_group` in the main click group. Nothing here imports torch; the
engine work itself is library code in `devices/engine.py`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn, Optional, Tuple

import click

from .. import trt
from ..bundle import Bundle, BundleError
from ..devices.detect import DeviceInfo, detect_device
from ..devices.engine import build_and_register
from ..devices.memory import estimate_memory, format_estimate
from ..devices.profiles import ProfileError, get_profile, load_profiles
from ..search import first_pass_kernel


def _fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


# ----------------------------------------------------------------------------------------------- devices


@click.group("devices")
def devices_group() -> None:
    """Jetson board profiles, board detection and memory fit of a bundle."""


@devices_group.command("list")
def list_command() -> None:
    """One line per known board: compute capability, memory variants, DLA cores, engine support."""
    try:
        profiles = load_profiles()
    except ProfileError as error:
        _fail(str(error))
    click.echo(f"{'device':<18} {'compute':<8} {'memory (DLA cores)':<24} {'JetPack / TensorRT':<28} engines")
    for profile in profiles.values():
        cc = profile.data["gpu"].get("compute_capability") or "-"
        variants = ", ".join(f"{v.name} ({v.dla_cores})" if v.memory_gb else v.name for v in profile.variants)
        software = ", ".join(f"{s['jetpack']}/{s['tensorrt']}" for s in profile.data["software"]) or "-"
        engines = ("yes: " + "/".join(profile.precisions)) if profile.engines_supported else "no (ONNX Runtime)"
        click.echo(f"{profile.name:<18} {cc:<8} {variants:<24} {software:<28} {engines}")


@devices_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def show_command(name: str, as_json: bool) -> None:
    """Everything the profile NAME holds, with the source of each group of figures."""
    try:
        profile = get_profile(name)
    except ProfileError as error:
        _fail(str(error))
    if as_json:
        click.echo(json.dumps(profile.data, indent=2))
        return
    data = profile.data
    gpu = data["gpu"]
    click.echo(f"{profile.title} [{profile.name}]")
    if gpu.get("compute_capability"):
        click.echo(f"  GPU: {gpu['architecture']}, compute capability {gpu['compute_capability']}, fast FP16 "
                   f"{'yes' if gpu['fast_fp16'] else 'no'}, fast INT8 {'yes' if gpu['fast_int8'] else 'no'}")
    for variant in profile.variants:
        memory = f"{variant.memory_gb:g} GB" if variant.memory_gb else "detected at run time"
        modules = f", modules {', '.join(variant.modules)}" if variant.modules else ""
        click.echo(f"  variant {variant.name}: {memory}, {variant.dla_cores} DLA core(s){modules}")
    for sw in data["software"]:
        click.echo(f"  JetPack {sw['jetpack']} (L4T {sw['l4t']}, Ubuntu {sw['ubuntu']}, Python {sw['python']}): "
                   f"CUDA {sw['cuda']}, TensorRT {sw['tensorrt']}")
    engines = data["engines"]
    click.echo(f"  engines: {'/'.join(engines.get('precisions', [])) or 'none'} -- {engines.get('note', '')}")
    defaults = profile.defaults
    click.echo("  defaults: " + ", ".join(f"{k}={v}" for k, v in defaults.items()))
    click.echo("  sources:")
    for group, source in data["sources"].items():
        click.echo(f"    {group}: {source}")


def _print_device(info: DeviceInfo) -> None:
    cc = info.compute_capability
    click.echo(f"device: {info.slug} ({info.title}), variant {info.variant}, {info.dla_cores} DLA core(s)")
    if info.model:
        click.echo(f"  model: {info.model}")
    if info.l4t_release:
        click.echo(f"  Jetson Linux {info.l4t_release} (JetPack {info.jetpack or 'unknown'})")
    if info.memory_total_mb is not None:
        click.echo(f"  memory: {info.memory_total_mb} MB")
    if cc is not None:
        click.echo(f"  GPU: {info.gpu_name or 'not probed'}, compute capability {cc[0]}.{cc[1]}")
    click.echo(f"  TensorRT: {info.tensorrt_version or 'not available'}")
    click.echo(f"  PatchCore first pass: {first_pass_kernel()}")
    for note in info.notes:
        click.echo(f"  note: {note}")


@devices_group.command("detect")
@click.option("--json", "as_json", is_flag=True, help="Print the detection as JSON.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("/"), hidden=True,
              help="Read /proc and /etc under this folder (tests).")
@click.option("--no-probe", is_flag=True, hidden=True, help="Skip the CUDA and TensorRT probes (tests).")
def detect_command(as_json: bool, root: Path, no_probe: bool) -> None:
    """Which board this is (device tree, L4T release, memory, CUDA) and what TensorRT it has."""
    info = detect_device(root, probe_cuda=not no_probe, probe_tensorrt=not no_probe)
    if as_json:
        # Which search this install runs (the compiled C pass, or numpy where it could not be built): a field question.
        click.echo(json.dumps({**info.to_dict(), "first_pass": first_pass_kernel()}, indent=2))
    else:
        _print_device(info)


def _read_bundle(bundle_dir: Path, verify_files: bool) -> Bundle:
    try:
        return Bundle.load(bundle_dir, verify=verify_files)
    except BundleError as error:
        _fail(str(error))


@devices_group.command("fit")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--device", "device_name", default=None, help="Profile name (default: detect this board).")
@click.option("--variant", default=None, help="Memory variant, e.g. 8GB (default: detected, else the smallest).")
@click.option("--batch", type=click.IntRange(1, 1024), default=None, help="Images per inference.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default=None,
              help="Feature backend (default: the profile's).")
@click.option("--memory-mb", type=click.IntRange(1), default=None,
              help="Memory of the machine, for profiles without a fixed size (workstation, cpu-only).")
@click.option("--image-size", type=(click.IntRange(16, 65536), click.IntRange(16, 65536)), default=None,
              metavar="W H", help="Camera frame size: counts the frames and their full-size "
                                  "maps; needed for a tiled bundle (its tiles are one batch).")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
@click.option("--strict", is_flag=True, help="Exit with status 1 when the bundle does not fit.")
def fit_command(bundle: Path, device_name: Optional[str], variant: Optional[str], batch: Optional[int],
                backend: Optional[str], memory_mb: Optional[int], image_size: Optional[Tuple[int, int]],
                as_json: bool, strict: bool) -> None:
    """Estimate the memory BUNDLE needs on a board and whether it fits the board's share."""
    loaded = _read_bundle(bundle, verify_files=False)
    if loaded.input_spec.tile is not None and image_size is None:  # issue 18: tiles per frame set the batch
        _fail(f"{bundle}: a tiled bundle ({loaded.input_spec.tile} px tiles): pass --image-size W H (the camera "
              "frame) so that the estimate counts its tiles")
    memory_total = memory_mb
    try:
        if device_name is None:
            info = detect_device()
            profile = get_profile(info.slug)
            variant = variant or info.variant
            memory_total = memory_total or info.memory_total_mb
        else:
            profile = get_profile(device_name)
        estimate = estimate_memory(loaded, profile, variant=variant, batch=batch, backend=backend,
                                   memory_total_mb=memory_total, image_size=image_size)
    except ProfileError as error:
        _fail(str(error))
    if as_json:
        click.echo(json.dumps(estimate, indent=2))
    else:
        click.echo(format_estimate(estimate))
    if estimate["warning"]:
        click.echo(f"WARNING: {estimate['warning']}", err=True)
        if strict:
            sys.exit(1)


# ----------------------------------------------------------------------------------------------- engine build


@click.group("engine")
def engine_group() -> None:
    """TensorRT engines for a bundle (built on the device that will run them)."""


@engine_group.command("build")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--precision", type=click.Choice(["fp16", "int8", "fp32"]), default=None,
              help="Engine precision (default: the board profile's, fp16 on Jetson).")
@click.option("--dla", "dla_core", type=click.IntRange(0), default=None, help="Run on this DLA core (GPU fallback).")
@click.option("--workspace", "workspace_mb", type=click.IntRange(16), default=None,
              help="Builder workspace in MB (default: the board profile's).")
@click.option("--calibration-images", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Nominal images for INT8 calibration (also used to verify the engine).")
@click.option("--max-batch", type=click.IntRange(1, 256), default=None,
              help="Largest batch the engine accepts (default: the board profile's).")
@click.option("--verify-images", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Images to compare the engine with ONNX Runtime on (default: the calibration images, else "
                   "synthetic textures).")
@click.option("--calibration-limit", type=click.IntRange(1), default=300, show_default=True,
              help="Use at most this many calibration images.")
@click.option("--tolerance", type=click.FloatRange(0.0, 1.0), default=None,
              help="Largest accepted relative score change (default: fp32 0.005, fp16 0.02, int8 0.10).")
@click.option("--image-size", type=(click.IntRange(16, 65536), click.IntRange(16, 65536)), default=None,
              metavar="W H", help="Camera frame size; a tiled bundle's engine is built for the tiles of one frame "
                                  "as one batch (needed for a tiled bundle unless --max-batch is given).")
def build_command(bundle: Path, precision: Optional[str], dla_core: Optional[int], workspace_mb: Optional[int],
                  calibration_images: Optional[Path], max_batch: Optional[int], verify_images: Optional[Path],
                  calibration_limit: int, tolerance: Optional[float], image_size: Optional[Tuple[int, int]]) -> None:
    """Build a TensorRT engine for this device, verify it against ONNX Runtime, register it in BUNDLE."""
    try:
        report = build_and_register(bundle, precision, dla_core=dla_core, workspace_mb=workspace_mb,
                                    max_batch=max_batch, calibration_images=calibration_images,
                                    calibration_limit=calibration_limit, verify_images=verify_images,
                                    tolerance=tolerance, image_size=image_size, log=click.echo,
                                    warn=lambda line: click.echo(line, err=True))
    except trt.EngineScoreError as error:
        _fail(str(error), code=1)
    except (trt.EngineBuildError, trt.TensorRTUnavailable, trt.CudaError, BundleError) as error:
        _fail(str(error))
    removed = report.removed
    click.echo(f"registered {report.entry['file']} in {bundle}" + (f" (replaces {', '.join(removed)})" if removed
                                                                    else ""))
    for note in report.notes:
        click.echo(f"note: {note}")
