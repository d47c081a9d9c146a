"""Training losses of the trained patch encoders. Inputs are codes [n, D] (or logits [n, C]); each loss is a
scalar mean over the n pairs, so its weight does not depend on how many patches a step samples."""

from __future__ import annotations

import torch
from torch.nn import functional as F

DEFAULT_MARGIN = 0.1
KMEANS_ITERATIONS = 10


def svdd_loss(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Patch SVDD: mean Euclidean distance ||f(p) - f(p')|| between a patch and a patch next to it."""
    loss: torch.Tensor = (first - second).norm(dim=1).mean()
    return loss


def relation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Self-supervised relative position (8 neighbours) or relative angle (12 directions): cross-entropy."""
    loss: torch.Tensor = F.cross_entropy(logits, labels)
    return loss


def cosine_loss(anchor: torch.Tensor, near: torch.Tensor, far: torch.Tensor,
                margin: float = DEFAULT_MARGIN) -> torch.Tensor:
    """A near patch must be more cosine-similar to the anchor than a far one, by `margin`:
    mean max(0, margin + cos(a, far) - cos(a, near))."""
    gap = F.cosine_similarity(anchor, far, dim=1) - F.cosine_similarity(anchor, near, dim=1)
    loss: torch.Tensor = F.relu(gap + margin).mean()
    return loss


def kmeans_centres(codes: torch.Tensor, k: int, generator: torch.Generator,
                   iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """Lloyd's k-means on detached codes [n, D] (k capped at n): centres [k, D].

    Start: a seeded random code, then each next centre the code farthest from those chosen (so well separated
    clusters are found without restarts)."""
    points = codes.detach()
    k = min(int(k), points.shape[0])
    chosen = [int(torch.randint(points.shape[0], (1,), generator=generator))]
    nearest = torch.cdist(points, points[chosen[0]][None])[:, 0]
    for _ in range(k - 1):
        chosen.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, torch.cdist(points, points[chosen[-1]][None])[:, 0])
    centres = points[chosen].clone()
    for _ in range(iterations):
        assignment = torch.cdist(points, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=k).to(points.dtype)
        filled = counts > 0  # an emptied cluster keeps its old centre
        centres[filled] = sums[filled] / counts[filled, None]
    return centres


def kmeans_loss(codes: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each code to its nearest (fixed) centre."""
    squared = ((codes[:, None, :] - centres[None, :, :].detach()) ** 2).sum(dim=2)
    loss: torch.Tensor = squared.min(dim=1).values.mean()
    return loss
