"""TensorRT engines for the patch-feature network: build, check, load and run.

This is the only module of patchcore-edge that imports `tensorrt` and `cuda` (cuda-python). Both are imported
inside functions, so importing this module never fails where they are missing; `tensorrt_status()` says why
TensorRT cannot be used here.

Targets the TensorRT Python API shipped by JetPack 5.1 (TensorRT 8.5.2), JetPack 6.0 (8.6.2) and JetPack 6.1/6.2
(10.3), i.e. TensorRT 8.5 to 10.x:
- name-based I/O (`num_io_tensors`, `get_tensor_name`, `get_tensor_mode`, `set_input_shape`,
  `set_tensor_address`, `execute_async_v3`), present from 8.5; the binding-index API removed in 10 is not used;
- `IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)` (8.4+); `max_workspace_size` is gone in 10;
- the `EXPLICIT_BATCH` network flag: required before 10, deprecated and ignored from 10, so it is only passed
  to TensorRT 8.x;
- `platform_has_fast_fp16/int8`: deprecated in 10, read with `getattr` and, where absent, replaced by the
  compute-capability rule of the TensorRT support matrix.
CUDA memory and streams come from cuda-python: `cuda.bindings.runtime` (cuda-python 12.6+) or `cuda.cudart`
(older releases).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Protocol
from typing import Tuple

import numpy as np

from .preprocess import input_size

if TYPE_CHECKING:  # pragma: no cover - the stubs give the type checker TensorRT's names
    import tensorrt as trt

MIN_TENSORRT = (8, 5)
PRECISIONS = ("fp32", "fp16", "int8")
INPUT_NAME = "image"
OUTPUT_NAME = "features"
REBUILD_HINT = "rebuild it on this device with `patchcore-edge engine build BUNDLE`"


class TensorRTUnavailable(RuntimeError):
    """TensorRT or CUDA cannot be used on this machine; the message says why and what to do."""


class EngineBuildError(RuntimeError):
    """An engine could not be built; the message says why in terms a user can act on."""


class EngineLoadError(RuntimeError):
    """An engine file cannot be used on this device or with this bundle."""


class CudaError(RuntimeError):
    """A CUDA runtime call failed."""


class BuildResult(NamedTuple):
    engine: bytes
    timing_cache: bytes
    int8_cache: Optional[bytes]


class DeviceLike(Protocol):
    """What `engine_entry_matches` needs to know about the device (see `devices.detect.DeviceInfo`)."""

    @property
    def slug(self) -> str: ...

    @property
    def compute_capability(self) -> Optional[Tuple[int, int]]: ...

    @property
    def tensorrt_version(self) -> Optional[str]: ...

    @property
    def dla_cores(self) -> int: ...


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    compute_capability: Tuple[int, int]
    total_memory_bytes: int
    integrated: bool


# ----------------------------------------------------------------------------------------------- versions


def parse_version(text: str) -> Tuple[int, ...]:
    """'10.3.0.30' -> (10, 3, 0, 30); stops at the first part that is not a number."""
    parts: List[int] = []
    for piece in str(text).split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group(0)))
    return tuple(parts)


def format_compute_capability(cc: Optional[Tuple[int, int]]) -> Optional[str]:
    return None if cc is None else f"{cc[0]}.{cc[1]}"


def _ensure_tensorrt() -> str:
    """Import tensorrt and return its version; TensorRTUnavailable says how to get a usable one."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as error:
        raise TensorRTUnavailable(
            f"the TensorRT Python bindings are not importable ({error}): on a Jetson they come with JetPack "
            "(`sudo apt install python3-libnvinfer`; a virtualenv needs --system-site-packages); elsewhere "
            "use the ONNX Runtime backend") from None
    version = getattr(trt, "__version__", None)
    if version is None:
        # A `tensorrt` folder without TensorRT in it: typically the type stubs (tensorrt-stubs), which install
        # only .pyi files and import as an empty namespace package.
        where = ", ".join(str(p) for p in getattr(trt, "__path__", [])) or "?"
        raise TensorRTUnavailable(
            f"`import tensorrt` finds a package without TensorRT in it ({where}; type stubs only?): install "
            "TensorRT itself (on a Jetson: JetPack's `python3-libnvinfer`), else use the ONNX Runtime backend")
    version = str(version)
    if parse_version(version)[:2] < MIN_TENSORRT:
        raise TensorRTUnavailable(
            f"TensorRT {version} is older than {MIN_TENSORRT[0]}.{MIN_TENSORRT[1]}, the oldest this toolkit "
            "drives (JetPack 5.1 or newer); use the ONNX Runtime backend on this device")
    return version


