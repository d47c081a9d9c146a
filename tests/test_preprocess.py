from __future__ import annotations

import numpy as np
import pytest

from patchcore_edge.preprocess import InputSpec, geometry, map_to_image, preprocess


def test_shape_and_normalisation() -> None:
    spec = InputSpec(resize=64, crop=56)
    image = np.full((100, 150, 3), 255, np.uint8)
    out = preprocess(image, spec)
    assert out.shape == (3, 56, 56) and out.dtype == np.float32
    expected = (1.0 - np.asarray(spec.mean)) / np.asarray(spec.std)
    np.testing.assert_allclose(out[:, 10, 10], expected, rtol=1e-5)


def test_geometry_keeps_aspect_and_centres_crop() -> None:
    geo = geometry(900, 1200, InputSpec(resize=256, crop=224))
    assert (geo.resized_height, geo.resized_width) == (256, 341)
    assert (geo.top, geo.left) == (16, 58)


def test_map_back_to_image_geometry() -> None:
    spec = InputSpec(resize=64, crop=32)
    geo = geometry(128, 128, spec)
    crop_map = np.zeros((32, 32), np.float32)
    crop_map[12:20, 12:20] = 1.0
    crop_map[0, :] = 0.5
    full = map_to_image(crop_map, geo)
    assert full.shape == (128, 128)
    # The crop covers the central half of the image (scale 2): the hot square lands in the middle,
    # and the unseen border repeats the nearest crop values instead of pretending to be normal.
    assert full[64, 64] == pytest.approx(1.0) and full[40, 40] == 0.0
    assert full[2, 64] == pytest.approx(0.5)


@pytest.mark.parametrize("resize, crop", [(10, 8), (64, 65), (5000, 224)])
def test_invalid_specs_are_refused(resize: int, crop: int) -> None:
    with pytest.raises(ValueError):
        InputSpec(resize=resize, crop=crop)


@pytest.mark.parametrize("height, width, resize, crop", [
    (900, 900, 256, 224),    # MVTec: non-integer factor 3.52
    (1024, 768, 256, 224),   # integer factor 3 (OpenCV's fast area path), crop's top/left skipped too
    (1080, 1920, 256, 224),  # landscape, the long side cropped hard
    (257, 300, 256, 256),    # a hair of shrinking, crop = resize
    (641, 479, 64, 56),      # odd sizes, strong shrinking
])
@pytest.mark.parametrize("parallel", [False, True], ids=["one-thread", "two-threads"])
def test_shrinking_only_the_cropped_region_matches_resizing_the_whole_image(
        height: int, width: int, resize: int, crop: int, parallel: bool) -> None:
    import cv2

    from patchcore_edge.preprocess import resize_crop

    spec = InputSpec(resize=resize, crop=crop)
    image = np.random.default_rng(height + width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    geo = geometry(height, width, spec)
    whole = cv2.resize(image.astype(np.float32), (geo.resized_width, geo.resized_height),
                       interpolation=cv2.INTER_AREA)
    expected = whole[geo.top:geo.top + crop, geo.left:geo.left + crop]
    np.testing.assert_array_equal(resize_crop(image, spec, parallel), expected)
