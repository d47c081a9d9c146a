"""`patchcore-edge devices ...` (profiles, detection, memory fit) and `patchcore-edge engine build`.

The lead registers `devices_group` and `engine_group` in the main click group. Nothing here imports torch;
TensorRT is reached only through `patchcore_edge.trt`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
import tempfile
from typing import Any, Dict, Iterator, List, Mapping, NoReturn, Optional, Sequence, Tuple

import click
import numpy as np

from ..bundle import Bundle, BundleError, utc_stamp
from ..imageio import ImageReadError, list_images, read_rgb
from ..methods import ScorerOptions, scorer_class
from ..preprocess import InputSpec, preprocess
from ..runtime.backends import OnnxRuntimeFeatures
from ..devices.detect import DeviceInfo, detect_device
from ..devices.memory import estimate_memory, format_estimate
from ..devices.profiles import ProfileError, get_profile, load_profiles

# Largest accepted relative change of any image score, engine vs ONNX Runtime, per precision. Thresholds are
# set on scores, so an engine that moves scores by more than this could move decisions.
SCORE_TOLERANCE = {"fp32": 0.005, "fp16": 0.02, "int8": 0.10}
SYNTHETIC_IMAGES = 8


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
        click.echo(json.dumps(info.to_dict(), indent=2))
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
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
@click.option("--strict", is_flag=True, help="Exit with status 1 when the bundle does not fit.")
def fit_command(bundle: Path, device_name: Optional[str], variant: Optional[str], batch: Optional[int],
                backend: Optional[str], memory_mb: Optional[int], as_json: bool, strict: bool) -> None:
    """Estimate the memory BUNDLE needs on a board and whether it fits the board's share."""
    loaded = _read_bundle(bundle, verify_files=False)
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
                                   memory_total_mb=memory_total)
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


def _preprocessed_images(folder: Path, spec: InputSpec, limit: int) -> Iterator[np.ndarray]:
    """Nominal images of `folder`, preprocessed as the runtime does; unreadable files are reported and skipped."""
    try:
        paths, skipped = list_images(folder)
    except NotADirectoryError as error:
        _fail(str(error))
    for problem in skipped:
        click.echo(f"skipped {problem}", err=True)
    used = 0
    for path in paths:
        if used >= limit:
            break
        try:
            image = read_rgb(path)
        except ImageReadError as error:
            click.echo(f"skipped {error}", err=True)
            continue
        used += 1
        yield preprocess(image, spec)


def _synthetic_images(spec: InputSpec, count: int = SYNTHETIC_IMAGES) -> List[np.ndarray]:
    """Smooth textured images (deterministic) when no sample images are given; stated in the verification."""
    rng = np.random.default_rng(0)
    size = spec.resize
    ramp = np.linspace(0, 2 * np.pi, size, dtype=np.float32)
    images = []
    for i in range(count):
        base = 128 + 60 * np.sin(ramp[None, :, None] * (i + 1) + ramp[:, None, None] * 0.5)
        noise = rng.normal(0, 12, (size, size, 3))
        images.append(preprocess(np.clip(base + noise, 0, 255).astype(np.uint8), spec))
    return images


def verify_against_onnxruntime(bundle: Bundle, candidate: Any, images: Sequence[np.ndarray], source: str
                               ) -> Dict[str, Any]:
    """Features and image scores of `candidate` vs ONNX Runtime (CPU) on the same preprocessed images.

    Scores use the bundle's method with exact search, so the only difference between the two columns is the
    feature backend.
    """
    from ..trt import feature_errors

    scorer = scorer_class(bundle.method.name).load(bundle, ScorerOptions(exact_search=True))
    features = bundle.features
    reference = OnnxRuntimeFeatures(bundle.path / features.onnx_file, features.input_name, features.outputs,
                                    providers=("CPUExecutionProvider",))
    batch = np.stack(list(images)).astype(np.float32)
    try:
        ref = reference.run(batch)
    finally:
        reference.close()
    cand = {features.output_name: candidate.features(batch)}
    ref_scores = np.array([s.score for s in scorer.score(ref)])
    cand_scores = np.array([s.score for s in scorer.score(cand)])
    change = np.abs(cand_scores - ref_scores)
    relative = change / np.maximum(np.abs(ref_scores), 1e-12)
    return {"reference": "onnxruntime CPUExecutionProvider", "images": int(len(batch)), "image_source": source,
            "features": feature_errors(ref[features.output_name], cand[features.output_name]),
            "scores": {"max_abs_change": float(change.max()), "max_rel_change": float(relative.max()),
                       "reference_min": float(ref_scores.min()), "reference_max": float(ref_scores.max())}}


def check_tolerance(verification: Mapping[str, Any], precision: str,
                    tolerance: Optional[float] = None) -> Tuple[bool, str]:
    """Whether the score change is within the tolerance stated for the precision, and the line saying so."""
    limit = SCORE_TOLERANCE[precision] if tolerance is None else float(tolerance)
    change = float(verification["scores"]["max_rel_change"])
    verdict = "within" if change <= limit else "BEYOND"
    return change <= limit, (f"image scores change by at most {change:.3g} (relative) on "
                             f"{verification['images']} {verification['image_source']} images: {verdict} the "
                             f"{limit:g} tolerance for {precision}")


