"""Export: nominal images -> the method's network -> its outputs -> the method's arrays + features.onnx -> bundle.

The same for every method (`export/methods/`): PatchCore's fit is coreset -> memory bank + HNSW index.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import __version__, trt
from ..bundle import FORMAT_NAME, FORMAT_VERSION, BundleError, check_replaceable, write_new_bundle
from ..devices.engine import build_engine_into
from ..imageio import ImageReadError, decode_rgb, list_images, read_image_bytes
from ..preprocess import InputSpec
from ..stats import quantiles
from .distributed import DaskUnavailable, dask_client, extract_on_dask
from .methods.base import MethodSettings

# Fewer good images than this cannot describe "normal": refuse rather than ship a bundle that alarms on everything.
MIN_IMAGES = 5

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]


class ExportError(Exception):
    """An export that cannot go on; the message says why and what to do."""


@dataclass
class ExportOptions:
    nominal_dir: Path
    output: Path
    method: str = "patchcore"
    method_params: Sequence[str] = ()  # NAME=VALUE texts of the method's own parameters (--method-param)
    backbone: Optional[str] = None  # None: the method's default (PatchCore: backbones.PATCHCORE_BACKBONE)
    weights: Optional[str] = None
    resize: int = 256
    crop: int = 224
    # --- input geometry (issue 18): see preprocess.InputSpec
    fit: str = "squash"
    input_size: Optional[Tuple[int, int]] = None  # (width, height); None: crop x crop
    tile: Optional[int] = None
    tile_overlap: int = 0
    roi: Optional[Tuple[Tuple[float, float], ...]] = None
    reduction: Optional[str] = None  # channel reduction order (features.REDUCTIONS); None: the default
    layers: Optional[Tuple[str, str]] = None  # the two stages; None: the backbone's measured default
    # ---
    feature_dim: Optional[int] = None
    coreset_ratio: float = 0.1
    coreset_size: Optional[int] = None
    projection_dim: int = 128
    device: str = "cpu"
    seed: int = 0
    batch_size: int = 8
    hnsw_m: Optional[int] = None
    ef_construction: Optional[int] = None
    ef: Optional[int] = None
    reweight_neighbours: int = 9
    rerank: int = 1
    gaussian_sigma: float = 4.0
    parity_images: int = 4
    engine: bool = True
    force: bool = False
    # Coreset at scale (export/coreset_select.py): method, a device profile capping the bank, a Dask scheduler.
    coreset_method: str = "auto"
    device_profile: Optional[str] = None
    dask: Optional[str] = None


@dataclass
class ExportSummary:
    bundle: Path
    images: int
    skipped: List[ImageReadError]
    patches: int
    coreset_size: int
    feature_dim: int
    bank_mb: float
    coverage_radius: Optional[float]
    onnx_max_abs_diff: float
    engine_note: str
    seconds: Dict[str, float] = field(default_factory=dict)
    coreset_note: str = ""
    method: str = "patchcore"
    method_lines: Dict[str, str] = field(default_factory=dict)  # the method's own summary rows (label: text)


def _quiet_progress(stage: str, done: int, total: int) -> None:
    pass


def _quiet_log(message: str) -> None:
    pass


def scan_nominal(nominal: Union[Path, Sequence[Path]]) -> Tuple[List[Path], List[ImageReadError]]:
    """The images of a folder, or the given list of image files."""
    if not isinstance(nominal, (str, Path)):
        paths = [Path(p) for p in nominal]
        missing = [ImageReadError(p, "no such file") for p in paths if not p.is_file()]
        return [p for p in paths if p.is_file()], missing
    if not Path(nominal).is_dir():
        raise ExportError(f"{nominal}: not a folder of nominal images")
    return list_images(Path(nominal))


def extract_outputs(network: Any, output_names: Sequence[str], paths: List[Path], spec: InputSpec,
                    batch_size: int, device: str, progress: Progress
                    ) -> Tuple[Dict[str, np.ndarray], List[Path], List[str], List[ImageReadError], List[np.ndarray],
                               List[int]]:
    """Decode, transform and run every image through the network, in batches, skipping unreadable ones.

    Returns each output stacked over the images used, the paths used, their file sha256, the read errors, and a
    few transformed input tensors (numpy) kept for the ONNX parity check, and how many network inputs (tiles)
    each used image gave.
    """
    import torch

    from .transform import torch_preprocess

    chunks: Dict[str, List[np.ndarray]] = {name: [] for name in output_names}
    used: List[Path] = []
    hashes: List[str] = []
    errors: List[ImageReadError] = []
    samples: List[np.ndarray] = []
    batch: List[torch.Tensor] = []
    pieces_per_image: List[int] = []

    def flush() -> None:
        if not batch:
            return
        with torch.no_grad():
            out = network(torch.stack(batch).to(device))
        tensors = list(out) if isinstance(out, (tuple, list)) else [out]
        for name, tensor in zip(output_names, tensors):
            chunks[name].append(tensor.float().cpu().numpy())
        batch.clear()

    for position, path in enumerate(paths, start=1):
        try:
            data = read_image_bytes(path)
            image = decode_rgb(data, path)
        except ImageReadError as error:
            errors.append(error)
        except OSError as error:
            errors.append(ImageReadError(path, f"cannot read file ({error.strerror or error})"))
        else:
            pieces = spec.pieces(image)[1]  # the image, or each of its tiles
            pieces_per_image.append(len(pieces))
            for piece in pieces:
                tensor = torch_preprocess(piece, spec)
                if len(samples) < 8:
                    samples.append(tensor.numpy().copy())
                batch.append(tensor)
                if len(batch) == batch_size:
                    flush()
            used.append(path)
            hashes.append(hashlib.sha256(data).hexdigest())
        progress("features", position, len(paths))
    flush()
    outputs = {name: np.ascontiguousarray(np.concatenate(parts), dtype=np.float32) if parts
               else np.zeros((0,), np.float32) for name, parts in chunks.items()}
    return outputs, used, hashes, errors, samples, pieces_per_image


def check_options(options: ExportOptions) -> None:
    """Every option checked before any work starts (ExportError naming the option): no features or coreset are
    computed for an export that would be refused at the end."""
    import torch

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ExportError(message)

    need(options.batch_size >= 1, f"--batch-size must be at least 1, got {options.batch_size}")
    need(options.ef is None or options.ef >= 1, f"--ef must be at least 1, got {options.ef}")
    need(options.projection_dim >= 1, f"--projection-dim must be at least 1, got {options.projection_dim}")
    need(options.feature_dim is None or options.feature_dim >= 1,
         f"--feature-dim must be at least 1, got {options.feature_dim}")
    try:
        device = torch.device(options.device)
    except (RuntimeError, ValueError):
        raise ExportError(f"--device {options.device}: not a torch device (cpu, cuda, cuda:1 ...)") from None
    if device.type == "cuda":
        need(torch.cuda.is_available(), f"--device {options.device}: torch sees no CUDA GPU here; use --device cpu")
        need(device.index is None or device.index < torch.cuda.device_count(),
             f"--device {options.device}: there are only {torch.cuda.device_count()} CUDA devices")
    output = Path(options.output).resolve()
    if isinstance(options.nominal_dir, (str, Path)):
        nominal = Path(options.nominal_dir).resolve()
        need(not (output == nominal or output.is_relative_to(nominal) or nominal.is_relative_to(output)),
             f"-o {options.output}: the bundle folder must be outside NOMINAL_DIR {options.nominal_dir} (and not "
             "contain it): the training images are never replaced")
    check_replaceable(output, options.force)


# MethodSettings fields the export derives; every other one is the ExportOptions field of the same name.
_DERIVED_SETTINGS = ("crop", "method_params", "pieces_per_image")


def _settings(options: ExportOptions, spec: InputSpec, params: Dict[str, Any]) -> MethodSettings:
    """What a method may read: ExportOptions' fields by name (a MethodSettings field ExportOptions lacks fails
    here, never defaults silently), the parsed method parameters, and the crop of the memory cap."""
    copied = {f.name: getattr(options, f.name) for f in fields(MethodSettings) if f.name not in _DERIVED_SETTINGS}
    # A non-square input counts as a square of its longer side in the device memory cap: never too small.
    return MethodSettings(**copied, crop=max(spec.width, spec.height), method_params=params)


def export_bundle(options: ExportOptions, progress: Progress = _quiet_progress, log: Log = _quiet_log,
                  images: Optional[Sequence[Path]] = None) -> ExportSummary:
    """Run the whole export and write the bundle atomically; raise ExportError/BundleError on failure.

    `images`: image files to use instead of the files of `options.nominal_dir`.
    """
    import torch

    from .backbones import get_spec
    from .methods import get_exporter, method_params
    from .methods.base import MethodExportError
    from .onnx_export import OnnxModelError, OnnxParityError, check_onnx_parity, export_onnx

    seconds: Dict[str, float] = {}
    output = Path(options.output)
    check_options(options)
    try:
        method = get_exporter(options.method)
        params = method_params(method, options.method_params)
        # The normalisation is the one the backbone's weights were trained with (backbones.BackboneSpec).
        normalisation = get_spec(method.backbone(options.backbone))
        spec = InputSpec(resize=options.resize, crop=options.crop, fit=options.fit, size=options.input_size,
                         roi=options.roi, tile=options.tile, tile_overlap=options.tile_overlap,
                         mean=normalisation.mean, std=normalisation.std)
    except ValueError as error:
        raise ExportError(str(error)) from None
    log(f"input: {spec.describe()}")
    settings = _settings(options, spec, params)
    paths, skipped = scan_nominal(Path(options.nominal_dir) if images is None else images)

    torch.manual_seed(options.seed)
    training_images: List[np.ndarray] = []
    if method.needs_training_images():
        from .transform import torch_preprocess

        for path in paths:
            try:
                image = decode_rgb(read_image_bytes(path), path)
                training_images.extend(torch_preprocess(piece, spec).numpy() for piece in spec.pieces(image)[1])
            except (ImageReadError, OSError):
                pass  # listed as skipped by the feature pass below
    method.attach(progress, log)
    try:
        network, info = method.network(settings, spec, training_images)
    except MethodExportError as error:
        raise ExportError(str(error)) from None
    del training_images
    reduction = info.extra.get("reduction_order")
    log(f"network: {info.backbone.get('name')} {' + '.join(info.layers)}, {info.dim}-d patch features"
        + (f", {reduction} channel reduction" if reduction else "")
        + (" (as chosen)" if options.backbone else f" ({method.name}'s default; README: which backbone when)"))
    network = network.to(options.device).eval()

    start = time.perf_counter()
    if options.dask:  # the feature pass on the cluster's CPUs (export/distributed.py)
        try:
            with dask_client(options.dask) as client:
                outputs, used, hashes, read_errors, samples, pieces_per_image = extract_on_dask(
                    client, extract_outputs, network, info.outputs, paths, spec, options.batch_size, progress)
        except DaskUnavailable as error:
            raise ExportError(str(error)) from None
        network = network.to(options.device)
    else:
        outputs, used, hashes, read_errors, samples, pieces_per_image = extract_outputs(
            network, info.outputs, paths, spec, options.batch_size, options.device, progress)
    seconds["features"] = time.perf_counter() - start
    skipped = skipped + read_errors
    for error in skipped:
        log(f"skipped {error.path}: {error.reason}")
    if len(used) < MIN_IMAGES:
        raise ExportError(f"{options.nominal_dir}: found {len(used)} usable image(s) (skipped {len(skipped)}); "
                          f"an export needs at least {MIN_IMAGES} images of good parts")

    output_shapes = {name: [int(n) for n in outputs[name].shape[1:]] for name in info.outputs}
    try:
        fitted = method.fit(outputs, len(used), replace(settings, pieces_per_image=tuple(pieces_per_image)),
                            progress, log)
    except MethodExportError as error:
        raise ExportError(str(error)) from None
    del outputs
    seconds.update(fitted.summary.get("seconds", {}))
    staged: Dict[str, Any] = {}  # what the staging step measured, for the summary

    def build(staging: Path) -> Dict[str, Any]:
        arrays: Dict[str, Any] = {}
        for key, array in fitted.arrays.items():
            np.save(staging / f"{key}.npy", array, allow_pickle=False)
            arrays[key] = {"file": f"{key}.npy", "dtype": str(array.dtype), "shape": [int(n) for n in array.shape]}
        for name, data in fitted.files.items():
            (staging / name).write_bytes(data)
        (staging / "training_images.json").write_text(json.dumps({"sha256": hashes}, indent=0) + "\n")

        start_onnx = time.perf_counter()
        progress("onnx", 0, 1)
        onnx_path = staging / "features.onnx"
        try:
            export_onnx(network.cpu(), onnx_path, spec, output_names=info.outputs)
            parity = check_onnx_parity(network, onnx_path, np.stack(samples[: max(1, options.parity_images)]),
                                       output_names=info.outputs)
        except OnnxParityError as error:
            raise ExportError(f"{onnx_path.name}: ONNX Runtime disagrees with torch: {error}") from None
        except OnnxModelError as error:
            raise ExportError(str(error)) from None
        seconds["onnx"] = time.perf_counter() - start_onnx
        progress("onnx", 1, 1)
        staged["parity"] = parity

        engines: List[Dict[str, Any]] = []
        # A tiled bundle runs each frame as one batch of its tiles: the engine's batch profile is tuned for the
        # tiles of the training frames (the camera's frames, as a rule).
        tiles = max(pieces_per_image) if options.tile is not None and pieces_per_image else None
        staged["engine_note"] = _maybe_build_engine(options, onnx_path, samples, staging, engines, log,
                                                    max_batch=tiles)
        held_out = fitted.training_scores
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "toolkit_version": __version__,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "created_with": {"python": platform.python_version(), "torch": torch.__version__},
            "backbone": info.backbone,
            "layers": list(info.layers),
            "input": spec.to_manifest(),
            "features": {
                "dim": int(info.dim), "grid": [int(info.grid[0]), int(info.grid[1])],
                "stride": int(info.stride), "local_neighbourhood": 3,
                "onnx_file": "features.onnx", "input_name": "image", "output_name": info.outputs[0],
                "outputs": list(info.outputs), "output_shapes": output_shapes,
                "layout": "NHWC", "onnx_parity": {"max_abs_diff": float(parity.max_abs),
                                                   "tolerance": float(parity.tolerance),
                                                   "images": int(min(len(samples), options.parity_images))},
                **info.extra,
            },
            "method": {"name": method.name, "params": fitted.params, "arrays": arrays, "files": fitted.file_roles},
            "score": {"distance": "euclidean",
                      "gaussian_sigma": float(options.gaussian_sigma if fitted.map_sigma is None
                                              else fitted.map_sigma),
                      # Quantiles of training images scored as new parts (for PatchCore: export/heldout.py).
                      "training_scores": quantiles(held_out) if held_out is not None and held_out.size else None,
                      **({} if fitted.map_range is None else {"map_range": [float(v) for v in fitted.map_range]})},
            "engines": engines,
            "calibration": None,
            "training_images": {"file": "training_images.json", "count": len(used)},
        }

    bundle_path = write_new_bundle(output, build, force=options.force)
    summary = fitted.summary
    return ExportSummary(
        bundle=bundle_path, images=len(used), skipped=skipped, patches=int(summary.get("patches", 0)),
        coreset_size=int(summary.get("coreset_size", 0)), feature_dim=int(info.dim),
        bank_mb=float(summary.get("bank_mb", 0.0)), coverage_radius=summary.get("coverage_radius"),
        onnx_max_abs_diff=float(staged["parity"].max_abs), engine_note=staged["engine_note"], seconds=seconds,
        coreset_note=str(summary.get("coreset_note", "")), method=method.name,
        method_lines={str(k): str(v) for k, v in summary.get("lines", {}).items()})


def _maybe_build_engine(options: ExportOptions, onnx_path: Path, samples: List[np.ndarray], staging: Path,
                        engines: List[Dict[str, Any]], log: Log, max_batch: Optional[int] = None) -> str:
    """Build a TensorRT engine for this machine's GPU where TensorRT exists; otherwise say so and carry on.

    The engine is checked against ONNX Runtime on the transformed nominal images kept from the feature pass.
    """
    if not options.engine:
        return "TensorRT engine: not requested (--no-engine)"
    available, reason = trt.tensorrt_status()
    if not available:
        return f"TensorRT engine: skipped ({reason}); build it on the device with `patchcore-edge engine build`"
    try:
        entry = build_engine_into(staging, onnx_path, "fp16", samples, "nominal (export)", log,
                                  max_batch=None if max_batch is None else min(max_batch, 256))
    except (trt.EngineBuildError, trt.TensorRTUnavailable, trt.CudaError) as error:
        return f"TensorRT engine: not built ({error}); the bundle runs with ONNX Runtime"
    engines.append(entry)
    return f"TensorRT engine: {entry['file']}"
