from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from patchcore_edge.imageio import ImageReadError, list_images, read_rgb


def _write(path: Path, array: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), array)
    return path


def test_colour_png_is_rgb(tmp_path: Path) -> None:
    bgr = np.zeros((5, 7, 3), np.uint8)
    bgr[..., 0] = 200  # blue in OpenCV's order
    rgb = read_rgb(_write(tmp_path / "c.png", bgr))
    assert rgb.shape == (5, 7, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [0, 0, 200]


def test_gray_16bit_and_rgba_are_converted(tmp_path: Path) -> None:
    gray = read_rgb(_write(tmp_path / "g.png", np.full((4, 4), 77, np.uint8)))
    assert gray.shape == (4, 4, 3) and (gray == 77).all()
    deep = read_rgb(_write(tmp_path / "d.png", np.full((4, 4), 65535, np.uint16)))
    assert deep.dtype == np.uint8 and (deep == 255).all()
    mid = read_rgb(_write(tmp_path / "m.png", np.full((4, 4), 257 * 100, np.uint16)))
    assert (mid == 100).all()
    rgba = np.zeros((3, 3, 4), np.uint8)
    rgba[..., 2] = 9  # red in BGRA
    rgba[..., 3] = 0
    out = read_rgb(_write(tmp_path / "a.png", rgba))
    assert out.shape == (3, 3, 3) and out[0, 0].tolist() == [9, 0, 0]


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"this is not an image", "not a readable image"),
])
def test_bad_files_name_the_reason(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as info:
        read_rgb(path)
    assert reason in str(info.value) and str(path) in str(info.value)


def test_truncated_png_is_an_error(tmp_path: Path) -> None:
    good = _write(tmp_path / "ok.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = good.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError):
        read_rgb(cut)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="not found"):
        read_rgb(tmp_path / "nope.png")


def test_list_images_sorts_and_reports_other_files(tmp_path: Path) -> None:
    for name in ("b.png", "a.JPG", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    images, skipped = list_images(tmp_path)
    assert [p.name for p in images] == ["a.JPG", "b.png"]
    assert [e.path for e in skipped] == [str(tmp_path / "notes.txt")]
    assert "not an image file" in skipped[0].reason


# ---------------------------------------------------------------------------------------------- hostile files

import os
import struct
import zlib

from patchcore_edge.imageio import ImageLimits, get_limits, header_size, set_limits


def _png_header_only(width: int, height: int, rows: int = 0) -> bytes:
    """A PNG that declares width x height but carries at most `rows` rows of (zero) pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\0" * ((width * 3 + 1) * rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height, words", [(40000, 40000, "over the limit"), (16000, 1, "aspect ratio"),
                                                  (30000, 30000, "--max-image-pixels")])
def test_png_bombs_are_refused_from_the_header(tmp_path: Path, width: int, height: int, words: str) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(width, height))
    assert len(bomb.read_bytes()) < 200
    with pytest.raises(ImageReadError) as caught:
        read_rgb(bomb)
    assert words in caught.value.reason and str(bomb) in str(caught.value)


def test_header_sizes_of_real_encodings(tmp_path: Path) -> None:
    image = np.zeros((7, 11, 3), np.uint8)
    for suffix in (".png", ".jpg", ".bmp", ".tif", ".webp", ".ppm"):
        ok, encoded = cv2.imencode(suffix, image)
        assert ok
        assert header_size(encoded.tobytes()) == (11, 7), suffix


def test_limits_can_be_raised(tmp_path: Path) -> None:
    wide = tmp_path / "wide.png"
    assert cv2.imwrite(str(wide), np.zeros((2, 60, 3), np.uint8))
    with pytest.raises(ImageReadError, match="aspect ratio"):
        read_rgb(wide)
    before = get_limits()
    set_limits(ImageLimits(before.max_pixels, 40.0))
    try:
        assert read_rgb(wide).shape == (2, 60, 3)
    finally:
        set_limits(before)


def test_fifo_dangling_link_are_skipped_with_reasons_never_block(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _write(folder / "good.png", np.zeros((4, 4, 3), np.uint8))
    os.mkfifo(folder / "pipe.png")
    os.symlink(folder / "gone.png", folder / "link.png")
    images, skipped = list_images(folder)
    assert images == [folder / "good.png"]
    reasons = {Path(e.path).name: e.reason for e in skipped}
    assert "FIFO" in reasons["pipe.png"] and reasons["link.png"] == "dangling symbolic link"
    with pytest.raises(ImageReadError, match="FIFO"):
        read_rgb(folder / "pipe.png")  # O_NONBLOCK: returns at once although no writer exists
    with pytest.raises(ImageReadError, match="dangling"):
        read_rgb(folder / "link.png")
