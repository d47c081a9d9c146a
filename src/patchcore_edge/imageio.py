"""Decode image files into RGB uint8 arrays, whatever their bit depth or channel count."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple

import cv2
import numpy as np
from .errors import FileProblem

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"})


class ImageReadError(FileProblem):
    """An image file that cannot be used, with the reason in words a user can act on."""



def to_rgb8(decoded: np.ndarray, path: os.PathLike | str = "<array>") -> np.ndarray:
    """Convert an array as OpenCV decodes it (BGR/BGRA/gray, 8 or 16 bit, or float) to RGB uint8."""
    image = decoded
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or image.size == 0:
        raise ImageReadError(path, f"unsupported image shape {decoded.shape}")
    if image.dtype == np.uint16:
        # 257 maps 65535 exactly onto 255, so full-range 16-bit images keep their full 8-bit range.
        image = (image.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageReadError(path, f"unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    channels = image.shape[2]
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:
        # Alpha is dropped rather than composited: inspection images are opaque and the colour is what counts.
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise ImageReadError(path, f"unsupported number of channels: {channels}")


def decode_rgb(data: bytes, path: os.PathLike | str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, ...) to RGB uint8."""
    if len(data) == 0:
        raise ImageReadError(path, "empty file")
    buffer = np.frombuffer(data, dtype=np.uint8)
    decoded = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise ImageReadError(path, "not a readable image (unknown format, truncated or corrupt)")
    return to_rgb8(decoded, path)


def read_rgb(path: os.PathLike | str) -> np.ndarray:
    """Read an image file as an RGB uint8 array of shape (H, W, 3); raise ImageReadError with the reason."""
    try:
        data = Path(path).read_bytes()
    except IsADirectoryError:
        raise ImageReadError(path, "is a folder, not an image file") from None
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as error:
        raise ImageReadError(path, f"cannot read file ({error.strerror or error})") from None
    return decode_rgb(data, path)


def list_images(folder: os.PathLike | str, recursive: bool = False) -> Tuple[List[Path], List[ImageReadError]]:
    """Image files in a folder (by suffix), sorted; plus the other files, as errors saying why they are skipped.

    Hidden files (names starting with '.') are ignored silently.
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    candidates: Iterable[Path] = root.rglob("*") if recursive else root.iterdir()
    images: List[Path] = []
    skipped: List[ImageReadError] = []
    for path in sorted(p for p in candidates if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            skipped.append(ImageReadError(path, f"not an image file (suffix {path.suffix or 'none'!r})"))
    return images, skipped


def read_many(paths: Sequence[Path]) -> Tuple[List[Tuple[Path, np.ndarray]], List[ImageReadError]]:
    """Read every path; return the images that decoded and the errors of the ones that did not."""
    images: List[Tuple[Path, np.ndarray]] = []
    errors: List[ImageReadError] = []
    for path in paths:
        try:
            images.append((path, read_rgb(path)))
        except ImageReadError as error:
            errors.append(error)
    return images, errors
