"""Control flow of the `patchcore_edge.trt` package against a declared test double of TensorRT and of the CUDA runtime.

TensorRT cannot be installed on the machines that run this suite (no GPU, and NVIDIA's wheels come from NVIDIA's
own index), so this file builds two fake modules and injects them with monkeypatch into `sys.modules`:

- `FakeTensorRT` stands in for `tensorrt`. It implements ONLY names that the TensorRT stubs (`tensorrt-stubs`)
  declare -- `test_double_uses_only_names_the_stubs_declare` checks that by parsing the stubs -- plus private
  `_`-prefixed knobs the tests turn (which GPU it pretends to be, which precisions are fast, how many DLA cores).
  The "ONNX model" it parses is a small JSON description written by the test, and the "engine" it serialises
  is JSON too: the double does not parse ONNX, optimise or generate kernels, and nothing here claims a real
  build or a real inference happened.
  Its engine has as many outputs as the model declares (SPADE: "features" + "global"; multi-scale: a grid per
  scale).
- `FakeCudart` stands in for `cuda.bindings.runtime` with the same function names (checked against the
  installed cuda-python): "device" allocations are host numpy buffers, so copies are real memmoves.

What this proves: the order and arguments of the TensorRT calls our code makes (network flags per version,
workspace pool, optimisation profile min/opt/max shapes, FP16/INT8/DLA flags, calibrator protocol: cache read,
one device pointer per image then None, cache write; callbacks that never let an exception escape into
TensorRT, which aborts the process -- the double records such an escape and stops the test), our refusals and their messages (precision a GPU lacks,
DLA core out of range, FP32 on DLA, parser errors listed per node, engine for another GPU or version, engine
whose tensors do not match the manifest, output by output), and the host/device data path of TensorRTFeatures
(profile choice by batch size, chunking above max batch, outputs in image order, one device buffer per output of
a multi-output network and every output returned by name and verified against ONNX Runtime).
What it does not prove: that real TensorRT accepts these calls, builds a fast or accurate engine, or that the
engine's features match ONNX Runtime. That is `tests/test_trt_gpu.py` (real TensorRT, skipped without one) and
`patchcore-edge engine build`'s own verification against ONNX Runtime on the device.
"""

from __future__ import annotations

import ast
import ctypes
import enum
import importlib.util
import json
import re
import sys
import types
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import pytest

from patchcore_edge import trt as pe_trt
from patchcore_edge.trt.callbacks import TensorRTLog

from conftest import two_output_onnx, with_global_output

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------- CUDA double


class FakeCudart(types.ModuleType):
    """`cuda.bindings.runtime` stand-in: memory is host memory; every call returns cuda-python's tuples."""

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorInvalidValue = 1
        cudaErrorMemoryAllocation = 2

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaStream_t:
        def __init__(self, value: int) -> None:
            self._value = value

        def __int__(self) -> int:
            return self._value

    def __init__(self) -> None:
        super().__init__("cuda.bindings.runtime")
        self._allocations: Dict[int, np.ndarray] = {}
        self._streams: Set[int] = set()
        self._copies: List[str] = []

    def cudaGetErrorString(self, error: Any) -> tuple:
        return self.cudaError_t.cudaSuccess, f"fake error {int(error)}".encode()

    def cudaGetDeviceCount(self) -> tuple:
        return self.cudaError_t.cudaSuccess, 1

    def cudaGetDeviceProperties(self, index: int) -> tuple:
        props = types.SimpleNamespace(name=b"Fake Orin\0\0", major=8, minor=7, totalGlobalMem=8 << 30,
                                      integrated=1)
        return self.cudaError_t.cudaSuccess, props

    def cudaMalloc(self, size: int) -> tuple:
        block = np.zeros(int(size), dtype=np.uint8)
        self._allocations[block.ctypes.data] = block
        return self.cudaError_t.cudaSuccess, block.ctypes.data

    def cudaFree(self, pointer: int) -> tuple:
        if self._allocations.pop(int(pointer), None) is None:
            return (self.cudaError_t.cudaErrorInvalidValue,)
        return (self.cudaError_t.cudaSuccess,)

    def _check_device(self, pointer: int, count: int) -> bool:
        return any(base <= pointer and pointer + count <= base + block.nbytes
                   for base, block in self._allocations.items())

    def cudaMemcpy(self, dst: int, src: int, count: int, kind: Any) -> tuple:
        device = dst if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else src
        if not self._check_device(int(device), int(count)):
            return (self.cudaError_t.cudaErrorInvalidValue,)
        ctypes.memmove(int(dst), int(src), int(count))
        self._copies.append("H2D" if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else "D2H")
        return (self.cudaError_t.cudaSuccess,)

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: Any, stream: Any) -> tuple:
        if int(stream) not in self._streams:
            return (self.cudaError_t.cudaErrorInvalidValue,)
        return self.cudaMemcpy(dst, src, count, kind)

    def cudaStreamCreate(self) -> tuple:
        stream = self.cudaStream_t(1000 + len(self._streams))
        self._streams.add(int(stream))
        return self.cudaError_t.cudaSuccess, stream

    def cudaStreamSynchronize(self, stream: Any) -> tuple:
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamDestroy(self, stream: Any) -> tuple:
        self._streams.discard(int(stream))
        return (self.cudaError_t.cudaSuccess,)


# ----------------------------------------------------------------------------------------------- TensorRT double


def _describe_real_onnx(model: bytes) -> Dict[str, Any]:
    """Input/output names and shapes of a real ONNX model, read with ONNX Runtime (no graph conversion)."""
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    shape = lambda dims: [d if isinstance(d, int) else -1 for d in dims]  # noqa: E731
    return {"input": {"name": inp.name, "shape": shape(inp.shape)},
            "outputs": [{"name": out.name, "shape": shape(out.shape)} for out in session.get_outputs()],
            "onnx": model.hex()}


class EscapedIntoTensorRT(BaseException):
    """What the double does when a Python callback raises into it: real TensorRT aborts the whole process."""


