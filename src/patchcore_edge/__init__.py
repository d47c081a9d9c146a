"""patchcore-edge: PatchCore anomaly detection from a workstation to NVIDIA Jetson boards.

    from patchcore_edge import Bundle, Detector, Result, export

    export("good_parts/", "bundle/")                  # workstation, needs the [export] extra (torch)
    with Detector.load("bundle/") as detector:        # device, no torch
        result = detector.predict("part.png")
        result.save("out/")

Names are imported on first use, so `import patchcore_edge` stays cheap and never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Bundle": "patchcore_edge.bundle",
    "BundleError": "patchcore_edge.bundle",
    "Detector": "patchcore_edge.runtime.detector",
    "Result": "patchcore_edge.runtime.detector",
}

if TYPE_CHECKING:
    from . import export
    from .bundle import Bundle, BundleError
    from .runtime.detector import Detector, Result


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'patchcore_edge' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["Bundle", "BundleError", "Detector", "Result", "export", "__version__"]
