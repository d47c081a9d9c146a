"""The bundle: a versioned folder of data (never code) shared by exporter, runtime and calibration.

Everything is validated before use: the manifest schema, every file's size and sha256, and the shapes of the arrays
against the manifest. Writes are atomic: a new bundle is built in a staging folder and renamed into place; an
existing bundle is changed by writing new files first and replacing manifest.json last (the commit point).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

FORMAT_NAME = "patchcore-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024

# The files every bundle has; the runtime cannot work without any of them.
REQUIRED_FILES = ("features.onnx", "memory_bank.npy", "bank_neighbours.npy", "index.hnsw")


class BundleError(Exception):
    """A bundle that cannot be used; the message names the file and what to do."""


def sha256_file(path: os.PathLike | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file_atomic(path: os.PathLike | str, data: bytes) -> None:
    """Write bytes to path through a temporary file in the same folder and a rename."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


def file_record(path: Path) -> Dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


# ---------------------------------------------------------------------------------------------- validation


def _require(condition: bool, bundle_dir: Path, message: str) -> None:
    if not condition:
        raise BundleError(f"{bundle_dir / MANIFEST}: {message}")


def _get(manifest: Mapping[str, Any], key: str, kind: type | tuple, bundle_dir: Path) -> Any:
    _require(key in manifest, bundle_dir, f"missing field {key!r}")
    value = manifest[key]
    _require(isinstance(value, kind) and not (kind is int and isinstance(value, bool)), bundle_dir,
             f"field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _positive_int(section: Mapping[str, Any], key: str, bundle_dir: Path, where: str) -> int:
    value = section.get(key)
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, bundle_dir,
             f"{where}.{key} must be a positive integer, got {value!r}")
    return int(value)


def _safe_name(name: Any, bundle_dir: Path) -> str:
    _require(isinstance(name, str) and name != "" and "/" not in name and "\\" not in name
             and name not in (".", "..") and not name.startswith("."), bundle_dir,
             f"file name {name!r} is not a plain file name inside the bundle")
    return str(name)


def validate_manifest(manifest: Any, bundle_dir: Path) -> Dict[str, Any]:
    """Check the schema of a manifest dict; raise BundleError naming the first problem."""
    _require(isinstance(manifest, dict), bundle_dir, "is not a JSON object")
    _require(manifest.get("format") == FORMAT_NAME, bundle_dir,
             f"not a patchcore-edge bundle (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    _require(isinstance(version, int), bundle_dir, "missing format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{bundle_dir / MANIFEST}: bundle format version {version} is not supported by this patchcore-edge "
            f"(it reads version {FORMAT_VERSION}); re-export the bundle with this version, or install the "
            "patchcore-edge version that made it")
    _get(manifest, "toolkit_version", str, bundle_dir)
    backbone = _get(manifest, "backbone", dict, bundle_dir)
    _require(isinstance(backbone.get("name"), str), bundle_dir, "backbone.name missing")
    layers = _get(manifest, "layers", list, bundle_dir)
    _require(len(layers) >= 1 and all(isinstance(x, str) for x in layers), bundle_dir, "layers must be names")

    spec = _get(manifest, "input", dict, bundle_dir)
    from .preprocess import InputSpec  # local: keeps bundle.py importable on its own

    try:
        InputSpec.from_manifest(spec)
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(f"{bundle_dir / MANIFEST}: input section is invalid ({error})") from None

    features = _get(manifest, "features", dict, bundle_dir)
    _positive_int(features, "dim", bundle_dir, "features")
    _positive_int(features, "stride", bundle_dir, "features")
    grid = features.get("grid")
    _require(isinstance(grid, list) and len(grid) == 2 and all(isinstance(g, int) and g > 0 for g in grid),
             bundle_dir, f"features.grid must be [h, w], got {grid!r}")
    for key in ("input_name", "output_name"):
        _require(isinstance(features.get(key), str), bundle_dir, f"features.{key} missing")
    _safe_name(features.get("onnx_file"), bundle_dir)

    coreset = _get(manifest, "coreset", dict, bundle_dir)
    _positive_int(coreset, "size", bundle_dir, "coreset")
    index = _get(manifest, "index", dict, bundle_dir)
    for key in ("M", "ef_construction", "ef"):
        _positive_int(index, key, bundle_dir, "index")
    score = _get(manifest, "score", dict, bundle_dir)
    _positive_int(score, "reweight_neighbours", bundle_dir, "score")
    _positive_int(score, "rerank", bundle_dir, "score")
    sigma = score.get("gaussian_sigma")
    _require(isinstance(sigma, (int, float)) and sigma >= 0, bundle_dir, "score.gaussian_sigma must be >= 0")

    files = _get(manifest, "files", dict, bundle_dir)
    for name, record in files.items():
        _safe_name(name, bundle_dir)
        _require(isinstance(record, dict) and isinstance(record.get("sha256"), str)
                 and len(record["sha256"]) == 64 and isinstance(record.get("bytes"), int), bundle_dir,
                 f"files[{name!r}] needs sha256 and bytes")
    for name in REQUIRED_FILES:
        _require(name in files, bundle_dir, f"required file {name} is not listed")

    engines = manifest.get("engines", [])
    _require(isinstance(engines, list), bundle_dir, "engines must be a list")
    for entry in engines:
        _require(isinstance(entry, dict) and _safe_name(entry.get("file"), bundle_dir) in files, bundle_dir,
                 f"engine entry {entry!r} names a file that is not listed")
    calibration = manifest.get("calibration")
    if calibration is not None:
        _require(isinstance(calibration, dict) and _safe_name(calibration.get("file"), bundle_dir) in files,
                 bundle_dir, "calibration names a file that is not listed")
        previous = calibration.get("previous")
        _require(previous is None or _safe_name(previous, bundle_dir) in files, bundle_dir,
                 "calibration.previous names a file that is not listed")
    return manifest