def make_fake_tensorrt(version: str = "10.3.0.30") -> types.ModuleType:
    """A fresh fake `tensorrt` module (see the module docstring for what it is and is not)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    state = types.SimpleNamespace(device="gpu-A", fast_fp16=True, fast_int8=True, dla_cores=0,
                                  fail_build=False, builds=[], feature_scale=1.0, output_scale={},
                                  context_shapes={}, escaped=[])
    trt._state = state

    def call_back(function: Any, *args: Any) -> Any:
        """TensorRT (C++) calling into Python: an exception that comes out of the callback kills the process."""
        try:
            return function(*args)
        except BaseException as error:
            state.escaped.append(error)
            raise EscapedIntoTensorRT(f"{function.__name__} raised {error!r} into TensorRT") from error

    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = 0, 1, 2, 3, 4

        def __init__(self) -> None:
            pass

        def log(self, severity: int, msg: str) -> None:
            pass

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        EXPLICIT_BATCH = 0

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE = 0

    class BuilderFlag(enum.IntEnum):
        FP16 = 0
        INT8 = 1
        GPU_FALLBACK = 3

    class DeviceType(enum.IntEnum):
        GPU = 0
        DLA = 1

    class TensorIOMode(enum.IntEnum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    class DataType(enum.IntEnum):
        FLOAT = 0
        HALF = 1

    class Dims:
        def __init__(self, shape: List[int]) -> None:
            self._shape = [int(v) for v in shape]

        def __len__(self) -> int:
            return len(self._shape)

        def __getitem__(self, index: int) -> int:
            return self._shape[index]

    class ITensor:
        def __init__(self, name: str, shape: List[int]) -> None:
            self.name = name
            self.shape = Dims(shape)

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self._flags = flags
            self._onnx: Optional[str] = None
            self._inputs: List[ITensor] = []
            self._outputs: List[ITensor] = []

        @property
        def num_inputs(self) -> int:
            return len(self._inputs)

        def get_input(self, index: int) -> ITensor:
            return self._inputs[index]

        @property
        def num_outputs(self) -> int:
            return len(self._outputs)

        def get_output(self, index: int) -> ITensor:
            return self._outputs[index]

    class ParserError:
        def __init__(self, item: Dict[str, Any]) -> None:
            self._item = item

        def node(self) -> int:
            return int(self._item["node"])

        def desc(self) -> str:
            return str(self._item["desc"])

    if int(version.split(".")[0]) >= 10:
        ParserError.node_name = lambda self: str(self._item.get("node_name", ""))  # type: ignore[attr-defined]

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
            self._network = network
            self._errors: List[ParserError] = []

        def parse(self, model: bytes) -> bool:
            try:
                description = json.loads(bytes(model).decode())
            except (UnicodeDecodeError, ValueError):
                description = _describe_real_onnx(bytes(model))
            if description.get("errors"):
                self._errors = [ParserError(item) for item in description["errors"]]
                return False
            self._network._onnx = description.get("onnx")
            self._network._inputs = [ITensor(description["input"]["name"], description["input"]["shape"])]
            self._network._outputs = [ITensor(o["name"], o["shape"]) for o in description["outputs"]]
            return True

        @property
        def num_errors(self) -> int:
            return len(self._errors)

        def get_error(self, index: int) -> ParserError:
            return self._errors[index]

    class IOptimizationProfile:
        def __init__(self) -> None:
            self._shapes_set: Dict[str, tuple] = {}

        def set_shape(self, input: str, min: Dims, opt: Dims, max: Dims) -> None:
            self._shapes_set[input] = tuple(tuple(d[i] for i in range(len(d))) for d in (min, opt, max))

    class ITimingCache:
        def __init__(self, data: bytes) -> None:
            self._data = bytes(data)

        def serialize(self) -> bytes:
            return self._data + b"|tuned"

    class IInt8Calibrator:
        pass

    class IInt8EntropyCalibrator2(IInt8Calibrator):
        def __init__(self) -> None:
            pass

    class IBuilderConfig:
        def __init__(self) -> None:
            self._flags: Set[int] = set()
            self._pools: Dict[int, int] = {}
            self._profiles_set: List[IOptimizationProfile] = []
            self.int8_calibrator: Optional[IInt8Calibrator] = None
            self._calibration_profile: Optional[IOptimizationProfile] = None
            self.default_device_type = DeviceType.GPU
            self.DLA_core = -1
            self._timing_cache: Optional[ITimingCache] = None

        def set_memory_pool_limit(self, pool: int, pool_size: int) -> None:
            self._pools[int(pool)] = int(pool_size)

        def set_flag(self, flag: int) -> None:
            self._flags.add(int(flag))

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            self._profiles_set.append(profile)
            return len(self._profiles_set) - 1

        def set_calibration_profile(self, profile: IOptimizationProfile) -> bool:
            self._calibration_profile = profile
            return True

        def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
            return ITimingCache(serialized_timing_cache)

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            if cache._data.startswith(b"other-gpu"):
                return False
            self._timing_cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache:
            assert self._timing_cache is not None
            return self._timing_cache

    class Builder:
        def __init__(self, logger: ILogger) -> None:
            self._logger = logger

        @property
        def platform_has_fast_fp16(self) -> bool:
            return state.fast_fp16

        @property
        def platform_has_fast_int8(self) -> bool:
            return state.fast_int8

        @property
        def num_DLA_cores(self) -> int:
            return state.dla_cores

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            return INetworkDefinition(flags)

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> Optional[bytes]:
            record: Dict[str, Any] = {"network_flags": network._flags, "config": config, "calibration": []}
            state.builds.append(record)
            calibrator = config.int8_calibrator
            if calibrator is not None:
                # The documented protocol: a cache short-cuts calibration; otherwise batches until None.
                cache = call_back(calibrator.read_calibration_cache)
                if cache is None:
                    while True:
                        pointers = call_back(calibrator.get_batch, [network._inputs[0].name])
                        if pointers is None:
                            break
                        first = ctypes.c_float.from_address(pointers[0]).value
                        record["calibration"].append((pointers, first))
                    call_back(calibrator.write_calibration_cache, b"calib:%d" % len(record["calibration"]))
            call_back(self._logger.log, ILogger.WARNING, "fake: building")
            if state.fail_build:
                call_back(self._logger.log, ILogger.ERROR, "fake: out of workspace")
                return None
            engine = {"device": state.device, "version": version, "onnx": network._onnx,
                      "io": [[t.name, "INPUT", [t.shape[i] for i in range(len(t.shape))]] for t in network._inputs]
                      + [[t.name, "OUTPUT", [t.shape[i] for i in range(len(t.shape))]] for t in network._outputs],
                      "profiles": [list(p._shapes_set[network._inputs[0].name]) for p in config._profiles_set]}
            return json.dumps(engine).encode()

    class IExecutionContext:
        def __init__(self, engine: "ICudaEngine") -> None:
            self._engine = engine
            self._profile = 0
            self._shapes: Dict[str, tuple] = {}
            self._addresses: Dict[str, int] = {}
            self._runs: List[tuple] = []

        def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
            self._profile = profile_index
            return True

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            low, _, high = self._engine.get_tensor_profile_shape(name, self._profile)
            if not low[0] <= shape[0] <= high[0]:
                return False
            self._shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name: str, memory: int) -> bool:
            self._addresses[name] = int(memory)
            return True

        def get_tensor_shape(self, name: str) -> Dims:
            # An input: the shape set; an output: the engine's, its batch that of the input (or a knob's shape).
            (in_name, _, _), *outputs = self._engine._io
            if name == in_name:
                return Dims(list(self._shapes[in_name]))
            tail = next(shape for tensor, _, shape in outputs if tensor == name)[1:]
            return Dims(state.context_shapes.get(name, [self._shapes[in_name][0], *tail]))

        def execute_async_v3(self, stream_handle: int) -> bool:
            # Not an inference: a fixed per-image function so the test can follow each image through.
            (in_name, _, _), *outputs = self._engine._io
            batch = self._shapes[in_name]
            count = int(np.prod(batch))
            images = np.ctypeslib.as_array((ctypes.c_float * count).from_address(self._addresses[in_name]))
            images = images.reshape(batch)
            if self._engine._onnx is not None:
                # Engine made from a real ONNX file: ONNX Runtime computes every output, scaled by the knobs.
                import onnxruntime as ort

                session = ort.InferenceSession(bytes.fromhex(self._engine._onnx),
                                               providers=["CPUExecutionProvider"])
                names = [o.name for o in session.get_outputs()]
                computed = dict(zip(names, session.run(names, {in_name: np.array(images)})))
            for position, (out_name, _, out_shape) in enumerate(outputs):
                out = np.empty((batch[0],) + tuple(out_shape[1:]), dtype=np.float32)
                if self._engine._onnx is not None:
                    scale = state.feature_scale * state.output_scale.get(out_name, 1.0)
                    out[...] = computed[out_name] * np.float32(scale)
                else:
                    # The image's mean, plus the output's position: each output tells which one it is.
                    means = images.mean(axis=(1, 2, 3)) + position
                    out[...] = means.reshape((-1,) + (1,) * (out.ndim - 1))
                ctypes.memmove(self._addresses[out_name], out.ctypes.data, out.nbytes)
            self._runs.append((self._profile, batch[0]))
            return True

    class ICudaEngine:
        def __init__(self, description: Dict[str, Any]) -> None:
            self._io = description["io"]
            self._profiles = description["profiles"]
            self._onnx = description.get("onnx")
            self._contexts: List[IExecutionContext] = []

        @property
        def num_io_tensors(self) -> int:
            return len(self._io)

        def get_tensor_name(self, index: int) -> str:
            return str(self._io[index][0])

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            for tensor, mode, _ in self._io:
                if tensor == name:
                    return TensorIOMode[mode]
            return TensorIOMode.NONE

        def get_tensor_shape(self, name: str) -> Dims:
            return Dims(next(shape for tensor, _, shape in self._io if tensor == name))

        def get_tensor_dtype(self, name: str) -> DataType:
            return DataType.FLOAT

        @property
        def num_optimization_profiles(self) -> int:
            return len(self._profiles)

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> List[Dims]:
            return [Dims(shape) for shape in self._profiles[profile_index]]

        def create_execution_context(self) -> IExecutionContext:
            context = IExecutionContext(self)
            self._contexts.append(context)
            return context

    class Runtime:
        def __init__(self, logger: ILogger) -> None:
            self._logger = logger

        def deserialize_cuda_engine(self, serialized_engine: bytes) -> Optional[ICudaEngine]:
            description = json.loads(bytes(serialized_engine).decode())
            if description["device"] != state.device or description["version"] != version:
                call_back(self._logger.log, ILogger.ERROR, "fake: engine plan incompatible with this device/version")
                return None
            engine = ICudaEngine(description)
            state.last_engine = engine
            return engine

    for name, value in list(locals().items()):
        if isinstance(value, type):
            setattr(trt, name, value)
    return trt


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = make_fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", FakeCudart())
    return module


def model_file(tmp_path: Path, crop: int = 8, grid: int = 2, dim: int = 4, batch: int = -1,
               errors: Optional[List[Dict[str, Any]]] = None, name: str = "features.onnx",
               extra_outputs: Sequence[Tuple[str, List[int]]] = ()) -> Path:
    """The fake parser's stand-in for an ONNX file (JSON; see the module docstring): the patch grid "features",
    then `extra_outputs` (name, shape after the batch)."""
    outputs = [("features", [grid, grid, dim]), *extra_outputs]
    description: Dict[str, Any] = {"input": {"name": "image", "shape": [batch, 3, crop, crop]},
                                   "outputs": [{"name": n, "shape": [batch, *tail]} for n, tail in outputs]}
    if errors:
        description = {"errors": errors}
    path = tmp_path / name
    path.write_text(json.dumps(description))
    return path


# ----------------------------------------------------------------------------------------------- the double itself


def _stub_names() -> Dict[str, Set[str]]:
    """{class name: names declared in it and its bases} plus {"": module-level names}, from the fixed stubs."""
    spec = importlib.util.spec_from_file_location("prepare_stubs", REPO / "typecheck" / "prepare_stubs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        files = module.stub_files()
    except SystemExit as error:
        pytest.skip(f"tensorrt-stubs not installed: {error}")
    source = next(f for f in files if f.name == "tensorrt.pyi")
    text = source.read_text()
    for _, fix in module.FIXES:
        text, _ = fix(text)
    tree = ast.parse(text)
    classes: Dict[str, Set[str]] = {}
    bases: Dict[str, List[str]] = {}
    module_names: Set[str] = set()

    def collect(node: ast.ClassDef, prefix: str = "") -> None:
        names: Set[str] = set()
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(item.name)
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                names.add(item.target.id)
            elif isinstance(item, ast.ClassDef):
                names.add(item.name)
                collect(item, prefix + node.name + ".")
        classes[prefix + node.name] = names
        bases[prefix + node.name] = [b.id for b in node.bases if isinstance(b, ast.Name)]

    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            module_names.add(node.name)
            collect(node)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            module_names.add(node.target.id)
    resolved: Dict[str, Set[str]] = {}
    for name in classes:
        names, todo = set(), [name]
        while todo:
            current = todo.pop()
            names |= classes.get(current, set())
            todo.extend(bases.get(current, []))
        resolved[name] = names
    resolved[""] = module_names | {"__version__"}
    return resolved


def test_double_uses_only_names_the_stubs_declare() -> None:
    declared = _stub_names()
    fake = make_fake_tensorrt()
    undeclared = []
    for name, value in vars(fake).items():
        if name.startswith("_") and name != "__version__":
            continue
        if name not in declared[""]:
            undeclared.append(name)
            continue
        if isinstance(value, type):
            members = set(vars(value))
            if hasattr(value, "__members__"):
                members |= set(value.__members__)
            for member in members:
                # Constructors of objects TensorRT itself creates (configs, engines...) are the double's own.
                if member.startswith("_"):
                    continue
                if member not in declared.get(name, set()):
                    undeclared.append(f"{name}.{member}")
    assert undeclared == []
    # The classes our code constructs must be constructible in the real API too.
    for constructed in ("Builder", "Runtime", "OnnxParser", "ILogger", "IInt8EntropyCalibrator2", "Dims"):
        assert "__init__" in declared[constructed], constructed


def test_cuda_double_uses_only_real_cuda_python_names() -> None:
    real = pytest.importorskip("cuda.bindings.runtime")
    fake = FakeCudart()
    public = [n for n in dir(type(fake)) if n.startswith("cuda")]
    assert len(public) > 10
    assert [n for n in public if not hasattr(real, n)] == []
    for enum_name in ("cudaError_t", "cudaMemcpyKind"):
        members = getattr(fake, enum_name).__members__
        assert all(hasattr(getattr(real, enum_name), m) for m in members)


# ----------------------------------------------------------------------------------------------- building


def test_profiles_cover_single_images_and_batches(fake: types.ModuleType, tmp_path: Path) -> None:
    result = pe_trt.build_engine(model_file(tmp_path), precision="fp16", max_batch=6, workspace_mb=256,
                                 timing_cache=b"previous")
    config = fake._state.builds[-1]["config"]
    shapes = [p._shapes_set["image"] for p in config._profiles_set]
    assert shapes == [((1, 3, 8, 8), (1, 3, 8, 8), (1, 3, 8, 8)),
                      ((2, 3, 8, 8), (6, 3, 8, 8), (6, 3, 8, 8))]
    assert config._pools == {int(fake.MemoryPoolType.WORKSPACE): 256 << 20}
    assert int(fake.BuilderFlag.FP16) in config._flags and int(fake.BuilderFlag.INT8) not in config._flags
    assert result.timing_cache == b"previous|tuned"
    assert result.int8_cache is None
    assert json.loads(result.engine)["profiles"][1] == [[2, 3, 8, 8], [6, 3, 8, 8], [6, 3, 8, 8]]


def test_single_profile_when_max_batch_is_one(fake: types.ModuleType, tmp_path: Path) -> None:
    pe_trt.build_engine(model_file(tmp_path), precision="fp32", max_batch=1)
    config = fake._state.builds[-1]["config"]
    assert len(config._profiles_set) == 1 and config._flags == set()


@pytest.mark.parametrize("version, flags", [("8.5.2.2", 1), ("8.6.2.3", 1), ("10.3.0.30", 0)])
def test_explicit_batch_flag_only_before_tensorrt_10(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     version: str, flags: int) -> None:
    module = make_fake_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    pe_trt.build_engine(model_file(tmp_path), precision="fp16")
    assert module._state.builds[-1]["network_flags"] == flags


def test_tensorrt_older_than_8_5_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt("8.2.1.8"))
    with pytest.raises(pe_trt.TensorRTUnavailable, match=r"8\.2\.1\.8 is older than 8\.5.*ONNX Runtime"):
        pe_trt.build_engine(model_file(tmp_path))


def test_foreign_timing_cache_is_replaced_not_fatal(fake: types.ModuleType, tmp_path: Path) -> None:
    result = pe_trt.build_engine(model_file(tmp_path), timing_cache=b"other-gpu cache")
    assert result.timing_cache == b"|tuned"


def test_int8_calibrator_feeds_device_pointers_then_none(fake: types.ModuleType, tmp_path: Path) -> None:
    images = [np.full((3, 8, 8), float(i), dtype=np.float32) for i in range(5)]
    result = pe_trt.build_engine(model_file(tmp_path), precision="int8", max_batch=4,
                                 calibration_batches=iter(images))
    record = fake._state.builds[-1]
    fed = record["calibration"]
    assert [value for _, value in fed] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all(len(pointers) == 1 and pointers[0] != 0 for pointers, _ in fed)
    config = record["config"]
    assert config._calibration_profile is config._profiles_set[0]
    assert {int(fake.BuilderFlag.INT8), int(fake.BuilderFlag.FP16)} <= config._flags
    assert result.int8_cache == b"calib:5"


def test_int8_cache_skips_calibration_images(fake: types.ModuleType, tmp_path: Path) -> None:
    def never() -> Any:
        raise AssertionError("images must not be read when a calibration cache is given")
        yield

    result = pe_trt.build_engine(model_file(tmp_path), precision="int8", calibration_batches=never(),
                                 int8_cache=b"calib:old")
    assert fake._state.builds[-1]["calibration"] == []
    assert result.int8_cache == b"calib:old"


def test_int8_with_an_empty_image_folder_is_an_error(fake: types.ModuleType, tmp_path: Path) -> None:
    with pytest.raises(pe_trt.EngineBuildError, match="read no image"):
        pe_trt.build_engine(model_file(tmp_path), precision="int8", calibration_batches=iter([]))


@pytest.mark.parametrize("knob, precision, message", [
    ("fast_fp16", "fp16", r"no fast FP16.*--precision fp32"),
    ("fast_int8", "int8", r"no fast INT8.*--precision fp16"),
])
def test_precision_the_gpu_lacks_is_refused(fake: types.ModuleType, tmp_path: Path, knob: str, precision: str,
                                            message: str) -> None:
    setattr(fake._state, knob, False)
    with pytest.raises(pe_trt.EngineBuildError, match=message):
        pe_trt.build_engine(model_file(tmp_path), precision=precision, calibration_batches=[])
    assert fake._state.builds == []


def test_int8_without_calibration_source_says_what_to_pass(fake: types.ModuleType, tmp_path: Path) -> None:
    with pytest.raises(pe_trt.EngineBuildError, match="--calibration-images"):
        pe_trt.build_engine(model_file(tmp_path), precision="int8")


@pytest.mark.parametrize("cores, core, precision, message", [
    (0, 0, "fp16", r"no DLA core.*leave out --dla"),
    (2, 2, "fp16", r"has 2 DLA core\(s\), use 0\.\.1"),
    (1, -1, "fp16", r"use 0\.\.0"),
    (2, 1, "fp32", r"DLA runs FP16 or INT8 only"),
])
def test_dla_requests_checked_before_building(fake: types.ModuleType, tmp_path: Path, cores: int, core: int,
                                              precision: str, message: str) -> None:
    fake._state.dla_cores = cores
    with pytest.raises(pe_trt.EngineBuildError, match=message):
        pe_trt.build_engine(model_file(tmp_path), precision=precision, dla_core=core)
    assert fake._state.builds == []


def test_dla_needs_a_static_batch(fake: types.ModuleType, tmp_path: Path) -> None:
    fake._state.dla_cores = 2
    with pytest.raises(pe_trt.EngineBuildError, match="--max-batch 1"):
        pe_trt.build_engine(model_file(tmp_path), precision="fp16", dla_core=0, max_batch=4)


def test_dla_build_sets_device_core_and_gpu_fallback(fake: types.ModuleType, tmp_path: Path) -> None:
    fake._state.dla_cores = 2
    pe_trt.build_engine(model_file(tmp_path), precision="fp16", dla_core=1)
    config = fake._state.builds[-1]["config"]
    assert config.default_device_type == fake.DeviceType.DLA and config.DLA_core == 1
    assert int(fake.BuilderFlag.GPU_FALLBACK) in config._flags


def test_parser_errors_are_listed_per_node(fake: types.ModuleType, tmp_path: Path) -> None:
    path = model_file(tmp_path, errors=[{"node": 7, "desc": "Unsupported ONNX op GridSample", "node_name": "gs"},
                                        {"node": 9, "desc": "Invalid weights"}])
    with pytest.raises(pe_trt.EngineBuildError) as info:
        pe_trt.build_engine(path)
    text = str(info.value)
    assert str(path) in text
    assert "node 7 (gs): Unsupported ONNX op GridSample" in text and "node 9: Invalid weights" in text


def test_missing_model_names_the_file(fake: types.ModuleType, tmp_path: Path) -> None:
    with pytest.raises(pe_trt.EngineBuildError, match=r"missing\.onnx: cannot read"):
        pe_trt.build_engine(tmp_path / "missing.onnx")


def test_fixed_batch_model_cannot_serve_batches(fake: types.ModuleType, tmp_path: Path) -> None:
    with pytest.raises(pe_trt.EngineBuildError, match="fixed batch of 1"):
        pe_trt.build_engine(model_file(tmp_path, batch=1), max_batch=4)


def test_failed_build_quotes_the_tensorrt_log(fake: types.ModuleType, tmp_path: Path) -> None:
    fake._state.fail_build = True
    with pytest.raises(pe_trt.EngineBuildError, match=r"out of workspace.*larger --workspace"):
        pe_trt.build_engine(model_file(tmp_path))


# ----------------------------------------------------------------------------------------------- loading, running


def _engine(fake: types.ModuleType, tmp_path: Path, max_batch: int = 4, **kw: Any) -> bytes:
    return pe_trt.build_engine(model_file(tmp_path, **kw), precision="fp16", max_batch=max_batch).engine


def _manifest(crop: int = 8, grid: int = 2, dim: int = 4, output_name: str = "features") -> Dict[str, Any]:
    """The manifest keys an engine's tensors are checked against (see ARCHITECTURE.md / bundle.py)."""
    return {"input": {"crop": crop}, "features": {"grid": [grid, grid], "dim": dim, "input_name": "image",
                                                  "output_name": output_name}}


