"""What the two trained patch-encoder models share: one encoder (with its relation classifier) per patch size,
and a training step that, per encoder in order, draws its patch positions, cuts the patches from the step's
images, encodes them in one batch and computes that encoder's losses.

A step is yielded encoder by encoder (`step_parts`): the encoders share no parameters and the step's loss is
the sum of theirs, so backpropagating each part on its own gives exactly the gradient of the sum, and the
training loop can check its time budget between parts (training.py)."""

from __future__ import annotations

import abc
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np
import torch
from torch import nn

from .patch_sampling import crop_patches

Positions = List[np.ndarray]
StepPart = Tuple[Dict[str, torch.Tensor], torch.Tensor]  # (named losses of one encoder, its weighted total)


class PatchModel(nn.Module):
    """Subclasses set `encoders` and `classifiers` (ModuleDicts keyed by the patch size) and implement
    `sample` and `losses`."""

    encoders: nn.ModuleDict
    classifiers: nn.ModuleDict

    @abc.abstractmethod
    def sample(self, rng: np.random.Generator, n: int, height: int, width: int,
               kernel: int) -> Tuple[Positions, np.ndarray]:
        """(positions of each patch role [n, 2], relation labels [n]) for one encoder's losses."""

    @abc.abstractmethod
    def losses(self, key: str, codes: Tuple[torch.Tensor, ...], target: torch.Tensor,
               generator: torch.Generator) -> StepPart:
        """One encoder's named losses (keys without the kernel) and its weighted total, from the codes of
        each patch role in `sample`'s order."""

    def step_parts(self, images: torch.Tensor, rng: np.random.Generator, generator: torch.Generator,
                   patches_per_image: int) -> Iterator[StepPart]:
        """Per encoder: (losses named with the kernel, e.g. "svdd64", weighted total). Lazy: an encoder's
        patches are drawn and encoded only when its part is asked for, in the encoders' order, so the random
        streams are consumed in the same order however the parts are used."""
        batch, _, height, width = images.shape
        n = batch * patches_per_image
        which = np.repeat(np.arange(batch), patches_per_image)
        for key, module in self.encoders.items():
            encoder: Any = module  # an encoder of patch_encoders (ModuleDict types its items as Module)
            kernel = int(encoder.kernel)
            positions, labels = self.sample(rng, n, height, width, kernel)
            patches = torch.cat([crop_patches(images, which, p, kernel) for p in positions])
            codes = tuple(encoder.codes(patches).split(n))
            target = torch.as_tensor(labels, dtype=torch.long, device=images.device)
            named, total = self.losses(key, codes, target, generator)
            yield {f"{name}{kernel}": value for name, value in named.items()}, total

    def step_losses(self, images: torch.Tensor, rng: np.random.Generator, generator: torch.Generator,
                    patches_per_image: int) -> Dict[str, torch.Tensor]:
        """Every encoder's losses and "total", their sum (the step's objective)."""
        losses: Dict[str, torch.Tensor] = {}
        total = images.new_zeros(())
        for named, part in self.step_parts(images, rng, generator, patches_per_image):
            losses.update(named)
            total = total + part
        losses["total"] = total
        return losses
