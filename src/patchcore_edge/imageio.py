"""Decode image files into RGB uint8 arrays, whatever their bit depth or channel count."""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from .errors import FileProblem

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"})


class ImageReadError(FileProblem):
    """An image file that cannot be used, with the reason in words a user can act on."""


@dataclass(frozen=True)
class ImageLimits:
    """What an image may declare in its header before any pixel is decoded.

    The defaults fit every real camera (100 MP is above the largest industrial area-scan sensors; 20:1 above
    panoramic and most line-scan frames), and keep decoding memory bounded: at most max_pixels x 8 bytes
    (16-bit RGBA), a tiny "decompression bomb" that declares 40000x40000 is refused from its 33-byte header.
    Raised with `patchcore-edge --max-image-pixels N --max-aspect-ratio R COMMAND`.
    """

    max_pixels: int = 100_000_000
    max_aspect: float = 20.0


_limits = ImageLimits()


def set_limits(limits: ImageLimits) -> None:
    """Set the header limits for every later read (the CLI's --max-image-pixels / --max-aspect-ratio)."""
    global _limits
    if limits.max_pixels < 1 or not limits.max_aspect >= 1.0:
        raise ValueError(f"image limits need max_pixels >= 1 and max_aspect >= 1, got {limits}")
    _limits = limits


def get_limits() -> ImageLimits:
    return _limits


def _png_size(data: bytes) -> Optional[Tuple[int, int]]:
    if len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    return None


_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _jpeg_size(data: bytes) -> Optional[Tuple[int, int]]:
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            at += 2
            continue
        length = struct.unpack(">H", data[at + 2:at + 4])[0]
        if marker in _JPEG_SOF:
            if at + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            return width, height
        at += 2 + length
    return None