def _io(crop: int = 8, grid: int = 2, dim: int = 4, output_name: str = "features",
        extra_outputs: Sequence[Tuple[str, Optional[Tuple[int, ...]]]] = ()) -> pe_trt.TensorIO:
    """What TensorRTFeatures checks an engine against: the tensors of `_manifest(...)`, plus `extra_outputs`
    (name, shape after the batch or None where the manifest records none)."""
    outputs = (pe_trt.OutputTensor(output_name, (grid, grid, dim)),
               *(pe_trt.OutputTensor(name, tail) for name, tail in extra_outputs))
    return pe_trt.TensorIO(input_name="image", width=crop, height=crop, outputs=outputs)


def test_engine_from_another_gpu_is_refused_with_rebuild_hint(fake: types.ModuleType, tmp_path: Path) -> None:
    engine = _engine(fake, tmp_path)
    fake._state.device = "gpu-B"
    with pytest.raises(pe_trt.EngineLoadError, match=r"another GPU or TensorRT version.*engine build BUNDLE"):
        pe_trt.TensorRTFeatures(engine, _io())


def test_engine_not_matching_the_manifest_is_refused(fake: types.ModuleType, tmp_path: Path) -> None:
    engine = _engine(fake, tmp_path, dim=4)
    with pytest.raises(pe_trt.EngineLoadError, match=r"'features' has shape \[-1, 2, 2, 4\].*\[batch, 2, 2, 8\]"):
        pe_trt.TensorRTFeatures(engine, _io(dim=8))
    with pytest.raises(pe_trt.EngineLoadError, match="does not belong to this bundle"):
        pe_trt.TensorRTFeatures(engine, _io(output_name="feats"))


