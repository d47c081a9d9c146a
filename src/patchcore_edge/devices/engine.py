"""TensorRT engines for a bundle on this board: find the one that runs here, build, verify and register one.

The board side of `patchcore_edge.trt` (which knows nothing of boards): the device is detected here and its
profile gives the build defaults. `engine build` (the CLI) and export's engine step are thin callers of
`build_and_register` and `build_engine_into`; the runtime asks `find_engine` / `open_engine`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .. import trt
from ..trt.verify import FeatureSource, ScoreFunction
from ..bundle import Bundle, utc_stamp
from ..imageio import ImageReadError, list_images, read_rgb
from ..methods import ScorerOptions, scorer_class
from ..preprocess import InputSpec, preprocess, tile_boxes
from .detect import DeviceInfo, detect_device
from .profiles import get_profile

Log = Callable[[str], None]
SYNTHETIC_IMAGES = 8
# At most this many sample images are read to verify an engine.
VERIFY_IMAGES = 16


def _quiet(line: str) -> None:
    pass


# ----------------------------------------------------------------------------------------------- the bundle's side


def bundle_io(bundle: Bundle) -> trt.TensorIO:
    """The tensors an engine must have to serve this bundle: its input and every output its network declares, with
    the shapes the manifest records."""
    features, spec = bundle.features, bundle.input_spec
    outputs = tuple(trt.OutputTensor(name, features.output_shapes.get(name)) for name in features.outputs)
    return trt.TensorIO(input_name=features.input_name, width=spec.width, height=spec.height, outputs=outputs)


def exact_score_function(bundle: Bundle) -> ScoreFunction:
    """Image scores of a batch of network outputs as the bundle's method scores them, with exact search (no HNSW
    error)."""
    scorer = scorer_class(bundle.method.name).load(bundle, ScorerOptions(exact_search=True))

    def score(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.array([s.score for s in scorer.score(outputs)])

    return score


def verify_against_onnxruntime(bundle: Bundle, candidate: FeatureSource, images: Sequence[np.ndarray],
                               source: str) -> Dict[str, Any]:
    """Every output and the image scores of `candidate` vs ONNX Runtime (CPU) on the same preprocessed images."""
    return trt.measure_against_onnxruntime(candidate, bundle.file(bundle.features.onnx_file), bundle_io(bundle),
                                           images, source, exact_score_function(bundle))


def find_engine(bundle: Bundle) -> Tuple[Optional[Mapping[str, Any]], str]:
    """The bundle's engine that runs on this device, or None and the one-line reason to fall back."""
    entries = bundle.engines
    if not entries:
        return None, "the bundle has no TensorRT engine; build one on the device with `patchcore-edge engine build`"
    ok, status = trt.tensorrt_status()
    if not ok:
        return None, status
    entry, reasons = trt.select_engine(entries, detect_device())
    if entry is None:
        return None, "; ".join(reasons)
    return entry, reasons[-1]


def open_engine(bundle: Bundle, entry: Mapping[str, Any]) -> trt.TensorRTFeatures:
    """The feature backend running the engine of `entry` (on its DLA core where it is a DLA engine).

    Raises EngineLoadError naming the engine file and the tensor when the engine does not match the manifest."""
    name = str(entry["file"])
    return trt.TensorRTFeatures(bundle.file(name), bundle_io(bundle), dla_core=trt.dla_core_of([entry], name),
                                precision=str(entry.get("precision", "unknown")))


# ----------------------------------------------------------------------------------------------- images


