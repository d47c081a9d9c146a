"""The bundle: a versioned folder of data (never code) shared by exporter, runtime and calibration.

Everything is validated before use: the manifest schema, every file's size and sha256, and the shapes of the arrays
against the manifest. Writes are atomic: a new bundle is built in a staging folder and renamed into place; an
existing bundle is changed by writing new files first and replacing manifest.json last (the commit point).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .preprocess import InputSpec

FORMAT_NAME = "patchcore-edge-bundle"
FORMAT_VERSION = 3
# Versions 1 and 2 are still read: version 1 (PatchCore only) is migrated in memory; version 3 only stopped
# writing PatchCore's unused hnswlib index (a version 2 bundle that has one still loads and verifies it).
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024

# The files every version 1 bundle has; version 2 lists each method's files in its method section.
V1_REQUIRED_FILES = ("features.onnx", "memory_bank.npy", "bank_neighbours.npy", "index.hnsw")
# Array element types a bundle may hold (plain numeric .npy, never object arrays).
ARRAY_DTYPES = ("float16", "float32", "float64", "int32", "int64", "uint8")


class BundleError(Exception):
    """A bundle that cannot be used; the message names the file and what to do."""


# JSON nesting a bundle's files may have: the manifest needs 5 levels; deeper is damage or an attack (Python's
# json raises RecursionError near 1000, which would surface as a traceback).
MAX_JSON_DEPTH = 32


def _depth_ok(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return True


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a bundle may hold")


def strict_json_loads(text: str, where: os.PathLike | str) -> Any:
    """Parse a bundle's JSON file: NaN/Infinity and nesting deeper than MAX_JSON_DEPTH are refused (ValueError
    naming the file); JSON itself allows the first and Python's parser crashes on the second."""
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply") from None
    except ValueError as error:
        raise ValueError(f"{where}: not valid JSON ({error})") from None
    if not _depth_ok(data, MAX_JSON_DEPTH):
        raise ValueError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _ordinary_permissions(path: Path, folder: bool) -> None:
    """mkdtemp/mkstemp create owner-only (0700/0600) paths; a bundle is read by a service user too, so it gets
    the permissions any file gets under the user's umask."""
    try:
        os.chmod(path, (0o777 if folder else 0o666) & ~_umask())
    except OSError:
        pass


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
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as error:
        raise BundleError(f"{target}: cannot write ({error.strerror or error})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _ordinary_permissions(Path(tmp), folder=False)
        os.replace(tmp, target)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise BundleError(f"{target}: cannot write ({error.strerror or error}); the bundle is unchanged") from None
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


# Upper bound of every integer field (sizes, counts, breadths): far above any real bundle, far below overflow.
MAX_COUNT = 1 << 31


def _positive_int(section: Mapping[str, Any], key: str, bundle_dir: Path, where: str,
                  maximum: int = MAX_COUNT) -> int:
    value = section.get(key)
    _require(isinstance(value, int) and not isinstance(value, bool) and 0 < value <= maximum, bundle_dir,
             f"{where}.{key} must be an integer from 1 to {maximum}, got {value!r}")
    return value if isinstance(value, int) else 0  # always the int: _require raised otherwise


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(float(value))


def _safe_name(name: Any, bundle_dir: Path) -> str:
    _require(isinstance(name, str) and name != "" and "/" not in name and "\\" not in name
             and name not in (".", "..") and not name.startswith("."), bundle_dir,
             f"file name {name!r} is not a plain file name inside the bundle")
    return str(name)


def _validate_common(manifest: Mapping[str, Any], bundle_dir: Path) -> None:
    """The sections every format version shares."""
    _get(manifest, "toolkit_version", str, bundle_dir)
    backbone = _get(manifest, "backbone", dict, bundle_dir)
    _require(isinstance(backbone.get("name"), str), bundle_dir, "backbone.name missing")
    layers = _get(manifest, "layers", list, bundle_dir)
    _require(all(isinstance(x, str) for x in layers), bundle_dir, "layers must be names")
    spec = _get(manifest, "input", dict, bundle_dir)
    if "size" in spec:  # [width, height]; format 1 and square inputs also record `crop`
        size = spec.get("size")
        _require(isinstance(size, list) and len(size) == 2
                 and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096 for v in size),
                 bundle_dir, f"input.size must be [width, height], integers from 1 to 4096, got {size!r}")
        crop = max(size)
        _require("crop" not in spec or spec.get("crop") == size[0] == size[1], bundle_dir,
                 f"input.crop {spec.get('crop')!r} disagrees with input.size {size!r} (crop is a square size)")
    else:
        crop = _positive_int(spec, "crop", bundle_dir, "input", maximum=4096)  # not 224.9 or "224": never truncated
    # Shorter side at most 8 crops: beyond that an image is blown up to gigabytes before the crop is taken.
    _positive_int(spec, "resize", bundle_dir, "input", maximum=min(4096, 8 * crop))
    for key in ("mean", "std"):
        values = spec.get(key)
        _require(isinstance(values, list) and len(values) == 3 and all(_finite(v) and abs(v) <= 1e6 for v in values),
                 bundle_dir, f"input.{key} must be three finite numbers, got {values!r}")
    try:
        InputSpec.from_manifest(spec)
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(f"{bundle_dir / MANIFEST}: input section is invalid ({error})") from None
    features = _get(manifest, "features", dict, bundle_dir)
    _positive_int(features, "dim", bundle_dir, "features", maximum=65536)
    _positive_int(features, "stride", bundle_dir, "features", maximum=crop)
    grid = features.get("grid")
    _require(isinstance(grid, list) and len(grid) == 2
             and all(isinstance(g, int) and not isinstance(g, bool) and 0 < g <= crop for g in grid),
             bundle_dir, f"features.grid must be [h, w], each 1 to the crop ({crop}), got {grid!r}")
    for key in ("input_name", "output_name"):
        _require(isinstance(features.get(key), str), bundle_dir, f"features.{key} missing")
    _safe_name(features.get("onnx_file"), bundle_dir)
    score = _get(manifest, "score", dict, bundle_dir)
    sigma = score.get("gaussian_sigma")
    _require(_finite(sigma) and 0 <= sigma <= crop, bundle_dir,
             f"score.gaussian_sigma must be a number from 0 to the crop ({crop}), got {sigma!r}")

    files = _get(manifest, "files", dict, bundle_dir)
    for name, record in files.items():
        _safe_name(name, bundle_dir)
        _require(isinstance(record, dict) and isinstance(record.get("sha256"), str)
                 and len(record["sha256"]) == 64 and isinstance(record.get("bytes"), int)
                 and not isinstance(record["bytes"], bool) and 0 <= record["bytes"] <= 1 << 40, bundle_dir,
                 f"files[{name!r}] needs sha256 and bytes")
    _require(features["onnx_file"] in files, bundle_dir, f"required file {features['onnx_file']} is not listed")
    engines = manifest.get("engines", [])
    _require(isinstance(engines, list), bundle_dir, "engines must be a list")
    for entry in engines:
        _require(isinstance(entry, dict) and _safe_name(entry.get("file"), bundle_dir) in files, bundle_dir,
                 f"engine entry {entry!r} names a file that is not listed")
    training = manifest.get("training_images")
    if training is not None:
        _require(isinstance(training, dict), bundle_dir, "training_images must be an object")
        name = training.get("file")
        _require(name is None or _safe_name(name, bundle_dir) in files, bundle_dir,
                 f"training_images.file names {name!r}, which is not listed")
    calibration = manifest.get("calibration")
    if calibration is not None:
        _require(isinstance(calibration, dict) and _safe_name(calibration.get("file"), bundle_dir) in files,
                 bundle_dir, "calibration names a file that is not listed")
        previous = calibration.get("previous")
        _require(previous is None or _safe_name(previous, bundle_dir) in files, bundle_dir,
                 "calibration.previous names a file that is not listed")