def _previous_caches(bundle: Bundle, slug: str, version: str) -> Tuple[Optional[bytes], Optional[bytes]]:
    """Timing and INT8 caches of an earlier engine for this device and TensorRT version, if any."""
    timing = int8 = None
    for entry in bundle.engines:
        if entry.get("device") == slug and entry.get("tensorrt_version") == version:
            if entry.get("timing_cache") and timing is None:
                timing = bundle.file(entry["timing_cache"]).read_bytes()
            if entry.get("int8_calibration_cache") and int8 is None:
                int8 = bundle.file(entry["int8_calibration_cache"]).read_bytes()
    return timing, int8


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
def build_command(bundle: Path, precision: Optional[str], dla_core: Optional[int], workspace_mb: Optional[int],
                  calibration_images: Optional[Path], max_batch: Optional[int], verify_images: Optional[Path],
                  calibration_limit: int, tolerance: Optional[float]) -> None:
    """Build a TensorRT engine for this device, verify it against ONNX Runtime, register it in BUNDLE."""
    from .. import trt

    available, reason = trt.tensorrt_status()
    if not available:
        _fail(f"cannot build a TensorRT engine here: {reason}. Build it on the Jetson that will run the bundle "
              "(JetPack ships TensorRT), or run with `--backend onnxruntime`.")
    loaded = _read_bundle(bundle, verify_files=True)
    spec = loaded.input_spec
    info = detect_device()
    profile = get_profile(info.slug)
    if not profile.engines_supported:
        _fail(f"{info.slug}: {profile.data['engines'].get('note')}")
    chosen = precision or str(profile.defaults.get("precision") or "fp16")
    version = str(info.tensorrt_version)
    timing_cache, int8_cache = _previous_caches(loaded, info.slug, version)
    calibration = None
    if chosen == "int8" and calibration_images is not None:
        int8_cache = None  # new images asked for: calibrate again
        calibration = _preprocessed_images(calibration_images, spec, calibration_limit)

    # A rebuild for the same device, TensorRT and precision gets a time tag: bundle files are never overwritten.
    plain_name = trt.engine_file_name(info.slug, version, chosen, dla_core)
    tag = utc_stamp() if loaded.has_file(plain_name) else None

    # Built outside the bundle: only update_bundle writes into it, so a failed build leaves it untouched.
    with tempfile.TemporaryDirectory(prefix="patchcore-engine-") as staging_name:
        staging = Path(staging_name)
        try:
            entry = trt.build_engine_into(staging, loaded.file(loaded.features.onnx_file), chosen,
                                          log=lambda line: click.echo(line), max_batch=max_batch,
                                          workspace_mb=workspace_mb, dla_core=dla_core,
                                          calibration_batches=calibration, timing_cache=timing_cache,
                                          int8_cache=int8_cache, tag=tag)
        except (trt.EngineBuildError, trt.TensorRTUnavailable) as error:
            _fail(str(error))
        sample_dir = verify_images or calibration_images
        if sample_dir is not None:
            samples = list(_preprocessed_images(sample_dir, spec, 16))
            source = f"sample ({sample_dir})"
        else:
            samples, source = _synthetic_images(spec), "synthetic"
        if not samples:
            _fail(f"{sample_dir}: no readable image to verify the engine on")
        with trt.TensorRTFeatures(staging / entry["file"], loaded.manifest_copy()) as candidate:
            verification = verify_against_onnxruntime(loaded, candidate, samples, source)
        ok, line = check_tolerance(verification, chosen, tolerance)
        click.echo(line)
        if not ok:
            _fail(f"engine not registered: {line}. Try --precision fp16 (or fp32), or more representative "
                  "--calibration-images for INT8.", code=1)
        verification["score_tolerance"] = SCORE_TOLERANCE[chosen] if tolerance is None else tolerance
        entry["verification"] = {**entry["verification"], "bundle_check": verification}

        artifacts = [entry["file"], entry["timing_cache"]] + ([entry["int8_calibration_cache"]]
                                                              if entry.get("int8_calibration_cache") else [])
        new_files = {name: (staging / name).read_bytes() for name in artifacts}
        engines = loaded.engines
        replaced = [e for e in engines
                    if (e.get("device"), e.get("tensorrt_version"), e.get("precision"), e.get("dla_core"))
                    == (entry["device"], entry["tensorrt_version"], entry["precision"], entry["dla_core"])]
        remove = sorted({name for e in replaced for name in (e.get("file"), e.get("timing_cache"),
                                                                  e.get("int8_calibration_cache"))
                         if name and loaded.has_file(name)})
        loaded.set_engines([e for e in engines if e not in replaced] + [entry], new_files, remove=remove)
    click.echo(f"registered {entry['file']} in {bundle}" + (f" (replaces {', '.join(remove)})" if remove else ""))

