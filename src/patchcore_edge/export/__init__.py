"""The exporter (workstation, torch): `patchcore_edge.export(images_or_folder, bundle_dir, **options)`.

This package is itself callable, so that `from patchcore_edge import export` gives the function users expect
while `patchcore_edge.export.pipeline` and the other modules stay importable under their names (a function of
the same name in the parent package would be replaced by this package on its first import).
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any, Sequence, Union

Images = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]


def export(images: Images, bundle_dir: Union[str, "os.PathLike[str]"], **options: Any) -> Any:
    """Export a bundle from a folder of good-part images or a list of image files; returns the ExportSummary.

    `options` are the fields of `patchcore_edge.export.pipeline.ExportOptions` (method, backbone, coreset_ratio,
    seed, force, ...); `progress` and `log` callbacks may be given too.
    """
    from .pipeline import ExportOptions, export_bundle

    progress = options.pop("progress", None)
    log = options.pop("log", None)
    folder = isinstance(images, (str, os.PathLike))
    listed = None if folder else [Path(p) for p in images]  # type: ignore[union-attr]
    nominal = Path(images) if folder else (listed[0].parent if listed else Path("."))  # type: ignore[arg-type]
    settings = ExportOptions(nominal_dir=nominal, output=Path(bundle_dir), **options)
    callbacks = {k: v for k, v in (("progress", progress), ("log", log)) if v is not None}
    return export_bundle(settings, images=listed, **callbacks)


class _CallableModule(types.ModuleType):
    def __call__(self, images: Images, bundle_dir: Union[str, "os.PathLike[str]"], **options: Any) -> Any:
        return export(images, bundle_dir, **options)


sys.modules[__name__].__class__ = _CallableModule