def _validate_v1(manifest: Mapping[str, Any], bundle_dir: Path) -> None:
    """Format version 1: PatchCore only, its settings in top-level coreset/index/score sections."""
    coreset = _get(manifest, "coreset", dict, bundle_dir)
    _positive_int(coreset, "size", bundle_dir, "coreset")
    index = _get(manifest, "index", dict, bundle_dir)
    for key in ("M", "ef_construction", "ef"):
        _positive_int(index, key, bundle_dir, "index")
    score = _get(manifest, "score", dict, bundle_dir)
    _positive_int(score, "reweight_neighbours", bundle_dir, "score")
    _positive_int(score, "rerank", bundle_dir, "score")
    files = _get(manifest, "files", dict, bundle_dir)
    for name in V1_REQUIRED_FILES:
        _require(name in files, bundle_dir, f"required file {name} is not listed")


def _migrate_v1(manifest: Mapping[str, Any]) -> Dict[str, Any]:
    """A version 1 manifest as version 2, in memory: the PatchCore settings move into the method section."""
    migrated = json.loads(json.dumps(manifest))
    coreset = migrated.pop("coreset")
    index = migrated.pop("index")
    score = migrated["score"]
    size, dim = int(coreset["size"]), int(migrated["features"]["dim"])
    b = int(score.pop("reweight_neighbours"))
    migrated["method"] = {
        "name": "patchcore",
        "params": {"reweight_neighbours": b, "rerank": int(score.pop("rerank")), "coreset": coreset,
                   "index": index},
        "arrays": {"memory_bank": {"file": "memory_bank.npy", "dtype": "float32", "shape": [size, dim]},
                   "bank_neighbours": {"file": "bank_neighbours.npy", "dtype": "int32", "shape": [size, b]}},
        "files": {"index": "index.hnsw"},
    }
    score.pop("method", None)
    migrated["features"].setdefault("outputs", [migrated["features"]["output_name"]])
    migrated["format_version"] = FORMAT_VERSION
    migrated["migrated_from"] = 1
    return migrated