def preprocessed_images(folder: Path, spec: InputSpec, limit: int, warn: Log = _quiet) -> Iterator[np.ndarray]:
    """Nominal images of `folder`, preprocessed as the runtime does; unreadable files are reported and skipped.

    The folder is listed now (a missing folder is an EngineBuildError here, not inside TensorRT's calibration);
    the images are read as they are consumed.
    """
    try:
        paths, skipped = list_images(folder)
    except (NotADirectoryError, FileNotFoundError) as error:
        raise trt.EngineBuildError(str(error)) from None
    for problem in skipped:
        warn(f"skipped {problem}")

    def read() -> Iterator[np.ndarray]:
        used = 0
        for path in paths:
            if used >= limit:
                break
            try:
                image = read_rgb(path)
            except ImageReadError as error:
                warn(f"skipped {error}")
                continue
            # A tiled bundle's network sees tiles, never the whole frame: calibrate and verify on those.
            for piece in spec.pieces(image)[1]:
                if used >= limit:
                    break
                used += 1
                yield preprocess(piece, spec)

    return read()


def synthetic_images(spec: InputSpec, count: int = SYNTHETIC_IMAGES) -> List[np.ndarray]:
    """Smooth textured images (deterministic) when no sample images are given; stated in the verification."""
    rng = np.random.default_rng(0)
    size = spec.resize if spec.tile is None else spec.tile  # a tiled bundle's network input is one tile
    ramp = np.linspace(0, 2 * np.pi, size, dtype=np.float32)
    images = []
    for i in range(count):
        base = 128 + 60 * np.sin(ramp[None, :, None] * (i + 1) + ramp[:, None, None] * 0.5)
        noise = rng.normal(0, 12, (size, size, 3))
        images.append(preprocess(np.clip(base + noise, 0, 255).astype(np.uint8), spec))
    return images


# ----------------------------------------------------------------------------------------------- building


def build_engine_into(folder: "Path | str", onnx_path: "Path | str", precision: str,
                      verify_images: Sequence[np.ndarray], verify_source: str, log: Log = _quiet, *,
                      io: Optional[trt.TensorIO] = None, score: Optional[ScoreFunction] = None,
                      score_tolerance: Optional[float] = None, device: Optional[DeviceInfo] = None,
                      max_batch: Optional[int] = None, workspace_mb: Optional[int] = None,
                      dla_core: Optional[int] = None, calibration_batches: Optional[Iterable[np.ndarray]] = None,
                      timing_cache: Optional[bytes] = None, int8_cache: Optional[bytes] = None,
                      tag: Optional[str] = None) -> Dict[str, Any]:
    """Build an engine for this board, verify it (`trt.verify_engine`) on `verify_images`, write it into `folder`.

    Writes the engine and its timing cache (and INT8 calibration cache) under new names in `folder` and returns
    the engine-list entry naming them. Raises EngineBuildError (EngineScoreError for the score check).
    """
    folder, onnx_path = Path(folder), Path(onnx_path)
    version = trt.ensure_tensorrt()
    device = device or detect_device()
    profile = get_profile(device.slug)
    if not profile.engines_supported:
        raise trt.EngineBuildError(f"{device.slug}: {profile.data['engines'].get('note', 'no TensorRT engines')}")
    defaults = profile.defaults
    if max_batch is None:
        max_batch = 1 if dla_core is not None else int(defaults.get("max_batch") or 1)
    workspace_mb = int(workspace_mb or defaults.get("workspace_mb") or 1024)
    log(f"TensorRT {version}: building a {precision} engine for {device.slug} (max batch {max_batch}, "
        f"workspace {workspace_mb} MB{'' if dla_core is None else f', DLA core {dla_core}'})")
    io = io or trt.onnx_io(onnx_path)
    result = trt.build_engine(onnx_path, precision=precision, max_batch=max_batch, workspace_mb=workspace_mb,
                              dla_core=dla_core, calibration_batches=calibration_batches,
                              timing_cache=timing_cache, int8_cache=int8_cache, input_name=io.input_name,
                              output_names=io.output_names, compute_capability=device.compute_capability)
    try:
        candidate = trt.TensorRTFeatures(result.engine, io, dla_core=dla_core, precision=precision,
                                         source=f"{onnx_path}: the {precision} engine built from it")
    except trt.EngineLoadError as error:
        raise trt.EngineBuildError(str(error)) from None  # the engine just built does not fit: a build problem
    with candidate:
        verification = trt.verify_engine(candidate, onnx_path, io, verify_images, verify_source, precision,
                                         score=score, score_tolerance=score_tolerance, log=log)
    names = trt.write_engine_files(folder, trt.engine_file_name(device.slug, version, precision, dla_core, tag),
                                   result)
    log(f"engine {names['file']}: verified on {len(verify_images)} {verify_source} images")
    return trt.engine_entry(names, device=device.slug, variant=device.variant,
                            compute_capability=device.compute_capability, tensorrt_version=version,
                            precision=precision, max_batch=max_batch, dla_core=dla_core,
                            workspace_mb=workspace_mb, verification=verification)


