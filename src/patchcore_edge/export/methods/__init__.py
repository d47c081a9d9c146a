"""Method exporters, registered by name (the runtime halves are in `patchcore_edge.methods`)."""

from __future__ import annotations

import importlib
from typing import Dict, Tuple

from .base import FittedMethod, MethodExporter, MethodSettings, NetworkInfo

_EXPORTERS: Dict[str, str] = {
    "patchcore": "patchcore_edge.export.methods.patchcore:PatchCoreExporter",
}


def exporter_names() -> Tuple[str, ...]:
    return tuple(_EXPORTERS)


def get_exporter(name: str) -> MethodExporter:
    target = _EXPORTERS.get(name)
    if target is None:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_EXPORTERS)}")
    module, _, cls = target.partition(":")
    exporter: MethodExporter = getattr(importlib.import_module(module), cls)()
    return exporter


__all__ = ["FittedMethod", "MethodExporter", "MethodSettings", "NetworkInfo", "exporter_names", "get_exporter"]
