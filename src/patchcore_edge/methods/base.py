"""What a scoring method is on the device: bundle arrays + network outputs -> image score and patch map.

A method never touches the CLI, calibration or outputs: the runtime (`runtime/detector.py`) turns its patch map
into a pixel map, applies the calibration and hands the result on. Numpy only.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple, Type, TypeVar

import numpy as np

from ..bundle import BundleError

if TYPE_CHECKING:
    from ..bundle import Bundle


@dataclass(frozen=True)
class MethodScore:
    """One image as a method sees it.

    score: the image score. patch_map: float32 [h, w], the per-position score on the method's output grid (the
    runtime upsamples it to the network input and smooths it). details: method-specific numbers (PatchCore:
    max_distance, weight, reranked) for records and tests.
    """

    score: float
    patch_map: np.ndarray
    details: Dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ScorerOptions:
    """Run-time choices a user may make for any method (a method ignores what does not apply to it)."""

    ef: Optional[int] = None
    exact_search: bool = False
    threads: Optional[int] = None
    # The calibrated pixel threshold and the map's reach in patch cells (`maps.map_reach_cells`): a method whose
    # patch map is approximate makes it exact wherever the map can exceed the threshold, so that masks do not
    # depend on its search settings (PatchCore: `scoring.image_scores`). None: no calibration.
    exact_map_above: Optional[float] = None
    exact_map_reach: int = 0


class Scorer(abc.ABC):
    """A method's runtime half. Subclasses set `name` and implement `load` and `score`."""

    name: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def load(cls, bundle: "Bundle", options: ScorerOptions) -> "Scorer":
        """Read and check the method's arrays and params from the bundle (BundleError naming the problem)."""

    @abc.abstractmethod
    def score(self, outputs: Mapping[str, np.ndarray], valid: Optional[np.ndarray] = None) -> List[MethodScore]:
        """Score a batch: `outputs` are the network's outputs by name, batch first.

        `valid` (bool [B, h*w], optional): grid positions that may score; the others (letterbox padding, outside
        the region of interest) never give the image score and are 0 in the patch map.
        """

    @classmethod
    def resident_bytes(cls, bundle: "Bundle", search_threads: int = 1) -> Dict[str, int]:
        """Memory the method holds at run time, by component, from the manifest alone (for `devices fit`).

        The default: every method array resident once.
        """
        return {key: int(np.prod(record.shape)) * np.dtype(record.dtype).itemsize
                for key, record in bundle.method.arrays.items()}

    @classmethod
    def caveats(cls, bundle: "Bundle") -> List[str]:
        """Where this method's numbers need care on this bundle, one sentence each (`eval` prints them under
        its tables; PaDiM: it assumes aligned parts). The default: none."""
        return []

    @classmethod
    def memory_advice(cls, bundle: "Bundle") -> Optional[str]:
        """What to change when the bundle does not fit a board (`devices fit`); None: the generic advice."""
        return None

    def settings(self) -> Dict[str, object]:
        """What the scores depend on beyond the bundle files (PatchCore: ef, exact search), for calibration."""
        return {}


def require_outputs(bundle: "Bundle", names: Tuple[str, ...]) -> None:
    """BundleError naming the manifest when the bundle's network lacks an output the method reads."""
    missing = [name for name in names if name not in bundle.features.outputs]
    if missing:
        raise BundleError(f"{bundle.path / 'manifest.json'}: features.outputs {list(bundle.features.outputs)} lack "
                          f"{missing[0]!r}, which method {bundle.method.name} reads; re-export the bundle")


Params = TypeVar("Params")


def read_params(bundle: "Bundle", parse: Callable[[Mapping[str, Any]], Params],
                errors: Tuple[Type[Exception], ...]) -> Params:
    """The method's settings parsed from the manifest's method.params; a bad one is a BundleError naming the
    manifest (the scorer's own error types, `errors`, say what is wrong)."""
    try:
        return parse(bundle.method.params)
    except errors as error:
        raise BundleError(f"{bundle.path / 'manifest.json'}: {error}; re-export the bundle") from None