def test_features_run_per_profile_and_in_image_order(fake: types.ModuleType, tmp_path: Path) -> None:
    engine = _engine(fake, tmp_path, max_batch=4)
    cudart = sys.modules["cuda.bindings.runtime"]
    backend = pe_trt.TensorRTFeatures(engine, _io())
    assert backend.max_batch == 4
    batch = np.stack([np.full((3, 8, 8), float(i), dtype=np.float32) for i in range(7)])
    out = backend.run(batch)["features"]
    single = backend.run(batch[:1])["features"]
    assert out.shape == (7, 2, 2, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0, 0, 0], np.arange(7, dtype=np.float32))
    assert single[0, 1, 1, 3] == 0.0
    runs = [run for context in fake._state.last_engine._contexts for run in context._runs]
    # 7 images with max batch 4: a batch of 4 and one of 3 on profile 1, then a single image on profile 0.
    assert sorted(runs) == [(0, 1), (1, 3), (1, 4)]
    assert len(cudart._allocations) == 2
    backend.close()
    assert cudart._allocations == {} and cudart._streams == set()
    with pytest.raises(RuntimeError, match="closed"):
        backend.run(batch)


def test_features_reject_wrong_input_shape(fake: types.ModuleType, tmp_path: Path) -> None:
    with pe_trt.TensorRTFeatures(_engine(fake, tmp_path), _io()) as backend:
        with pytest.raises(ValueError, match=r"\[B, 3, 8, 8\]"):
            backend.run(np.zeros((1, 3, 9, 9), dtype=np.float32))


