"""Is TensorRT usable here: the importable version, the oldest one driven, and a one-line status.

`tensorrt` is imported inside functions only, so importing this package never fails where it is missing.
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

from .cuda import cuda_devices
from .errors import TensorRTUnavailable

MIN_TENSORRT = (8, 5)


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


def ensure_tensorrt() -> str:
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


def tensorrt_status() -> Tuple[bool, str]:
    """(True, what is there) where engines can be built and run here, else (False, why and what to do)."""
    try:
        version = ensure_tensorrt()
    except TensorRTUnavailable as error:
        return False, str(error)
    devices, reason = cuda_devices()
    if not devices:
        return False, f"TensorRT {version} is installed but {reason}"
    device = devices[0]
    return True, (f"TensorRT {version} on CUDA device 0 ({device.name}, compute "
                  f"{format_compute_capability(device.compute_capability)})")
