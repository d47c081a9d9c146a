"""Build a serialised engine from `features.onnx`: parsing, optimisation profiles, precision checks, memory pool.

Targets the TensorRT Python API of JetPack 5.1 (TensorRT 8.5.2), JetPack 6.0 (8.6.2) and JetPack 6.1/6.2 (10.3):
- `IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)` (8.4+); `max_workspace_size` is gone in 10;
- the `EXPLICIT_BATCH` network flag: required before 10, deprecated and ignored from 10, so it is only passed
  to TensorRT 8.x;
- `platform_has_fast_fp16/int8`: deprecated in 10, read with `getattr` and, where absent, replaced by the
  compute-capability rule of the TensorRT support matrix.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .calibrator import Calibration, make_calibrator
from .callbacks import TensorRTLog, make_logger
from .errors import EngineBuildError
from .status import ensure_tensorrt, parse_version

if TYPE_CHECKING:  # pragma: no cover - the stubs give the type checker TensorRT's names
    import tensorrt as trt

PRECISIONS = ("fp32", "fp16", "int8")
INPUT_NAME = "image"


class BuildResult(NamedTuple):
    engine: bytes
    timing_cache: bytes
    int8_cache: Optional[bytes]


def network_flags() -> int:
    import tensorrt as trt

    if parse_version(trt.__version__)[0] >= 10:
        return 0  # every network is explicit-batch in TensorRT 10; the flag is deprecated there
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def fast_precisions(builder: "trt.Builder", cc: Optional[Tuple[int, int]]) -> Tuple[bool, bool]:
    """(fast FP16, fast INT8) from the builder, or from the compute capability where the builder no longer says.

    Rule of the TensorRT support matrix: FP16 on 5.3, 6.0, 6.2 and 7.0+; INT8 on 6.1 and 7.0+.
    """
    fp16: Optional[bool] = getattr(builder, "platform_has_fast_fp16", None)
    int8: Optional[bool] = getattr(builder, "platform_has_fast_int8", None)
    if fp16 is None or int8 is None:
        if cc is None:
            return True, True
        fp16 = cc in ((5, 3), (6, 0), (6, 2)) or cc >= (7, 0)
        int8 = cc == (6, 1) or cc >= (7, 0)
    return bool(fp16), bool(int8)


def optimisation_profiles(max_batch: int) -> List[Tuple[int, int, int]]:
    """(min, opt, max) batch sizes of the engine's optimisation profiles.

    Profile 0 serves single images (`predict`, `stream` with batch 1) with kernels tuned for batch 1; where
    batches are allowed, profile 1 serves 2..max_batch tuned for max_batch (`predict_batch`, batched `stream`).
    """
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    profiles = [(1, 1, 1)]
    if max_batch > 1:
        profiles.append((2, max_batch, max_batch))
    return profiles


def dims(value: "trt.Dims") -> Tuple[int, ...]:
    # Dims supports len() and indexing in every TensorRT version; iteration is not declared by the stubs.
    return tuple(int(value[i]) for i in range(len(value)))


def _parse_onnx(network: "trt.INetworkDefinition", logger: "trt.ILogger", log: TensorRTLog,
                onnx_path: Path) -> None:
    import tensorrt as trt

    try:
        model = onnx_path.read_bytes()
    except OSError as error:
        raise EngineBuildError(f"{onnx_path}: cannot read the ONNX model ({error.strerror or error})") from None
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse(model)
    log.reraise(EngineBuildError, f"{onnx_path}: while TensorRT parsed the model")
    if parsed:
        return
    lines = []
    for index in range(parser.num_errors):
        problem = parser.get_error(index)
        where = f"node {problem.node()}"
        node_name = getattr(problem, "node_name", None)  # TensorRT 10 only
        if callable(node_name) and node_name():
            where += f" ({node_name()})"
        lines.append(f"  - {where}: {problem.desc()}")
    detail = "\n".join(lines) or "  - (the parser gave no detail)"
    raise EngineBuildError(f"{onnx_path}: TensorRT {trt.__version__} cannot parse this ONNX model:\n{detail}\n"
                           "Re-export the bundle with a supported opset, or use the ONNX Runtime backend.")


def _network_input(network: "trt.INetworkDefinition", input_name: str, onnx_path: Path) -> Tuple[int, ...]:
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != [input_name]:
        raise EngineBuildError(f"{onnx_path}: expected one input named {input_name!r}, found {names}")
    shape = dims(network.get_input(0).shape)
    if len(shape) != 4 or shape[1] != 3 or shape[2] <= 0 or shape[3] <= 0:
        raise EngineBuildError(f"{onnx_path}: input {input_name!r} has shape {list(shape)}, expected "
                               "[batch, 3, H, W]")
    return shape


def _network_outputs(network: "trt.INetworkDefinition", expected: Optional[Sequence[str]], onnx_path: Path) -> None:
    """The model's outputs must be the ones the bundle declares (any order): refused before the long build."""
    names = [network.get_output(i).name for i in range(network.num_outputs)]
    if not names:
        raise EngineBuildError(f"{onnx_path}: the model has no output")
    if expected is not None and sorted(names) != sorted(expected):
        raise EngineBuildError(f"{onnx_path}: the model has outputs {names}, the bundle declares {list(expected)}; "
                               "re-export the bundle")