def tensorrt_version() -> Optional[str]:
    """The installed TensorRT version string, or None where `import tensorrt` fails."""
    try:
        import tensorrt as trt
    except (ImportError, OSError):
        return None
    version = getattr(trt, "__version__", None)
    return None if version is None else str(version)


# ----------------------------------------------------------------------------------------------- CUDA


def _cudart() -> Any:
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise TensorRTUnavailable("cuda-python is not installed: `pip install cuda-python` (TensorRT's Python "
                              "API needs it here for device memory and streams)")


def _cuda_call(result: Any, what: str) -> Any:
    """Unpack a cuda-python `(error, value...)` tuple, raising CudaError with CUDA's own message."""
    cudart = _cudart()
    error = result[0]
    if error != cudart.cudaError_t.cudaSuccess:
        _, message = cudart.cudaGetErrorString(error)
        text = message.decode() if isinstance(message, bytes) else str(message)
        raise CudaError(f"{what} failed: {text} ({getattr(error, 'name', error)})")
    values = result[1:]
    if len(values) == 0:
        return None
    return values[0] if len(values) == 1 else values


def cuda_devices() -> Tuple[List[CudaDevice], str]:
    """The visible CUDA devices, and when there are none the reason in words."""
    try:
        cudart = _cudart()
    except TensorRTUnavailable as error:
        return [], str(error)
    try:
        count = int(_cuda_call(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount"))
    except CudaError as error:
        return [], f"no usable CUDA device ({error})"
    devices: List[CudaDevice] = []
    for index in range(count):
        prop = _cuda_call(cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
        raw_name = prop.name
        name = raw_name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw_name, bytes) else str(raw_name)
        devices.append(CudaDevice(index, name, (int(prop.major), int(prop.minor)), int(prop.totalGlobalMem),
                                  bool(prop.integrated)))
    return devices, "" if devices else "the CUDA runtime reports 0 devices"


class _DeviceBuffer:
    """One cudaMalloc allocation, freed by `free()`."""

    def __init__(self, nbytes: int) -> None:
        self._cudart = _cudart()
        self.nbytes = int(nbytes)
        self.ptr = int(_cuda_call(self._cudart.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes} bytes)"))

    def upload(self, host: np.ndarray, stream: Any = None) -> None:
        if host.nbytes > self.nbytes or not host.flags.c_contiguous:
            raise ValueError("host array larger than the device buffer or not C-contiguous")
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        if stream is None:
            _cuda_call(self._cudart.cudaMemcpy(self.ptr, host.ctypes.data, host.nbytes, kind), "cudaMemcpy H2D")
        else:
            _cuda_call(self._cudart.cudaMemcpyAsync(self.ptr, host.ctypes.data, host.nbytes, kind, stream),
                       "cudaMemcpyAsync H2D")

    def download(self, host: np.ndarray, stream: Any) -> None:
        if host.nbytes > self.nbytes or not host.flags.c_contiguous:
            raise ValueError("host array larger than the device buffer or not C-contiguous")
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _cuda_call(self._cudart.cudaMemcpyAsync(host.ctypes.data, self.ptr, host.nbytes, kind, stream),
                   "cudaMemcpyAsync D2H")

    def free(self) -> None:
        if self.ptr:
            _cuda_call(self._cudart.cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


# ----------------------------------------------------------------------------------------------- status


def tensorrt_status() -> Tuple[bool, str]:
    """(True, what is there) where engines can be built and run here, else (False, why and what to do)."""
    try:
        version = _ensure_tensorrt()
    except TensorRTUnavailable as error:
        return False, str(error)
    devices, reason = cuda_devices()
    if not devices:
        return False, f"TensorRT {version} is installed but {reason}"
    device = devices[0]
    return True, (f"TensorRT {version} on CUDA device 0 ({device.name}, compute "
                  f"{format_compute_capability(device.compute_capability)})")


# ----------------------------------------------------------------------------------------------- naming


_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def engine_file_name(device_slug: str, trt_version: str, precision: str, dla_core: Optional[int] = None,
                     tag: Optional[str] = None) -> str:
    """`features.<device>.trt<version>.<precision>[-dla<core>][.<tag>].engine`.

    A serialised engine only loads with the TensorRT version and GPU it was built with, so both are in the name
    and a bundle can carry one engine per board. `tag` (e.g. a UTC timestamp) keeps a rebuilt engine's name
    unique, as `bundle.update_bundle` never overwrites a file.
    """
    if not _SLUG.match(device_slug):
        raise ValueError(f"device name {device_slug!r}: use lower-case letters, digits and '-'")
    version = ".".join(str(v) for v in parse_version(trt_version))
    if not version:
        raise ValueError(f"TensorRT version {trt_version!r} has no numeric part")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    kind = precision if dla_core is None else f"{precision}-dla{int(dla_core)}"
    suffix = "" if tag is None else "." + re.sub(r"[^A-Za-z0-9-]", "-", tag)
    return f"features.{device_slug}.trt{version}.{kind}{suffix}.engine"


# ----------------------------------------------------------------------------------------------- matching


def engine_entry_matches(entry: Mapping[str, Any], device: DeviceLike) -> Tuple[bool, str]:
    """Whether a manifest["engines"] entry can run on `device`; the reason is one line either way."""
    name = str(entry.get("file", "<engine>"))
    if device.tensorrt_version is None:
        return False, f"{name}: TensorRT is not available on this device"
    if entry.get("device") != device.slug:
        return False, f"{name}: built for {entry.get('device')}, this device is {device.slug}"
    wanted_cc = str(entry.get("compute_capability"))
    have_cc = format_compute_capability(device.compute_capability)
    if have_cc is not None and wanted_cc != have_cc:
        return False, f"{name}: built for compute capability {wanted_cc}, this GPU has {have_cc}; {REBUILD_HINT}"
    built_with = str(entry.get("tensorrt_version"))
    if parse_version(built_with) != parse_version(device.tensorrt_version):
        # Engines are tied to the exact TensorRT build (major.minor.patch.build) that serialised them.
        return False, (f"{name}: built with TensorRT {built_with}, this device has {device.tensorrt_version}; "
                       f"{REBUILD_HINT}")
    dla = entry.get("dla_core")
    if dla is not None and int(dla) >= device.dla_cores:
        return False, f"{name}: runs on DLA core {dla}, this device has {device.dla_cores} DLA core(s)"
    return True, (f"{name}: matches {device.slug} (compute {have_cc or wanted_cc}, TensorRT {built_with}, "
                  f"{entry.get('precision')})")


def select_engine(entries: Iterable[Mapping[str, Any]], device: DeviceLike,
                  ) -> Tuple[Optional[Mapping[str, Any]], List[str]]:
    """The first matching engine entry (GPU engines before DLA ones), and one reason line per entry tried."""
    reasons: List[str] = []
    ordered = sorted(entries, key=lambda e: e.get("dla_core") is not None)
    for entry in ordered:
        ok, reason = engine_entry_matches(entry, device)
        reasons.append(reason)
        if ok:
            return entry, reasons
    if not reasons:
        reasons.append("the bundle has no TensorRT engine")
    return None, reasons


def find_engine(bundle_dir: "Path | str", manifest: Mapping[str, Any],
                ) -> Tuple[Optional[Mapping[str, Any]], str]:
    """The bundle's engine that runs on this device, or None and the one-line reason to fall back."""
    entries = list(manifest.get("engines") or [])
    if not entries:
        return None, "the bundle has no TensorRT engine; build one on the device with `patchcore-edge engine build`"
    ok, status = tensorrt_status()
    if not ok:
        return None, status
    from .devices.detect import detect_device  # local: detect uses this module for its CUDA probe

    device = detect_device()
    entry, reasons = select_engine(entries, device)
    if entry is None:
        return None, "; ".join(reasons)
    return entry, reasons[-1]


# ----------------------------------------------------------------------------------------------- building


class _LogStore:
    """Warnings and errors TensorRT logged, so error messages can quote TensorRT's own words."""

    def __init__(self) -> None:
        self.errors: List[str] = []
        self.warnings: List[str] = []

    def last_errors(self, count: int = 5) -> str:
        return "; ".join(self.errors[-count:])


def _make_logger(store: _LogStore) -> "trt.ILogger":
    import tensorrt as trt

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: "trt.ILogger.Severity", msg: str) -> None:
            if severity <= trt.ILogger.ERROR:
                store.errors.append(msg)
            elif severity <= trt.ILogger.WARNING:
                store.warnings.append(msg)

    return _Logger()


def _network_flags() -> int:
    import tensorrt as trt

    if parse_version(trt.__version__)[0] >= 10:
        return 0  # every network is explicit-batch in TensorRT 10; the flag is deprecated there
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def _fast_precisions(builder: "trt.Builder", cc: Optional[Tuple[int, int]]) -> Tuple[bool, bool]:
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


class _Calibration:
    """State of one INT8 calibration: the images still to feed, the caches, the device buffer."""

    def __init__(self, images: Optional[Iterable[np.ndarray]], input_shape: Tuple[int, ...],
                 cache: Optional[bytes]) -> None:
        self.images: Iterator[np.ndarray] = iter(images if images is not None else ())
        self.input_shape = input_shape
        self.cache_in = cache
        self.cache_out: Optional[bytes] = None
        self.images_used = 0
        self.buffer: Optional[_DeviceBuffer] = None

    def next_pointer(self) -> Optional[int]:
        try:
            image = next(self.images)
        except StopIteration:
            return None
        host = np.ascontiguousarray(np.asarray(image, dtype=np.float32).reshape(self.input_shape))
        if self.buffer is None:
            self.buffer = _DeviceBuffer(host.nbytes)
        self.buffer.upload(host)
        self.images_used += 1
        return self.buffer.ptr

    def release(self) -> None:
        if self.buffer is not None:
            self.buffer.free()
            self.buffer = None


def _make_calibrator(state: _Calibration) -> "trt.IInt8EntropyCalibrator2":
    """An IInt8EntropyCalibrator2 that feeds preprocessed nominal images one at a time.

    TensorRT calls `read_calibration_cache` first; when a cache is given it is used and no image is read.
    Otherwise `get_batch` copies one image to the GPU per call and returns its device pointer, and None once
    the images are exhausted; TensorRT then hands the new cache to `write_calibration_cache`.
    """
    import tensorrt as trt

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self) -> int:
            return 1

        # TensorRT documents None as "no more data" and "no cache"; the stubs' return types omit it.
        def get_batch(self, names: List[str]) -> Optional[List[int]]:  # type: ignore[override]
            pointer = state.next_pointer()
            return None if pointer is None else [pointer]

        def read_calibration_cache(self) -> Optional[bytes]:  # type: ignore[override]
            return state.cache_in

        def write_calibration_cache(self, cache: Any) -> None:
            state.cache_out = bytes(cache)

    return _EntropyCalibrator()


def _parse_onnx(network: "trt.INetworkDefinition", logger: "trt.ILogger", onnx_path: Path) -> None:
    import tensorrt as trt

    try:
        model = onnx_path.read_bytes()
    except OSError as error:
        raise EngineBuildError(f"{onnx_path}: cannot read the ONNX model ({error.strerror or error})") from None
    parser = trt.OnnxParser(network, logger)
    if parser.parse(model):
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


def _dims(dims: "trt.Dims") -> Tuple[int, ...]:
    # Dims supports len() and indexing in every TensorRT version; iteration is not declared by the stubs.
    return tuple(int(dims[i]) for i in range(len(dims)))


def _network_input(network: "trt.INetworkDefinition", input_name: str, onnx_path: Path) -> Tuple[int, ...]:
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != [input_name]:
        raise EngineBuildError(f"{onnx_path}: expected one input named {input_name!r}, found {names}")
    shape = _dims(network.get_input(0).shape)
    if len(shape) != 4 or shape[1] != 3 or shape[2] <= 0 or shape[3] <= 0:
        raise EngineBuildError(f"{onnx_path}: input {input_name!r} has shape {list(shape)}, expected "
                               "[batch, 3, crop, crop]")
    return shape


def _check_request(builder: "trt.Builder", precision: str, dla_core: Optional[int], has_int8_source: bool,
                   compute_capability: Optional[Tuple[int, int]]) -> bool:
    """Refuse what this GPU cannot do, before the (long) build; returns whether FP16 is fast."""
    fast_fp16, fast_int8 = _fast_precisions(builder, compute_capability)
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


def _check_dla_batch(dla_core: Optional[int], max_batch: int) -> None:
    # DLA layers need static shapes; a batch range would push them back onto the GPU (or fail the build).
    if dla_core is not None and max_batch != 1:
        raise EngineBuildError(f"--dla needs static shapes: build the DLA engine with --max-batch 1 "
                               f"(got {max_batch})")


def build_engine(onnx_path: "Path | str", precision: str = "fp16", max_batch: int = 1, workspace_mb: int = 1024,
                 dla_core: Optional[int] = None, calibration_batches: Optional[Iterable[np.ndarray]] = None,
                 timing_cache: Optional[bytes] = None, int8_cache: Optional[bytes] = None,
                 input_name: str = INPUT_NAME,
                 compute_capability: Optional[Tuple[int, int]] = None) -> BuildResult:
    """Build a serialised engine from the bundle's `features.onnx`.

    `calibration_batches`: preprocessed nominal images (float32 [3, crop, crop] or [1, 3, crop, crop]) for INT8;
    `int8_cache`: a previous calibration cache, used instead of the images when given. `timing_cache`: bytes of
    an earlier build's timing cache (speeds up rebuilds). Returns the engine, the updated timing cache and, for
    INT8, the calibration cache. Raises EngineBuildError with a reason a user can act on.
    """
    version = _ensure_tensorrt()
    import tensorrt as trt

    onnx_path = Path(onnx_path)
    if precision not in PRECISIONS:
        raise EngineBuildError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if max_batch < 1:
        raise EngineBuildError(f"--max-batch must be at least 1, got {max_batch}")
    if workspace_mb < 16:
        raise EngineBuildError(f"--workspace {workspace_mb} MB is too small: give at least 16 MB")

    _check_dla_batch(dla_core, max_batch)
    log = _LogStore()
    logger = _make_logger(log)
    builder = trt.Builder(logger)
    fast_fp16 = _check_request(builder, precision, dla_core,
                               int8_cache is not None or calibration_batches is not None, compute_capability)
    network = builder.create_network(_network_flags())
    _parse_onnx(network, logger, onnx_path)
    shape = _network_input(network, input_name, onnx_path)
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
    calibration: Optional[_Calibration] = None
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        if fast_fp16:
            # Layers without an INT8 kernel then fall back to FP16 rather than FP32.
            config.set_flag(trt.BuilderFlag.FP16)
        calibration = _Calibration(calibration_batches if int8_cache is None else None, (1,) + shape[1:],
                                   int8_cache)
        config.int8_calibrator = _make_calibrator(calibration)
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


# ----------------------------------------------------------------------------------------------- running


class TensorRTFeatures:
    """FeatureBackend running a serialised engine: float32 [B, 3, crop, crop] -> float32 [B, h, w, D].

    Device buffers for the largest batch are allocated once; each call copies the batch in, runs
    `execute_async_v3` on the backend's own stream and copies the features out (explicit H2D/D2H copies).
    """

    name = "tensorrt"

    def __init__(self, engine: "Path | str | bytes", manifest: Mapping[str, Any]) -> None:
        """`engine`: the engine file (or its bytes); `manifest`: the bundle manifest it must fit (input crop,
        features grid/dim and tensor names)."""
        self.tensorrt_version = _ensure_tensorrt()
        import tensorrt as trt

        self._closed = True
        if isinstance(engine, bytes):
            data, self.source = engine, "<engine bytes>"
        else:
            self.source = str(engine)
            try:
                data = Path(engine).read_bytes()
            except OSError as error:
                raise EngineLoadError(f"{engine}: cannot read the engine ({error.strerror or error}); "
                                      f"{REBUILD_HINT}") from None
        features = manifest["features"]
        width, height = input_size(manifest["input"])
        self._input_name = str(features.get("input_name", INPUT_NAME))
        self._output_name = str(features.get("output_name", OUTPUT_NAME))
        self._input_tail = (3, height, width)
        self._output_tail = (int(features["grid"][0]), int(features["grid"][1]), int(features["dim"]))
        self._log = _LogStore()
        self._logger = _make_logger(self._log)
        self._runtime = trt.Runtime(self._logger)
        dla_core = self._dla_core(engine, manifest)
        if dla_core is not None:
            # A DLA engine runs on the core the runtime names at deserialisation time.
            self._runtime.DLA_core = dla_core
        loaded: Optional["trt.ICudaEngine"] = self._runtime.deserialize_cuda_engine(data)
        if loaded is None:
            detail = self._log.last_errors(2)
            raise EngineLoadError(
                f"{self.source}: engine built for another GPU or TensorRT version (this is TensorRT "
                f"{self.tensorrt_version}): {REBUILD_HINT}" + (f" [{detail}]" if detail else ""))
        self._engine = loaded
        self._check_io()
        self._profiles = self._profile_batches()
        self.max_batch: Optional[int] = max(high for _, high in self._profiles)
        self._contexts: Dict[int, "trt.IExecutionContext"] = {}
        self._cudart = _cudart()
        self._stream = _cuda_call(self._cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: List[_DeviceBuffer] = []
        self._closed = False
        try:
            for tail in (self._input_tail, self._output_tail):
                self._buffers.append(_DeviceBuffer(self.max_batch * int(np.prod(tail)) * 4))
        except CudaError:
            self.close()
            raise
        self._d_input, self._d_output = self._buffers

    @staticmethod
    def _dla_core(engine: "Path | str | bytes", manifest: Mapping[str, Any]) -> Optional[int]:
        """The DLA core recorded in the manifest entry of this engine file, if it is a DLA engine."""
        if isinstance(engine, bytes):
            return None
        name = Path(engine).name
        for entry in manifest.get("engines") or []:
            if entry.get("file") == name and entry.get("dla_core") is not None:
                return int(entry["dla_core"])
        return None

    def _check_io(self) -> None:
        import tensorrt as trt

        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = {name: engine.get_tensor_mode(name) for name in names}
        expected = {self._input_name: trt.TensorIOMode.INPUT, self._output_name: trt.TensorIOMode.OUTPUT}
        if modes != expected:
            found = ", ".join(f"{n} ({getattr(m, 'name', m)})" for n, m in modes.items())
            raise EngineLoadError(
                f"{self.source}: the engine has tensors {found}, but the manifest expects input "
                f"{self._input_name!r} and output {self._output_name!r}: it does not belong to this bundle; "
                f"{REBUILD_HINT}")
        for name, tail in ((self._input_name, self._input_tail), (self._output_name, self._output_tail)):
            shape = _dims(engine.get_tensor_shape(name))
            if shape[1:] != tail:
                raise EngineLoadError(
                    f"{self.source}: tensor {name!r} has shape {list(shape)}, the manifest says "
                    f"[batch, {', '.join(str(t) for t in tail)}]: the engine does not belong to this bundle; "
                    f"{REBUILD_HINT}")
            if engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise EngineLoadError(f"{self.source}: tensor {name!r} is not float32; {REBUILD_HINT}")

    def _profile_batches(self) -> List[Tuple[int, int]]:
        engine = self._engine
        batches = []
        for index in range(int(engine.num_optimization_profiles)):
            low, _, high = engine.get_tensor_profile_shape(self._input_name, index)
            batches.append((int(low[0]), int(high[0])))
        if not batches or min(low for low, _ in batches) > 1:
            raise EngineLoadError(f"{self.source}: the engine has no optimisation profile for batch 1; "
                                  f"{REBUILD_HINT}")
        return batches

    def _profile_for(self, batch: int) -> int:
        fitting = [(high - low, i) for i, (low, high) in enumerate(self._profiles) if low <= batch <= high]
        return min(fitting)[1]

    def _context(self, profile: int) -> "trt.IExecutionContext":
        context = self._contexts.get(profile)
        if context is None:
            created: Optional["trt.IExecutionContext"] = self._engine.create_execution_context()
            if created is None:
                raise EngineLoadError(f"{self.source}: TensorRT could not create an execution context (out of "
                                      "GPU memory?)")
            if profile != 0 and not created.set_optimization_profile_async(profile, int(self._stream)):
                raise EngineLoadError(f"{self.source}: cannot select optimisation profile {profile}")
            self._contexts[profile] = context = created
        return context

    def features(self, batch: np.ndarray) -> np.ndarray:
        if self._closed:
            raise RuntimeError(f"{self.source}: backend is closed")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self._input_tail:
            raise ValueError(f"expected a batch of shape [B, {', '.join(map(str, self._input_tail))}], "
                             f"got {list(batch.shape)}")
        step = int(self.max_batch or 1)
        chunks = [self._run(batch[start:start + step]) for start in range(0, batch.shape[0], step)]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=0)

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        size = int(chunk.shape[0])
        context = self._context(self._profile_for(size))
        if not context.set_input_shape(self._input_name, (size,) + self._input_tail):
            raise RuntimeError(f"{self.source}: TensorRT refused input shape {[size, *self._input_tail]}")
        context.set_tensor_address(self._input_name, self._d_input.ptr)
        context.set_tensor_address(self._output_name, self._d_output.ptr)
        host_in = np.ascontiguousarray(chunk, dtype=np.float32)
        host_out = np.empty((size,) + self._output_tail, dtype=np.float32)
        self._d_input.upload(host_in, self._stream)
        if not context.execute_async_v3(int(self._stream)):
            raise RuntimeError(f"{self.source}: TensorRT inference failed: "
                               + (self._log.last_errors(2) or "no detail in the log"))
        self._d_output.download(host_out, self._stream)
        # host_in must stay alive until the copies queued on the stream are done.
        _cuda_call(self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return host_out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._contexts.clear()
        for buffer in self._buffers:
            buffer.free()
        _cuda_call(self._cudart.cudaStreamDestroy(self._stream), "cudaStreamDestroy")

    def __enter__(self) -> "TensorRTFeatures":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------- verification

# Largest accepted max|f_trt - f_onnx| / max|f_onnx| per precision when an engine is checked against ONNX
# Runtime. FP16 keeps ~3 significant digits per operation; INT8 calibration error is larger.
FEATURE_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "int8": 1e-1}


def feature_errors(reference: np.ndarray, candidate: np.ndarray) -> Dict[str, float]:
    """How far a backend's features are from the reference (ONNX Runtime) on the same inputs."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"feature shapes differ: {list(ref.shape)} vs {list(cand.shape)}")
    diff = np.abs(ref - cand)
    scale = float(np.abs(ref).max()) or 1.0
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "max_rel": float(diff.max()) / scale}


def onnx_io(onnx_path: "Path | str") -> Dict[str, Any]:
    """The manifest-like description (input crop, features grid/dim, tensor names) of a features.onnx."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise EngineBuildError(f"{onnx_path}: expected one input and one output")
    in_shape, out_shape = inputs[0].shape, outputs[0].shape
    if len(in_shape) != 4 or len(out_shape) != 4 or not all(isinstance(v, int) for v in out_shape[1:]):
        raise EngineBuildError(f"{onnx_path}: shapes {in_shape} -> {out_shape} are not [B,3,H,W] -> "
                               "[B,h,w,D] with a fixed h, w, D")
    return {"input": {"size": [int(in_shape[3]), int(in_shape[2])]},
            "features": {"grid": [int(out_shape[1]), int(out_shape[2])], "dim": int(out_shape[3]),
                         "input_name": inputs[0].name, "output_name": outputs[0].name}}


def _onnx_features(onnx_path: Path, description: Mapping[str, Any], batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    features = description["features"]
    out = session.run([features["output_name"]], {features["input_name"]: batch})[0]
    return np.asarray(out, dtype=np.float32)


def build_engine_into(folder: "Path | str", onnx_path: "Path | str", precision: str = "fp16",
                      log: Optional[Any] = None, *, max_batch: Optional[int] = None,
                      workspace_mb: Optional[int] = None, dla_core: Optional[int] = None,
                      calibration_batches: Optional[Iterable[np.ndarray]] = None,
                      timing_cache: Optional[bytes] = None, int8_cache: Optional[bytes] = None,
                      tag: Optional[str] = None) -> Dict[str, Any]:
    """Build an engine for this device, check its features against ONNX Runtime, write it into `folder`.

    Writes the engine and its timing cache (and INT8 calibration cache) under new names in `folder` and returns
    the manifest["engines"] entry naming them. Used by `export` (into the bundle being staged); `engine build`
    adds the image-score check on top. Raises EngineBuildError when the features differ beyond
    FEATURE_TOLERANCE[precision].
    """
    say = log if callable(log) else (lambda message: None)
    folder, onnx_path = Path(folder), Path(onnx_path)
    version = _ensure_tensorrt()
    from .devices.detect import detect_device
    from .devices.profiles import get_profile

    device = detect_device()
    profile = get_profile(device.slug)
    if not profile.engines_supported:
        raise EngineBuildError(f"{device.slug}: {profile.data['engines'].get('note', 'no TensorRT engines')}")
    defaults = profile.defaults
    if max_batch is None:
        max_batch = 1 if dla_core is not None else int(defaults.get("max_batch") or 1)
    workspace_mb = int(workspace_mb or defaults.get("workspace_mb") or 1024)
    say(f"TensorRT {version}: building a {precision} engine for {device.slug} (max batch {max_batch}, "
        f"workspace {workspace_mb} MB{'' if dla_core is None else f', DLA core {dla_core}'})")
    result = build_engine(onnx_path, precision=precision, max_batch=max_batch, workspace_mb=workspace_mb,
                          dla_core=dla_core, calibration_batches=calibration_batches, timing_cache=timing_cache,
                          int8_cache=int8_cache, compute_capability=device.compute_capability)

    description = onnx_io(onnx_path)
    width, height = input_size(description["input"])
    probe = np.random.default_rng(0).standard_normal((min(2, max_batch), 3, height, width)).astype(np.float32)
    with TensorRTFeatures(result.engine, description) as backend:
        candidate = backend.features(probe)
    errors = feature_errors(_onnx_features(onnx_path, description, probe), candidate)
    limit = FEATURE_TOLERANCE[precision]
    if errors["max_rel"] > limit:
        raise EngineBuildError(
            f"the {precision} engine's features differ from ONNX Runtime by {errors['max_rel']:.3g} (relative), "
            f"more than the {limit:g} accepted for {precision}: not registered; try --precision fp16/fp32")

    cc = format_compute_capability(device.compute_capability)
    names = {"file": engine_file_name(device.slug, version, precision, dla_core, tag)}
    base = names["file"][: -len(".engine")]
    names["timing_cache"] = base + ".timing.cache"
    if result.int8_cache is not None:
        names["int8_calibration_cache"] = base + ".int8.cache"
    for name in names.values():
        if (folder / name).exists():
            raise EngineBuildError(f"{folder / name}: already exists; pass a tag to build under a new name")
    (folder / names["file"]).write_bytes(result.engine)
    (folder / names["timing_cache"]).write_bytes(result.timing_cache)
    if result.int8_cache is not None:
        (folder / names["int8_calibration_cache"]).write_bytes(result.int8_cache)
    say(f"engine {names['file']}: features within {errors['max_rel']:.2g} of ONNX Runtime (limit {limit:g})")
    return {**names, "device": device.slug, "variant": device.variant, "compute_capability": cc,
            "tensorrt_version": version, "precision": precision, "max_batch": max_batch,
            "dla_core": dla_core, "workspace_mb": workspace_mb,
            "verification": {"reference": "onnxruntime CPUExecutionProvider",
                             "inputs": f"{probe.shape[0]} random normal inputs (seed 0)",
                             "features": errors, "feature_tolerance": limit}}
