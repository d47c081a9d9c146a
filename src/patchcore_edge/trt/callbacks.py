"""Python code that TensorRT calls back (the logger, the INT8 calibrator) must never raise into TensorRT.

An exception that leaves a callback crosses TensorRT's C++ frames, which abort the process instead of giving
the promised one-line error. So every callback catches everything, holds the first error here, and answers
TensorRT with its "nothing" value; the code that made the TensorRT call re-raises the held error once that
call has returned (Polygraphy does the same in its calibrator and logger).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Type

if TYPE_CHECKING:  # pragma: no cover - the stubs give the type checker TensorRT's names
    import tensorrt as trt


class HeldErrors:
    """The first exception raised inside a callback, held until the TensorRT call that ran it returns."""

    def __init__(self) -> None:
        self.error: Optional[BaseException] = None

    def hold(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error

    def reraise(self, kind: Type[Exception], during: str) -> None:
        """Raise the held error, if any, as `kind` ("<during>: <what went wrong>"); Ctrl-C stays Ctrl-C."""
        error, self.error = self.error, None
        if error is None:
            return
        if not isinstance(error, Exception):
            raise error  # KeyboardInterrupt, SystemExit: as the user or the program asked
        if isinstance(error, kind):
            raise error
        detail = str(error) or type(error).__name__
        if type(error).__module__ == "builtins":
            detail = f"{type(error).__name__}: {detail}"
        raise kind(f"{during}: {detail}") from error


class TensorRTLog(HeldErrors):
    """Warnings and errors TensorRT logged (error messages quote TensorRT's own words), and held errors."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: List[str] = []
        self.warnings: List[str] = []

    def record(self, is_error: bool, message: str) -> None:
        (self.errors if is_error else self.warnings).append(message)

    def last_errors(self, count: int = 5) -> str:
        return "; ".join(self.errors[-count:])


def make_logger(log: TensorRTLog) -> "trt.ILogger":
    """An ILogger that keeps warnings and errors in `log`; it never raises into TensorRT."""
    import tensorrt as trt

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: "trt.ILogger.Severity", msg: str) -> None:
            try:
                if severity <= trt.ILogger.WARNING:
                    log.record(severity <= trt.ILogger.ERROR, str(msg))
            except BaseException as error:  # noqa: B036 - see the module docstring
                log.hold(error)

    return _Logger()
