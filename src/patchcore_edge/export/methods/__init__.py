"""Method exporters, registered by name (the runtime halves are in `patchcore_edge.methods`)."""

from __future__ import annotations

import importlib
from typing import Any, Dict, Sequence, Tuple

from .base import FittedMethod, MethodExporter, MethodExportError, MethodParameter, MethodSettings, NetworkInfo

_EXPORTERS: Dict[str, str] = {
    "patchcore": "patchcore_edge.export.methods.patchcore:PatchCoreExporter",
    "spade": "patchcore_edge.export.methods.spade:SpadeExporter",
    "padim": "patchcore_edge.export.methods.padim:PadimExporter",
    "patch_svdd": "patchcore_edge.export.methods.patch_svdd:PatchSVDD",
    "multiscale": "patchcore_edge.export.methods.multiscale:Multiscale",
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


def method_params(exporter: MethodExporter, pairs: Sequence[str]) -> Dict[str, Any]:
    """The method's parameters from NAME=VALUE texts, defaults filled in; ValueError naming a bad one."""
    known = {p.name: p for p in exporter.parameters}
    values = {p.name: p.default for p in exporter.parameters}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"--method-param {pair!r}: expected NAME=VALUE")
        if name not in known:
            takes = ", ".join(sorted(known)) if known else "no parameters"
            raise ValueError(f"--method-param {name}: method {exporter.name!r} takes {takes}")
        try:
            values[name] = known[name].parse(text.strip())
        except ValueError as error:
            raise ValueError(f"--method-param {error}") from None
    return values


__all__ = ["MethodParameter", "method_params", "FittedMethod", "MethodExportError", "MethodExporter", "MethodSettings", "NetworkInfo", "exporter_names", "get_exporter"]
