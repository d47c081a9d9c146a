"""The calibration record (calibration-<UTC stamp>.json in the bundle): schema, validation and how it is applied.

Decisions, the same on every bundle:

* anomalous  <=>  score > image.threshold
* normalised score = score / image.threshold, so the threshold always reads 1.0: 0.5 is half-way to the threshold,
  2.0 twice as far from normal as the threshold. Scores are distances (>= 0), so normalised scores are too.
* defect mask = (anomaly map > pixel.threshold), minus connected regions (8-connectivity) smaller than
  pixel.min_defect_area pixels of the original image.

The runtime loads this module (no torch, no scipy): it holds only data and these three rules.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, NoReturn, Optional, Union

import cv2
import numpy as np

if TYPE_CHECKING:
    from .bundle import Bundle

SCHEMA = "patchcore-edge-calibration"
SCHEMA_VERSION = 1
MAX_FILE_BYTES = 4 * 1024 * 1024

IMAGE_METHODS = ("order-statistic", "maximum-too-few-images", "best-f1", "max-recall")
PIXEL_METHODS = ("nominal-order-statistic", "masks-best-f1", "manual")
CERTIFICATES = ("order-statistic", "held-out")
NORMALISATION = {"kind": "ratio", "formula": "normalised = score / image.threshold", "threshold_reads": 1.0}


class CalibrationError(ValueError):
    """A calibration that cannot be used or made; the message names the file or folder and what to do."""


@dataclass(frozen=True)
class ImageCalibration:
    """See docs/technicians.md; rank = nominal calibration scores at or below the threshold."""

    threshold: float
    method: str
    target_false_alarm_rate: float
    confidence: float
    n_nominal: int
    rank: int
    n_required: int
    guarantee_met: bool
    guaranteed_false_alarm_rate: float
    expected_false_alarm_rate: float
    empirical_false_alarm_rate: float
    n_defect: int = 0
    recall: Optional[float] = None
    precision: Optional[float] = None
    f1: Optional[float] = None
    # Which images the guaranteed rate rests on (CERTIFICATES): all nominal images for an order statistic; for a
    # threshold chosen with the defect images (best-F1), the nominal images held out of that choice.
    certificate: str = "order-statistic"
    n_selection: Optional[int] = None
    n_certification: Optional[int] = None

    def certificate_text(self) -> str:
        """The one wording of what the guaranteed rate rests on, for the summary, the JSON and the docs."""
        if self.certificate == "held-out":
            return (f"certified on {self.n_certification} held-out nominal images (the threshold was chosen on the "
                    f"other {self.n_selection} and the defect images)")
        return f"certified by the order statistic of all {self.n_nominal} nominal images"


@dataclass(frozen=True)
class PixelCalibration:
    threshold: float
    min_defect_area: int
    method: str
    f1: Optional[float] = None
    # Fraction of nominal calibration images with >= min_defect_area pixels above the threshold (an upper bound on
    # the fraction that shows a mask), and the rate of such images guaranteed at the image confidence.
    nominal_images_reaching_area: Optional[float] = None
    guaranteed_mask_rate: Optional[float] = None


@dataclass(frozen=True)
class Calibration:
    """A validated calibration. Build with `from_dict` / `load` (validated) or directly (validated in post-init)."""

    image: ImageCalibration
    pixel: Optional[PixelCalibration]
    nominal_scores: Dict[str, float]
    created_utc: str = ""
    toolkit_version: str = ""
    bundle: Dict[str, str] = field(default_factory=dict)
    warnings: List[Dict[str, str]] = field(default_factory=list)
    sources: Dict[str, Any] = field(default_factory=dict)
    # What produced the scores (see SCORED_WITH): the thresholds hold only for the same set-up.
    scored_with: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate(self.to_dict(), "<calibration>")

    # ------------------------------------------------------------------------------------------ the rules

    def normalise(self, score: float) -> float:
        """score / threshold: the threshold reads 1.0 on every bundle."""
        return float(score) / self.image.threshold

    def decide(self, score: float) -> bool:
        """True (anomalous) iff score > threshold."""
        return bool(float(score) > self.image.threshold)

    def mask(self, anomaly_map: np.ndarray) -> np.ndarray:
        """Defect mask, bool (H, W): map > pixel threshold, keeping regions of at least min_defect_area pixels.

        Without a pixel calibration the mask is empty.
        """
        values = np.asarray(anomaly_map)
        if values.ndim != 2:
            raise ValueError(f"anomaly map must be 2-D (H, W), got shape {values.shape}")
        if self.pixel is None:
            return np.zeros(values.shape, dtype=bool)
        above = values > self.pixel.threshold
        return remove_small_regions(above, self.pixel.min_defect_area)

    # ------------------------------------------------------------------------------------------ (de)serialise

    def to_dict(self) -> Dict[str, Any]:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "created_utc": self.created_utc,
            "toolkit_version": self.toolkit_version,
            "decision": "anomalous if score > image.threshold",
            "normalisation": dict(NORMALISATION),
            "image": {**asdict(self.image), "certified_by": self.image.certificate_text()},
            "pixel": None if self.pixel is None else asdict(self.pixel),
            "nominal_scores": dict(self.nominal_scores),
            "bundle": dict(self.bundle),
            "warnings": [dict(w) for w in self.warnings],
            "sources": dict(self.sources),
            "scored_with": json.loads(json.dumps(self.scored_with)),
        }

    def to_json_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")

    @classmethod
    def from_dict(cls, data: Any, source: str = "<calibration>") -> "Calibration":
        _validate(data, source)
        image = ImageCalibration(**{k: data["image"][k] for k in _IMAGE_FIELDS if k in data["image"]})
        pixel = None
        if data.get("pixel") is not None:
            pixel = PixelCalibration(**{k: data["pixel"][k] for k in _PIXEL_FIELDS if k in data["pixel"]})
        return cls(image=image, pixel=pixel, nominal_scores=dict(data["nominal_scores"]),
                   created_utc=str(data.get("created_utc", "")), toolkit_version=str(data.get("toolkit_version", "")),
                   bundle=dict(data.get("bundle", {})), warnings=list(data.get("warnings", [])),
                   sources=dict(data.get("sources", {})), scored_with=dict(data.get("scored_with", {})))

    @classmethod
    def load(cls, path: Union["os.PathLike[str]", str]) -> "Calibration":
        file = Path(path)
        try:
            if file.stat().st_size > MAX_FILE_BYTES:
                raise CalibrationError(f"{file}: too large to be a calibration file")
            data = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CalibrationError(f"{file}: calibration file not found; calibrate the bundle again") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CalibrationError(f"{file}: not a readable JSON calibration ({error}); roll it back with "
                                   "`patchcore-edge calibrate BUNDLE --rollback` or calibrate again") from None
        return cls.from_dict(data, str(file))


_IMAGE_FIELDS = tuple(ImageCalibration.__dataclass_fields__)
_PIXEL_FIELDS = tuple(PixelCalibration.__dataclass_fields__)
_REQUIRED_IMAGE_FIELDS = tuple(f.name for f in fields(ImageCalibration) if f.default is MISSING)


def remove_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Drop 8-connected regions smaller than min_area pixels from a bool mask."""
    mask = np.asarray(mask, dtype=bool)
    if min_area <= 1 or not mask.any():
        return mask.copy()
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False  # label 0 is the background
    return np.asarray(keep[labels], dtype=bool)