def test_engine_file_is_read_and_a_missing_one_named(fake: types.ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "features.x.engine"
    path.write_bytes(_engine(fake, tmp_path))
    with pe_trt.TensorRTFeatures(path, _io()) as backend:
        assert backend.source == str(path) and backend.name == "tensorrt"
    with pytest.raises(pe_trt.EngineLoadError, match=r"gone\.engine: cannot read the engine"):
        pe_trt.TensorRTFeatures(tmp_path / "gone.engine", _io())


def test_status_reports_the_gpu_through_the_doubles(fake: types.ModuleType) -> None:
    ok, reason = pe_trt.tensorrt_status()
    assert ok and "TensorRT 10.3.0.30" in reason and "Fake Orin" in reason and "compute 8.7" in reason


# ----------------------------------------------------------------------------------------------- without doubles


def test_status_without_tensorrt_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    ok, reason = pe_trt.tensorrt_status()
    assert not ok and "python3-libnvinfer" in reason and "ONNX Runtime" in reason
    assert pe_trt.tensorrt_version() is None


def test_engine_file_name_carries_device_version_precision() -> None:
    assert pe_trt.engine_file_name("jetson-orin-nx", "8.5.2.2", "fp16") == "features.jetson-orin-nx.trt8.5.2.2.fp16.engine"
    assert pe_trt.engine_file_name("jetson-agx-orin", "10.3.0", "int8", dla_core=1, tag="20250101T000000Z") == \
        "features.jetson-agx-orin.trt10.3.0.int8-dla1.20250101T000000Z.engine"
    with pytest.raises(ValueError, match="lower-case"):
        pe_trt.engine_file_name("Jetson Nano", "8.5", "fp16")
    with pytest.raises(ValueError, match="choose one of"):
        pe_trt.engine_file_name("jetson-nano", "8.5", "bf16")


class _Device:
    def __init__(self, slug: str = "jetson-orin-nx", cc: Any = (8, 7), trt: Optional[str] = "8.5.2.2",
                 dla: int = 1) -> None:
        self.slug, self.compute_capability, self.tensorrt_version, self.dla_cores = slug, cc, trt, dla


ENTRY = {"file": "features.jetson-orin-nx.trt8.5.2.2.fp16.engine", "device": "jetson-orin-nx",
         "compute_capability": "8.7", "tensorrt_version": "8.5.2.2", "precision": "fp16", "max_batch": 4}


@pytest.mark.parametrize("device, ok, words", [
    (_Device(), True, "matches jetson-orin-nx"),
    (_Device(trt=None), False, "TensorRT is not available"),
    (_Device(slug="jetson-agx-orin"), False, "built for jetson-orin-nx, this device is jetson-agx-orin"),
    (_Device(cc=(7, 2)), False, "compute capability 8.7, this GPU has 7.2"),
    (_Device(trt="8.6.2.3"), False, "built with TensorRT 8.5.2.2, this device has 8.6.2.3; rebuild"),
])
def test_engine_entry_matching_reasons(device: _Device, ok: bool, words: str) -> None:
    matched, reason = pe_trt.engine_entry_matches(ENTRY, device)
    assert matched is ok and words in reason and ENTRY["file"] in reason


def test_select_engine_prefers_gpu_and_checks_dla_cores() -> None:
    dla_entry = dict(ENTRY, file="dla.engine", dla_core=1)
    entry, reasons = pe_trt.select_engine([dla_entry, ENTRY], _Device(dla=1))
    assert entry is ENTRY and len(reasons) == 1
    entry, reasons = pe_trt.select_engine([dla_entry], _Device(dla=1))
    assert entry is None and "DLA core 1, this device has 1 DLA core(s)" in reasons[0]
    assert pe_trt.select_engine([], _Device()) == (None, ["the bundle has no TensorRT engine"])


# ----------------------------------------------------------------------------------------------- engine build CLI


def test_engine_build_registers_verified_engine_and_runtime_picks_it(fake: types.ModuleType, tiny_bundle: Path,
                                                                     tmp_path: Path) -> None:
    """The whole `engine build` flow on a real bundle, TensorRT played by the double.

    The double's "engine" computes features with ONNX Runtime (see `_describe_real_onnx`), so this follows
    build -> verification against ONNX Runtime -> registration -> auto backend selection -> scoring; it says
    nothing about real TensorRT numerics.
    """
    import shutil

    from click.testing import CliRunner

    from patchcore_edge.bundle import read_manifest
    from patchcore_edge.cli.devices import engine_group
    from patchcore_edge.runtime.detector import Detector

    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    runner = CliRunner()
    first = runner.invoke(engine_group, ["build", str(bundle), "--max-batch", "2"])
    assert first.exit_code == 0, first.output
    name = "features.cuda-workstation.trt10.3.0.30.fp16.engine"
    assert f"registered {name}" in first.output and "within the 0.02 tolerance for fp16" in first.output
    manifest = read_manifest(bundle)  # verifies the sha256 of every file, the new ones included
    (entry,) = manifest["engines"]
    assert entry["file"] == name and entry["compute_capability"] == "8.7" and entry["max_batch"] == 2
    assert entry["timing_cache"] in manifest["files"]
    check = entry["verification"]
    assert check["image_source"] == "synthetic" and check["scores"]["max_rel_change"] < 1e-5
    assert check["reference"] == "onnxruntime CPUExecutionProvider" and check["images"] == 8
    assert "note: the bundle has no calibration yet" in first.output
    # A single-output PatchCore bundle: one output recorded, built, checked and returned.
    assert manifest["features"]["output_shapes"] == {"features": [*manifest["features"]["grid"],
                                                                  manifest["features"]["dim"]]}
    assert list(check["outputs"]) == ["features"] and check["features"]["output"] == "features"
    assert "on all" not in first.output

    image = np.random.default_rng(3).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    with_engine = Detector.load(bundle, backend="auto")
    reference = Detector.load(bundle, backend="onnxruntime")
    assert with_engine.backend_name == "tensorrt"
    assert with_engine.predict(image, maps=False).score == pytest.approx(reference.predict(image, maps=False).score,
                                                                         rel=1e-5)
    assert (with_engine.backend.engine_file, with_engine.backend.precision) == (name, "fp16")
    assert list(with_engine.backend.run(np.zeros((1, 3, 64, 64), np.float32))) == ["features"]
    with_engine.backend.close()

    second = runner.invoke(engine_group, ["build", str(bundle), "--max-batch", "2"])
    assert second.exit_code == 0 and f"(replaces {name}, {entry['timing_cache']})" in second.output
    manifest = read_manifest(bundle)
    (entry2,) = manifest["engines"]
    assert entry2["file"] != name and not (bundle / name).exists()
    assert fake._state.builds[-1]["config"].get_timing_cache()._data.startswith(b"|tuned")

    before = (bundle / "manifest.json").read_bytes()
    fake._state.feature_scale = 1.3  # features 30% off: refused by the feature check inside the build
    refused = runner.invoke(engine_group, ["build", str(bundle)])
    assert refused.exit_code == 2 and "differ from ONNX Runtime by 0.3" in refused.output
    assert "not registered" in refused.output
    fake._state.feature_scale = 1.01  # features within fp16's 2%, scores then beyond a stated 1e-4
    refused = runner.invoke(engine_group, ["build", str(bundle), "--tolerance", "0.0001"])
    assert refused.exit_code == 1 and "engine not registered" in refused.output and "BEYOND" in refused.output
    assert (bundle / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in bundle.iterdir()) == sorted(list(manifest["files"]) + ["manifest.json"])


def test_dla_engine_is_loaded_on_its_recorded_core(fake: types.ModuleType, tmp_path: Path) -> None:
    fake._state.dla_cores = 2
    path = tmp_path / "features.dla.engine"
    path.write_bytes(pe_trt.build_engine(model_file(tmp_path), precision="fp16", dla_core=1).engine)
    manifest = dict(_manifest(), engines=[{"file": path.name, "dla_core": 1}])
    with pe_trt.TensorRTFeatures(path, _io(), dla_core=pe_trt.dla_core_of(manifest["engines"], path.name)) as backend:
        assert backend._runtime.DLA_core == 1
    with pe_trt.TensorRTFeatures(path, _io(), dla_core=pe_trt.dla_core_of([], path.name)) as backend:
        assert not hasattr(backend._runtime, "DLA_core")


# ----------------------------------------------------------------------------------------------- callbacks


def _images_failing_at(index: int, error: BaseException) -> Any:
    for i in range(5):
        if i == index:
            raise error
        yield np.full((3, 8, 8), float(i), dtype=np.float32)


def test_calibration_image_error_is_held_and_raised_after_the_build(fake: types.ModuleType, tmp_path: Path) -> None:
    with pytest.raises(pe_trt.EngineBuildError, match=r"INT8 calibration failed: ValueError: image 2 unreadable"):
        pe_trt.build_engine(model_file(tmp_path), precision="int8",
                            calibration_batches=_images_failing_at(2, ValueError("image 2 unreadable")))
    assert fake._state.escaped == []  # nothing raised into TensorRT: the process would have died
    record = fake._state.builds[-1]  # TensorRT's build ran to its end ...
    assert [value for _, value in record["calibration"]] == [0.0, 1.0]  # ... fed the images before the error


def test_calibration_image_of_the_wrong_shape_is_held_not_raised_into_tensorrt(fake: types.ModuleType,
                                                                                tmp_path: Path) -> None:
    with pytest.raises(pe_trt.EngineBuildError, match=r"INT8 calibration failed: ValueError: cannot reshape"):
        pe_trt.build_engine(model_file(tmp_path), precision="int8",
                            calibration_batches=[np.zeros((3, 9, 9), np.float32)])
    assert fake._state.escaped == [] and len(fake._state.builds) == 1


def test_ctrl_c_during_calibration_stays_ctrl_c(fake: types.ModuleType, tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        pe_trt.build_engine(model_file(tmp_path), precision="int8",
                            calibration_batches=_images_failing_at(1, KeyboardInterrupt()))
    assert fake._state.escaped == [] and len(fake._state.builds) == 1


def test_logger_error_is_held_and_raised_after_the_build(fake: types.ModuleType, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: TensorRTLog, is_error: bool, message: str) -> None:
        raise MemoryError("no room for the log line")

    monkeypatch.setattr(TensorRTLog, "record", broken)
    with pytest.raises(pe_trt.EngineBuildError,
                       match=r"while TensorRT built the engine: MemoryError: no room for the log line"):
        pe_trt.build_engine(model_file(tmp_path), precision="fp16")
    assert fake._state.escaped == [] and len(fake._state.builds) == 1


def test_logger_error_while_loading_is_raised_as_a_load_error(fake: types.ModuleType, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(fake, tmp_path)
    fake._state.device = "gpu-B"  # the runtime logs an error while refusing the plan

    def broken(self: TensorRTLog, is_error: bool, message: str) -> None:
        raise RuntimeError("log sink gone")

    monkeypatch.setattr(TensorRTLog, "record", broken)
    with pytest.raises(pe_trt.EngineLoadError, match=r"engine bytes>: while TensorRT loaded the engine: RuntimeError: log sink gone"):
        pe_trt.TensorRTFeatures(engine, _io())
    assert fake._state.escaped == []


def test_engine_build_with_a_broken_calibration_folder_is_one_line(fake: types.ModuleType, tiny_bundle: Path,
                                                                   tmp_path: Path) -> None:
    import shutil

    from click.testing import CliRunner

    from patchcore_edge.cli.devices import engine_group

    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    before = (bundle / "manifest.json").read_bytes()
    result = CliRunner().invoke(engine_group, ["build", str(bundle), "--precision", "int8",
                                               "--calibration-images", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("error: ") and "missing" in result.output
    assert fake._state.escaped == [] and (bundle / "manifest.json").read_bytes() == before


# ----------------------------------------------------------------------------------------------- export's check


def test_export_checks_its_engine_on_the_nominal_images(fake: types.ModuleType, tmp_path: Path) -> None:
    """Export's engine step, TensorRT played by the double: the check runs on the exported nominal images."""
    pytest.importorskip("torch")
    from conftest import make_nominal_folder

    from patchcore_edge.bundle import read_manifest
    from patchcore_edge.export.pipeline import ExportOptions, export_bundle

    nominal = make_nominal_folder(tmp_path / "nominal", count=6, size=80)
    summary = export_bundle(ExportOptions(nominal_dir=nominal, output=tmp_path / "bundle", resize=72, crop=64,
                                          coreset_ratio=0.25))
    assert summary.engine_note.startswith("TensorRT engine: features.cuda-workstation.trt10.3.0.30.fp16")
    (entry,) = read_manifest(summary.bundle)["engines"]
    check = entry["verification"]
    assert check["image_source"] == "nominal (export)" and check["images"] == 6
    assert check["features"]["max_rel"] < 1e-5 and check["feature_tolerance"] == 2e-2
    # The images checked are the exported ones: the double's engine saw exactly their pixels.
    seen = [run for context in fake._state.last_engine._contexts for run in context._runs]
    assert sum(size for _, size in seen) == 6

    fake._state.feature_scale = 1.3  # a bad engine is left out, the export still succeeds on ONNX Runtime
    refused = export_bundle(ExportOptions(nominal_dir=nominal, output=tmp_path / "bundle2", resize=72, crop=64,
                                          coreset_ratio=0.25))
    assert "not built" in refused.engine_note and "differ from ONNX Runtime by 0.3" in refused.engine_note
    assert read_manifest(refused.bundle)["engines"] == []


# ----------------------------------------------------------------------------------------------- several outputs
# SPADE's network has the patch grid "features" and the pooled "global" feature; multi-scale methods one grid per
# scale. Every output the manifest declares is built, buffered, run, returned by name and verified.


def test_build_refuses_a_model_whose_outputs_are_not_the_bundles(fake: types.ModuleType, tmp_path: Path) -> None:
    with pytest.raises(pe_trt.EngineBuildError,
                       match=r"features\.onnx: the model has outputs \['features'\], the bundle declares "
                             r"\['features', 'global'\]; re-export"):
        pe_trt.build_engine(model_file(tmp_path), output_names=["features", "global"])
    assert fake._state.builds == []  # refused before the (long) build
    # The order does not matter; the optimisation profiles cover the input only, the outputs follow from it.
    result = pe_trt.build_engine(model_file(tmp_path, extra_outputs=[("global", [6])]), max_batch=4,
                                 output_names=["global", "features"])
    assert [list(p._shapes_set) for p in fake._state.builds[-1]["config"]._profiles_set] == [["image"], ["image"]]
    assert [tensor[:2] for tensor in json.loads(result.engine)["io"]] == [["image", "INPUT"], ["features", "OUTPUT"],
                                                                          ["global", "OUTPUT"]]


def test_each_output_gets_its_own_buffer_and_comes_back_by_name(fake: types.ModuleType, tmp_path: Path) -> None:
    engine = _engine(fake, tmp_path, max_batch=4, extra_outputs=[("global", [6]), ("coarse", [1, 1, 4])])
    cudart = sys.modules["cuda.bindings.runtime"]
    # The manifest lists the outputs in another order than the engine: the result follows the manifest.
    backend = pe_trt.TensorRTFeatures(engine, _io(extra_outputs=[("coarse", (1, 1, 4)), ("global", (6,))]))
    sizes = sorted(block.nbytes for block in cudart._allocations.values())
    assert sizes == sorted(4 * 4 * n for n in (3 * 8 * 8, 2 * 2 * 4, 1 * 1 * 4, 6))  # max batch 4, float32
    batch = np.stack([np.full((3, 8, 8), float(i), dtype=np.float32) for i in range(7)])
    out = backend.run(batch)
    assert list(out) == ["features", "coarse", "global"]
    assert [out[name].shape for name in out] == [(7, 2, 2, 4), (7, 1, 1, 4), (7, 6)]
    # The double's engine writes image mean + the output's position in the engine into each output.
    for name, position in (("features", 0), ("global", 1), ("coarse", 2)):
        flat = out[name].reshape(7, -1)
        np.testing.assert_array_equal(flat, np.broadcast_to(np.arange(7.0)[:, None] + position, flat.shape))
    runs = [run for context in fake._state.last_engine._contexts for run in context._runs]
    assert sorted(runs) == [(1, 3), (1, 4)]
    fake._state.context_shapes = {"global": [1, 7]}  # TensorRT deriving another shape than the buffers hold
    with pytest.raises(RuntimeError, match=r"output 'global' the shape \[1, 7\] for a batch of 1, expected \[1, 6\]"):
        backend.run(batch[:1])
    backend.close()
    assert cudart._allocations == {} and cudart._streams == set()


def test_engine_outputs_must_match_the_manifests(fake: types.ModuleType, tmp_path: Path) -> None:
    two = _engine(fake, tmp_path, extra_outputs=[("global", [6])])
    with pytest.raises(pe_trt.EngineLoadError, match=r"<engine bytes>: the engine has output\(s\) 'global' the "
                                                     r"manifest does not declare.*does not belong to this bundle"):
        pe_trt.TensorRTFeatures(two, _io())
    one = _engine(fake, tmp_path)
    with pytest.raises(pe_trt.EngineLoadError, match=r"the manifest declares output\(s\) 'global' the engine lacks"):
        pe_trt.TensorRTFeatures(one, _io(extra_outputs=[("global", (6,))]))
    with pytest.raises(pe_trt.EngineLoadError,
                       match=r"output 'global' has shape \[-1, 6\], the manifest says \[batch, 5\].*engine build"):
        pe_trt.TensorRTFeatures(two, _io(extra_outputs=[("global", (5,))]))
    # An output whose shape the manifest does not record (an older bundle) takes the engine's ...
    with pe_trt.TensorRTFeatures(two, _io(extra_outputs=[("global", None)])) as backend:
        assert backend.run(np.zeros((2, 3, 8, 8), np.float32))["global"].shape == (2, 6)
    # ... which must then be fixed beyond the batch, as the buffers are allocated once.
    dynamic = _engine(fake, tmp_path, extra_outputs=[("global", [-1])])
    with pytest.raises(pe_trt.EngineLoadError, match=r"output 'global' has shape \[-1, -1\]: only its batch"):
        pe_trt.TensorRTFeatures(dynamic, _io(extra_outputs=[("global", None)]))


def test_int8_calibration_of_a_two_output_network(fake: types.ModuleType, tmp_path: Path) -> None:
    images = [np.full((3, 8, 8), float(i), dtype=np.float32) for i in range(3)]
    result = pe_trt.build_engine(model_file(tmp_path, extra_outputs=[("global", [6])]), precision="int8",
                                 max_batch=2, calibration_batches=iter(images), output_names=["features", "global"])
    assert [value for _, value in fake._state.builds[-1]["calibration"]] == [0.0, 1.0, 2.0]
    assert result.int8_cache == b"calib:3"
    with pe_trt.TensorRTFeatures(result.engine, _io(extra_outputs=[("global", (6,))]), precision="int8") as backend:
        assert backend.precision == "int8" and backend.engine_file is None
        out = backend.run(np.stack(images))
    np.testing.assert_array_equal(out["global"], np.repeat(np.arange(3, dtype=np.float32)[:, None] + 1, 6, axis=1))
    np.testing.assert_array_equal(out["features"][:, 1, 1, 3], np.arange(3, dtype=np.float32))


def test_calibrator_feeds_only_the_network_input(fake: types.ModuleType) -> None:
    from patchcore_edge.trt.calibrator import Calibration, make_calibrator

    state = Calibration([np.full((3, 8, 8), 5.0, np.float32)], "image", (1, 3, 8, 8), None)
    calibrator = make_calibrator(state)
    assert calibrator.get_batch(["features"]) is None  # held, never raised into TensorRT
    with pytest.raises(pe_trt.EngineBuildError,
                       match=r"asked the calibrator for tensors \['features'\], the network's only input is 'image'"):
        state.held.reraise(pe_trt.EngineBuildError, "INT8 calibration failed")
    assert state.images_used == 0
    (pointer,) = calibrator.get_batch(["image"])
    assert ctypes.c_float.from_address(pointer).value == 5.0 and state.images_used == 1
    state.release()


def test_two_output_network_build_load_run_verify(fake: types.ModuleType, tmp_path: Path) -> None:
    path = two_output_onnx(tmp_path / "features.onnx")
    io = pe_trt.onnx_io(path)
    assert io.output_names == ("features", "global") and [o.tail for o in io.outputs] == [(2, 2, 3), (3,)]
    result = pe_trt.build_engine(path, precision="fp16", max_batch=4, output_names=io.output_names)
    images = list(np.random.default_rng(5).standard_normal((6, 3, 8, 8)).astype(np.float32))

    def score(outputs: Any) -> np.ndarray:  # a score that depends on both outputs
        return outputs["features"].max(axis=(1, 2, 3)) + np.abs(outputs["global"]).max(axis=1) / 100

    with pe_trt.TensorRTFeatures(result.engine, io, precision="fp16") as backend:
        out = backend.run(np.stack(images))  # 4 + 2 images: both profiles
        np.testing.assert_allclose(out["global"], np.stack(images).mean(axis=(2, 3)) * 100, rtol=1e-5, atol=1e-5)
        record = pe_trt.verify_engine(backend, path, io, images, "synthetic", "fp16", score=score)
    assert sorted(record["outputs"]) == ["features", "global"] and record["features"]["max_rel"] < 1e-6
    assert record["scores"]["max_rel_change"] < 1e-6 and record["images"] == 6

    fake._state.output_scale = {"global": 1.3}  # only the second output is off
    with pe_trt.TensorRTFeatures(result.engine, io) as backend:
        measured = pe_trt.measure_against_onnxruntime(backend, path, io, images, "synthetic")
        with pytest.raises(pe_trt.EngineBuildError,
                           match=r"differ from ONNX Runtime by 0\.3 \(relative, output 'global'\).*not registered"):
            pe_trt.verify_engine(backend, path, io, images, "synthetic", "fp16", score=score)
    assert measured["outputs"]["features"]["max_rel"] < 1e-6
    assert measured["outputs"]["global"]["max_rel"] == pytest.approx(0.3, rel=1e-3)
    assert measured["features"]["output"] == "global"
    with pytest.raises(pe_trt.EngineBuildError, match="the engine gives no output 'global'"):
        pe_trt.output_errors(pe_trt.TensorRTFeatures(result.engine, io).run(np.stack(images[:1])),
                             {"features": out["features"][:1]})


def test_two_output_bundle_through_engine_build_and_the_runtime(fake: types.ModuleType, tiny_bundle: Path,
                                                                tmp_path: Path) -> None:
    """`engine build` and the runtime on a bundle whose network has two outputs, TensorRT played by the double
    (its engine computes every output with ONNX Runtime: this follows the data, not real TensorRT numerics)."""
    import cv2
    from click.testing import CliRunner

    from patchcore_edge.bundle import BundleError, manifest_bytes, read_manifest
    from patchcore_edge.cli import main as cli
    from patchcore_edge.cli.devices import engine_group
    from patchcore_edge.preprocess import preprocess
    from patchcore_edge.runtime.detector import Detector

    bundle = with_global_output(tiny_bundle, tmp_path / "bundle")
    runner = CliRunner()
    built = runner.invoke(engine_group, ["build", str(bundle), "--max-batch", "2"])
    assert built.exit_code == 0, built.output
    assert "on all 2 outputs" in built.output
    (entry,) = read_manifest(bundle)["engines"]
    check = entry["verification"]
    assert sorted(check["outputs"]) == ["features", "global"]
    assert all(errors["max_rel"] < 1e-5 for errors in check["outputs"].values())
    engine_io = json.loads((bundle / entry["file"]).read_bytes())["io"]
    assert [name for name, mode, _ in engine_io if mode == "OUTPUT"] == ["features", "global"]

    image = np.random.default_rng(3).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    with Detector.load(bundle, backend="auto") as with_engine, \
            Detector.load(bundle, backend="onnxruntime") as reference:
        backend = with_engine.backend
        assert isinstance(backend, pe_trt.TensorRTFeatures)
        assert (backend.engine_file, backend.precision) == (entry["file"], "fp16")
        batch = preprocess(image, with_engine.spec)[None]
        got, want = backend.run(batch), reference.backend.run(batch)
        assert list(got) == list(want) == ["features", "global"]
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
        assert with_engine.predict(image, maps=False).score == pytest.approx(
            reference.predict(image, maps=False).score, rel=1e-5)
        assert with_engine.scored_with["engine_file"] == entry["file"]

    before = (bundle / "manifest.json").read_bytes()
    fake._state.output_scale = {"global": 1.3}  # the grid is right, the pooled output is not: refused, named
    refused = runner.invoke(engine_group, ["build", str(bundle)])
    assert refused.exit_code == 2 and "(relative, output 'global')" in refused.output
    assert "not registered" in refused.output and (bundle / "manifest.json").read_bytes() == before
    fake._state.output_scale = {}

    # A manifest whose shape of "global" disagrees with the engine: a BundleError naming the engine and output.
    manifest = json.loads(before)
    dim = manifest["features"]["dim"]
    manifest["features"]["output_shapes"]["global"] = [dim + 1]
    (bundle / "manifest.json").write_bytes(manifest_bytes(manifest))
    wrong = (rf"{re.escape(entry['file'])}: output 'global' has shape \[-1, {dim}\], the manifest says "
             rf"\[batch, {dim + 1}\]")
    with pytest.raises(BundleError, match=wrong):
        Detector.load(bundle, backend="tensorrt")
    cv2.imwrite(str(tmp_path / "part.png"), image)
    ran = runner.invoke(cli, ["run", str(bundle), str(tmp_path / "part.png"), "--backend", "tensorrt"])
    assert ran.exit_code == 2 and "Traceback" not in ran.output and re.search(wrong, ran.output)


def test_devices_fit_counts_every_output(tiny_bundle: Path, tmp_path: Path) -> None:
    from patchcore_edge.bundle import Bundle
    from patchcore_edge.devices import memory
    from patchcore_edge.devices.profiles import get_profile

    pytest.importorskip("onnx")
    one = Bundle.load(tiny_bundle)
    two = Bundle.load(with_global_output(tiny_bundle, tmp_path / "two"))
    profile, batch, dim = get_profile("jetson-orin-nx"), 2, one.features.dim
    for backend, host_copies in (("tensorrt", 1), ("onnxruntime", 0)):
        single = memory.estimate_memory(one, profile, variant="8GB", batch=batch, backend=backend)
        double = memory.estimate_memory(two, profile, variant="8GB", batch=batch, backend=backend)
        extra = double["components"]["activations"] - single["components"]["activations"]
        # The liveness peak keeps every output alive to the end (here the peak lies earlier, in the backbone, so
        # it need not grow); TensorRT adds a host copy of each output.
        assert extra >= host_copies * batch * dim * 4
    unrecorded = Bundle.load(with_global_output(tiny_bundle, tmp_path / "old", record_shapes=False))
    notes = memory.estimate_memory(unrecorded, profile, variant="8GB", backend="tensorrt")["assumptions"]
    assert any("output(s) global have no recorded shape" in note for note in notes)


# ----------------------------------------------------------------------------------------------- layering


def test_trt_package_imports_nothing_above_it() -> None:
    """trt/ sits below devices/, runtime/ and export/: it imports only itself (and no board detection)."""
    package = REPO / "src" / "patchcore_edge" / "trt"
    outside = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                if node.level > 1 or (node.module or "").split(".")[0] not in {p.stem for p in package.glob("*.py")}:
                    outside.append(f"{path.name}: from {'.' * node.level}{node.module or ''}")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                outside += [f"{path.name}: import {n}" for n in names if n.startswith("patchcore_edge")]
    assert outside == []
    assert len(list(package.glob("*.py"))) >= 9