def _bmp_size(data: bytes) -> Optional[Tuple[int, int]]:
    if len(data) < 26:
        return None
    if struct.unpack("<I", data[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER
        width, height = struct.unpack("<HH", data[18:22])
        return width, height
    width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)


def _webp_size(data: bytes) -> Optional[Tuple[int, int]]:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = struct.unpack("<I", data[21:25])[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    return None


def _tiff_size(data: bytes) -> Optional[Tuple[int, int]]:
    order = "<" if data[:2] == b"II" else ">"
    if len(data) < 8 or struct.unpack(order + "H", data[2:4])[0] != 42:
        return None  # BigTIFF and others: left to the decoder's own limit
    offset = struct.unpack(order + "I", data[4:8])[0]
    if offset + 2 > len(data):
        return None
    count = struct.unpack(order + "H", data[offset:offset + 2])[0]
    found = {}
    for i in range(count):
        entry = data[offset + 2 + 12 * i:offset + 14 + 12 * i]
        if len(entry) < 12:
            return None
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (256, 257):
            found[tag] = struct.unpack(order + ("H" if kind == 3 else "I"), entry[8:10] if kind == 3 else entry[8:12])[0]
    if 256 in found and 257 in found:
        return found[256], found[257]
    return None


def _pnm_size(data: bytes) -> Optional[Tuple[int, int]]:
    fields: List[bytes] = []
    for line in data[:4096].split(b"\n"):
        fields.extend(line.split(b"#", 1)[0].split())
        if len(fields) >= 3:
            break
    try:
        return int(fields[1]), int(fields[2])
    except (IndexError, ValueError):
        return None


def header_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) an encoded image declares in its header; None when the format is not recognised."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png_size(data)
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    if data[:2] == b"BM":
        return _bmp_size(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_size(data)
    if data[:1] == b"P" and data[1:2] in b"123456":
        return _pnm_size(data)
    return None


def check_header(data: bytes, path: os.PathLike | str, limits: Optional[ImageLimits] = None) -> None:
    """Refuse an image whose header declares more pixels or a longer aspect ratio than the limits allow."""
    limits = limits or _limits
    size = header_size(data)
    if size is None:
        return  # not a format we parse: OpenCV's own pixel limit (OPENCV_IO_MAX_IMAGE_PIXELS) still applies
    width, height = size
    if width < 1 or height < 1:
        raise ImageReadError(path, f"the header declares an empty image ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageReadError(path, f"the header declares {width}x{height} = {width * height:,} pixels, over the "
                                   f"limit of {limits.max_pixels:,} (raise it with --max-image-pixels)")
    if max(width, height) > limits.max_aspect * min(width, height):
        raise ImageReadError(path, f"the header declares {width}x{height}, an aspect ratio over "
                                   f"{limits.max_aspect:g}:1 (raise it with --max-aspect-ratio)")



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
    check_header(data, path)
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        decoded = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    except cv2.error as error:  # OpenCV raises (instead of returning None) on images over its own limits
        message = str(error).strip().splitlines()[-1] if str(error).strip() else "decoder error"
        raise ImageReadError(path, f"not a readable image ({message})") from None
    if decoded is None:
        raise ImageReadError(path, "not a readable image (unknown format, truncated or corrupt)")
    return to_rgb8(decoded, path)


def read_rgb(path: os.PathLike | str) -> np.ndarray:
    """Read an image file as an RGB uint8 array of shape (H, W, 3); raise ImageReadError with the reason."""
    return decode_rgb(read_image_bytes(path), path)


def read_image_bytes(path: os.PathLike | str) -> bytes:
    """The encoded bytes of an image file; a folder, FIFO, device, dangling link or oversized file is refused
    (ImageReadError with the reason) without blocking."""
    try:
        return _read_regular(Path(path))
    except IsADirectoryError:
        raise ImageReadError(path, "is a folder, not an image file") from None
    except FileNotFoundError:
        reason = "dangling symbolic link" if os.path.islink(path) else "file not found"
        raise ImageReadError(path, reason) from None
    except OSError as error:
        raise ImageReadError(path, f"cannot read file ({error.strerror or error})") from None


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _read_regular(path: Path) -> bytes:
    """The bytes of a regular file; a FIFO or device is refused without blocking (O_NONBLOCK, then fstat)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(info.st_mode):
            raise ImageReadError(path, f"{_special_kind(info.st_mode)}, not an image file")
        # An encoded image is never larger than its raw 16-bit RGBA pixels; a bigger file is not worth reading.
        budget = _limits.max_pixels * 8 + (1 << 20)
        if info.st_size > budget:
            raise ImageReadError(path, f"file of {info.st_size:,} bytes is larger than any image within the "
                                       f"pixel limit ({_limits.max_pixels:,}, raise it with --max-image-pixels)")
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read(budget + 1)
    finally:
        os.close(fd)


def list_images(folder: os.PathLike | str, recursive: bool = False) -> Tuple[List[Path], List[ImageReadError]]:
    """Image files in a folder (by suffix), sorted; plus the other files, as errors saying why they are skipped.

    Hidden files (names starting with '.') are ignored silently. Dangling symbolic links, FIFOs, sockets and
    devices are skipped with their reason (opening a FIFO would block the run).
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    candidates: Iterable[Path] = root.rglob("*") if recursive else root.iterdir()
    images: List[Path] = []
    skipped: List[ImageReadError] = []
    for path in sorted(p for p in candidates if not p.name.startswith(".")):
        reason = skip_reason(path)
        if reason == "folder":
            continue
        if reason is not None:
            skipped.append(ImageReadError(path, reason))
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            skipped.append(ImageReadError(path, f"not an image file (suffix {path.suffix or 'none'!r})"))
    return images, skipped


def skip_reason(path: Path) -> Optional[str]:
    """None for a regular file (links followed); "folder" for a folder; else why the entry is skipped."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "dangling symbolic link" if path.is_symlink() else "vanished while listing"
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return None
    return f"{_special_kind(mode)}, not an image file"


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
