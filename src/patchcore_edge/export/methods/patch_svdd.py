"""Patch SVDD (Yi and Yoon, ACCV 2020): a hierarchical 64 encoder and a 32 encoder trained with the patch
SVDD loss (a patch and its 3x3 neighbour pulled together) and the relative-position task (which of the 8
neighbours), loss = lambda * SVDD + SSL per encoder; maps of 64 (stride 16) and 32 (stride 4) patches
multiplied, image score their maximum."""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
from torch import nn

from ...methods.patch_maps import Scale
from .patch_encoders import HierarchicalEncoder, PatchEncoder, RelationClassifier
from .patch_losses import relation_loss, svdd_loss
from .patch_model import PatchModel, Positions, StepPart
from .patch_sampling import NEIGHBOURS, neighbour_pairs, svdd_pairs
from .trained_exporter import TrainedPatchMethod
from .training import TrainedOptions


class PatchSVDDModel(PatchModel):
    def __init__(self, dim: int, lam: float) -> None:
        super().__init__()
        self.lam = lam
        self.encoders = nn.ModuleDict({"64": HierarchicalEncoder(dim), "32": PatchEncoder(32, dim)})
        self.classifiers = nn.ModuleDict({key: RelationClassifier(dim, len(NEIGHBOURS)) for key in self.encoders})

    def sample(self, rng: np.random.Generator, n: int, height: int, width: int,
               kernel: int) -> Tuple[Positions, np.ndarray]:
        anchor, near = svdd_pairs(rng, n, height, width, kernel)
        first, second, labels = neighbour_pairs(rng, n, height, width, kernel)
        return [anchor, near, first, second], labels

    def losses(self, key: str, codes: Tuple[torch.Tensor, ...], target: torch.Tensor,
               generator: torch.Generator) -> StepPart:
        anchor, near, first, second = codes
        named: Dict[str, torch.Tensor] = {"svdd": svdd_loss(anchor, near),
                                          "pos": relation_loss(self.classifiers[key](first, second), target)}
        return named, named["pos"] + self.lam * named["svdd"]


class PatchSVDD(TrainedPatchMethod):
    name = "patch_svdd"
    scales = (Scale("emb64", 64, 16), Scale("emb32", 32, 4))
    combine = "product"
    window = None
    # The official code's defaults: 1e-3 for object categories, 1 for textures.
    object_lambda = 1e-3
    texture_lambda = 1.0

    def build_model(self, options: TrainedOptions) -> nn.Module:
        return PatchSVDDModel(options.dim, self.lam(options))
