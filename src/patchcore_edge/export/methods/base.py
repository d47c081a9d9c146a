"""What a scoring method is on the workstation: the network to export, and the fit of its bundle arrays.

The export pipeline (`export/pipeline.py`) is the same for every method: read the nominal images, build the
method's network, run every image through it, hand the outputs to `fit`, export the network to ONNX and check it
against torch, write the bundle. A method's runtime half lives in `patchcore_edge/methods/`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ...preprocess import InputSpec

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]


class MethodExportError(ValueError):
    """A method's network or fit that cannot go on; the message says why."""


@dataclass(frozen=True)
class NetworkInfo:
    """The exported network, as the manifest records it.

    outputs: the output names, in the order the module returns them (the first is the patch grid [B, h, w, dim]).
    """

    outputs: Tuple[str, ...]
    dim: int
    grid: Tuple[int, int]
    stride: int
    backbone: Dict[str, Any]
    layers: Tuple[str, ...]
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class FittedMethod:
    """A method's bundle content: arrays (saved as <key>.npy, no pickle), other files, params, summary lines.

    training_scores: image scores of training images scored as new parts (for calibration's drift check), or
    None where the method cannot produce them.
    """

    arrays: Dict[str, np.ndarray]
    files: Dict[str, bytes] = field(default_factory=dict)
    file_roles: Dict[str, str] = field(default_factory=dict)
    params: Dict[str, Any] = field(default_factory=dict)
    summary: Dict[str, Any] = field(default_factory=dict)
    training_scores: Optional[np.ndarray] = None
    # Gaussian sigma of the pixel map when the method's inference fixes it (trained patch methods: 0, the
    # paper's mean over covering patches); None: the export option.
    map_sigma: Optional[float] = None
    # The heat-map colour range of an uncalibrated bundle, where the image score is not on the map's scale.
    map_range: Optional[Tuple[float, float]] = None


@dataclass(frozen=True)
class MethodParameter:
    """A method's own export option, given as `--method-param NAME=VALUE` (one way for every method)."""

    name: str
    kind: type  # int, float, str or bool
    default: Any
    help: str
    choices: Optional[Tuple[str, ...]] = None
    minimum: Optional[float] = None

    def parse(self, text: str) -> Any:
        """The value of `text`, or ValueError saying what this parameter takes."""
        what = f"{self.name} must be {self.describe_kind()}, got {text!r}"
        try:
            if self.kind is bool:
                lowered = text.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(what)
                value: Any = lowered in ("true", "1", "yes")
            else:
                value = self.kind(text)
        except ValueError:
            raise ValueError(what) from None
        if self.choices is not None and value not in self.choices:
            raise ValueError(what)
        if self.minimum is not None and value < self.minimum:
            raise ValueError(what)
        return value

    def describe_kind(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        kind = {int: "an integer", float: "a number", str: "text", bool: "true or false"}[self.kind]
        return kind if self.minimum is None else f"{kind} >= {self.minimum:g}"


@dataclass(frozen=True)
class MethodSettings:
    """The export options every method may read (each method takes what applies to it).

    A separate type so that methods never see the pipeline's own options (paths, --force, the engine); the
    export builds it from ExportOptions by field name (`pipeline._settings`), so a field added here needs the
    ExportOptions field of the same name, with the same default (tests/test_options.py).
    """

    backbone: Optional[str] = None  # None: the method's own default (MethodExporter.backbone)
    weights: Optional[str] = None
    feature_dim: Optional[int] = None
    coreset_ratio: float = 0.1
    coreset_size: Optional[int] = None
    projection_dim: int = 128
    device: str = "cpu"
    seed: int = 0
    hnsw_m: Optional[int] = None
    ef_construction: Optional[int] = None
    ef: Optional[int] = None
    reweight_neighbours: int = 9
    rerank: int = 1
    reduction: Optional[str] = None  # channel reduction order (features.REDUCTIONS); None: the default
    layers: Optional[Tuple[str, str]] = None  # the two stages; None: the backbone's measured default
    # Coreset at scale (export/coreset_select.py): method, a device profile capping the bank, a Dask scheduler.
    coreset_method: str = "auto"
    device_profile: Optional[str] = None
    dask: Optional[str] = None
    crop: int = 224
    gaussian_sigma: float = 4.0  # the pixel map's blur (methods whose image score is taken on the map)
    # The method's own parameters (MethodExporter.parameters), parsed and complete (defaults filled in).
    method_params: Dict[str, Any] = field(default_factory=dict)
    # Network inputs each nominal image gave, in order (a tiled export: its tiles); empty: one each.
    pieces_per_image: Tuple[int, ...] = ()


class MethodExporter(abc.ABC):
    """A method's export half. Subclasses set `name` and implement `network` and `fit`."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""  # one line for `export --help`
    parameters: ClassVar[Tuple[MethodParameter, ...]] = ()
    # The ImageNet backbone when --backbone is not given: the one the method's stages were measured on.
    default_backbone: ClassVar[str] = "mobilenet_v2"

    def backbone(self, chosen: Optional[str]) -> str:
        """The backbone an export builds: the one chosen, else the method's default."""
        return chosen or self.default_backbone

    @abc.abstractmethod
    def network(self, settings: MethodSettings, spec: InputSpec,
                training_images: Sequence[np.ndarray]) -> Tuple[torch.nn.Module, NetworkInfo]:
        """The module exported as features.onnx (normalised image batch -> the outputs in `NetworkInfo.outputs`).

        `training_images` are the preprocessed nominal images (float32 [3, H, W]), for methods that train.
        """

    @abc.abstractmethod
    def fit(self, outputs: Dict[str, np.ndarray], images: int, settings: MethodSettings, progress: Progress,
            log: Log) -> FittedMethod:
        """The method's arrays from the network outputs of all `images` nominal images (stacked, batch first)."""

    def needs_training_images(self) -> bool:
        """True when `network` trains on the images (they are then kept in memory before the feature pass)."""
        return False

    def attach(self, progress: Progress, log: Log) -> None:
        """The export's progress and log callbacks, before `network` (a method that trains reports through
        them); the default ignores them."""


def no_progress(stage: str, done: int, total: int) -> None:
    pass


def no_log(message: str) -> None:
    pass


__all__: List[str] = ["FittedMethod", "MethodExportError", "MethodExporter", "MethodParameter", "MethodSettings", "NetworkInfo",
                      "Progress", "Log"]
