"""CUDA device memory, streams and device properties through cuda-python.

`cuda.bindings.runtime` (cuda-python 12.6+) or `cuda.cudart` (older releases), imported on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, List, Tuple

import numpy as np

from .errors import CudaError, TensorRTUnavailable


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    compute_capability: Tuple[int, int]
    total_memory_bytes: int
    integrated: bool


def cudart() -> Any:
    """The CUDA runtime module of cuda-python; TensorRTUnavailable where cuda-python is missing."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise TensorRTUnavailable("cuda-python is not installed: `pip install cuda-python` (TensorRT's Python "
                              "API needs it here for device memory and streams)")


def cuda_call(result: Any, what: str) -> Any:
    """Unpack a cuda-python `(error, value...)` tuple, raising CudaError with CUDA's own message."""
    runtime = cudart()
    error = result[0]
    if error != runtime.cudaError_t.cudaSuccess:
        _, message = runtime.cudaGetErrorString(error)
        text = message.decode() if isinstance(message, bytes) else str(message)
        raise CudaError(f"{what} failed: {text} ({getattr(error, 'name', error)})")
    values = result[1:]
    if len(values) == 0:
        return None
    return values[0] if len(values) == 1 else values


def cuda_devices() -> Tuple[List[CudaDevice], str]:
    """The visible CUDA devices, and when there are none the reason in words."""
    try:
        runtime = cudart()
    except TensorRTUnavailable as error:
        return [], str(error)
    try:
        count = int(cuda_call(runtime.cudaGetDeviceCount(), "cudaGetDeviceCount"))
    except CudaError as error:
        return [], f"no usable CUDA device ({error})"
    devices: List[CudaDevice] = []
    for index in range(count):
        prop = cuda_call(runtime.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
        raw_name = prop.name
        name = raw_name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw_name, bytes) else str(raw_name)
        devices.append(CudaDevice(index, name, (int(prop.major), int(prop.minor)), int(prop.totalGlobalMem),
                                  bool(prop.integrated)))
    return devices, "" if devices else "the CUDA runtime reports 0 devices"


class DeviceBuffer:
    """One cudaMalloc allocation, freed by `free()`."""

    def __init__(self, nbytes: int) -> None:
        self._cudart = cudart()
        self.nbytes = int(nbytes)
        self.ptr = int(cuda_call(self._cudart.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes} bytes)"))

    def upload(self, host: np.ndarray, stream: Any = None) -> None:
        if host.nbytes > self.nbytes or not host.flags.c_contiguous:
            raise ValueError("host array larger than the device buffer or not C-contiguous")
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        if stream is None:
            cuda_call(self._cudart.cudaMemcpy(self.ptr, host.ctypes.data, host.nbytes, kind), "cudaMemcpy H2D")
        else:
            cuda_call(self._cudart.cudaMemcpyAsync(self.ptr, host.ctypes.data, host.nbytes, kind, stream),
                      "cudaMemcpyAsync H2D")

    def download(self, host: np.ndarray, stream: Any) -> None:
        if host.nbytes > self.nbytes or not host.flags.c_contiguous:
            raise ValueError("host array larger than the device buffer or not C-contiguous")
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(self._cudart.cudaMemcpyAsync(host.ctypes.data, self.ptr, host.nbytes, kind, stream),
                  "cudaMemcpyAsync D2H")

    def free(self) -> None:
        if self.ptr:
            cuda_call(self._cudart.cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class Stream:
    """One CUDA stream, destroyed by `destroy()`; `handle` is what TensorRT's `*_async` calls take."""

    def __init__(self) -> None:
        self._cudart = cudart()
        self._stream: Any = cuda_call(self._cudart.cudaStreamCreate(), "cudaStreamCreate")

    @property
    def raw(self) -> Any:
        """The cuda-python stream object (for cudaMemcpyAsync)."""
        return self._stream

    @property
    def handle(self) -> int:
        return int(self._stream)

    def synchronize(self) -> None:
        cuda_call(self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def destroy(self) -> None:
        if self._stream is not None:
            cuda_call(self._cudart.cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self._stream = None
