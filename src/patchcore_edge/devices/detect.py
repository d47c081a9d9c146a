"""Which board is this? Read from the device tree, the L4T release file, /proc/meminfo and (optionally) CUDA.

Every file is read under a `root` folder (default "/"), so tests can run the real parsing code on files they
write. The CUDA and TensorRT probes go through `patchcore_edge.trt` (below this package: it knows nothing of
boards), the only package that imports them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..trt import cuda_devices, tensorrt_version
from .profiles import Profile, Variant, load_profiles

# Jetson Linux (L4T) release -> JetPack release, from https://developer.nvidia.com/embedded/jetpack-archive and
# https://developer.nvidia.com/embedded/jetson-linux-archive. Used only to name the JetPack in reports.
L4T_TO_JETPACK: Dict[str, str] = {
    "32.6.1": "4.6", "32.7.1": "4.6.1/4.6.2", "32.7.2": "4.6.2", "32.7.3": "4.6.3", "32.7.4": "4.6.4",
    "32.7.5": "4.6.5", "35.1.0": "5.0.2", "35.2.1": "5.1", "35.3.1": "5.1.1", "35.4.1": "5.1.2",
    "35.5.0": "5.1.3", "35.6.0": "5.1.4", "35.6.1": "5.1.5", "36.2.0": "6.0 DP", "36.3.0": "6.0",
    "36.4.0": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1",
}


@dataclass(frozen=True)
class DeviceInfo:
    """What detection found. `slug` names the matching profile; `dla_cores` comes from the module variant."""

    slug: str
    title: str
    variant: Optional[str]
    model: Optional[str]
    compatible: Tuple[str, ...]
    l4t_release: Optional[str]
    jetpack: Optional[str]
    memory_total_mb: Optional[int]
    compute_capability: Optional[Tuple[int, int]]
    gpu_name: Optional[str]
    tensorrt_version: Optional[str]
    dla_cores: int
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, object]:
        cc = self.compute_capability
        return {"device": self.slug, "title": self.title, "variant": self.variant, "model": self.model,
                "compatible": list(self.compatible), "l4t": self.l4t_release, "jetpack": self.jetpack,
                "memory_total_mb": self.memory_total_mb,
                "compute_capability": None if cc is None else f"{cc[0]}.{cc[1]}", "gpu": self.gpu_name,
                "tensorrt": self.tensorrt_version, "dla_cores": self.dla_cores, "notes": list(self.notes)}


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None


def read_model(root: Path) -> Optional[str]:
    """/proc/device-tree/model: a NUL-terminated string, e.g. 'NVIDIA Jetson Orin NX Engineering Reference ...'."""
    text = _read_text(root / "proc" / "device-tree" / "model")
    if text is None:
        return None
    return text.split("\0", 1)[0].strip() or None


def read_compatible(root: Path) -> Tuple[str, ...]:
    """/proc/device-tree/compatible: NUL-separated strings, most specific first."""
    text = _read_text(root / "proc" / "device-tree" / "compatible")
    if not text:
        return ()
    return tuple(part.strip() for part in text.split("\0") if part.strip())


_RELEASE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)")


def parse_nv_tegra_release(text: str) -> Optional[str]:
    """'# R35 (release), REVISION: 4.1, GCID: ...' -> '35.4.1'."""
    match = _RELEASE.search(text)
    if match is None:
        return None
    revision = match.group(2).strip(".")
    parts = [match.group(1)] + revision.split(".")
    while len(parts) < 3:
        parts.append("0")
    return ".".join(parts[:3])


def read_l4t_release(root: Path) -> Optional[str]:
    text = _read_text(root / "etc" / "nv_tegra_release")
    return None if text is None else parse_nv_tegra_release(text)


def jetpack_for_l4t(release: Optional[str]) -> Optional[str]:
    if release is None:
        return None
    if release in L4T_TO_JETPACK:
        return L4T_TO_JETPACK[release]
    major_minor = ".".join(release.split(".")[:2])
    matches = [jp for l4t, jp in L4T_TO_JETPACK.items() if l4t.startswith(major_minor + ".")]
    return matches[-1] if matches else None


def read_memory_total_mb(root: Path) -> Optional[int]:
    text = _read_text(root / "proc" / "meminfo")
    if text is None:
        return None
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, flags=re.M)
    return None if match is None else int(match.group(1)) // 1024


def _module_ids(compatible: Tuple[str, ...]) -> List[str]:
    """'nvidia,p3768-0000+p3767-0001' -> ['p3768-0000', 'p3767-0001'] (carrier board + module)."""
    ids: List[str] = []
    for entry in compatible:
        vendor, _, rest = entry.partition(",")
        if vendor == "nvidia":
            ids.extend(part for part in rest.split("+") if re.match(r"^p\d{4}-\d{4}$", part))
    return ids


def match_jetson(model: Optional[str], compatible: Tuple[str, ...],
                 profiles: Dict[str, Profile]) -> Tuple[Optional[Profile], Optional[Variant], str]:
    """The Jetson profile (and module variant) for these device-tree strings, and how it was decided."""
    jetsons = [p for p in profiles.values() if p.kind == "jetson"]
    modules = _module_ids(compatible)
    # Module part numbers are the most specific evidence: they name both the board and its memory variant.
    for module in modules:
        for profile in jetsons:
            variant = profile.variant_for_module(module)
            if variant is not None:
                return profile, variant, f"module {module} in /proc/device-tree/compatible"
    for entry in compatible:
        for profile in jetsons:
            if entry in profile.data["detection"].get("compatible", []):
                return profile, None, f"'{entry}' in /proc/device-tree/compatible"
    if model:
        keywords = sorted(((k, p) for p in jetsons for k in p.data["detection"].get("model_contains", [])),
                          key=lambda item: -len(item[0]))
        for keyword, profile in keywords:
            if keyword.lower() in model.lower():
                return profile, None, f"'{keyword}' in /proc/device-tree/model"
    return None, None, ""


def detect_device(root: "Path | str" = "/", probe_cuda: bool = True, probe_tensorrt: bool = True,
                  profiles: Optional[Dict[str, Profile]] = None) -> DeviceInfo:
    """Detect the board. Without a Jetson device tree: `cuda-workstation` where CUDA sees a GPU, else `cpu-only`."""
    root = Path(root)
    profiles = profiles if profiles is not None else load_profiles()
    model = read_model(root)
    compatible = read_compatible(root)
    l4t = read_l4t_release(root)
    memory_mb = read_memory_total_mb(root)
    notes: List[str] = []

    gpu_name: Optional[str] = None
    cuda_cc: Optional[Tuple[int, int]] = None
    cuda_memory_mb: Optional[int] = None
    trt_version: Optional[str] = None
    if probe_cuda or probe_tensorrt:
        if probe_cuda:
            devices, reason = cuda_devices()
            if devices:
                gpu_name, cuda_cc = devices[0].name, devices[0].compute_capability
                cuda_memory_mb = devices[0].total_memory_bytes // (1 << 20)
            else:
                notes.append(f"CUDA: {reason}")
        if probe_tensorrt:
            trt_version = tensorrt_version()

    profile, variant, evidence = match_jetson(model, compatible, profiles)
    if profile is not None:
        notes.append(f"board from {evidence}")
        if variant is None and memory_mb is not None:
            variant = profile.variant_for_memory(memory_mb)
            if variant is not None:
                notes.append(f"variant {variant.name} from MemTotal {memory_mb} MB")
        expected_cc = profile.compute_capability
        if cuda_cc is not None and expected_cc is not None and cuda_cc != expected_cc:
            notes.append(f"CUDA reports compute capability {cuda_cc[0]}.{cuda_cc[1]}, the {profile.name} profile "
                         f"says {expected_cc[0]}.{expected_cc[1]}: the detection may be wrong")
        cc = cuda_cc or expected_cc
    elif model is not None and ("jetson" in model.lower() or any("tegra" in c for c in compatible)):
        notes.append(f"unknown Jetson board {model!r}: treated as {'cuda-workstation' if cuda_cc else 'cpu-only'}")
        profile = profiles["cuda-workstation" if cuda_cc else "cpu-only"]
        cc = cuda_cc
    else:
        profile = profiles["cuda-workstation" if cuda_cc is not None else "cpu-only"]
        cc = cuda_cc
        if cuda_memory_mb is not None:
            notes.append(f"GPU memory {cuda_memory_mb} MB")

    if variant is None:
        variant = profile.variants[0] if len(profile.variants) == 1 else profile.variant()
        if profile.kind == "jetson":
            notes.append(f"memory variant unknown: assuming the smallest ({variant.name})")
    return DeviceInfo(slug=profile.name, title=profile.title, variant=variant.name, model=model,
                      compatible=compatible, l4t_release=l4t, jetpack=jetpack_for_l4t(l4t),
                      memory_total_mb=memory_mb, compute_capability=cc, gpu_name=gpu_name,
                      tensorrt_version=trt_version, dla_cores=variant.dla_cores, notes=notes)