def _validate_method(manifest: Mapping[str, Any], bundle_dir: Path) -> None:
    method = _get(manifest, "method", dict, bundle_dir)
    _require(isinstance(method.get("name"), str) and method["name"] != "", bundle_dir, "method.name missing")
    _require(isinstance(method.get("params", {}), dict), bundle_dir, "method.params must be an object")
    files = manifest["files"]
    arrays = method.get("arrays", {})
    _require(isinstance(arrays, dict), bundle_dir, "method.arrays must be an object")
    for key, record in arrays.items():
        _require(isinstance(record, dict), bundle_dir, f"method.arrays[{key!r}] must be an object")
        name = _safe_name(record.get("file"), bundle_dir)
        _require(name in files, bundle_dir, f"method array {key!r} names {name}, which is not listed")
        _require(record.get("dtype") in ARRAY_DTYPES, bundle_dir,
                 f"method.arrays[{key!r}].dtype must be one of {', '.join(ARRAY_DTYPES)}")
        shape = record.get("shape")
        _require(isinstance(shape, list) and 1 <= len(shape) <= 8
                 and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape), bundle_dir,
                 f"method.arrays[{key!r}].shape must be a list of positive integers, got {shape!r}")
    others = method.get("files", {})
    _require(isinstance(others, dict), bundle_dir, "method.files must be an object")
    for key, name in others.items():
        _require(_safe_name(name, bundle_dir) in files, bundle_dir,
                 f"method file {key!r} names {name}, which is not listed")
    outputs = manifest["features"].get("outputs")
    _require(isinstance(outputs, list) and len(outputs) >= 1 and all(isinstance(o, str) for o in outputs),
             bundle_dir, "features.outputs must list the network's output names")
    # Each output's shape after the batch (written since several outputs exist; optional, so older bundles load):
    # what a TensorRT engine's buffers and the ONNX model are checked against.
    shapes = manifest["features"].get("output_shapes")
    if shapes is not None:
        _require(isinstance(shapes, dict) and all(name in outputs for name in shapes)
                 and all(isinstance(s, list) and 1 <= len(s) <= 8
                         and all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_COUNT for n in s)
                         for s in shapes.values()), bundle_dir,
                 "features.output_shapes must map output names to their shapes after the batch (positive "
                 f"integers), got {shapes!r}")
        # features.grid and dim are the first output's, except where they are a map's cells (the trained patch
        # methods, whose embedding grids each have their own shape).
        if manifest["features"].get("grid_is") != "map cells":
            grid, dim = manifest["features"]["grid"], manifest["features"]["dim"]
            first = shapes.get(outputs[0], [*grid, dim])
            _require(first == [*grid, dim], bundle_dir,
                     f"features.output_shapes[{outputs[0]!r}] is {first}, but grid and dim say {[*grid, dim]}")


