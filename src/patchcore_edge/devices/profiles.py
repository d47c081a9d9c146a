"""Device profiles: one JSON file per board in `devices/profiles/`, loaded and checked here.

A profile holds what NVIDIA publishes about a board (GPU compute capability, memory and DLA cores per module
variant, the JetPack / CUDA / TensorRT versions it ships with, with the source URL of each group of figures)
and this project's defaults for it (backbone, coreset cap, workspace, ef, memory budget).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
REQUIRED_KEYS = ("name", "title", "kind", "gpu", "variants", "software", "engines", "detection", "defaults",
                 "sources")
KINDS = ("jetson", "workstation", "cpu")


class ProfileError(Exception):
    """A profile file or name that cannot be used; the message names the file or lists the valid names."""


@dataclass(frozen=True)
class Variant:
    name: str
    memory_gb: Optional[float]
    dla_cores: int
    modules: Tuple[str, ...]


@dataclass(frozen=True)
class Profile:
    name: str
    title: str
    kind: str
    data: Dict[str, Any]

    @property
    def compute_capability(self) -> Optional[Tuple[int, int]]:
        text = self.data["gpu"].get("compute_capability")
        if text is None:
            return None
        major, minor = str(text).split(".")
        return int(major), int(minor)

    @property
    def variants(self) -> List[Variant]:
        return [Variant(str(v["name"]), v.get("memory_gb"), int(v.get("dla_cores", 0)),
                        tuple(v.get("modules", ()))) for v in self.data["variants"]]

    @property
    def defaults(self) -> Dict[str, Any]:
        return dict(self.data["defaults"])

    @property
    def engines_supported(self) -> bool:
        return bool(self.data["engines"]["supported"])

    @property
    def precisions(self) -> List[str]:
        return list(self.data["engines"].get("precisions", []))

    def variant(self, name: Optional[str] = None) -> Variant:
        """The named variant; without a name the smallest-memory one (the conservative choice)."""
        variants = self.variants
        if name is None:
            known = [v for v in variants if v.memory_gb is not None]
            return min(known, key=lambda v: v.memory_gb or 0.0) if known else variants[0]
        for variant in variants:
            if variant.name.lower() == name.lower():
                return variant
        raise ProfileError(f"{self.name} has no variant {name!r}; choose one of "
                           f"{', '.join(v.name for v in variants)}")

    def variant_for_module(self, module: str) -> Optional[Variant]:
        return next((v for v in self.variants if module in v.modules), None)

    def variant_for_memory(self, total_mb: float) -> Optional[Variant]:
        """The variant whose nominal memory is the smallest one not below the memory the kernel reports.

        The kernel reports less than the nominal size (carve-outs for firmware and the GPU), never more.
        """
        sized = sorted((v for v in self.variants if v.memory_gb is not None), key=lambda v: v.memory_gb or 0.0)
        for variant in sized:
            if total_mb <= float(variant.memory_gb or 0.0) * 1024.0:
                return variant
        return sized[-1] if sized else None


def _validate(data: Any, path: Path) -> Profile:
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: not a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise ProfileError(f"{path}: missing keys {', '.join(missing)}")
    if data["name"] != path.stem:
        raise ProfileError(f"{path}: name {data['name']!r} differs from the file name")
    if data["kind"] not in KINDS:
        raise ProfileError(f"{path}: kind {data['kind']!r} is not one of {', '.join(KINDS)}")
    if not isinstance(data["variants"], list) or not data["variants"]:
        raise ProfileError(f"{path}: needs at least one variant")
    for variant in data["variants"]:
        if not isinstance(variant, dict) or "name" not in variant or "dla_cores" not in variant:
            raise ProfileError(f"{path}: every variant needs a name and dla_cores")
    sources = data["sources"]
    for group in ("gpu", "variants", "software", "engines", "detection", "defaults"):
        if not isinstance(sources, dict) or not sources.get(group):
            raise ProfileError(f"{path}: sources.{group} is missing: every group of figures names its source")
    profile = Profile(str(data["name"]), str(data["title"]), str(data["kind"]), data)
    try:
        profile.compute_capability
    except ValueError:
        raise ProfileError(f"{path}: gpu.compute_capability must look like '8.7'") from None
    return profile


def load_profiles(folder: Path = PROFILE_DIR) -> Dict[str, Profile]:
    """All profiles in `folder`, by name, sorted by name."""
    profiles: Dict[str, Profile] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ProfileError(f"{path}: cannot read the profile ({error})") from None
        profile = _validate(data, path)
        profiles[profile.name] = profile
    if not profiles:
        raise ProfileError(f"{folder}: no device profile found (the package is incomplete; reinstall it)")
    return profiles


def get_profile(name: str, folder: Path = PROFILE_DIR) -> Profile:
    profiles = load_profiles(folder)
    if name not in profiles:
        raise ProfileError(f"unknown device {name!r}; known devices: {', '.join(profiles)}")
    return profiles[name]
