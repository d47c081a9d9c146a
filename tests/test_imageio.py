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