def _check_request(builder: "trt.Builder", precision: str, dla_core: Optional[int], has_int8_source: bool,
                   compute_capability: Optional[Tuple[int, int]]) -> bool:
    """Refuse what this GPU cannot do, before the (long) build; returns whether FP16 is fast."""
    fast_fp16, fast_int8 = fast_precisions(builder, compute_capability)
    if precision == "fp16" and not fast_fp16:
        raise EngineBuildError("this GPU has no fast FP16 (TensorRT reports platform_has_fast_fp16 = False): "
                               "build with --precision fp32")
    if precision == "int8" and not fast_int8:
        raise EngineBuildError("this GPU has no fast INT8 (TensorRT reports platform_has_fast_int8 = False): "
                               "build with --precision " + ("fp16" if fast_fp16 else "fp32"))
    if precision == "int8" and not has_int8_source:
        raise EngineBuildError("INT8 needs calibration: pass --calibration-images DIR with nominal images "
                               "(a few dozen to a few hundred)")
    if dla_core is not None:
        cores = int(builder.num_DLA_cores)
        if cores == 0:
            raise EngineBuildError(f"--dla {dla_core}: this device has no DLA core; build for the GPU "
                                   "(leave out --dla)")
        if not 0 <= dla_core < cores:
            raise EngineBuildError(f"--dla {dla_core}: this device has {cores} DLA core(s), use 0..{cores - 1}")
        if precision == "fp32":
            raise EngineBuildError("DLA runs FP16 or INT8 only: add --precision fp16 (or int8)")
    return fast_fp16


def _check_sizes(precision: str, max_batch: int, workspace_mb: int, dla_core: Optional[int]) -> None:
    if precision not in PRECISIONS:
        raise EngineBuildError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if max_batch < 1:
        raise EngineBuildError(f"--max-batch must be at least 1, got {max_batch}")
    if workspace_mb < 16:
        raise EngineBuildError(f"--workspace {workspace_mb} MB is too small: give at least 16 MB")
    # DLA layers need static shapes; a batch range would push them back onto the GPU (or fail the build).
    if dla_core is not None and max_batch != 1:
        raise EngineBuildError(f"--dla needs static shapes: build the DLA engine with --max-batch 1 "
                               f"(got {max_batch})")


