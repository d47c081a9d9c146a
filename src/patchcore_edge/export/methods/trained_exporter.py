"""What Patch SVDD and the multi-scale method share on the export side: train the encoders, give the
fully convolutional embedding-grid network, and fit the per-scale memory banks."""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple, cast

import numpy as np
import torch

from ...methods.patch_maps import Scale, Window, to_params
from .patch_bank import Log, fit_banks
from .patch_encoders import EmbeddingGrids
from .training import OnStep, Trainable, TrainedOptions, TrainRecord, train


class TrainedPatchMethod(abc.ABC):
    name: ClassVar[str]
    scales: ClassVar[Tuple[Scale, ...]]
    combine: ClassVar[str]
    window: ClassVar[Optional[Window]] = None
    object_lambda: ClassVar[float]
    texture_lambda: ClassVar[float]

    @classmethod
    def lam(cls, options: TrainedOptions) -> float:
        if options.lam is not None:
            return float(options.lam)
        return cls.texture_lambda if options.texture else cls.object_lambda

    @abc.abstractmethod
    def build_model(self, options: TrainedOptions) -> torch.nn.Module:
        """The encoders with their heads, whose `step_losses` the training loop optimises."""

    def grids(self, model: torch.nn.Module) -> EmbeddingGrids:
        """The exported network of the trained model's encoders (`model.encoders` keyed by kernel), outputs in
        `scales` order."""
        encoders: Any = model.encoders
        return EmbeddingGrids([encoders[str(s.kernel)] for s in self.scales], [s.stride for s in self.scales])

    def train_network(self, images: np.ndarray, options: TrainedOptions,
                      on_step: Optional[OnStep] = None) -> Tuple[EmbeddingGrids, TrainRecord]:
        """Train on normalised images [N, 3, H, W] (seeded); the grid network comes back on the CPU, eval."""
        torch.manual_seed(options.schedule.seed)
        model = self.build_model(options).to(options.device)
        record = train(cast(Trainable, model), images, options.schedule, device=options.device, checkpoint=options.checkpoint,
                       on_step=on_step)
        network = self.grids(model.cpu()).eval()
        return network, record

    def fit(self, outputs: Mapping[str, np.ndarray], options: TrainedOptions,
            log: Log = lambda _m: None) -> Tuple[Dict[str, np.ndarray], Dict[str, bytes], Dict[str, Any],
                                                 Dict[str, Any]]:
        """(arrays, files, params, summary) from each scale's grids over the training images."""
        arrays, files, summary = fit_banks(outputs, self.scales, options.coreset_ratio, options.schedule.seed, log,
                                           options.max_bank)
        params = to_params(self.scales, self.combine, self.window)
        params.update({"lambda": self.lam(options), "coreset_ratio": options.coreset_ratio,
                       "max_bank": options.max_bank, "dim": options.dim})
        return arrays, files, params, summary
