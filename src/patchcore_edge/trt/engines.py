"""Engine files and their entries in the bundle's engine list: naming, the entry's fields, matching a device.

A serialised engine only loads with the TensorRT version and GPU it was built with, so both are in its name and
its entry, and a bundle can carry one engine per board. The entry's schema belongs to this module.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Protocol, Tuple

from .build import PRECISIONS, BuildResult
from .errors import REBUILD_HINT, EngineBuildError
from .status import format_compute_capability, parse_version

_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]*$")
# The files an entry owns, besides the engine itself.
CACHE_KEYS = ("timing_cache", "int8_calibration_cache")


class DeviceLike(Protocol):
    """What engine matching needs to know about the device (see `devices.detect.DeviceInfo`)."""

    @property
    def slug(self) -> str: ...

    @property
    def compute_capability(self) -> Optional[Tuple[int, int]]: ...

    @property
    def tensorrt_version(self) -> Optional[str]: ...

    @property
    def dla_cores(self) -> int: ...


def engine_file_name(device_slug: str, trt_version: str, precision: str, dla_core: Optional[int] = None,
                     tag: Optional[str] = None) -> str:
    """`features.<device>.trt<version>.<precision>[-dla<core>][.<tag>].engine`.

    `tag` (e.g. a UTC timestamp) keeps a rebuilt engine's name unique, as a bundle file is never overwritten.
    """
    if not _SLUG.match(device_slug):
        raise ValueError(f"device name {device_slug!r}: use lower-case letters, digits and '-'")
    version = ".".join(str(v) for v in parse_version(trt_version))
    if not version:
        raise ValueError(f"TensorRT version {trt_version!r} has no numeric part")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    kind = precision if dla_core is None else f"{precision}-dla{int(dla_core)}"
    suffix = "" if tag is None else "." + re.sub(r"[^A-Za-z0-9-]", "-", tag)
    return f"features.{device_slug}.trt{version}.{kind}{suffix}.engine"


def write_engine_files(folder: Path, engine_name: str, result: BuildResult) -> Dict[str, str]:
    """Write the engine and its caches into `folder` under new names; returns {entry key: file name}."""
    names = {"file": engine_name}
    base = engine_name[: -len(".engine")]
    names["timing_cache"] = base + ".timing.cache"
    if result.int8_cache is not None:
        names["int8_calibration_cache"] = base + ".int8.cache"
    for name in names.values():
        if (folder / name).exists():
            raise EngineBuildError(f"{folder / name}: already exists; pass a tag to build under a new name")
    (folder / names["file"]).write_bytes(result.engine)
    (folder / names["timing_cache"]).write_bytes(result.timing_cache)
    if result.int8_cache is not None:
        (folder / names["int8_calibration_cache"]).write_bytes(result.int8_cache)
    return names


def engine_entry(files: Mapping[str, str], *, device: str, variant: Optional[str],
                 compute_capability: Optional[Tuple[int, int]], tensorrt_version: str, precision: str,
                 max_batch: int, dla_core: Optional[int], workspace_mb: int,
                 verification: Mapping[str, Any]) -> Dict[str, Any]:
    """The engine-list entry of one built and verified engine."""
    return {**files, "device": device, "variant": variant,
            "compute_capability": format_compute_capability(compute_capability),
            "tensorrt_version": tensorrt_version, "precision": precision, "max_batch": int(max_batch),
            "dla_core": dla_core, "workspace_mb": int(workspace_mb), "verification": dict(verification)}


def entry_files(entry: Mapping[str, Any]) -> List[str]:
    """The bundle files an entry owns: the engine and its caches."""
    return [str(entry[key]) for key in ("file",) + CACHE_KEYS if entry.get(key)]


def same_slot(entry: Mapping[str, Any], other: Mapping[str, Any]) -> bool:
    """Whether `other` is an engine for the same device, TensorRT, precision and DLA core (a rebuild replaces it)."""
    keys = ("device", "tensorrt_version", "precision", "dla_core")
    return all(entry.get(key) == other.get(key) for key in keys)


def cache_files(entries: Iterable[Mapping[str, Any]], device: str, tensorrt_version: str,
                ) -> Tuple[Optional[str], Optional[str]]:
    """Timing and INT8 cache file names of earlier engines for this device and TensorRT version, if any."""
    timing = int8 = None
    for entry in entries:
        if entry.get("device") == device and entry.get("tensorrt_version") == tensorrt_version:
            timing = timing or entry.get("timing_cache") or None
            int8 = int8 or entry.get("int8_calibration_cache") or None
    return timing, int8


def dla_core_of(entries: Iterable[Mapping[str, Any]], file_name: str) -> Optional[int]:
    """The DLA core recorded for the engine file `file_name`, None for a GPU engine (or an unlisted file)."""
    for entry in entries:
        if entry.get("file") == file_name and entry.get("dla_core") is not None:
            return int(entry["dla_core"])
    return None


def engine_entry_matches(entry: Mapping[str, Any], device: DeviceLike) -> Tuple[bool, str]:
    """Whether an engine-list entry can run on `device`; the reason is one line either way."""
    name = str(entry.get("file", "<engine>"))
    if device.tensorrt_version is None:
        return False, f"{name}: TensorRT is not available on this device"
    if entry.get("device") != device.slug:
        return False, f"{name}: built for {entry.get('device')}, this device is {device.slug}"
    wanted_cc = str(entry.get("compute_capability"))
    have_cc = format_compute_capability(device.compute_capability)
    if have_cc is not None and wanted_cc != have_cc:
        return False, f"{name}: built for compute capability {wanted_cc}, this GPU has {have_cc}; {REBUILD_HINT}"
    built_with = str(entry.get("tensorrt_version"))
    if parse_version(built_with) != parse_version(device.tensorrt_version):
        # Engines are tied to the exact TensorRT build (major.minor.patch.build) that serialised them.
        return False, (f"{name}: built with TensorRT {built_with}, this device has {device.tensorrt_version}; "
                       f"{REBUILD_HINT}")
    dla = entry.get("dla_core")
    if dla is not None and int(dla) >= device.dla_cores:
        return False, f"{name}: runs on DLA core {dla}, this device has {device.dla_cores} DLA core(s)"
    return True, (f"{name}: matches {device.slug} (compute {have_cc or wanted_cc}, TensorRT {built_with}, "
                  f"{entry.get('precision')})")


def select_engine(entries: Iterable[Mapping[str, Any]], device: DeviceLike,
                  ) -> Tuple[Optional[Mapping[str, Any]], List[str]]:
    """The first matching engine entry (GPU engines before DLA ones), and one reason line per entry tried."""
    reasons: List[str] = []
    ordered = sorted(entries, key=lambda e: e.get("dla_core") is not None)
    for entry in ordered:
        ok, reason = engine_entry_matches(entry, device)
        reasons.append(reason)
        if ok:
            return entry, reasons
    if not reasons:
        reasons.append("the bundle has no TensorRT engine")
    return None, reasons