def validate_manifest(manifest: Any, bundle_dir: Path) -> Dict[str, Any]:
    """Check the schema of a manifest dict; raise BundleError naming the first problem.

    Returns the manifest in the current format version (a version 1 manifest is migrated in memory).
    """
    _require(isinstance(manifest, dict), bundle_dir, "is not a JSON object")
    _require(manifest.get("format") == FORMAT_NAME, bundle_dir,
             f"not a patchcore-edge bundle (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    _require(isinstance(version, int) and not isinstance(version, bool), bundle_dir, "missing format_version")
    if version not in READABLE_VERSIONS:
        raise BundleError(
            f"{bundle_dir / MANIFEST}: bundle format version {version} is not supported by this patchcore-edge "
            f"(it reads versions {', '.join(map(str, READABLE_VERSIONS))}); re-export the bundle with this "
            "version, or install the patchcore-edge version that made it")
    _validate_common(manifest, bundle_dir)
    if version == 1:
        _validate_v1(manifest, bundle_dir)
        manifest = _migrate_v1(manifest)
    _validate_method(manifest, bundle_dir)
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
        aside = [p for p in leftovers(folder.absolute()) if ".old-" in p.name]
        if aside:
            raise BundleError(f"{folder}: no such bundle folder; an interrupted export left the previous bundle at "
                              f"{aside[-1]}: rename it back to {folder.name}")
        raise BundleError(f"{folder}: no such bundle folder")
    if not path.is_file():
        raise BundleError(f"{path}: missing; {folder} is not a bundle (or its export was interrupted): export it again")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: too large to be a manifest")
    try:
        manifest = strict_json_loads(path.read_text(encoding="utf-8"), path)
    except UnicodeDecodeError:
        raise BundleError(f"{path}: not UTF-8 text; restore it from the exported bundle") from None
    except ValueError as error:
        raise BundleError(f"{error}; restore it from the exported bundle") from None
    manifest = validate_manifest(manifest, folder)
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
    check_replaceable(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    report_leftovers(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        manifest = build(staging)
        manifest = dict(manifest)
        manifest["files"] = {p.name: file_record(p) for p in sorted(staging.iterdir()) if p.is_file()
                             and p.name != MANIFEST}
        validate_manifest(manifest, staging)
        write_file_atomic(staging / MANIFEST, manifest_bytes(manifest))
        for path in staging.iterdir():
            if path.is_file():
                _ordinary_permissions(path, folder=False)
        _ordinary_permissions(staging, folder=True)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{int(time.time() * 1000)}"
            os.replace(target, old)
        try:
            os.replace(staging, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)  # put the previous bundle back before reporting the failure
            raise
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def is_our_bundle(folder: Path) -> bool:
    """A folder whose manifest.json says it is a patchcore-edge bundle (its files may be damaged)."""
    try:
        manifest = strict_json_loads((folder / MANIFEST).read_text(encoding="utf-8"), folder / MANIFEST)
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME


def check_replaceable(target: Path, force: bool) -> None:
    """Refuse, with the reason, to put a bundle where something that is not ours would be lost.

    --force replaces only a bundle (a folder with a manifest.json of ours) or an empty folder: a folder of
    training images, a home directory or a file is never deleted.
    """
    if not (target.exists() or target.is_symlink()):
        return
    if not target.is_dir():
        raise BundleError(f"{target}: exists and is not a folder; choose another output folder")
    empty = not any(target.iterdir())
    if empty:
        return
    if not is_our_bundle(target):
        raise BundleError(f"{target}: exists and is not a patchcore-edge bundle (no manifest.json of ours); "
                          "it is never replaced, even with --force: choose another output folder")
    if not force:
        raise BundleError(f"{target}: already exists; pass --force to overwrite it or choose another output folder")


def leftovers(target: Path) -> List[Path]:
    """Hidden `.NAME.staging-*` / `.NAME.old-*` folders an interrupted export left beside `target`."""
    parent = Path(target).parent
    if not parent.is_dir():
        return []
    prefix = f".{Path(target).name}."
    return sorted(p for p in parent.iterdir() if p.name.startswith(prefix)
                  and (p.name[len(prefix):].startswith("staging-") or p.name[len(prefix):].startswith("old-")))


# A staging folder untouched for this long belongs to an export that was killed, not one still running.
STALE_STAGING_S = 3600.0


def report_leftovers(target: Path) -> None:
    """Clean up what an interrupted export left (stale staging folders; an old bundle superseded by a valid one),
    and report, with its path, a previous bundle a kill left moved aside while the target is missing."""
    log = logging.getLogger("patchcore_edge")
    for path in leftovers(target):
        if ".old-" in path.name and not target.exists() and is_our_bundle(path):
            log.warning("%s: an interrupted export left the previous bundle here; %s is missing (rename it back "
                        "to keep it)", path, target)
            continue
        if ".staging-" in path.name and time.time() - path.stat().st_mtime < STALE_STAGING_S:
            log.warning("%s: another export may be writing here (staging folder younger than an hour); left "
                        "alone", path)
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by an interrupted export", path)


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


LOCK_FILE = ".patchcore-edge.lock"


@contextmanager
def bundle_lock(bundle_dir: os.PathLike | str, job: str, wait_s: float = 30.0) -> Iterator[None]:
    """Hold the bundle's lock while `job` changes it: a second calibration of the same bundle fails at once with
    a message instead of silently dropping the first one's file from the manifest. The lock file is removed
    on release (a kill leaves it unlocked: flock locks die with their process). Waits up to wait_s first."""
    path = Path(bundle_dir) / LOCK_FILE
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise BundleError(f"{path}: cannot create the lock file ({error.strerror or error})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            raise BundleError(f"{Path(bundle_dir)}: {holder} is changing this bundle; wait for it to finish and "
                              f"run {job} again (lock file {path})") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file between our open and our lock: take the new one
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{job} (pid {os.getpid()})\n".encode())
        yield
    finally:
        try:
            path.unlink()
        except OSError:
            pass
        os.close(fd)


def utc_stamp() -> str:
    """A file-name-safe UTC timestamp with milliseconds, for unique bundle file names."""
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}Z"


# ---------------------------------------------------------------------------------------------- the Bundle


@dataclass(frozen=True)
class FeaturesInfo:
    """The exported network: `onnx_file` maps input `input_name` [B, 3, H, W] to the named `outputs`."""

    onnx_file: str
    input_name: str
    outputs: Tuple[str, ...]
    dim: int
    grid: Tuple[int, int]
    stride: int
    # Shape after the batch of each output (bundles older than output_shapes: the first one's, [grid, dim]).
    output_shapes: Mapping[str, Tuple[int, ...]] = field(default_factory=dict)

    def output_shape(self, name: str) -> Tuple[int, ...]:
        """An output's shape after the batch."""
        return tuple(self.output_shapes[name])

    @property
    def output_name(self) -> str:
        """The first (for PatchCore: the only) output, the patch-feature grid [B, h, w, dim]."""
        return self.outputs[0]


def _output_shapes(features: Mapping[str, Any]) -> Dict[str, Tuple[int, ...]]:
    first = (int(features["grid"][0]), int(features["grid"][1]), int(features["dim"]))
    recorded = features.get("output_shapes") or {}
    return {str(features["outputs"][0]): first,
            **{str(name): tuple(int(n) for n in shape) for name, shape in recorded.items()}}


@dataclass(frozen=True)
class ArrayRecord:
    file: str
    dtype: str
    shape: Tuple[int, ...]


@dataclass(frozen=True)
class MethodInfo:
    """The scoring method: its registered name, its own settings and the bundle arrays/files it owns."""

    name: str
    params: Mapping[str, Any]
    arrays: Mapping[str, ArrayRecord]
    files: Mapping[str, str]


@dataclass(frozen=True)
class CalibrationRef:
    file: str
    previous: Optional[str]


class Bundle:
    """A loaded, validated bundle. The only code that knows the manifest's keys: everything else asks it."""

    def __init__(self, path: Path, manifest: Dict[str, Any]) -> None:
        self.path = Path(path)
        self._manifest = manifest
        features = manifest["features"]
        self.features = FeaturesInfo(
            onnx_file=str(features["onnx_file"]), input_name=str(features["input_name"]),
            outputs=tuple(str(o) for o in features["outputs"]), dim=int(features["dim"]),
            grid=(int(features["grid"][0]), int(features["grid"][1])), stride=int(features["stride"]),
            output_shapes=MappingProxyType(_output_shapes(features)))
        method = manifest["method"]
        self.method = MethodInfo(
            name=str(method["name"]), params=MappingProxyType(json.loads(json.dumps(method.get("params", {})))),
            arrays=MappingProxyType({key: ArrayRecord(str(r["file"]), str(r["dtype"]), tuple(int(n) for n in r["shape"]))
                                     for key, r in method.get("arrays", {}).items()}),
            files=MappingProxyType({key: str(name) for key, name in method.get("files", {}).items()}))

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def draft(cls, dim: int, grid: Sequence[int], crop: int, onnx_bytes: int,
              arrays: Mapping[str, Tuple[str, Sequence[int]]], params: Mapping[str, Any],
              method: str = "patchcore") -> "Bundle":
        """A bundle that exists only as numbers, for estimates before an export (size caps): no files."""
        manifest = {
            "input": InputSpec(resize=crop, crop=crop).to_manifest(), "score": {"gaussian_sigma": 0.0},
            "features": {"dim": int(dim), "grid": [int(grid[0]), int(grid[1])], "stride": 1,
                         "onnx_file": "features.onnx", "input_name": "image", "outputs": ["features"]},
            "method": {"name": method, "params": dict(params), "files": {},
                       "arrays": {key: {"file": f"{key}.npy", "dtype": dtype, "shape": [int(n) for n in shape]}
                                  for key, (dtype, shape) in arrays.items()}},
            "files": {"features.onnx": {"sha256": "0" * 64, "bytes": int(onnx_bytes)}}, "engines": [],
        }
        return cls(Path("<draft>"), manifest)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], verify: bool = True, verify_calibration: bool = True) -> "Bundle":
        """Read and validate a bundle; with verify, every listed file's size and sha256 are checked too.

        verify_calibration=False skips the calibration files' check (calibrate replaces a damaged one).
        """
        folder = Path(path)
        manifest = read_manifest(folder, verify_files=False)
        if verify:
            check_files(folder, manifest, skip=() if verify_calibration else calibration_files(manifest))
        return cls(folder, manifest)

    def reload(self) -> "Bundle":
        return Bundle.load(self.path, verify=False)

    def file(self, name: str) -> Path:
        """Path of a file the bundle lists (BundleError for any other name)."""
        if name not in self._manifest["files"]:
            raise BundleError(f"{self.path / name}: not a file of this bundle")
        return self.path / name

    def has_file(self, name: str) -> bool:
        return name in self._manifest["files"]

    def file_sha256(self, name: str) -> str:
        return str(self._manifest["files"][name]["sha256"])

    def file_bytes(self, name: str) -> int:
        return int(self._manifest["files"][name]["bytes"])

    @property
    def file_names(self) -> Tuple[str, ...]:
        return tuple(self._manifest["files"])

    def method_array(self, key: str) -> np.ndarray:
        """One of the method's arrays, dtype and shape checked against the manifest record."""
        record = self.method.arrays.get(key)
        if record is None:
            raise BundleError(f"{self.path / MANIFEST}: method {self.method.name} has no array {key!r}; "
                              "re-export the bundle")
        return load_array(self.path, record.file, np.dtype(record.dtype), record.shape)

    def method_file(self, key: str) -> Path:
        name = self.method.files.get(key)
        if name is None:
            raise BundleError(f"{self.path / MANIFEST}: method {self.method.name} has no file {key!r}; "
                              "re-export the bundle")
        return self.path / name

    # ------------------------------------------------------------------------------------------ parts

    @property
    def format_version(self) -> int:
        return int(self._manifest["format_version"])

    @property
    def toolkit_version(self) -> str:
        return str(self._manifest["toolkit_version"])

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_manifest(self._manifest["input"])

    @property
    def backbone(self) -> Mapping[str, Any]:
        return MappingProxyType(dict(self._manifest["backbone"]))

    @property
    def layers(self) -> Tuple[str, ...]:
        return tuple(self._manifest["layers"])

    @property
    def map_sigma(self) -> float:
        """Gaussian blur of the pixel map, in network-input pixels."""
        return float(self._manifest["score"]["gaussian_sigma"])

    @property
    def map_range(self) -> Optional[Tuple[float, float]]:
        given = self._manifest["score"].get("map_range")
        if isinstance(given, list) and len(given) == 2 and all(isinstance(v, (int, float)) for v in given):
            return float(given[0]), float(given[1])
        return None

    @property
    def training_scores(self) -> Optional[Dict[str, float]]:
        """Quantiles (q..., min, max, n) of training images scored as new parts, recorded at export."""
        recorded = self._manifest["score"].get("training_scores")
        if isinstance(recorded, dict):
            candidate = recorded.get("quantiles", recorded)
            if isinstance(candidate, dict):
                return {str(k): float(v) for k, v in candidate.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if isinstance(recorded, list):  # an early form: the plain scores
            values = [float(v) for v in recorded if isinstance(v, (int, float))]
            if values:
                return {"max": max(values), "min": min(values), "n": float(len(values))}
        return None

    @property
    def coverage_radius(self) -> Optional[float]:
        """Largest distance of a training patch to the bank, when the method kept a coreset and measured it."""
        coreset = self.method.params.get("coreset")
        value = None
        if isinstance(coreset, Mapping):
            # Above a few hundred thousand patches only the selection's upper bound is recorded.
            value = coreset.get("coverage_radius")
            value = coreset.get("coverage_radius_bound") if value is None else value
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def engines(self) -> List[Dict[str, Any]]:
        """The TensorRT engine entries (their schema belongs to `patchcore_edge.trt`)."""
        return [dict(entry) for entry in self._manifest.get("engines") or []]

    @property
    def calibration(self) -> Optional[CalibrationRef]:
        entry = self._manifest.get("calibration")
        if not entry:
            return None
        return CalibrationRef(str(entry["file"]), entry.get("previous"))

    @property
    def training_images_file(self) -> Optional[Path]:
        entry = self._manifest.get("training_images")
        name = entry.get("file") if isinstance(entry, dict) else None
        if name is None:
            return None
        return self.path / _safe_name(name, self.path)

    @property
    def training_image_count(self) -> Optional[int]:
        entry = self._manifest.get("training_images")
        count = entry.get("count") if isinstance(entry, dict) else None
        return int(count) if isinstance(count, int) else None

    def fingerprint(self) -> Dict[str, str]:
        """sha256 of the files that define the scores: a calibration is valid for this bundle only."""
        names = {"features_sha256": self.features.onnx_file}
        for key, record in self.method.arrays.items():
            names[f"{key}_sha256"] = record.file
        return {key: self.file_sha256(name) for key, name in names.items() if self.has_file(name)}

    def describe(self) -> Dict[str, Any]:
        """What says which model this is, for reports (no file list)."""
        m = self._manifest
        return {
            "format_version": self.format_version, "toolkit_version": self.toolkit_version,
            "backbone": dict(m["backbone"]), "layers": list(m["layers"]), "input": dict(m["input"]),
            "features": {"dim": self.features.dim, "grid": list(self.features.grid), "stride": self.features.stride},
            "method": {"name": self.method.name, "params": json.loads(json.dumps(dict(self.method.params)))},
            "score": {k: v for k, v in m["score"].items() if k != "training_scores"},
            "engines": [{k: e.get(k) for k in ("file", "device", "precision")} for e in self.engines],
            "calibrated": self.calibration is not None,
            "bytes": sum(int(r["bytes"]) for r in m["files"].values()),
        }

    def manifest_copy(self) -> Dict[str, Any]:
        """A deep copy of the manifest, for records that keep it whole (never for looking up fields)."""
        return json.loads(json.dumps(self._manifest))

    # ------------------------------------------------------------------------------------------ changes

    def set_calibration(self, name: str, data: bytes, remove_older: bool = True) -> "Bundle":
        """Add calibration file `name` as the current one; the current becomes previous, the older goes."""
        current = self.calibration
        previous = current.file if current else None
        older = current.previous if current else None
        remove = [older] if remove_older and older and older != previous and self.has_file(older) else []

        def edit(edited: Dict[str, Any]) -> None:
            edited["calibration"] = {"file": name, "previous": previous}

        update_bundle(self.path, {name: data}, edit, remove=remove)
        return self.reload()

    def swap_calibrations(self) -> "Bundle":
        """Make the previous calibration the current one and the current the previous."""
        current = self.calibration
        if current is None or not current.previous:
            raise BundleError(f"{self.path}: there is no previous calibration")

        def edit(edited: Dict[str, Any]) -> None:
            edited["calibration"] = {"file": current.previous, "previous": current.file}

        update_bundle(self.path, {}, edit)
        return self.reload()

    def set_engines(self, entries: Sequence[Mapping[str, Any]], new_files: Mapping[str, bytes],
                    remove: Sequence[str] = ()) -> "Bundle":
        """Replace the engine list (entries from `patchcore_edge.trt`), adding and removing their files."""

        def edit(edited: Dict[str, Any]) -> None:
            edited["engines"] = [dict(e) for e in entries]

        update_bundle(self.path, new_files, edit, remove=remove)
        return self.reload()

    def unique_name(self, base: str, suffix: str) -> str:
        """A file name not yet used in the bundle folder: base+suffix, else base-2+suffix, ..."""
        name, n = f"{base}{suffix}", 1
        while self.has_file(name) or (self.path / name).exists():
            n += 1
            name = f"{base}-{n}{suffix}"
        return name
