"""Multi-scale patch-based representation learning (Tsai, Wu and Lai, WACV 2022): encoders for 64, 32 and 16
pixel patches, each trained with SVDD + cosine (near more similar than far) losses, the relative-angle task
over 12 directions and a k-means loss (k = 50): loss = lambda (SVDD + Cos) + SSL + Kmeans per encoder.
Maps of the three scales summed; image score the maximum over 8x8 windows (stride 4) of the local mean."""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
from torch import nn

from ...methods.patch_maps import Scale, Window
from .patch_encoders import RelationClassifier, build_encoder
from .patch_losses import cosine_loss, kmeans_centres, kmeans_loss, relation_loss, svdd_loss
from .patch_model import PatchModel, Positions, StepPart
from .patch_sampling import ANGLE_CLASSES, angle_pairs, near_far_triplets
from .trained_exporter import TrainedPatchMethod
from .training import TrainedOptions

KMEANS_K = 50
KERNELS = (64, 32, 16)


class MultiscaleModel(PatchModel):
    def __init__(self, dim: int, lam: float, k: int = KMEANS_K) -> None:
        super().__init__()
        self.lam = lam
        self.k = k
        self.encoders = nn.ModuleDict({str(kernel): build_encoder(kernel, dim) for kernel in KERNELS})
        self.classifiers = nn.ModuleDict({key: RelationClassifier(dim, ANGLE_CLASSES) for key in self.encoders})

    def sample(self, rng: np.random.Generator, n: int, height: int, width: int,
               kernel: int) -> Tuple[Positions, np.ndarray]:
        anchor, near, far = near_far_triplets(rng, n, height, width, kernel)
        first, second, labels = angle_pairs(rng, n, height, width, kernel)
        return [anchor, near, far, first, second], labels

    def losses(self, key: str, codes: Tuple[torch.Tensor, ...], target: torch.Tensor,
               generator: torch.Generator) -> StepPart:
        a, b, c, d, e = codes
        named: Dict[str, torch.Tensor] = {"svdd": svdd_loss(a, b), "cos": cosine_loss(a, b, c),
                                          "ssl": relation_loss(self.classifiers[key](d, e), target),
                                          "kmeans": kmeans_loss(a, kmeans_centres(a, self.k, generator))}
        return named, self.lam * (named["svdd"] + named["cos"]) + named["ssl"] + named["kmeans"]


class Multiscale(TrainedPatchMethod):
    name = "multiscale"
    scales = (Scale("emb64", 64, 16), Scale("emb32", 32, 4), Scale("emb16", 16, 4))
    combine = "sum"
    window = Window(size=8, stride=4)
    # Not given by the summary of the paper: Patch SVDD's defaults, an option like there.
    object_lambda = 1e-3
    texture_lambda = 1.0

    def build_model(self, options: TrainedOptions) -> nn.Module:
        return MultiscaleModel(options.dim, self.lam(options))