def calibration_files(manifest: Mapping[str, Any]) -> List[str]:
    entry = manifest.get("calibration") or {}
    return [name for name in (entry.get("file"), entry.get("previous")) if name]


def check_files(bundle_dir: Path, manifest: Mapping[str, Any], skip: Sequence[str] = ()) -> None:
    """Check that every listed file (but those in skip) exists with the recorded size and sha256."""
    for name, record in manifest["files"].items():
        if name in skip:
            continue
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle; re-export the bundle or copy the whole folder again")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise BundleError(f"{path}: size {size} bytes differs from the manifest's {record['bytes']}; the file was "
                              "altered or copied incompletely: copy the bundle again or re-export it")
        if sha256_file(path) != record["sha256"]:
            raise BundleError(f"{path}: sha256 differs from the manifest; the file was altered: copy the bundle "
                              "again or re-export it")


def read_manifest(bundle_dir: os.PathLike | str, verify_files: bool = True) -> Dict[str, Any]:
    """The validated manifest of a bundle; with verify_files, every file's size and sha256 are checked too."""
    folder = Path(bundle_dir)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such bundle folder")
    if not path.is_file():
        raise BundleError(f"{path}: missing; {folder} is not a bundle (or its export was interrupted): export it again")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: too large to be a manifest")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"{path}: not valid JSON ({error}); restore it from the exported bundle") from None
    validate_manifest(manifest, folder)
    if verify_files:
        check_files(folder, manifest)
    return manifest


def load_array(bundle_dir: Path, name: str, dtype: np.dtype | type, shape: Sequence[Optional[int]]) -> np.ndarray:
    """Load a .npy file of the bundle (no pickle) and check its dtype and shape (None = any)."""
    path = bundle_dir / name
    try:
        array = np.load(path, allow_pickle=False, mmap_mode=None)
    except (OSError, ValueError) as error:
        raise BundleError(f"{path}: not a readable .npy array ({error})") from None
    if array.dtype != np.dtype(dtype):
        raise BundleError(f"{path}: dtype {array.dtype}, expected {np.dtype(dtype)}")
    if array.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, array.shape)):
        raise BundleError(f"{path}: shape {array.shape}, expected {tuple(shape)}")
    return np.ascontiguousarray(array)


# ---------------------------------------------------------------------------------------------- writing


def write_new_bundle(target: os.PathLike | str, build: Callable[[Path], Dict[str, Any]], force: bool = False) -> Path:
    """Create a bundle atomically: `build(staging)` writes the files and returns the manifest (without "files").

    The staging folder sits beside the target, so the final rename cannot cross file systems. An interrupted export
    leaves only a hidden staging folder, never a half bundle under the target name. With force, an existing bundle
    is replaced (moved aside first, deleted after the new one is in place).
    """
    target = Path(target).resolve()
    if target.exists() and not force:
        raise BundleError(f"{target}: already exists; pass --force to overwrite it or choose another output folder")
    if target.exists() and not target.is_dir():
        raise BundleError(f"{target}: exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        manifest = build(staging)
        manifest = dict(manifest)
        manifest["files"] = {p.name: file_record(p) for p in sorted(staging.iterdir()) if p.is_file()
                             and p.name != MANIFEST}
        validate_manifest(manifest, staging)
        write_file_atomic(staging / MANIFEST, manifest_bytes(manifest))
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{int(time.time() * 1000)}"
            os.replace(target, old)
        os.replace(staging, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def update_bundle(bundle_dir: os.PathLike | str, new_files: Mapping[str, bytes],
                  edit: Callable[[Dict[str, Any]], None], remove: Sequence[str] = ()) -> Dict[str, Any]:
    """Add files to an existing bundle and change its manifest, atomically (manifest.json is the commit point).

    New file names must not be in the bundle yet, so a crash before the manifest is replaced leaves the old
    bundle intact (plus an unlisted file); files in `remove` are deleted only after the new manifest is in place.
    """
    folder = Path(bundle_dir)
    manifest = read_manifest(folder, verify_files=False)
    for name in new_files:
        _safe_name(name, folder)
        if name in manifest["files"] or name == MANIFEST:
            raise BundleError(f"{folder / name}: already part of the bundle; new files need new names")
    for name in remove:
        if name not in manifest["files"]:
            raise BundleError(f"{folder / name}: cannot remove a file the bundle does not list")
    for name, data in new_files.items():
        write_file_atomic(folder / name, data)
    edited = json.loads(json.dumps(manifest))
    edit(edited)
    files = dict(edited.get("files", manifest["files"]))
    for name in remove:
        files.pop(name, None)
    for name in new_files:
        files[name] = file_record(folder / name)
    edited["files"] = files
    validate_manifest(edited, folder)
    write_file_atomic(folder / MANIFEST, manifest_bytes(edited))
    for name in remove:
        if name not in new_files:
            (folder / name).unlink(missing_ok=True)
    return edited


def utc_stamp() -> str:
    """A file-name-safe UTC timestamp with milliseconds, for unique bundle file names."""
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}Z"
