"""Export: nominal images -> patch features -> coreset -> memory bank + HNSW index + features.onnx -> bundle."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .. import __version__
from ..bundle import FORMAT_NAME, FORMAT_VERSION, BundleError, write_new_bundle
from ..imageio import ImageReadError, decode_rgb, list_images
from ..calibration.thresholds import quantiles
from ..preprocess import InputSpec

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
    backbone: str = "mobilenet_v2"
    weights: Optional[str] = None
    resize: int = 256
    crop: int = 224
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
    rerank: int = 8
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


def _quiet_progress(stage: str, done: int, total: int) -> None:
    pass


def _quiet_log(message: str) -> None:
    pass


def scan_nominal(nominal_dir: Path) -> Tuple[List[Path], List[ImageReadError]]:
    if not nominal_dir.is_dir():
        raise ExportError(f"{nominal_dir}: not a folder of nominal images")
    return list_images(nominal_dir)


def extract_bank_features(extractor: Any, paths: List[Path], spec: InputSpec, batch_size: int, device: str,
                          progress: Progress) -> Tuple[np.ndarray, List[Path], List[str], List[ImageReadError],
                                                       List[np.ndarray]]:
    """Decode, transform and run every image through the extractor, in batches, skipping unreadable ones.

    Returns patch features [N*h*w, D], the paths used, their file sha256, the read errors, and a few transformed
    input tensors (numpy) kept for the ONNX parity check.
    """
    import torch

    from .transform import torch_preprocess

    chunks: List[np.ndarray] = []
    used: List[Path] = []
    hashes: List[str] = []
    errors: List[ImageReadError] = []
    samples: List[np.ndarray] = []
    batch: List[torch.Tensor] = []

    def flush() -> None:
        if not batch:
            return
        with torch.no_grad():
            out = extractor(torch.stack(batch).to(device))
        chunks.append(out.reshape(-1, out.shape[-1]).float().cpu().numpy())
        batch.clear()

    for position, path in enumerate(paths, start=1):
        try:
            data = path.read_bytes()
            image = decode_rgb(data, path)
        except ImageReadError as error:
            errors.append(error)
        except OSError as error:
            errors.append(ImageReadError(path, f"cannot read file ({error.strerror or error})"))
        else:
            tensor = torch_preprocess(image, spec)
            if len(samples) < 8:
                samples.append(tensor.numpy().copy())
            batch.append(tensor)
            used.append(path)
            hashes.append(hashlib.sha256(data).hexdigest())
            if len(batch) == batch_size:
                flush()
        progress("features", position, len(paths))
    flush()
    features = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    return np.ascontiguousarray(features, dtype=np.float32), used, hashes, errors, samples


def export_bundle(options: ExportOptions, progress: Progress = _quiet_progress, log: Log = _quiet_log) -> ExportSummary:
    """Run the whole export and write the bundle atomically; raise ExportError/BundleError on failure."""
    import torch

    from .. import search
    from .backbones import BackboneError
    from .coreset import CoresetInputError
    from .features import build_extractor
    from .heldout import leave_one_image_out_scores
    from .onnx_export import OnnxModelError, OnnxParityError, check_onnx_parity, export_onnx

    seconds: Dict[str, float] = {}
    output = Path(options.output)
    if output.exists() and not options.force:
        raise BundleError(f"{output}: already exists; pass --force to overwrite it or choose another output folder")
    try:
        spec = InputSpec(resize=options.resize, crop=options.crop)
    except ValueError as error:
        raise ExportError(str(error)) from None
    paths, skipped = scan_nominal(Path(options.nominal_dir))

    torch.manual_seed(options.seed)
    try:
        extractor, info = build_extractor(options.backbone, options.weights, spec, options.feature_dim)
    except BackboneError as error:
        raise ExportError(str(error)) from None
    extractor = extractor.to(options.device).eval()

    start = time.perf_counter()
    features, used, hashes, read_errors, samples = extract_bank_features(
        extractor, paths, spec, options.batch_size, options.device, progress)
    seconds["features"] = time.perf_counter() - start
    skipped = skipped + read_errors
    for error in skipped:
        log(f"skipped {error.path}: {error.reason}")
    if len(used) < MIN_IMAGES:
        raise ExportError(f"{options.nominal_dir}: found {len(used)} usable image(s) (skipped {len(skipped)}); "
                          f"an export needs at least {MIN_IMAGES} images of good parts")

    try:
        selection, size_note = _select_coreset(options, features, info, extractor,
                                               lambda done, total: progress("coreset", done, total))
    except CoresetInputError as error:
        raise ExportError(f"coreset: {error}") from None
    seconds["coreset"] = selection.seconds
    selected = selection.indices
    radius = selection.radius
    bank = np.ascontiguousarray(features[selected], dtype=np.float32)

    start = time.perf_counter()
    progress("index", 0, 3)
    b = min(options.reweight_neighbours, bank.shape[0])
    neighbours = search.bank_neighbours(bank, b)
    patches_per_image = info.grid[0] * info.grid[1]
    progress("index", 1, 3)
    held_out = leave_one_image_out_scores(features, patches_per_image, selected, bank, neighbours)
    progress("index", 2, 3)
    del features
    index_params = {
        "M": options.hnsw_m or search.DEFAULT_M,
        "ef_construction": options.ef_construction or search.DEFAULT_EF_CONSTRUCTION,
        "ef": options.ef or search.DEFAULT_EF,
    }
    index = search.build_index(bank, m=index_params["M"], ef_construction=index_params["ef_construction"],
                               seed=options.seed)
    progress("index", 3, 3)
    seconds["index"] = time.perf_counter() - start

    staged: Dict[str, Any] = {}  # what the staging step measured, for the summary

    def build(staging: Path) -> Dict[str, Any]:
        np.save(staging / "memory_bank.npy", bank, allow_pickle=False)
        np.save(staging / "bank_neighbours.npy", neighbours.astype(np.int32), allow_pickle=False)
        search.save_index(index, staging / "index.hnsw")
        (staging / "training_images.json").write_text(json.dumps({"sha256": hashes}, indent=0) + "\n")

        start_onnx = time.perf_counter()
        progress("onnx", 0, 1)
        onnx_path = staging / "features.onnx"
        try:
            export_onnx(extractor.cpu(), onnx_path, spec)
            parity = check_onnx_parity(extractor, onnx_path, np.stack(samples[: max(1, options.parity_images)]))
        except OnnxParityError as error:
            raise ExportError(f"{onnx_path.name}: ONNX Runtime disagrees with torch: {error}") from None
        except OnnxModelError as error:
            raise ExportError(str(error)) from None
        seconds["onnx"] = time.perf_counter() - start_onnx
        progress("onnx", 1, 1)
        staged["parity"] = parity

        engines: List[Dict[str, Any]] = []
        staged["engine_note"] = _maybe_build_engine(options, onnx_path, info, staging, engines, log)
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "toolkit_version": __version__,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "created_with": {"python": platform.python_version(), "torch": torch.__version__},
            "backbone": info.backbone_manifest(),
            "layers": list(info.layers),
            "input": spec.to_manifest(),
            "features": {
                "dim": int(info.feature_dim), "grid": [int(info.grid[0]), int(info.grid[1])],
                "stride": int(info.stride), "local_neighbourhood": 3,
                "onnx_file": "features.onnx", "input_name": "image", "output_name": "features",
                "layout": "NHWC", "onnx_parity": {"max_abs_diff": float(parity.max_abs),
                                                   "tolerance": float(parity.tolerance),
                                                   "images": int(min(len(samples), options.parity_images))},
                **info.extra_manifest(),
            },
            "coreset": {
                "size": int(bank.shape[0]), "patches": int(len(used) * info.grid[0]
                                                                                      * info.grid[1]),
                "ratio": float(bank.shape[0] / max(1, len(used) * info.grid[0] * info.grid[1])),
                "projection_dim": int(options.projection_dim), "seed": int(options.seed),
                **selection.to_manifest(), "size_limit": size_note or None,
            },
            "index": {"library": "hnswlib", "space": "l2", **index_params, "seed": int(options.seed)},
            "score": {"method": "patchcore", "distance": "euclidean", "reweight_neighbours": int(b),
                      "rerank": int(options.rerank), "gaussian_sigma": float(options.gaussian_sigma),
                      # Quantiles of training images scored without their own bank rows (export/heldout.py).
                      "training_scores": quantiles(held_out) if held_out.size else None},
            "engines": engines,
            "calibration": None,
            "training_images": {"file": "training_images.json", "count": len(used)},
        }

    bundle_path = write_new_bundle(output, build, force=options.force)
    return ExportSummary(
        bundle=bundle_path, images=len(used), skipped=skipped, patches=len(used) * info.grid[0] * info.grid[1],
        coreset_size=int(bank.shape[0]), feature_dim=int(info.feature_dim), bank_mb=bank.nbytes / 2**20,
        coverage_radius=radius, onnx_max_abs_diff=float(staged["parity"].max_abs),
        coreset_note=f"{selection.method}, radius {selection.radius_text()}" + (f"; {size_note}" if size_note
                                                                              else ""),
        engine_note=staged["engine_note"], seconds=seconds)


def _select_coreset(options: ExportOptions, features: np.ndarray, info: Any, extractor: Any,
                    progress: Callable[[int, int], None]) -> Tuple[Any, str]:
    """The coreset by options.coreset_method, capped by --device-profile, on Dask when --dask is given."""
    import contextlib

    from .. import search
    from .coreset import coreset_size
    from .coreset_cells import run_in_process
    from .coreset_select import bank_size_limit, capped_size, select_coreset
    from .distributed import DaskUnavailable, dask_client, dask_runner

    ratio = None if options.coreset_size is not None else options.coreset_ratio
    size = coreset_size(features.shape[0], ratio=ratio, size=options.coreset_size)
    note = ""
    if options.device_profile:
        onnx_bytes = 4 * sum(int(p.numel()) for p in extractor.parameters())
        limit, reason = bank_size_limit(options.device_profile, int(info.feature_dim), tuple(info.grid),
                                        int(options.crop), onnx_bytes, options.hnsw_m or search.DEFAULT_M,
                                        options.reweight_neighbours)
        if limit < size:
            note = f"capped from {size:,} to {limit:,} by the {reason}"
        size = capped_size(size, limit)
    method = options.coreset_method
    if options.dask and method == "auto":
        method = "partitioned"  # the selection that runs on a cluster
    client_context: Any = contextlib.nullcontext(None)
    if options.dask and method == "partitioned":
        client_context = dask_client(options.dask)
    try:
        with client_context as client:
            result = select_coreset(features, size, method=method, projection_dim=options.projection_dim,
                                    seed=options.seed, device=options.device,
                                    runner=run_in_process if client is None else dask_runner(client),
                                    progress=progress)
    except DaskUnavailable as error:
        raise ExportError(str(error)) from None
    return result, note


def _maybe_build_engine(options: ExportOptions, onnx_path: Path, info: Any, staging: Path,
                        engines: List[Dict[str, Any]], log: Log) -> str:
    """Build a TensorRT engine for this machine's GPU where TensorRT exists; otherwise say so and carry on."""
    if not options.engine:
        return "TensorRT engine: not requested (--no-engine)"
    from .. import trt

    available, reason = trt.tensorrt_status()
    if not available:
        return f"TensorRT engine: skipped ({reason}); build it on the device with `patchcore-edge engine build`"
    try:
        entry = trt.build_engine_into(staging, onnx_path, precision="fp16", log=log)
    except (trt.EngineBuildError, trt.TensorRTUnavailable, trt.CudaError) as error:
        return f"TensorRT engine: not built ({error}); the bundle runs with ONNX Runtime"
    engines.append(entry)
    return f"TensorRT engine: {entry['file']}"
