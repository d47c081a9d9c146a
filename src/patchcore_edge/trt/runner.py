"""Load a serialised engine and run it: float32 [B, 3, H, W] -> float32 [B, h, w, D].

Name-based I/O (`num_io_tensors`, `get_tensor_name`, `get_tensor_mode`, `set_input_shape`, `set_tensor_address`,
`execute_async_v3`), present from TensorRT 8.5; the binding-index API removed in 10 is not used.
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
class TensorIO:
    """What an engine must look like to serve a bundle: tensor names and shapes after the batch dimension."""

    input_name: str
    output_name: str
    width: int
    height: int
    grid: Tuple[int, int]
    dim: int

    @property
    def input_tail(self) -> Tuple[int, int, int]:
        return (3, self.height, self.width)

    @property
    def output_tail(self) -> Tuple[int, int, int]:
        return (self.grid[0], self.grid[1], self.dim)


class TensorRTFeatures:
    """FeatureBackend running a serialised engine.

    Device buffers for the largest batch are allocated once; each call copies the batch in, runs
    `execute_async_v3` on the backend's own stream and copies the features out (explicit H2D/D2H copies).
    """

    name = "tensorrt"

    def __init__(self, engine: "Path | str | bytes", io: TensorIO, dla_core: Optional[int] = None) -> None:
        """`engine`: the engine file (or its bytes); `io`: the tensors it must have for the bundle;
        `dla_core`: the DLA core a DLA engine runs on (recorded in its manifest entry)."""
        self.tensorrt_version = ensure_tensorrt()
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
        self._check_io()
        self._profiles = self._profile_batches()
        self.max_batch: Optional[int] = max(high for _, high in self._profiles)
        self._contexts: Dict[int, "trt.IExecutionContext"] = {}
        self._stream = Stream()
        self._buffers: List[DeviceBuffer] = []
        self._closed = False
        try:
            for tail in (io.input_tail, io.output_tail):
                self._buffers.append(DeviceBuffer(self.max_batch * int(np.prod(tail)) * 4))
        except CudaError:
            self.close()
            raise
        self._d_input, self._d_output = self._buffers

    def _check_io(self) -> None:
        import tensorrt as trt

        engine, io = self._engine, self._io
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = {name: engine.get_tensor_mode(name) for name in names}
        expected = {io.input_name: trt.TensorIOMode.INPUT, io.output_name: trt.TensorIOMode.OUTPUT}
        if modes != expected:
            found = ", ".join(f"{n} ({getattr(m, 'name', m)})" for n, m in modes.items())
            raise EngineLoadError(
                f"{self.source}: the engine has tensors {found}, but the manifest expects input "
                f"{io.input_name!r} and output {io.output_name!r}: it does not belong to this bundle; "
                f"{REBUILD_HINT}")
        for name, tail in ((io.input_name, io.input_tail), (io.output_name, io.output_tail)):
            shape = dims(engine.get_tensor_shape(name))
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

    def features(self, batch: np.ndarray) -> np.ndarray:
        if self._closed:
            raise RuntimeError(f"{self.source}: backend is closed")
        tail = self._io.input_tail
        if batch.ndim != 4 or tuple(batch.shape[1:]) != tail:
            raise ValueError(f"expected a batch of shape [B, {', '.join(map(str, tail))}], "
                             f"got {list(batch.shape)}")
        step = int(self.max_batch or 1)
        chunks = [self._run(batch[start:start + step]) for start in range(0, batch.shape[0], step)]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=0)

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        io = self._io
        size = int(chunk.shape[0])
        context = self._context(self._profile_for(size))
        if not context.set_input_shape(io.input_name, (size,) + io.input_tail):
            raise RuntimeError(f"{self.source}: TensorRT refused input shape {[size, *io.input_tail]}")
        context.set_tensor_address(io.input_name, self._d_input.ptr)
        context.set_tensor_address(io.output_name, self._d_output.ptr)
        host_in = np.ascontiguousarray(chunk, dtype=np.float32)
        host_out = np.empty((size,) + io.output_tail, dtype=np.float32)
        self._d_input.upload(host_in, self._stream.raw)
        ran = context.execute_async_v3(self._stream.handle)
        self._log.reraise(RuntimeError, f"{self.source}: while TensorRT ran the engine")
        if not ran:
            raise RuntimeError(f"{self.source}: TensorRT inference failed: "
                               + (self._log.last_errors(2) or "no detail in the log"))
        self._d_output.download(host_out, self._stream.raw)
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