# ---------------------------------------------------------------------------------------------- validation


def _fail(source: str, problem: str) -> NoReturn:
    raise CalibrationError(f"{source}: {problem}; calibrate the bundle again or roll back with "
                           "`patchcore-edge calibrate BUNDLE --rollback`")


def _number(section: Mapping[str, Any], key: str, source: str, where: str, low: float = -math.inf,
            high: float = math.inf, low_open: bool = False, optional: bool = False) -> None:
    value = section.get(key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(source, f"{where}.{key} must be a finite number, got {value!r}")
    ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        _fail(source, f"{where}.{key} = {value!r} is out of range (needs {bound} and <= {high})")


def _integer(section: Mapping[str, Any], key: str, source: str, where: str, low: int = 0) -> None:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(source, f"{where}.{key} must be an integer >= {low}, got {value!r}")


def _validate(data: Any, source: str) -> None:
    if not isinstance(data, dict):
        _fail(source, "is not a JSON object")
    if data.get("schema") != SCHEMA:
        _fail(source, f"not a patchcore-edge calibration (schema {data.get('schema')!r})")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CalibrationError(f"{source}: calibration schema version {version!r} is not supported (this "
                               f"patchcore-edge reads version {SCHEMA_VERSION}); calibrate the bundle again")
    image = data.get("image")
    if not isinstance(image, dict):
        _fail(source, "missing the 'image' section")
    missing = [k for k in _REQUIRED_IMAGE_FIELDS if k not in image]
    if missing:
        _fail(source, f"image section lacks {', '.join(missing)}")
    _number(image, "threshold", source, "image", low=0.0, low_open=True)
    if image.get("method") not in IMAGE_METHODS:
        _fail(source, f"image.method must be one of {', '.join(IMAGE_METHODS)}, got {image.get('method')!r}")
    _number(image, "target_false_alarm_rate", source, "image", low=0.0, high=1.0, low_open=True)
    _number(image, "confidence", source, "image", low=0.0, high=1.0, low_open=True)
    for key in ("guaranteed_false_alarm_rate", "expected_false_alarm_rate", "empirical_false_alarm_rate"):
        _number(image, key, source, "image", low=0.0, high=1.0)
    for key in ("recall", "precision", "f1"):
        _number(image, key, source, "image", low=0.0, high=1.0, optional=True)
    _integer(image, "n_nominal", source, "image", low=1)
    _integer(image, "rank", source, "image", low=0)
    _integer(image, "n_required", source, "image", low=1)
    if "n_defect" in image:
        _integer(image, "n_defect", source, "image", low=0)
    if image["rank"] > image["n_nominal"]:
        _fail(source, f"image.rank {image['rank']} exceeds image.n_nominal {image['n_nominal']}")
    if not isinstance(image.get("guarantee_met"), bool):
        _fail(source, "image.guarantee_met must be true or false")
    if image.get("certificate", "order-statistic") not in CERTIFICATES:
        _fail(source, f"image.certificate must be one of {', '.join(CERTIFICATES)}, got {image.get('certificate')!r}")
    if image.get("certificate") == "held-out":
        _integer(image, "n_selection", source, "image", low=1)
        _integer(image, "n_certification", source, "image", low=1)
    pixel = data.get("pixel")
    if pixel is not None:
        if not isinstance(pixel, dict):
            _fail(source, "pixel must be an object or null")
        _number(pixel, "threshold", source, "pixel", low=0.0, low_open=True)
        _integer(pixel, "min_defect_area", source, "pixel", low=0)
        if pixel.get("method") not in PIXEL_METHODS:
            _fail(source, f"pixel.method must be one of {', '.join(PIXEL_METHODS)}, got {pixel.get('method')!r}")
        for key in ("f1", "nominal_images_reaching_area", "guaranteed_mask_rate"):
            _number(pixel, key, source, "pixel", low=0.0, high=1.0, optional=True)
    normalisation = data.get("normalisation", NORMALISATION)
    if not isinstance(normalisation, dict) or normalisation.get("kind") != NORMALISATION["kind"]:
        _fail(source, f"normalisation kind {normalisation!r} is not supported (only {NORMALISATION['kind']!r})")
    nominal = data.get("nominal_scores")
    if not isinstance(nominal, dict) or not all(k in nominal for k in ("q25", "q50", "q75")):
        _fail(source, "nominal_scores must hold at least q25, q50 and q75")
    for key in ("q25", "q50", "q75"):
        _number(nominal, key, source, "nominal_scores")
    for key in ("bundle", "sources", "scored_with"):
        if not isinstance(data.get(key, {}), dict):
            _fail(source, f"{key} must be an object")
    warnings = data.get("warnings", [])
    if not isinstance(warnings, list) or not all(isinstance(w, dict) for w in warnings):
        _fail(source, "warnings must be a list of objects")


# ---------------------------------------------------------------------------------------------- bundle binding


def check_binding(calibration: Calibration, bundle: "Bundle", source: str) -> None:
    """Raise CalibrationError when the calibration was made on a bundle with a different bank or network."""
    current = bundle.fingerprint()
    for key, value in calibration.bundle.items():
        if key in current and current[key] != value:
            raise CalibrationError(
                f"{source}: this calibration was made for another bundle ({key} differs); the scores of this bundle "
                "are on another scale: calibrate this bundle with its own images")


# ---- item 1 (issue 11): a calibration holds for the set-up that produced its scores, and only for it.
# Keys of Calibration.scored_with, in the order a mismatch is reported, with the words used for them.
SCORED_WITH = (("backend", "feature backend"), ("engine_sha256", "TensorRT engine (sha256)"),
               ("precision", "precision"), ("method", "search settings"), ("toolkit_version", "patchcore-edge version"))
REDO_CALIBRATION = "calibrate again on this device with this set-up (`patchcore-edge calibrate BUNDLE NOMINAL_DIR`)"


def setup_mismatch(calibration: Calibration, actual: Mapping[str, Any]) -> Optional[str]:
    """Why the calibration does not apply to the set-up `actual` (a SCORED_WITH record), or None when it does.

    Any difference voids the guarantee: an FP16 or INT8 engine moves scores by up to 2 % / 10 %, another version
    may score differently. A calibration that records no set-up (made before it was recorded) is refused as well.
    """
    recorded = calibration.scored_with
    if not recorded:
        return "the calibration does not record the backend and settings its scores came from (an older format)"
    differences = []
    for key, words in SCORED_WITH:
        if recorded.get(key) != actual.get(key):
            differences.append(f"{words} {_show(recorded.get(key))} at calibration, {_show(actual.get(key))} now")
    return "; ".join(differences) or None


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k} {_show(v)}" for k, v in sorted(value.items())) + ")"
    if isinstance(value, str) and len(value) == 64:
        return value[:12]
    return "none" if value is None else str(value)
# ---- end item 1


def load_for_bundle(bundle: "Bundle") -> Optional[Calibration]:
    """The bundle's current calibration (validated and checked against the bundle), or None when it has none."""
    ref = bundle.calibration
    if ref is None:
        return None
    path = bundle.path / ref.file
    calibration = Calibration.load(path)
    check_binding(calibration, bundle, str(path))
    return calibration
