"""Load a serialised engine and run it: float32 [B, 3, H, W] -> {output name: float32 [B, ...]} for every output.

Name-based I/O (`num_io_tensors`, `get_tensor_name`, `get_tensor_mode`, `set_input_shape`, `set_tensor_address`,
`execute_async_v3`), present from TensorRT 8.5; the binding-index API removed in 10 is not used. A network may
have several named outputs (SPADE: the patch grid and a pooled feature; multi-scale methods: one grid per
scale): each gets its own device buffer, sized from the engine's shape for the largest batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np

from .build import dims
from .callbacks import TensorRTLog, make_logger
from .cuda import DeviceBuffer, Stream
from .errors import REBUILD_HINT, CudaError, EngineLoadError
from .status import ensure_tensorrt

if TYPE_CHECKING:  # pragma: no cover - the stubs give the type checker TensorRT's names
    import tensorrt as trt


@dataclass(frozen=True)
class OutputTensor:
    """One output an engine must have: its name and, where the manifest records it, its shape after the batch."""

    name: str
    tail: Optional[Tuple[int, ...]] = None


@dataclass(frozen=True)
class TensorIO:
    """What an engine must look like to serve a bundle: its input (float32 [B, 3, height, width]) and its outputs,
    in the manifest's order. An output without a recorded shape takes the engine's (fixed beyond the batch)."""

    input_name: str
    width: int
    height: int
    outputs: Tuple[OutputTensor, ...]

    @property
    def input_tail(self) -> Tuple[int, int, int]:
        return (3, self.height, self.width)

    @property
    def output_names(self) -> Tuple[str, ...]:
        return tuple(output.name for output in self.outputs)


def _listed(names: "List[str] | Tuple[str, ...]") -> str:
    return ", ".join(repr(name) for name in names) or "none"


class TensorRTFeatures:
    """The TensorRT feature backend: runs a serialised engine, returns every output the bundle declares, by name.

    Device buffers (the input and one per output) for the largest batch are allocated once; each call copies the
    batch in, runs `execute_async_v3` on the backend's own stream and copies each output out.
    """

    name = "tensorrt"

    def __init__(self, engine: "Path | str | bytes", io: TensorIO, dla_core: Optional[int] = None,
                 precision: str = "unknown", source: Optional[str] = None) -> None:
        """`engine`: the engine file (or its bytes); `io`: the tensors it must have for the bundle;
        `dla_core`: the DLA core a DLA engine runs on (recorded in its manifest entry); `precision`: the one it
        was built with (recorded there too; what calibration ties its thresholds to); `source`: what messages
        call engine bytes."""
        self.tensorrt_version = ensure_tensorrt()
        import tensorrt as trt

        self._closed = True
        self.precision = precision
        if isinstance(engine, bytes):
            data, self.source = engine, source or "<engine bytes>"
            self.engine_file: Optional[str] = None
        else:
            self.source, self.engine_file = str(engine), Path(engine).name
            try:
                data = Path(engine).read_bytes()
            except OSError as error:
                raise EngineLoadError(f"{engine}: cannot read the engine ({error.strerror or error}); "
                                      f"{REBUILD_HINT}") from None
        self._io = io
        self._log = TensorRTLog()
        self._logger = make_logger(self._log)
        self._runtime = trt.Runtime(self._logger)
        if dla_core is not None:
            # A DLA engine runs on the core the runtime names at deserialisation time.
            self._runtime.DLA_core = int(dla_core)
        loaded: Optional["trt.ICudaEngine"] = self._runtime.deserialize_cuda_engine(data)
        self._log.reraise(EngineLoadError, f"{self.source}: while TensorRT loaded the engine")
        if loaded is None:
            detail = self._log.last_errors(2)
            raise EngineLoadError(
                f"{self.source}: engine built for another GPU or TensorRT version (this is TensorRT "
                f"{self.tensorrt_version}): {REBUILD_HINT}" + (f" [{detail}]" if detail else ""))
        self._engine = loaded
        self._tails = self._check_io()
        self._profiles = self._profile_batches()
        self.max_batch: Optional[int] = max(high for _, high in self._profiles)
        self._contexts: Dict[int, "trt.IExecutionContext"] = {}
        self._stream = Stream()
        self._buffers: List[DeviceBuffer] = []
        self._closed = False
        try:
            for tail in (io.input_tail, *self._tails.values()):
                self._buffers.append(DeviceBuffer(self.max_batch * int(np.prod(tail)) * 4))
        except CudaError:
            self.close()
            raise
        self._d_input = self._buffers[0]
        self._d_outputs = dict(zip(self._tails, self._buffers[1:]))

    def _refuse(self, problem: str) -> EngineLoadError:
        return EngineLoadError(f"{self.source}: {problem}: the engine does not belong to this bundle; {REBUILD_HINT}")

    def _check_io(self) -> Dict[str, Tuple[int, ...]]:
        """The engine's tensors against the manifest's; returns each output's shape after the batch, in order."""
        import tensorrt as trt

        engine, io = self._engine, self._io
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = {name: engine.get_tensor_mode(name) for name in names}
        inputs = [name for name in names if modes[name] == trt.TensorIOMode.INPUT]
        outputs = [name for name in names if modes[name] == trt.TensorIOMode.OUTPUT]
        missing = [name for name in io.output_names if name not in outputs]
        extra = [name for name in outputs if name not in io.output_names]
        if inputs != [io.input_name] or missing or extra:
            found = ", ".join(f"{n} ({getattr(m, 'name', m)})" for n, m in modes.items())
            what = [f"the manifest declares output(s) {_listed(missing)} the engine lacks"] if missing else []
            what += [f"the engine has output(s) {_listed(extra)} the manifest does not declare"] if extra else []
            if inputs != [io.input_name]:
                what.append(f"the manifest's input is {io.input_name!r}, the engine's {_listed(inputs)}")
            raise self._refuse(f"{'; '.join(what)} (engine tensors: {found}; manifest: input {io.input_name!r}, "
                               f"outputs {_listed(io.output_names)})")
        shape = dims(engine.get_tensor_shape(io.input_name))
        if shape[1:] != io.input_tail:
            raise self._refuse(f"input {io.input_name!r} has shape {list(shape)}, the manifest says "
                               f"[batch, {', '.join(str(t) for t in io.input_tail)}]")
        tails: Dict[str, Tuple[int, ...]] = {}
        for output in io.outputs:
            shape = dims(engine.get_tensor_shape(output.name))
            if output.tail is not None and shape[1:] != output.tail:
                raise self._refuse(f"output {output.name!r} has shape {list(shape)}, the manifest says "
                                   f"[batch, {', '.join(str(t) for t in output.tail)}]")
            if len(shape) < 1 or any(d <= 0 for d in shape[1:]):
                raise EngineLoadError(f"{self.source}: output {output.name!r} has shape {list(shape)}: only its "
                                      f"batch dimension may vary; {REBUILD_HINT}")
            tails[output.name] = shape[1:]
        for name in (io.input_name, *io.output_names):
            if engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise EngineLoadError(f"{self.source}: tensor {name!r} is not float32; {REBUILD_HINT}")
        return tails

    def _profile_batches(self) -> List[Tuple[int, int]]:
        engine = self._engine
        batches = []
        for index in range(int(engine.num_optimization_profiles)):
            low, _, high = engine.get_tensor_profile_shape(self._io.input_name, index)
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
            self._log.reraise(EngineLoadError, f"{self.source}: while TensorRT created an execution context")
            if created is None:
                raise EngineLoadError(f"{self.source}: TensorRT could not create an execution context (out of "
                                      "GPU memory?)")
            if profile != 0 and not created.set_optimization_profile_async(profile, self._stream.handle):
                raise EngineLoadError(f"{self.source}: cannot select optimisation profile {profile}")
            self._contexts[profile] = context = created
        return context

    def run(self, batch: np.ndarray) -> Dict[str, np.ndarray]:
        """float32 [B, 3, H, W] -> {output name: float32 [B, ...]}, every output in the manifest's order; batches
        above the engine's largest are run in chunks."""
        if self._closed:
            raise RuntimeError(f"{self.source}: backend is closed")
        tail = self._io.input_tail
        if batch.ndim != 4 or tuple(batch.shape[1:]) != tail:
            raise ValueError(f"expected a batch of shape [B, {', '.join(map(str, tail))}], "
                             f"got {list(batch.shape)}")
        step = int(self.max_batch or 1)
        chunks = [self._run(batch[start:start + step]) for start in range(0, batch.shape[0], step)]
        if len(chunks) == 1:
            return chunks[0]
        return {name: np.concatenate([chunk[name] for chunk in chunks], axis=0) for name in self._tails}

    def _run(self, chunk: np.ndarray) -> Dict[str, np.ndarray]:
        io = self._io
        size = int(chunk.shape[0])
        context = self._context(self._profile_for(size))
        if not context.set_input_shape(io.input_name, (size,) + io.input_tail):
            raise RuntimeError(f"{self.source}: TensorRT refused input shape {[size, *io.input_tail]}")
        context.set_tensor_address(io.input_name, self._d_input.ptr)
        host_out: Dict[str, np.ndarray] = {}
        for name, tail in self._tails.items():
            # The shapes TensorRT derives for this batch must be the ones the buffers were sized for.
            shape = dims(context.get_tensor_shape(name))
            if shape != (size,) + tail:
                raise RuntimeError(f"{self.source}: TensorRT gives output {name!r} the shape {list(shape)} for a "
                                   f"batch of {size}, expected {[size, *tail]}; {REBUILD_HINT}")
            context.set_tensor_address(name, self._d_outputs[name].ptr)
            host_out[name] = np.empty(shape, dtype=np.float32)
        host_in = np.ascontiguousarray(chunk, dtype=np.float32)
        self._d_input.upload(host_in, self._stream.raw)
        ran = context.execute_async_v3(self._stream.handle)
        self._log.reraise(RuntimeError, f"{self.source}: while TensorRT ran the engine")
        if not ran:
            raise RuntimeError(f"{self.source}: TensorRT inference failed: "
                               + (self._log.last_errors(2) or "no detail in the log"))
        for name, host in host_out.items():
            self._d_outputs[name].download(host, self._stream.raw)
        # host_in must stay alive until the copies queued on the stream are done.
        self._stream.synchronize()
        return host_out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._contexts.clear()
        for buffer in self._buffers:
            buffer.free()
        self._stream.destroy()

    def __enter__(self) -> "TensorRTFeatures":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
