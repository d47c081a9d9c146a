"""The torch reference transform (export) must feed the network the same pixels as OpenCV's (runtime)."""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from patchcore_edge.export.transform import area_matrix, torch_preprocess, torch_preprocess_batch
from patchcore_edge.imageio import read_rgb
from patchcore_edge.preprocess import InputSpec, preprocess

# Normalised units; one grey level is ~0.017 of them, so this is far below anything the network could notice.
TOLERANCE = 1e-4
SPECS = [InputSpec(), InputSpec(resize=64, crop=56), InputSpec(resize=320, crop=320)]
# Every fit, square and non-square inputs: squash shrinks one axis and enlarges the other on elongated images.
FIT_SPECS = [InputSpec(fit="squash"), InputSpec(fit="squash", size=(96, 48)), InputSpec(fit="letterbox"),
             InputSpec(fit="letterbox", size=(64, 128)), InputSpec(fit="crop", resize=128, size=(112, 56))]
FIT_IDS = ["squash-224", "squash-96x48", "letterbox-224", "letterbox-64x128", "crop-112x56"]


def _max_difference(image: np.ndarray, spec: InputSpec) -> float:
    reference = torch_preprocess(image, spec).numpy()
    runtime = preprocess(image, spec)
    assert reference.shape == runtime.shape == (3, spec.height, spec.width)
    assert reference.dtype == runtime.dtype == np.float32
    return float(np.abs(reference - runtime).max())


def _pick(folder: Path, count: int) -> List[Path]:
    files = sorted(folder.glob("*.png"))
    return files[:: max(1, len(files) // count)][:count]


@pytest.mark.shared_data
@pytest.mark.parametrize("spec", SPECS, ids=["256-224", "64-56", "320-320"])
def test_parity_on_bottle_images(bottle: Path, spec: InputSpec) -> None:
    paths = _pick(bottle / "train" / "good", 2) + _pick(bottle / "test" / "broken_large", 1)
    for path in paths:
        image = read_rgb(path)
        assert image.shape == (900, 900, 3)
        assert _max_difference(image, spec) < TOLERANCE, path


@pytest.mark.parametrize("spec", SPECS, ids=["256-224", "64-56", "320-320"])
def test_parity_on_elpv_gray_images(elpv_images: Path, spec: InputSpec) -> None:
    # 300x300 grey: downscaled for 256 and 64, upscaled for 320.
    for path in _pick(elpv_images, 2):
        image = read_rgb(path)
        assert image.shape == (300, 300, 3)
        assert _max_difference(image, spec) < TOLERANCE, path


@pytest.mark.parametrize("height, width, spec", [
    (100, 150, SPECS[0]),   # upscale, landscape
    (31, 47, SPECS[1]),     # strong upscale, odd sizes
    (257, 300, SPECS[0]),   # downscale by a hair: slivers of overlap at every cell
    (1001, 333, SPECS[0]),  # tall, odd factor
    (640, 479, SPECS[1]),   # landscape, odd width, strong downscale
    (256, 256, SPECS[0]),   # no resize at all
    (225, 1000, SPECS[1]),  # extreme aspect ratio
])
def test_parity_on_synthetic_sizes(height: int, width: int, spec: InputSpec,
                                   rng: np.random.Generator) -> None:
    # Noise is the hardest case for interpolation: every pixel differs from its neighbours.
    noise = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    assert _max_difference(noise, spec) < TOLERANCE
    ramp = np.linspace(0, 255, height * width * 3).reshape(height, width, 3).astype(np.uint8)
    assert _max_difference(ramp, spec) < TOLERANCE


def test_area_matrix_is_a_box_average_for_integer_factors() -> None:
    a = area_matrix(12, 4)
    expected = torch.zeros(4, 12, dtype=torch.float64)
    for row in range(4):
        expected[row, 3 * row:3 * row + 3] = 1.0 / 3.0
    torch.testing.assert_close(a, expected)


def test_area_matrix_weights_partial_pixels_by_overlap() -> None:
    a = area_matrix(5, 2)  # cells of 2.5 source pixels: pixel 2 is shared half and half
    expected = torch.tensor([[0.4, 0.4, 0.2, 0.0, 0.0], [0.0, 0.0, 0.2, 0.4, 0.4]], dtype=torch.float64)
    torch.testing.assert_close(a, expected)


def test_constant_image_stays_constant() -> None:
    spec = InputSpec(resize=64, crop=56)
    image = np.zeros((90, 130, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 128, 250
    out = torch_preprocess(image, spec)
    expected = (np.array([10, 128, 250]) / 255.0 - np.array(spec.mean)) / np.array(spec.std)
    np.testing.assert_allclose(out.numpy().reshape(3, -1).T, np.broadcast_to(expected, (56 * 56, 3)),
                               atol=1e-6)


def test_centre_crop_uses_torchvision_rounding() -> None:
    # resize 64 of a 64x69 image: width stays 69, offset round(13/2) = round(6.5) = 6 (round half to even).
    spec = InputSpec(resize=64, crop=56)
    image = np.zeros((64, 69, 3), np.uint8)
    image[:, 6, :] = 255  # first column inside the crop
    out = torch_preprocess(image, spec)
    assert float(out[0, 0, 0]) > 2.0 and float(out[0, 0, 1]) < 0.0


def test_batch_stacks_single_images(rng: np.random.Generator) -> None:
    spec = InputSpec(resize=64, crop=56)
    images = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in [(80, 80, 3), (50, 120, 3), (200, 70, 3)]]
    batch = torch_preprocess_batch(images, spec)
    assert batch.shape == (3, 3, 56, 56) and batch.dtype == torch.float32
    for i, image in enumerate(images):
        torch.testing.assert_close(batch[i], torch_preprocess(image, spec), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8),
                                 np.zeros((10, 10, 3), np.float32)])
def test_bad_input_is_refused_with_the_reason(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="RGB"):
        torch_preprocess(bad, InputSpec(resize=64, crop=56))


def test_empty_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one image"):
        torch_preprocess_batch([], InputSpec())


@pytest.mark.parametrize("spec", FIT_SPECS, ids=FIT_IDS)
@pytest.mark.parametrize("height, width", [(300, 300), (100, 400), (400, 100), (31, 47), (1001, 333), (48, 96)])
def test_parity_for_every_fit(height: int, width: int, spec: InputSpec, rng: np.random.Generator) -> None:
    noise = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    assert _max_difference(noise, spec) < TOLERANCE


@pytest.mark.parametrize("spec", FIT_SPECS, ids=FIT_IDS)
def test_parity_for_every_fit_on_elpv_strips(elpv_images: Path, spec: InputSpec) -> None:
    for path in _pick(elpv_images, 1):
        image = read_rgb(path)
        for strip in (image[:, :150], image[:75, :]):  # 1:2 and 4:1 strips of a real cell image
            assert _max_difference(np.ascontiguousarray(strip), spec) < TOLERANCE, path


def test_letterbox_padding_is_zero_after_normalisation() -> None:
    spec = InputSpec(fit="letterbox", size=(64, 64))
    image = np.full((20, 80, 3), 255, np.uint8)  # scaled to 64x16, 24 rows of padding above and below
    for out in (torch_preprocess(image, spec).numpy(), preprocess(image, spec)):
        assert np.all(out[:, :24] == 0.0) and np.all(out[:, 40:] == 0.0)
        assert np.all(out[:, 24:40] > 2.0)
