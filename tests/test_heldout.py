"""Leave-one-image-out scores of training images (the export's reference for calibration drift checks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from patchcore_edge import search
from patchcore_edge.bundle import read_manifest
from patchcore_edge.export.heldout import leave_one_image_out_scores


def _brute_force(features: np.ndarray, per_image: int, selected: np.ndarray, b: int, image: int) -> float:
    """The leave-one-out score from first principles: drop the image's rows, then PatchCore eq. 6-7 on what is left
    (nearest row, its b nearest rows in the reduced bank, softmax weight), all in float64 by direct differences."""
    kept = selected[selected // per_image != image]
    bank = features[kept].astype(np.float64)
    patches = features[image * per_image:(image + 1) * per_image].astype(np.float64)
    distances = np.linalg.norm(patches[:, None] - bank[None], axis=2)
    worst = int(distances.min(axis=1).argmax())
    nearest = int(distances[worst].argmin())
    around = np.linalg.norm(bank - bank[nearest], axis=1)
    support = np.argsort(around, kind="stable")[:b]
    assert support[0] == nearest
    to_support = np.linalg.norm(patches[worst] - bank[support], axis=1)
    softmax = np.exp(to_support - to_support.max())
    return float((1.0 - softmax[0] / softmax.sum()) * distances[worst, nearest])


def test_scores_equal_a_brute_force_leave_one_out(rng: np.random.Generator) -> None:
    per_image, images = 49, 12
    features = (rng.normal(size=(images * per_image, 24)) + 5.0).astype(np.float32)  # offset: tests centring
    selected = rng.choice(features.shape[0], 150, replace=False)
    neighbours = search.bank_neighbours(features[selected], 5)
    scores = leave_one_image_out_scores(features, per_image, selected, features[selected], neighbours,
                                        max_images=6)
    chosen = np.unique(np.linspace(0, images - 1, 6).round().astype(int))
    expected = [_brute_force(features, per_image, selected, 5, int(i)) for i in chosen]
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_an_image_that_is_the_whole_bank_is_left_out(rng: np.random.Generator) -> None:
    features = rng.normal(size=(3 * 10, 4)).astype(np.float32)
    selected = np.arange(10)  # every bank row from image 0
    neighbours = search.bank_neighbours(features[selected], 3)
    assert leave_one_image_out_scores(features, 10, selected, features[selected], neighbours).size == 2
    with pytest.raises(ValueError, match="two images"):
        leave_one_image_out_scores(features[:10], 10, selected, features[selected], neighbours)


def test_export_records_quantiles_above_the_training_scores(tiny_bundle: Path) -> None:
    from patchcore_edge.runtime.detector import Detector
    from patchcore_edge.imageio import read_rgb

    recorded = read_manifest(tiny_bundle)["score"]["training_scores"]
    assert recorded["n"] == read_manifest(tiny_bundle)["training_images"]["count"]
    assert recorded["min"] <= recorded["q25"] <= recorded["q50"] <= recorded["q75"] <= recorded["max"]
    # A training image scored with its own rows in the bank scores lower than without them.
    detector = Detector.load(tiny_bundle, backend="onnxruntime", exact_search=True)
    own = [detector.predict(read_rgb(path), maps=False).score
           for path in sorted((tiny_bundle.parent / "nominal").iterdir())]
    assert np.median(own) < recorded["q50"]


def test_tiled_images_score_the_maximum_over_their_tiles(rng: np.random.Generator) -> None:
    """A tiled bundle's reference is per image, as `run` scores it: every tile's rows left out, max over tiles."""
    per_tile, tiles = 16, [2, 3, 1, 2, 2]
    owner = np.repeat(np.arange(len(tiles)), tiles)  # image of each tile
    features = (rng.normal(size=(sum(tiles) * per_tile, 8)) + 3.0).astype(np.float32)
    selected = rng.choice(features.shape[0], 40, replace=False)
    neighbours = search.bank_neighbours(features[selected], 4)
    scores = leave_one_image_out_scores(features, per_tile, selected, features[selected], neighbours,
                                        pieces_per_image=tiles)
    expected = []
    for image in range(len(tiles)):
        kept = features[selected[owner[selected // per_tile] != image]]  # the bank without any of its tiles
        rows = per_tile + np.arange(kept.shape[0])
        # Each tile as "image 0" of a set whose other rows are the reduced bank: _brute_force keeps them all.
        expected.append(max(_brute_force(np.concatenate([features[t * per_tile:(t + 1) * per_tile], kept]),
                                         per_tile, rows, 4, 0) for t in np.flatnonzero(owner == image)))
    assert scores.size == len(tiles)
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="adds up to"):
        leave_one_image_out_scores(features, per_tile, selected, features[selected], neighbours,
                                   pieces_per_image=[2, 2])
