"""The INT8 entropy calibrator: feeds preprocessed nominal images to TensorRT one at a time.

Only the network's one input is fed; every output (a network may have several) is calibrated from it, as the
activation ranges TensorRT measures cover the whole graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from .callbacks import HeldErrors
from .cuda import DeviceBuffer

if TYPE_CHECKING:  # pragma: no cover - the stubs give the type checker TensorRT's names
    import tensorrt as trt


class Calibration:
    """State of one INT8 calibration: the images still to feed, the caches, the device buffer."""

    def __init__(self, images: Optional[Iterable[np.ndarray]], input_name: str, input_shape: Tuple[int, ...],
                 cache: Optional[bytes]) -> None:
        self.images: Iterator[np.ndarray] = iter(images if images is not None else ())
        self.input_name = input_name
        self.input_shape = input_shape
        self.cache_in = cache
        self.cache_out: Optional[bytes] = None
        self.images_used = 0
        self.buffer: Optional[DeviceBuffer] = None
        self.held = HeldErrors()

    def next_pointer(self) -> Optional[int]:
        """Device pointer of the next image, None once the images are exhausted."""
        try:
            image = next(self.images)
        except StopIteration:
            return None
        host = np.ascontiguousarray(np.asarray(image, dtype=np.float32).reshape(self.input_shape))
        if self.buffer is None:
            self.buffer = DeviceBuffer(host.nbytes)
        self.buffer.upload(host)
        self.images_used += 1
        return self.buffer.ptr

    def pointers(self, names: List[str]) -> Optional[List[int]]:
        """The device pointers TensorRT asks for (one per input name), None once the images are exhausted."""
        if list(names) != [self.input_name]:
            raise ValueError(f"TensorRT asked the calibrator for tensors {list(names)}, the network's only input "
                             f"is {self.input_name!r}")
        pointer = self.next_pointer()
        return None if pointer is None else [pointer]

    def release(self) -> None:
        if self.buffer is not None:
            self.buffer.free()
            self.buffer = None


def make_calibrator(state: Calibration) -> "trt.IInt8EntropyCalibrator2":
    """An IInt8EntropyCalibrator2 over `state`; it never raises into TensorRT (see `callbacks`).

    TensorRT calls `read_calibration_cache` first; when a cache is given it is used and no image is read.
    Otherwise `get_batch` copies one image to the GPU per call and returns its device pointer (for the input
    name TensorRT passes), and None once the images are exhausted -- or once anything went wrong, the error then
    held in `state.held` for the builder's caller to raise; TensorRT hands the new cache to
    `write_calibration_cache`.
    """
    import tensorrt as trt

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self) -> int:
            return 1

        # TensorRT documents None as "no more data" and "no cache"; the stubs' return types omit it.
        def get_batch(self, names: List[str]) -> Optional[List[int]]:  # type: ignore[override]
            if state.held.error is not None:
                return None
            try:
                return state.pointers(names)
            except BaseException as error:  # noqa: B036 - see callbacks
                state.held.hold(error)
                return None

        def read_calibration_cache(self) -> Optional[bytes]:  # type: ignore[override]
            return state.cache_in

        def write_calibration_cache(self, cache: Any) -> None:
            try:
                state.cache_out = bytes(cache)
            except BaseException as error:  # noqa: B036 - see callbacks
                state.held.hold(error)

    return _EntropyCalibrator()
