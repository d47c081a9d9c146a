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

from typing import Optional, Sequence

import numpy as np

from ..scoring import reweight

# Quantiles of 64 images are as informative as those of all of them; this caps the cost at 64 bank passes.
MAX_IMAGES = 64


def leave_one_image_out_scores(features: np.ndarray, patches_per_image: int, selected: np.ndarray,
                               bank: np.ndarray, neighbours: np.ndarray, max_images: int = MAX_IMAGES,
                               pieces_per_image: Optional[Sequence[int]] = None) -> np.ndarray:
    """PatchCore image scores (float64) of up to `max_images` evenly spaced training images.

    `features` [N * P, D] are the patch features of all training pieces in order, `patches_per_image` the P
    patches of one network input, `selected` the coreset rows of `features` that form `bank`, `neighbours` the
    bank's self-neighbour table (itself first): only its width b is used, the support is recomputed on the bank
    without the image's rows. `pieces_per_image`: how many consecutive network inputs each image gave (a tiled
    bundle: its tiles; default one each). An image's score is then what `run` reports for it: the maximum of its
    tiles' scores, with the rows of all its tiles left out.
    """
    pieces = features.shape[0] // patches_per_image
    counts = np.ones(pieces, np.int64) if pieces_per_image is None else np.asarray(pieces_per_image, np.int64)
    if counts.sum() != pieces or (counts < 1).any():
        raise ValueError(f"pieces_per_image adds up to {int(counts.sum())}, the features hold {pieces} pieces")
    count = counts.size
    if count < 2:
        raise ValueError("leave-one-image-out scores need at least two images")
    first_piece = np.concatenate([[0], np.cumsum(counts)])
    source_image = np.repeat(np.arange(count), counts)[np.asarray(selected) // patches_per_image]
    centre = bank.mean(axis=0, dtype=np.float64).astype(np.float32)
    centred_bank = bank - centre
    bank_norms = np.einsum("ij,ij->i", centred_bank, centred_bank)
    chosen = np.unique(np.linspace(0, count - 1, min(count, max_images)).round().astype(np.int64))
    scores = []
    for image in chosen:
        own = source_image == image
        if own.all():  # a bank drawn from this image alone has nothing left to compare with
            continue
        scores.append(max(_piece_score(features[piece * patches_per_image:(piece + 1) * patches_per_image] - centre,
                                       centred_bank, bank_norms, own, neighbours.shape[1])
                          for piece in range(first_piece[image], first_piece[image + 1])))
    return np.asarray(scores, dtype=np.float64)


def _piece_score(patches: np.ndarray, centred_bank: np.ndarray, bank_norms: np.ndarray, own: np.ndarray,
                 b: int) -> float:
    """PatchCore's re-weighted score of one network input's (centred) patches against the bank without `own`."""
    squared = bank_norms[None, :] - 2.0 * (patches @ centred_bank.T)
    squared[:, own] = np.inf
    nearest = np.argmin(squared, axis=1)
    # The float32 expansion ranks well but cancels badly: redo the distances that decide the score exactly.
    nearest_distance = np.linalg.norm(patches.astype(np.float64) - centred_bank[nearest], axis=1)
    worst = int(np.argmax(nearest_distance))
    support = _reduced_support(centred_bank, own, int(nearest[worst]), b)
    support_distance = np.linalg.norm(patches[worst].astype(np.float64) - centred_bank[support], axis=1)
    return float(reweight(support_distance)) * float(nearest_distance[worst])


def _reduced_support(centred_bank: np.ndarray, own: np.ndarray, centre_row: int, b: int) -> np.ndarray:
    """The b rows of the bank without `own` that are nearest to `centre_row` (itself first, ties by row number)."""
    kept = np.flatnonzero(~own)
    distance = np.linalg.norm(centred_bank[kept].astype(np.float64) - centred_bank[centre_row], axis=1)
    distance[kept == centre_row] = -1.0
    order = np.lexsort((kept, distance))
    return kept[order[:min(b, kept.size)]]
