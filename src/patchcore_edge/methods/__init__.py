"""Scoring methods, registered by name. Adding one: a module here with a `Scorer` subclass, a line below, and
its exporter in `patchcore_edge/export/methods/`. Nothing else changes."""

from __future__ import annotations

import importlib
from typing import Dict, Tuple, Type

from .base import MethodScore, Scorer, ScorerOptions

# name -> "module:class", imported only when a bundle uses the method.
_SCORERS: Dict[str, str] = {
    "patchcore": "patchcore_edge.methods.patchcore:PatchCoreScorer",
    "spade": "patchcore_edge.methods.spade:SpadeMethod",
    "padim": "patchcore_edge.methods.padim:PadimMethod",
    "patch_svdd": "patchcore_edge.methods.trained_patch:PatchSVDDScorer",
    "multiscale": "patchcore_edge.methods.trained_patch:MultiscaleScorer",
}


class UnknownMethod(ValueError):
    pass


def method_names() -> Tuple[str, ...]:
    return tuple(_SCORERS)


def scorer_class(name: str) -> Type[Scorer]:
    """The Scorer class registered as `name`."""
    target = _SCORERS.get(name)
    if target is None:
        raise UnknownMethod(f"unknown scoring method {name!r}; this patchcore-edge knows "
                            f"{', '.join(sorted(_SCORERS))} (a newer version may know more)")
    module, _, cls = target.partition(":")
    found: Type[Scorer] = getattr(importlib.import_module(module), cls)
    return found


__all__ = ["MethodScore", "Scorer", "ScorerOptions", "UnknownMethod", "method_names", "scorer_class"]
