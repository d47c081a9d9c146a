from __future__ import annotations

import numpy as np
import pytest

from patchcore_edge.preprocess import (InputSpec, Tile, geometry, map_to_image, patch_validity, preprocess,
                                      region_mask, stitch_maps, tile_boxes)


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


@pytest.mark.parametrize("height, width, size", [
    (900, 900, (224, 224)),   # the default bottle bundle: squash 900 -> 224, factor 4.02
    (1080, 1920, (448, 224)),  # 2:1 input
    (641, 479, (100, 90)),     # odd sizes
    (200, 1000, (224, 224)),   # height enlarged: the per-axis path, not the bands
])
@pytest.mark.parametrize("parallel", [False, True], ids=["one-thread", "two-threads"])
def test_squash_in_bands_equals_the_one_piece_resize(height: int, width: int, size: tuple, parallel: bool) -> None:
    import cv2

    from patchcore_edge.preprocess import resize_crop

    spec = InputSpec(fit="squash", size=size)
    image = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if height > size[1] and width > size[0]:
        expected = cv2.resize(image.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    else:  # area filter on the shrinking axis (width), then bilinear on the enlarging one
        expected = cv2.resize(cv2.resize(image.astype(np.float32), (size[0], height), interpolation=cv2.INTER_AREA),
                              size, interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(resize_crop(image, spec, parallel), expected)


def test_squash_and_letterbox_cover_the_whole_image() -> None:
    squash = geometry(200, 800, InputSpec(fit="squash", size=(448, 224)))
    assert (squash.resized_height, squash.resized_width, squash.top, squash.left) == (224, 448, 0, 0)
    box = geometry(200, 800, InputSpec(fit="letterbox"))  # 224x224: scale 0.28 -> 56x224, 84 rows padding
    assert (box.resized_height, box.resized_width, box.top, box.left) == (56, 224, -84, 0)
    crop = geometry(200, 800, InputSpec(resize=256, crop=224))
    assert squash.inspected_fraction == box.inspected_fraction == 1.0
    assert crop.inspected_fraction == pytest.approx(224 * 224 / (256 * 1024))


def test_letterbox_map_drops_the_padding_and_padding_patches_never_count() -> None:
    spec = InputSpec(fit="letterbox", size=(64, 64))
    geo = geometry(32, 128, spec)  # 64x16 image band, rows 24..39 of the input
    input_map = np.full((64, 64), 9.0, np.float32)
    input_map[24:40] = 1.0
    full = map_to_image(input_map, geo)
    assert full.shape == (32, 128) and np.allclose(full, 1.0)
    valid = patch_validity(geo, (8, 8))
    assert valid is not None
    assert valid.reshape(8, 8)[3:5].all() and not valid.reshape(8, 8)[:3].any() and not valid.reshape(8, 8)[5:].any()
    assert patch_validity(geometry(32, 128, InputSpec(fit="squash")), (8, 8)) is None


def test_non_square_map_back_and_region_of_interest() -> None:
    spec = InputSpec(fit="squash", size=(64, 32), roi=((0.0, 0.0), (0.5, 0.0), (0.5, 1.0), (0.0, 1.0)))
    geo = geometry(100, 300, spec)
    full = map_to_image(np.ones((32, 64), np.float32), geo)
    assert full.shape == (100, 300)
    mask = region_mask(100, 300, spec)
    assert mask is not None and mask[:, :148].all() and not mask[:, 152:].any()
    valid = patch_validity(geo, (4, 8), mask)
    assert valid is not None and valid.reshape(4, 8)[:, :4].all() and not valid.reshape(4, 8)[:, 4:].any()


def test_spec_round_trips_through_the_manifest() -> None:
    for spec in (InputSpec(), InputSpec(fit="letterbox", size=(448, 224)),
                 InputSpec(fit="squash", roi=((0.1, 0.1), (0.9, 0.1), (0.5, 0.9)))):
        assert InputSpec.from_manifest(spec.to_manifest()) == spec
    legacy = {"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.2] * 3}  # format-1 manifest
    assert InputSpec.from_manifest(legacy) == InputSpec(mean=(0.5,) * 3, std=(0.2,) * 3)
    with pytest.raises(ValueError, match="fit"):
        InputSpec(fit="stretch")


def test_tiles_cover_the_image_and_stitching_keeps_the_maximum() -> None:
    tiles = tile_boxes(1000, 2500, 512, 64)
    covered = np.zeros((1000, 2500), bool)
    for t in tiles:
        assert t.height == t.width == 512
        covered[t.top:t.top + t.height, t.left:t.left + t.width] = True
    assert covered.all()
    assert max(t.left for t in tiles) + 512 == 2500
    maps = [np.zeros((512, 512), np.float32) for _ in tiles]
    maps[-1][-1, -1] = 5.0
    stitched = stitch_maps(maps, tiles, 1000, 2500)
    assert stitched[-1, -1] == 5.0 and stitched.sum() == 5.0
    assert tile_boxes(100, 100, 512, 64) == [Tile(0, 0, 100, 100)]



@pytest.mark.parametrize("grid, size", [((28, 28), (224, 224)), ((4, 8), (64, 32)), ((5, 7), (56, 40)), ((1, 1), (9, 9))])
@pytest.mark.parametrize("sigma", [4.0, 1.5, 0.0])
def test_the_anomaly_map_is_the_opencv_chain_that_defines_it(grid: tuple, size: tuple, sigma: float) -> None:
    """Two products with per-axis weights give the bilinear resize then the Gaussian blur (up to float32 rounding),
    and every pixel stays a weighted mean of its patches: weights >= 0 summing to 1, none beyond map_reach_cells."""
    import cv2

    from patchcore_edge.maps import anomaly_map, axis_weights, gaussian_kernel_size, map_reach_cells

    patches = np.random.default_rng(0).gamma(2.0, 1.0, grid).astype(np.float32)
    width, height = size
    expected = cv2.resize(patches, (width, height), interpolation=cv2.INTER_LINEAR)
    if sigma > 0:
        k = gaussian_kernel_size(sigma)
        expected = cv2.GaussianBlur(expected, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    got = anomaly_map(patches, (width, height), sigma)
    assert got.shape == (height, width) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * float(expected.max()))
    reach = map_reach_cells(grid, max(size), sigma)
    for cells, pixels in ((grid[0], height), (grid[1], width)):
        weights = axis_weights(cells, pixels, sigma)
        assert weights.shape == (pixels, cells) and (weights >= 0).all() and not weights.flags.writeable
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
        cell = max(size) / max(grid)
        for i in range(cells):  # a unit patch reaches no pixel farther than map_reach_cells cells from it
            touched = np.flatnonzero(weights[:, i] > 0)
            assert (np.abs(touched + 0.5 - (i + 0.5) * pixels / cells) <= reach * cell).all()
