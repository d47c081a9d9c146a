"""Trained patch encoders of Patch SVDD (Yi and Yoon, ACCV 2020) and multi-scale patch learning (Tsai et al.,
WACV 2022), written so that one set of weights runs both on single patches (training) and fully convolutionally
over a whole image (export), where it yields the embedding of every patch position at once.

Every encoder has no padding, so its output at grid position (i, j) depends only on the input window
[s*i, s*i + kernel) x [s*j, s*j + kernel) (s: the encoder's stride); a kernel x kernel patch gives a 1 x 1 grid.
The hierarchical 64 encoder of Patch SVDD splits a 64 patch into 2 x 2 parts of 32, encodes each with the
small encoder and encodes the four codes again; over a whole image the four parts of a patch are grid points
32 pixels (32 / stride grid steps) apart, which a 2 x 2 convolution with that dilation reads in one go.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

EMBEDDING_DIM = 64
_SLOPE = 0.1  # LeakyReLU slope of the Patch SVDD reference networks


def _conv_stack(channels: Sequence[int], first_stride: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    for index, (cin, cout) in enumerate(zip(channels[:-1], channels[1:])):
        layers.append(nn.Conv2d(cin, cout, 3, stride=first_stride if index == 0 else 1))
        if index < len(channels) - 2:
            layers.append(nn.LeakyReLU(_SLOPE))
    layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def _single(grid: torch.Tensor, patches: torch.Tensor, kernel: int) -> torch.Tensor:
    if tuple(patches.shape[-2:]) != (kernel, kernel):
        raise ValueError(f"patches of shape {tuple(patches.shape)} do not fit a {kernel}-pixel encoder")
    return grid[:, :, 0, 0]


class PatchEncoder(nn.Module):
    """A plain encoder: 3x3 convolutions without padding, the first with stride 2, tanh codes.

    kernel 32 is Patch SVDD's small encoder (8 convolutions: 32 -> 15 -> 13 ... -> 1); kernel 16 is the
    16-pixel encoder of the multi-scale method (4 convolutions: 16 -> 7 -> 5 -> 3 -> 1).
    """

    _CHANNELS: Dict[int, Tuple[int, ...]] = {32: (3, 64, 64, 128, 128, 64, 32, 32),
                                              16: (3, 64, 128, 128)}

    def __init__(self, kernel: int, dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        if kernel not in self._CHANNELS:
            raise ValueError(f"no plain encoder for {kernel}-pixel patches (have {sorted(self._CHANNELS)})")
        self.kernel = kernel
        self.stride = 2
        self.dim = dim
        self.body = _conv_stack(self._CHANNELS[kernel] + (dim,), first_stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, D, (H - kernel) // 2 + 1, (W - kernel) // 2 + 1]."""
        grid: torch.Tensor = self.body(images)
        return grid

    def codes(self, patches: torch.Tensor) -> torch.Tensor:
        """Codes [N, D] of patches [N, 3, kernel, kernel]."""
        return _single(self(patches), patches, self.kernel)


class HierarchicalEncoder(nn.Module):
    """Patch SVDD's 64 encoder: the 32 encoder on the four quarters, then a 2x2 convolution over their codes."""

    def __init__(self, dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        self.inner = PatchEncoder(32, dim)
        self.kernel = 64
        self.stride = self.inner.stride
        self.dim = dim
        # Quarters sit 32 pixels apart, i.e. 32 / stride steps on the inner grid.
        self.combine = nn.Sequential(nn.Conv2d(dim, 128, 2, dilation=32 // self.inner.stride),
                                     nn.LeakyReLU(_SLOPE), nn.Conv2d(128, dim, 1), nn.Tanh())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid: torch.Tensor = self.combine(self.inner(images))
        return grid

    def forward_parts(self, patches: torch.Tensor) -> torch.Tensor:
        """The paper's formulation on 64 x 64 patches [N, 3, 64, 64]: encode the 2x2 quarters separately.

        Used by the tests as the patch-by-patch reference of `forward`.
        """
        quarters = [patches[:, :, r:r + 32, c:c + 32] for r in (0, 32) for c in (0, 32)]
        codes = [self.inner(q) for q in quarters]  # each [N, D, 1, 1]
        grid = torch.cat([torch.cat(codes[0:2], dim=3), torch.cat(codes[2:4], dim=3)], dim=2)  # [N, D, 2, 2]
        layers = list(self.combine.children())
        first = nn.functional.conv2d(grid, layers[0].weight, layers[0].bias)  # type: ignore[union-attr, arg-type]
        out: torch.Tensor = nn.Sequential(*layers[1:])(first)
        return out

    def codes(self, patches: torch.Tensor) -> torch.Tensor:
        """Codes [N, D] of 64 x 64 patches, computed from the four quarters only (training)."""
        return _single(self.forward_parts(patches), patches, self.kernel)


def build_encoder(kernel: int, dim: int = EMBEDDING_DIM) -> nn.Module:
    """The encoder for `kernel`-pixel patches: 64 hierarchical, 32 and 16 plain."""
    if kernel == 64:
        return HierarchicalEncoder(dim)
    return PatchEncoder(kernel, dim)


class RelationClassifier(nn.Module):
    """Predicts how a second patch lies relative to the first (8 neighbours, or 12 angles) from the difference
    of their codes, as Patch SVDD's position classifier."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 128), nn.LeakyReLU(_SLOPE), nn.Linear(128, 128),
                                 nn.LeakyReLU(_SLOPE), nn.Linear(128, classes))

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(first - second)
        return logits


class EmbeddingGrids(nn.Module):
    """The exported graph: normalised image [B, 3, H, W] -> one channels-last embedding grid per scale,
    [B, h, w, D] with the patches `stride` pixels apart (h = (H - kernel) / stride + 1)."""

    def __init__(self, encoders: Sequence[Any], strides: Sequence[int]) -> None:
        super().__init__()
        if len(encoders) != len(strides) or not encoders:
            raise ValueError("need one inference stride per encoder")
        for encoder, stride in zip(encoders, strides):
            if stride % encoder.stride:
                raise ValueError(f"inference stride {stride} is not a multiple of the {encoder.kernel} "
                                 f"encoder's stride {encoder.stride}")
        self.encoders = nn.ModuleList(encoders)
        self.steps = [stride // encoder.stride for encoder, stride in zip(encoders, strides)]

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        grids = []
        for encoder, step in zip(self.encoders, self.steps):
            grid = encoder(images)[:, :, ::step, ::step]
            grids.append(grid.permute(0, 2, 3, 1).contiguous())
        return tuple(grids)
