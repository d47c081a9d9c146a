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