def build_engine(onnx_path: "Path | str", precision: str = "fp16", max_batch: int = 1, workspace_mb: int = 1024,
                 dla_core: Optional[int] = None, calibration_batches: Optional[Iterable[np.ndarray]] = None,
                 timing_cache: Optional[bytes] = None, int8_cache: Optional[bytes] = None,
                 input_name: str = INPUT_NAME, output_names: Optional[Sequence[str]] = None,
                 compute_capability: Optional[Tuple[int, int]] = None) -> BuildResult:
    """Build a serialised engine from the bundle's `features.onnx`, every output of the network included.

    The optimisation profiles cover the input's batch range; each output's shape follows from it.
    `output_names`: the outputs the bundle declares (checked before the build; None: whatever the model has).
    `calibration_batches`: preprocessed nominal images (float32 [3, H, W] or [1, 3, H, W]) for INT8;
    `int8_cache`: a previous calibration cache, used instead of the images when given. `timing_cache`: bytes of
    an earlier build's timing cache (speeds up rebuilds). Returns the engine, the updated timing cache and, for
    INT8, the calibration cache. Raises EngineBuildError with a reason a user can act on -- also for an error
    raised while TensorRT called back into Python (reading a calibration image, logging).
    """
    version = ensure_tensorrt()
    import tensorrt as trt

    onnx_path = Path(onnx_path)
    _check_sizes(precision, max_batch, workspace_mb, dla_core)
    log = TensorRTLog()
    logger = make_logger(log)
    builder = trt.Builder(logger)
    log.reraise(EngineBuildError, "while TensorRT created the builder")
    fast_fp16 = _check_request(builder, precision, dla_core,
                               int8_cache is not None or calibration_batches is not None, compute_capability)
    network = builder.create_network(network_flags())
    _parse_onnx(network, logger, log, onnx_path)
    shape = _network_input(network, input_name, onnx_path)
    _network_outputs(network, output_names, onnx_path)
    if shape[0] != -1 and max_batch > 1:
        raise EngineBuildError(f"{onnx_path}: the model has a fixed batch of {shape[0]}; --max-batch "
                               f"{max_batch} needs a model exported with a dynamic batch dimension")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    profiles = []
    for low, opt, high in optimisation_profiles(max_batch):
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, trt.Dims([low, *shape[1:]]), trt.Dims([opt, *shape[1:]]),
                          trt.Dims([high, *shape[1:]]))
        config.add_optimization_profile(profile)
        profiles.append(profile)

    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    calibration: Optional[Calibration] = None
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        if fast_fp16:
            # Layers without an INT8 kernel then fall back to FP16 rather than FP32.
            config.set_flag(trt.BuilderFlag.FP16)
        calibration = Calibration(calibration_batches if int8_cache is None else None, input_name,
                                  (1,) + shape[1:], int8_cache)
        config.int8_calibrator = make_calibrator(calibration)
        config.set_calibration_profile(profiles[0])
    if dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)

    if not config.set_timing_cache(config.create_timing_cache(timing_cache or b""), False):
        # A cache from another GPU or TensorRT version is refused; start from an empty one instead.
        config.set_timing_cache(config.create_timing_cache(b""), False)

    try:
        serialized: Optional["trt.IHostMemory"] = builder.build_serialized_network(network, config)
    finally:
        if calibration is not None:
            calibration.release()
    if calibration is not None:
        calibration.held.reraise(EngineBuildError, "INT8 calibration failed")
    log.reraise(EngineBuildError, "while TensorRT built the engine")
    if serialized is None:
        raise EngineBuildError(f"TensorRT {version} could not build an engine from {onnx_path} "
                               f"({log.last_errors() or 'no detail in the TensorRT log'}). "
                               "Try a larger --workspace, another --precision, or leave out --dla.")
    int8_out: Optional[bytes] = None
    if calibration is not None:
        if calibration.cache_in is None and calibration.images_used == 0:
            raise EngineBuildError("INT8 calibration read no image: the calibration image folder gave none")
        int8_out = calibration.cache_out if calibration.cache_out is not None else calibration.cache_in
    engine = bytes(memoryview(serialized))
    new_cache = bytes(memoryview(config.get_timing_cache().serialize()))
    return BuildResult(engine, new_cache, int8_out)
