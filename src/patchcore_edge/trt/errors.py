"""The errors of the TensorRT layer; each message says why, in words a user can act on."""

from __future__ import annotations


class TensorRTUnavailable(RuntimeError):
    """TensorRT or CUDA cannot be used on this machine; the message says why and what to do."""


class EngineBuildError(RuntimeError):
    """An engine could not be built (or failed its check); the message says why in terms a user can act on."""


class EngineLoadError(RuntimeError):
    """An engine file cannot be used on this device or with this bundle."""


class CudaError(RuntimeError):
    """A CUDA runtime call failed."""


REBUILD_HINT = "rebuild it on this device with `patchcore-edge engine build BUNDLE`"
