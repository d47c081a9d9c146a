"""Patch SVDD (Yi and Yoon, ACCV 2020): a hierarchical 64 encoder and a 32 encoder trained with the patch
SVDD loss (a patch and its 3x3 neighbour pulled together) and the relative-position task (which of the 8
neighbours), loss = lambda * SVDD + SSL per encoder; maps of 64 (stride 16) and 32 (stride 4) patches
multiplied, image score their maximum."""

from __future__ import annotations

from typing import Any, Dict

import numpy as np
import torch
from torch import nn

from ...methods.patch_maps import Scale
from .patch_encoders import HierarchicalEncoder, PatchEncoder, RelationClassifier
from .patch_losses import relation_loss, svdd_loss
from .patch_sampling import NEIGHBOURS, crop_patches, neighbour_pairs, svdd_pairs
from .trained_exporter import TrainedPatchMethod
from .training import TrainedOptions


class PatchSVDDModel(nn.Module):
    def __init__(self, dim: int, lam: float) -> None:
        super().__init__()
        self.lam = lam
        self.encoders = nn.ModuleDict({"64": HierarchicalEncoder(dim), "32": PatchEncoder(32, dim)})
        self.classifiers = nn.ModuleDict({key: RelationClassifier(dim, len(NEIGHBOURS)) for key in self.encoders})

    def step_losses(self, images: torch.Tensor, rng: np.random.Generator, generator: torch.Generator,
                    patches_per_image: int) -> Dict[str, torch.Tensor]:
        batch, _, height, width = images.shape
        n = batch * patches_per_image
        which = np.repeat(np.arange(batch), patches_per_image)
        losses: Dict[str, torch.Tensor] = {}
        for key, module in self.encoders.items():
            encoder: Any = module  # an encoder of patch_encoders (ModuleDict types its items as Module)
            kernel = int(encoder.kernel)
            anchor, near = svdd_pairs(rng, n, height, width, kernel)
            first, second, labels = neighbour_pairs(rng, n, height, width, kernel)
            patches = torch.cat([crop_patches(images, which, p, kernel) for p in (anchor, near, first, second)])
            codes = encoder.codes(patches).split(n)
            losses[f"svdd{kernel}"] = svdd_loss(codes[0], codes[1])
            target = torch.as_tensor(labels, dtype=torch.long, device=images.device)
            losses[f"pos{kernel}"] = relation_loss(self.classifiers[key](codes[2], codes[3]), target)
        svdd = losses["svdd64"] + losses["svdd32"]
        losses["total"] = losses["pos64"] + losses["pos32"] + self.lam * svdd
        return losses


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
