"""Scores of training images as if they were new parts: the reference a first calibration is checked against.

A training image scores near zero against the full bank, since its own patches were selected into it. Removing
from the bank the rows that came from the image itself (leave one image out) gives the score a new good part of
the same kind would get, up to the small influence the image had on where the other centres fell. Calibration
compares fresh good parts with these quantiles to flag a moved camera or new lighting
(`stats.distribution_shift`).

Everything the score uses comes from the reduced bank: the nearest row m* of each patch and also the re-weighting
support N_b(m*), the b rows of the reduced bank nearest to m* (m* first). The full bank's neighbour table would
still name the image's own rows there, and those sit closer to p* than the rest: the weight, and the score, would
come out low.
"""

from __future__ import annotations

import numpy as np

from ..scoring import reweight

# Quantiles of 64 images are as informative as those of all of them; this caps the cost at 64 bank passes.
MAX_IMAGES = 64


def leave_one_image_out_scores(features: np.ndarray, patches_per_image: int, selected: np.ndarray,
                               bank: np.ndarray, neighbours: np.ndarray, max_images: int = MAX_IMAGES
                               ) -> np.ndarray:
    """PatchCore image scores (float64) of up to `max_images` evenly spaced training images.

    `features` [N * P, D] are the patch features of all training images in order, `selected` the coreset rows
    of `features` that form `bank`, `neighbours` the bank's self-neighbour table (itself first): only its width b
    is used, the support is recomputed on the bank without the image's rows.
    """
    count = features.shape[0] // patches_per_image
    if count < 2:
        raise ValueError("leave-one-image-out scores need at least two images")
    source_image = np.asarray(selected) // patches_per_image
    centre = bank.mean(axis=0, dtype=np.float64).astype(np.float32)
    centred_bank = bank - centre
    bank_norms = np.einsum("ij,ij->i", centred_bank, centred_bank)
    chosen = np.unique(np.linspace(0, count - 1, min(count, max_images)).round().astype(np.int64))
    scores = []
    for image in chosen:
        own = source_image == image
        if own.all():  # a bank drawn from this image alone has nothing left to compare with
            continue
        patches = features[image * patches_per_image:(image + 1) * patches_per_image] - centre
        squared = bank_norms[None, :] - 2.0 * (patches @ centred_bank.T)
        squared[:, own] = np.inf
        nearest = np.argmin(squared, axis=1)
        # The float32 expansion ranks well but cancels badly: redo the distances that decide the score exactly.
        nearest_distance = np.linalg.norm(patches.astype(np.float64) - centred_bank[nearest], axis=1)
        worst = int(np.argmax(nearest_distance))
        support = _reduced_support(centred_bank, own, int(nearest[worst]), neighbours.shape[1])
        support_distance = np.linalg.norm(patches[worst].astype(np.float64) - centred_bank[support], axis=1)
        scores.append(float(reweight(support_distance)) * nearest_distance[worst])
    return np.asarray(scores, dtype=np.float64)


def _reduced_support(centred_bank: np.ndarray, own: np.ndarray, centre_row: int, b: int) -> np.ndarray:
    """The b rows of the bank without `own` that are nearest to `centre_row` (itself first, ties by row number)."""
    kept = np.flatnonzero(~own)
    distance = np.linalg.norm(centred_bank[kept].astype(np.float64) - centred_bank[centre_row], axis=1)
    distance[kept == centre_row] = -1.0
    order = np.lexsort((kept, distance))
    return kept[order[:min(b, kept.size)]]