@dataclass
class EngineReport:
    """What `build_and_register` did: the new entry, the files of the engine it replaced, lines for the user."""

    entry: Dict[str, Any]
    removed: List[str]
    notes: List[str] = field(default_factory=list)


def tiled_max_batch(spec: InputSpec, image_size: Optional[Tuple[int, int]], max_batch: Optional[int],
                    dla_core: Optional[int]) -> Tuple[Optional[int], Optional[str]]:
    """The engine's largest batch for a tiled bundle (issue 18) and a line saying why, or (max_batch, None).

    The runtime sends the tiles of one frame through the network as one batch, so the engine's batch profile is
    tuned for that count (`image_size`: the camera frame, width x height); an explicit --max-batch wins, DLA
    stays at 1 (static batch). Raises EngineBuildError for a tiled bundle given neither.
    """
    if spec.tile is None:
        return max_batch, None if image_size is None else "--image-size only matters for a tiled bundle: ignored"
    if image_size is None:
        if max_batch is None and dla_core is None:
            raise trt.EngineBuildError(
                f"a tiled bundle ({spec.tile} px tiles, overlap {spec.tile_overlap}) runs each frame as one batch "
                "of its tiles: pass --image-size W H (the camera frame) so that the engine's batch profile "
                "fits it, or --max-batch N")
        return max_batch, None
    count = len(tile_boxes(int(image_size[1]), int(image_size[0]), spec.tile, spec.tile_overlap))
    frame = f"{image_size[0]}x{image_size[1]} frame: {count} tiles of {spec.tile} px"
    if dla_core is not None:
        return max_batch, f"{frame}, run one at a time on the DLA (static batch 1)"
    if max_batch is not None:
        chunked = "" if max_batch >= count else f"; frames run in chunks of {max_batch}"
        return max_batch, f"{frame}, --max-batch {max_batch}{chunked}"
    chosen = min(count, 256)
    return chosen, f"{frame}: engine batch profile up to {chosen}" + ("" if chosen == count else
                                                                     " (frames run in chunks)")


def calibration_note(calibration_file: Optional[str], bundle_dir: Path) -> str:
    """Why the bundle's thresholds must be set again now that it has a new engine."""
    command = f"`patchcore-edge calibrate {bundle_dir} GOOD_DIR`"
    if calibration_file:
        return (f"calibration {calibration_file} was made on scores of another feature backend: its thresholds "
                f"and their guarantee do not carry over to this engine; run {command} again on this device")
    return f"the bundle has no calibration yet: run {command} on this device, with this engine"


def build_and_register(bundle_dir: "Path | str", precision: Optional[str] = None, *, dla_core: Optional[int] = None,
                       workspace_mb: Optional[int] = None, max_batch: Optional[int] = None,
                       calibration_images: Optional[Path] = None, calibration_limit: int = 300,
                       verify_images: Optional[Path] = None, tolerance: Optional[float] = None,
                       image_size: Optional[Tuple[int, int]] = None, log: Log = _quiet,
                       warn: Log = _quiet) -> EngineReport:
    """`engine build`: build an engine for this board, verify it against ONNX Runtime, register it in the bundle.

    Reuses the timing (and INT8) cache of an earlier engine for this board and TensorRT version; replaces the
    bundle's engine for the same board, TensorRT, precision and DLA core. The bundle is changed only by
    `update_bundle` at the end, so a failure leaves it as it was. Raises TensorRTUnavailable, BundleError,
    EngineBuildError (EngineScoreError when only the image scores are beyond the tolerance). `image_size`: the
    camera frame (width, height), which sets the batch of a tiled bundle's engine (`tiled_max_batch`).
    """
    available, reason = trt.tensorrt_status()
    if not available:
        raise trt.TensorRTUnavailable(
            f"cannot build a TensorRT engine here: {reason}. Build it on the Jetson that will run the bundle "
            "(JetPack ships TensorRT), or run with `--backend onnxruntime`.")
    bundle = Bundle.load(bundle_dir, verify=True)
    spec = bundle.input_spec
    try:
        max_batch, tiles_line = tiled_max_batch(spec, image_size, max_batch, dla_core)
    except trt.EngineBuildError as error:
        raise trt.EngineBuildError(f"{bundle_dir}: {error}") from None
    if tiles_line:
        log(tiles_line)
    device = detect_device()
    profile = get_profile(device.slug)
    if not profile.engines_supported:
        raise trt.EngineBuildError(f"{device.slug}: {profile.data['engines'].get('note')}")
    chosen = precision or str(profile.defaults.get("precision") or "fp16")
    version = str(device.tensorrt_version)
    engines = bundle.engines
    timing_name, int8_name = trt.cache_files(engines, device.slug, version)
    timing_cache = None if timing_name is None else bundle.file(timing_name).read_bytes()
    int8_cache = None if int8_name is None else bundle.file(int8_name).read_bytes()
    calibration = None
    if chosen == "int8" and calibration_images is not None:
        int8_cache = None  # new images asked for: calibrate again
        calibration = preprocessed_images(calibration_images, spec, calibration_limit, warn)

    sample_dir = verify_images or calibration_images
    if sample_dir is not None:
        samples = list(preprocessed_images(sample_dir, spec, VERIFY_IMAGES, warn))
        source = f"sample ({sample_dir})"
        if not samples:
            raise trt.EngineBuildError(f"{sample_dir}: no readable image to verify the engine on")
    else:
        samples, source = synthetic_images(spec), "synthetic"

    # A rebuild for the same device, TensorRT and precision gets a time tag: bundle files are never overwritten.
    plain_name = trt.engine_file_name(device.slug, version, chosen, dla_core)
    tag = utc_stamp() if bundle.has_file(plain_name) else None

    # Built outside the bundle: only update_bundle writes into it, so a failed build leaves it untouched.
    with tempfile.TemporaryDirectory(prefix="patchcore-engine-") as staging_name:
        staging = Path(staging_name)
        entry = build_engine_into(staging, bundle.file(bundle.features.onnx_file), chosen, samples, source,
                                  log, io=bundle_io(bundle), score=exact_score_function(bundle),
                                  score_tolerance=tolerance, device=device, max_batch=max_batch,
                                  workspace_mb=workspace_mb, dla_core=dla_core, calibration_batches=calibration,
                                  timing_cache=timing_cache, int8_cache=int8_cache, tag=tag)
        new_files = {name: (staging / name).read_bytes() for name in trt.entry_files(entry)}
        replaced = [e for e in engines if trt.same_slot(e, entry)]
        removed = sorted({name for e in replaced for name in trt.entry_files(e) if bundle.has_file(name)})
        bundle.set_engines([e for e in engines if e not in replaced] + [entry], new_files, remove=removed)
    thresholds = bundle.calibration
    return EngineReport(entry, removed, [calibration_note(thresholds.file if thresholds else None, bundle.path)])

