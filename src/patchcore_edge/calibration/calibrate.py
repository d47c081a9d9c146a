"""Calibrate a bundle in the field: score folders with the runtime Detector, set thresholds, guard, write, roll back.

Nothing here changes the bundle until every number is computed; the write itself is one one `Bundle.set_calibration`
call (`Bundle.set_calibration`: manifest.json is replaced last), so an interruption leaves the old or the new calibration, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import cv2
import numpy as np

from .. import __version__
from ..bundle import Bundle, BundleError, utc_stamp
from ..imageio import IMAGE_SUFFIXES, ImageReadError, decode_rgb, list_images, read_rgb
from .. import stats
from ..decision import (REDO_CALIBRATION, Calibration, CalibrationError, ImageCalibration, PixelCalibration,
                        check_binding, setup_mismatch)
from ..runtime.detector import Detector

# Below this many usable nominal images the order statistics say next to nothing (the maximum of 9 images
# guarantees only a 28 % false-alarm rate at 95 % confidence) and the robust summaries (quartiles) are noise.
MIN_NOMINAL_IMAGES = 10
# Defect maps are pooled for the pixel best-F1 at this longest side: maps are upsampled from a coarse feature grid
# and blurred, so 256 px keeps their shape while bounding memory (about 256 KiB per defect image).
PIXEL_SAMPLE_SIDE = 256
# Per nominal image, the largest map values kept: enough for any minimum defect area up to this many pixels.
TOP_VALUES_KEPT = 4096

Progress = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


@dataclass(frozen=True)
class Finding:
    """Something the technician should know: a code for scripts, a sentence for people, the files concerned."""

    code: str
    message: str
    severity: str = "warning"  # "warning" or "info"
    paths: Tuple[str, ...] = ()

    def as_record(self) -> Dict[str, str]:
        return {"code": self.code, "severity": self.severity, "message": self.message}


@dataclass
class ScoredImage:
    path: Path
    group: str  # "nominal" or "defect"
    score: float
    sha256: str
    in_training: bool = False
    top_values: Optional[np.ndarray] = None  # nominal: largest map values, descending
    has_mask: Optional[bool] = None  # check: whether the calibrated defect mask is non-empty
    flags: List[str] = field(default_factory=list)


@dataclass
class ScoredFolder:
    folder: Path
    images: List[ScoredImage]
    skipped: List[ImageReadError]
    pixel_values: List[np.ndarray] = field(default_factory=list)  # defect maps (downsampled), with masks given
    pixel_labels: List[np.ndarray] = field(default_factory=list)
    short_sides: List[int] = field(default_factory=list)


@dataclass
class CalibrationOutcome:
    calibration: Calibration
    nominal: List[ScoredImage]
    defects: List[ScoredImage]
    excluded: List[ScoredImage]  # usable images left out of the statistics (training images, duplicates)
    skipped: List[ImageReadError]
    findings: List[Finding]
    pixel_nominal_threshold: Optional[float] = None
    written: Optional[str] = None  # calibration file name in the bundle, when written
    bundle_dir: Optional[Path] = None


@dataclass
class CheckOutcome:
    calibration: Calibration
    images: List[ScoredImage]
    skipped: List[ImageReadError]
    false_alarms: int
    interval: Tuple[float, float]
    confidence: float
    verdict: str  # "above target", "within target" or "consistent"
    images_with_mask: Optional[int]
    findings: List[Finding]

    @property
    def observed_rate(self) -> float:
        return self.false_alarms / max(1, len(self.images))


# ---------------------------------------------------------------------------------------------- scoring


def _read_items(paths: Sequence[Path], hashes: Dict[Path, str]) -> Iterator[Tuple[Path, Any]]:
    """(path, RGB image or ImageReadError) for the Detector's stream; records each file's sha256 on the way."""
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as error:
            yield path, ImageReadError(path, f"cannot read file ({error.strerror or error})")
            continue
        hashes[path] = hashlib.sha256(data).hexdigest()
        try:
            yield path, decode_rgb(data, path)
        except ImageReadError as error:
            yield path, error


def _top_values(anomaly_map: np.ndarray, count: int) -> np.ndarray:
    flat = np.asarray(anomaly_map, dtype=np.float32).ravel()
    count = min(count, flat.size)
    top = np.partition(flat, flat.size - count)[flat.size - count:]
    return np.ascontiguousarray(np.sort(top)[::-1], dtype=np.float32)


def _downsample(anomaly_map: np.ndarray, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    height, width = anomaly_map.shape
    scale = PIXEL_SAMPLE_SIDE / max(height, width)
    if scale >= 1.0:
        return anomaly_map.astype(np.float32).ravel(), mask.ravel()
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small_map = cv2.resize(anomaly_map.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    # A pixel of the small mask is defective when most of the area it covers is.
    small_mask = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA) >= 0.5
    return small_map.ravel(), small_mask.ravel()


def find_mask(image_path: Path, images_root: Path, masks_root: Path) -> Optional[Path]:
    """The mask of a defect image: same relative folder under masks_root, named <stem>_mask.* or <stem>.*"""
    relative = image_path.relative_to(images_root)
    folder = masks_root / relative.parent
    for stem in (f"{image_path.stem}_mask", image_path.stem):
        for suffix in (image_path.suffix, *sorted(IMAGE_SUFFIXES)):
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def read_mask(path: Path) -> np.ndarray:
    """A defect mask file -> bool (H, W); any channel above mid-grey marks the defect."""
    return np.asarray(read_rgb(path).max(axis=2) > 127, dtype=bool)


def score_folder(detector: Any, folder: Path, group: str, training: Set[str], keep_top: bool = False,
                 masks_root: Optional[Path] = None, masker: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                 batch_size: int = 4, progress: Progress = _no_progress) -> ScoredFolder:
    """Score every image under folder (recursively) with the detector; unreadable files are listed, not fatal."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"{folder}: not a folder; give the folder that holds the {group} images")
    paths, skipped = list_images(folder, recursive=True)
    hashes: Dict[Path, str] = {}
    out = ScoredFolder(folder=folder, images=[], skipped=list(skipped))
    need_maps = keep_top or masks_root is not None or masker is not None
    done = 0
    for key, result in detector.stream(_read_items(paths, hashes), batch_size=batch_size, maps=need_maps):
        done += 1
        progress(group, done, len(paths))
        path = Path(key)
        if isinstance(result, ImageReadError):
            out.skipped.append(result)
            continue
        score = float(result.score)
        if not math.isfinite(score):
            out.skipped.append(ImageReadError(path, f"the detector returned a non-finite score ({score})"))
            continue
        digest = hashes[path]
        image = ScoredImage(path=path, group=group, score=score, sha256=digest, in_training=digest in training)
        anomaly_map = result.anomaly_map
        if anomaly_map is not None:
            out.short_sides.append(int(min(anomaly_map.shape)))
            if keep_top:
                image.top_values = _top_values(anomaly_map, TOP_VALUES_KEPT)
            if masks_root is not None:
                _add_pixels(out, path, folder, masks_root, anomaly_map)
            if masker is not None:
                image.has_mask = bool(np.any(masker(anomaly_map)))
        out.images.append(image)
    return out


def _add_pixels(out: ScoredFolder, path: Path, folder: Path, masks_root: Path, anomaly_map: np.ndarray) -> None:
    mask_path = find_mask(path, folder, masks_root)
    if mask_path is None:
        out.skipped.append(ImageReadError(path, f"no mask found under {masks_root} (looked for "
                                                f"{path.stem}_mask.* and {path.stem}.*); image used for the image "
                                                "threshold only"))
        return
    try:
        mask = read_mask(mask_path)
    except ImageReadError as error:
        out.skipped.append(ImageReadError(mask_path, f"{error.reason}; image used for the image threshold only"))
        return
    if mask.shape != anomaly_map.shape:
        out.skipped.append(ImageReadError(mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                                                     f"{anomaly_map.shape[1]}x{anomaly_map.shape[0]}; image used "
                                                     "for the image threshold only"))
        return
    values, labels = _downsample(anomaly_map, mask)
    out.pixel_values.append(values)
    out.pixel_labels.append(labels)


# ---------------------------------------------------------------------------------------------- bundle helpers


def training_hashes(bundle: Bundle) -> Set[str]:
    """sha256 of the images the bank was built from (empty when the bundle does not record them)."""
    path = bundle.training_images_file or bundle.path / "training_images.json"
    if not path.is_file():
        return set()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {str(h).lower() for h in data["sha256"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CalibrationError(f"{path}: unreadable list of training images ({error}); re-export the bundle") from None


def current_calibration(bundle: Bundle) -> Optional[Calibration]:
    ref = bundle.calibration
    if ref is None:
        return None
    try:
        return Calibration.load(bundle.path / ref.file)
    except (RecursionError, ValueError, TypeError, KeyError) as error:  # nested too deep, NaN, wrong fields
        raise CalibrationError(f"{bundle.path / ref.file}: not a usable calibration ({type(error).__name__})") from None


def reference_quantiles(bundle: Bundle, previous: Optional[Calibration]
                        ) -> Tuple[Optional[Dict[str, float]], str]:
    """Nominal score quantiles to compare with: the export's held-out scores if recorded, else the last calibration."""
    recorded = bundle.training_scores
    if recorded is not None and all(k in recorded for k in ("q25", "q50", "q75")):
        return recorded, "the export"
    if previous is not None:
        return dict(previous.nominal_scores), f"the current calibration ({previous.created_utc or 'undated'})"
    return None, ""


def default_min_defect_area(bundle: Bundle, short_side: int) -> int:
    """A quarter of one feature cell, in original-image pixels.

    The map comes from a grid with one cell per `stride` crop pixels, upsampled and blurred: a region smaller
    than a quarter cell is the tip of a blob barely crossing the threshold, not a structure the model resolved.
    """
    spec = bundle.input_spec
    stride = float(bundle.features.stride)
    if spec.tile is not None:  # a tiled bundle's network sees one tile at a time: its cells are a tile's
        short_side = min(short_side, spec.tile)
    # The shorter side's scale: `resize` for a crop, the input's shorter side when the whole image is fitted.
    resize = float(spec.resize) if spec.fit == "crop" else float(min(spec.width, spec.height))
    cell = stride * short_side / resize
    return max(1, round((cell / 2.0) ** 2))


# ---------------------------------------------------------------------------------------------- calibration


def _dedupe(images: List[ScoredImage], group: str, findings: List[Finding]) -> Tuple[List[ScoredImage],
                                                                                       List[ScoredImage]]:
    seen: Dict[str, Path] = {}
    kept: List[ScoredImage] = []
    dropped: List[ScoredImage] = []
    for image in images:
        if image.sha256 in seen:
            image.flags.append(f"duplicate of {seen[image.sha256]}")
            dropped.append(image)
        else:
            seen[image.sha256] = image.path
            kept.append(image)
    if dropped:
        findings.append(Finding(
            "duplicate-images", f"{len(dropped)} {group} image(s) are byte-identical copies of others and were "
            "counted once (copies would fake a larger sample)", paths=tuple(str(i.path) for i in dropped)))
    return kept, dropped


def _nominal_set(scored: ScoredFolder, defects: Optional[ScoredFolder], findings: List[Finding]
                 ) -> Tuple[List[ScoredImage], List[ScoredImage]]:
    """Usable nominal images and the excluded ones (training images, duplicates, files also given as defects)."""
    nominal, excluded = _dedupe(scored.images, "nominal", findings)
    in_training = [i for i in nominal if i.in_training]
    if in_training:
        for image in in_training:
            image.flags.append("training image")
        everything = len(in_training) == len(nominal)
        findings.append(Finding(
            "training-images",
            f"{len(in_training)} of {len(nominal)} nominal images were used to build the bundle; they score "
            "lower than new parts would (their own patches are in the memory bank), so they are left out of the "
            "statistics" + ("" if not everything else "; no other image remains"),
            paths=tuple(str(i.path) for i in in_training)))
        nominal = [i for i in nominal if not i.in_training]
        excluded += in_training
    if defects is not None:
        defect_hashes = {i.sha256 for i in defects.images}
        both = [i for i in nominal if i.sha256 in defect_hashes]
        if both:
            findings.append(Finding(
                "nominal-and-defect", f"{len(both)} file(s) appear both as nominal and as defect images; they were "
                "left out of the nominal set: check the labels", paths=tuple(str(i.path) for i in both)))
            for image in both:
                image.flags.append("also in the defect folder")
            nominal = [i for i in nominal if i.sha256 not in defect_hashes]
            excluded += both
    return nominal, excluded


def _require_enough(nominal: List[ScoredImage], scored: ScoredFolder, alpha: float, confidence: float,
                    listed: Optional[int] = None) -> None:
    """Raise a CalibrationError saying what to do when fewer than MIN_NOMINAL_IMAGES nominal images are usable."""
    usable = len(nominal) if listed is None else listed
    if usable >= MIN_NOMINAL_IMAGES:
        return
    needed = stats.min_images(alpha, confidence)
    problems = []
    if scored.skipped:
        what = "not images" if listed is not None else "unreadable or not images"
        problems.append(f"{len(scored.skipped)} file(s) skipped as {what}")
    excluded = len(scored.images) - len(nominal)
    if listed is None and excluded:
        problems.append(f"{excluded} left out (training images, duplicates or also given as defects)")
    detail = f" ({'; '.join(problems)})" if problems else ""
    found = len(scored.images) if listed is None else listed
    if found == 0 and not scored.skipped:
        head = f"{scored.folder}: no images found"
    else:
        head = f"{scored.folder}: {usable} usable nominal image(s){detail}"
    raise CalibrationError(
        f"{head}. A calibration needs at least {MIN_NOMINAL_IMAGES} photos of good parts the bundle has not seen "
        f"(and {needed} to guarantee a {alpha:.2%} false-alarm rate at {confidence:.0%} confidence); add photos "
        "of good parts to the folder and run calibrate again")


@dataclass(frozen=True)
class CalibrationOptions:
    """What `calibrate BUNDLE NOMINAL_DIR` is asked for (the command builds it from its options)."""

    nominal_dir: Path
    defects_dir: Optional[Path] = None
    masks_dir: Optional[Path] = None
    false_alarm_rate: float = 0.01
    confidence: float = 0.95
    optimise: Optional[str] = None  # None, "f1" or "recall"
    min_defect_area: Optional[int] = None  # image pixels; None: default_min_defect_area
    batch_size: int = 4


def _check_options(options: CalibrationOptions) -> None:
    try:
        stats._check_rates(options.false_alarm_rate, options.confidence)
    except ValueError as error:
        raise CalibrationError(str(error)) from None
    optimise, defects_dir, masks_dir = options.optimise, options.defects_dir, options.masks_dir
    if optimise not in (None, "f1", "recall"):
        raise CalibrationError(f"--optimise must be f1 or recall, got {optimise!r}")
    if optimise is not None and defects_dir is None:
        raise CalibrationError(f"--optimise {optimise} needs defect images: add --defects DIR")
    if masks_dir is not None and defects_dir is None:
        raise CalibrationError("--masks needs --defects: masks belong to defect images")
    if masks_dir is not None and not Path(masks_dir).is_dir():
        raise CalibrationError(f"{masks_dir}: not a folder of defect masks")
    if options.min_defect_area is not None and options.min_defect_area < 0:
        raise CalibrationError(f"--min-defect-area must be >= 0 pixels, got {options.min_defect_area}")
    if not Path(options.nominal_dir).is_dir():
        raise CalibrationError(f"{options.nominal_dir}: not a folder; give the folder of good-part images "
                               "(NOMINAL_DIR)")
    if defects_dir is not None and not Path(defects_dir).is_dir():
        raise CalibrationError(f"{defects_dir}: not a folder of defect images")


def calibrate(detector: Any, bundle: Bundle, options: CalibrationOptions,
              progress: Progress = _no_progress) -> CalibrationOutcome:
    """Score the folders and compute a Calibration (the bundle is not changed; see `write_calibration`)."""
    _check_options(options)
    nominal_dir = Path(options.nominal_dir)
    defects_dir, masks_dir = options.defects_dir, options.masks_dir
    false_alarm_rate, confidence = options.false_alarm_rate, options.confidence
    batch_size = options.batch_size

    findings: List[Finding] = []
    training = training_hashes(bundle)
    if not training:
        findings.append(Finding("no-training-list", "the bundle does not list its training images, so the check "
                                "that calibration images are new to the bundle was not possible", "info"))
    try:
        previous = current_calibration(bundle)
    except CalibrationError as error:
        # A broken current calibration must not block its replacement; only the shift test needs it.
        previous = None
        findings.append(Finding("previous-unreadable", f"the current calibration cannot be read ({error}); the "
                                "comparison with it was skipped and the new calibration replaces it"))

    # Count first, so a wrong or thin folder fails before minutes of scoring.
    paths, others = list_images(nominal_dir, recursive=True)
    if len(paths) < MIN_NOMINAL_IMAGES:
        _require_enough([], ScoredFolder(nominal_dir, [], others), false_alarm_rate, confidence, listed=len(paths))
    scored = score_folder(detector, nominal_dir, "nominal", training, keep_top=True, batch_size=batch_size,
                          progress=progress)
    defects_scored = None
    if defects_dir is not None:
        defects_scored = score_folder(detector, Path(defects_dir), "defect", training, masks_root=masks_dir,
                                      batch_size=batch_size, progress=progress)
    nominal, excluded = _nominal_set(scored, defects_scored, findings)
    _require_enough(nominal, scored, false_alarm_rate, confidence)
    defects: List[ScoredImage] = []
    skipped = list(scored.skipped)
    if defects_scored is not None:
        defects, dropped = _dedupe(defects_scored.images, "defect", findings)
        excluded += dropped
        skipped += defects_scored.skipped
        if not defects:
            raise CalibrationError(f"{defects_dir}: no usable defect images; remove --defects or add images of "
                                   "defective parts")
        trained_defects = [i for i in defects if i.in_training]
        if trained_defects:
            findings.append(Finding("defect-in-training", f"{len(trained_defects)} defect image(s) were used to "
                                    "build the bundle as good parts: the bundle has learnt these defects as normal; "
                                    "re-export without them", paths=tuple(str(i.path) for i in trained_defects)))
    if skipped:
        findings.append(Finding("skipped-files", f"{len(skipped)} file(s) were skipped", "info",
                                paths=tuple(f"{e.path}: {e.reason}" for e in skipped)))

    nominal_scores = np.array([i.score for i in nominal])
    defect_scores = np.array([i.score for i in defects])
    image = _image_calibration(nominal_scores, defect_scores, false_alarm_rate, confidence, options.optimise,
                               findings, split_keys=[i.sha256 for i in nominal])
    short_side = int(np.median(scored.short_sides)) if scored.short_sides else 0
    pixel, pixel_nominal = _pixel_calibration(nominal, defects_scored, bundle, short_side, options.min_defect_area,
                                              image, findings)
    _guard_rails(nominal, defects, image, bundle, previous, findings)

    calibration = Calibration(
        image=image, pixel=pixel, nominal_scores=stats.quantiles(nominal_scores),
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), toolkit_version=__version__,
        bundle=bundle.fingerprint(), warnings=[f.as_record() for f in findings if f.severity == "warning"],
        sources={"nominal_dir": str(nominal_dir), "defects_dir": None if defects_dir is None else str(defects_dir),
                 "masks_dir": None if masks_dir is None else str(masks_dir), "nominal_used": len(nominal),
                 "defects_used": len(defects), "excluded": len(excluded), "skipped": len(skipped),
                 "backend": str(getattr(detector, "backend_name", "unknown"))},
        scored_with=dict(getattr(detector, "scored_with", {})))
    return CalibrationOutcome(calibration=calibration, nominal=nominal, defects=defects, excluded=excluded,
                              skipped=skipped, findings=findings, pixel_nominal_threshold=pixel_nominal,
                              bundle_dir=bundle.path)


def held_out_split(keys: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """(selection, certification) index arrays: images in sha256 order, alternately. The split ignores the scores,
    so the certification images stay exchangeable with future good parts whatever the selection half chose."""
    order = np.array(sorted(range(len(keys)), key=lambda i: (keys[i], i)), dtype=np.int64)
    return order[0::2], order[1::2]


def _image_calibration(nominal: np.ndarray, defects: np.ndarray, alpha: float, confidence: float,
                       optimise: Optional[str], findings: List[Finding],
                       split_keys: Optional[Sequence[str]] = None) -> ImageCalibration:
    base = stats.image_threshold(nominal, alpha, confidence)
    n = int(nominal.size)
    if not base.guarantee_met and optimise != "f1":
        findings.append(Finding(
            "too-few-images",
            f"{n} nominal images cannot guarantee a {alpha:.2%} false-alarm rate at {confidence:.0%} confidence "
            f"(that needs {base.n_required}); the threshold is the highest nominal score, which guarantees only "
            f"{base.guaranteed_rate:.2%} at that confidence. Add good-part images to reach {base.n_required}"))
    method = "order-statistic" if base.guarantee_met else "maximum-too-few-images"
    threshold = base.threshold
    # The images the guaranteed rate is computed on: all of them for a fixed-rank order statistic.
    certify = nominal
    certificate, n_selection, n_certification = "order-statistic", None, None
    if optimise == "recall":
        # Recall only falls as the threshold rises, so the lowest threshold that keeps the false-alarm guarantee,
        # the order statistic above, is the one with the highest recall; its certificate is the order statistic's.
        method = "max-recall"
    elif optimise == "f1":
        # A threshold chosen by looking at the nominal scores cannot be certified on the same scores (in-sample
        # the stated rate is exceeded in 6-9 % of calibrations at 95 %): choose on one half, certify on the other.
        selection, held_out = held_out_split(split_keys if split_keys is not None else [f"{i:012d}" for i in range(n)])
        point = stats.best_f1_threshold(nominal[selection], defects)
        threshold = point.threshold
        method = "best-f1"
        certify = nominal[held_out]
        certificate, n_selection, n_certification = "held-out", int(selection.size), int(held_out.size)
        if threshold <= 0:
            raise CalibrationError("the best-F1 threshold is 0: the defect images score no higher than the good "
                                   "ones; check the folders or calibrate without --optimise f1")
    exceed = int(np.count_nonzero(nominal > threshold))
    certified_exceed = int(np.count_nonzero(certify > threshold))
    guaranteed = stats.guaranteed_rate(int(certify.size), certified_exceed, confidence)
    if method == "best-f1" and guaranteed > alpha:
        findings.append(Finding(
            "f1-above-target", f"the best-F1 threshold lets {certified_exceed} of the {certify.size} held-out nominal "
            f"images through as false alarms and guarantees only a {guaranteed:.2%} false-alarm rate at "
            f"{confidence:.0%} confidence, above the {alpha:.2%} target; calibrate without --optimise f1 to keep the "
            "target"))
    recall = precision = f1 = None
    if defects.size:
        true_pos = int(np.count_nonzero(defects > threshold))
        recall = true_pos / defects.size
        flagged = true_pos + exceed
        precision = true_pos / flagged if flagged else 1.0
        f1 = 2 * true_pos / (2 * true_pos + exceed + (defects.size - true_pos))
    if threshold <= 0:
        raise CalibrationError("every nominal score is 0: the images are blank or identical to the training data; "
                               "check the nominal folder")
    return ImageCalibration(
        threshold=float(threshold), method=method, target_false_alarm_rate=alpha, confidence=confidence, n_nominal=n,
        rank=int(np.count_nonzero(nominal <= threshold)), n_required=base.n_required,
        guarantee_met=bool(guaranteed <= alpha), guaranteed_false_alarm_rate=float(guaranteed),
        expected_false_alarm_rate=(certified_exceed + 1) / (certify.size + 1), empirical_false_alarm_rate=exceed / n,
        n_defect=int(defects.size), recall=recall, precision=precision, f1=f1, certificate=certificate,
        n_selection=n_selection, n_certification=n_certification)


def _pixel_calibration(nominal: List[ScoredImage], defects: Optional[ScoredFolder], bundle: Bundle,
                       short_side: int, min_area: Optional[int], image: ImageCalibration, findings: List[Finding]
                       ) -> Tuple[Optional[PixelCalibration], Optional[float]]:
    tops = [i.top_values for i in nominal if i.top_values is not None and i.top_values.size]
    if len(tops) < len(nominal) or not tops:
        findings.append(Finding("no-maps", "the detector returned no anomaly maps, so no pixel threshold was set",
                                "info"))
        return None, None
    area = default_min_defect_area(bundle, short_side) if min_area is None else int(min_area)
    rank = max(1, area)
    # Per image, the min_area-th largest map value: above it fewer than min_area pixels exceed the threshold, so no
    # region of min_area pixels can appear. Its order statistic carries the image-level guarantee over to masks.
    per_image = np.array([float(t[min(rank, t.size) - 1]) for t in tops])
    if rank > TOP_VALUES_KEPT:
        findings.append(Finding("area-capped", f"minimum defect area {area} px exceeds the {TOP_VALUES_KEPT} map "
                                "values kept per image; the nominal pixel threshold is conservative (higher)", "info"))
    nominal_point = stats.image_threshold(per_image, image.target_false_alarm_rate, image.confidence)
    method = "nominal-order-statistic"
    threshold = nominal_point.threshold
    f1 = None
    if defects is not None and defects.pixel_values:
        values = np.concatenate(defects.pixel_values)
        labels = np.concatenate(defects.pixel_labels)
        if labels.any():
            point = stats.best_f1_pixel_threshold(values, labels)
            threshold, f1, method = point.threshold, point.f1, "masks-best-f1"
        else:
            findings.append(Finding("empty-masks", "the defect masks mark no pixel; the pixel threshold comes from "
                                    "the nominal images"))
    if threshold <= 0:
        findings.append(Finding("no-pixel-threshold", "the pixel threshold came out as 0 (flat anomaly maps); no "
                                "pixel threshold was set"))
        return None, float(nominal_point.threshold)
    reaching = int(np.count_nonzero(per_image > threshold))
    return PixelCalibration(
        threshold=float(threshold), min_defect_area=int(area), method=method, f1=f1,
        nominal_images_reaching_area=reaching / per_image.size,
        guaranteed_mask_rate=stats.guaranteed_rate(per_image.size, reaching, image.confidence)
    ), float(nominal_point.threshold)


def _guard_rails(nominal: List[ScoredImage], defects: List[ScoredImage], image: ImageCalibration,
                 bundle: Bundle, previous: Optional[Calibration], findings: List[Finding]) -> None:
    scores = np.array([i.score for i in nominal])
    reference, origin = reference_quantiles(bundle, previous)
    if reference is not None:
        shift = stats.distribution_shift(reference, scores)
        if shift.moved:
            findings.append(Finding(
                "score-shift",
                f"the nominal scores differ from those of {origin}: median {shift.new_median:.4g} vs "
                f"{shift.reference_median:.4g} ({shift.median_shift_iqr:+.1f} IQR), spread x{shift.spread_ratio:.2f}. "
                "The camera, lighting or parts may have changed: if so, consider re-exporting the bundle with "
                "images of the new set-up; if these images are right, the new thresholds follow them"))
    outliers = stats.upper_outliers(scores)
    if outliers.any():
        odd = [i for i, flag in zip(nominal, outliers) if flag]
        for item in odd:
            item.flags.append("outlier: scores like a defect")
        findings.append(Finding(
            "nominal-outliers",
            f"{len(odd)} nominal image(s) score far above the others (beyond Q3 + {stats.OUTLIER_FENCE_IQR:g} IQR): "
            "likely a defect filed as good, or a changed scene. Look at them; remove real defects and calibrate "
            "again", paths=tuple(str(i.path) for i in odd)))
    above = [i for i in nominal if i.score > image.threshold]
    for item in above:
        item.flags.append("above threshold")
    if above:
        findings.append(Finding(
            "nominal-above-threshold", f"{len(above)} of {len(nominal)} nominal calibration image(s) score above the "
            "threshold (allowed by the order statistic; worth a look)", "info",
            paths=tuple(str(i.path) for i in above)))
    missed = [i for i in defects if i.score <= image.threshold]
    for item in missed:
        item.flags.append("missed (below threshold)")
    if missed:
        findings.append(Finding(
            "missed-defects", f"{len(missed)} of {len(defects)} defect image(s) score at or below the threshold and "
            "would pass as good", "info", paths=tuple(str(i.path) for i in missed)))


# ---------------------------------------------------------------------------------------------- write / rollback


def write_calibration(bundle: Bundle, calibration: Calibration) -> str:
    """Add the calibration to the bundle as the current one; the current becomes previous, older ones go."""
    check_binding(calibration, bundle, str(bundle.path))
    name = bundle.unique_name(f"calibration-{utc_stamp()}", ".json")
    bundle.set_calibration(name, calibration.to_json_bytes())
    return name


def rollback(bundle: Bundle) -> Tuple[str, str]:
    """Swap the current and previous calibrations; returns (now current, now previous)."""
    ref = bundle.calibration
    if ref is None:
        raise CalibrationError(f"{bundle.path}: the bundle has no calibration, so there is nothing to roll back; "
                               "run `patchcore-edge calibrate BUNDLE NOMINAL_DIR` to make one")
    if not ref.previous:
        raise CalibrationError(f"{bundle.path}: there is no previous calibration to roll back to (only "
                               f"{ref.file}); calibrate again with other images to replace it")
    path = bundle.path / ref.previous
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != bundle.file_sha256(ref.previous):
        raise CalibrationError(f"{path}: the previous calibration is missing or altered, so it cannot be restored; "
                               "calibrate again instead")
    check_binding(Calibration.load(path), bundle, str(path))
    bundle.swap_calibrations()
    return ref.previous, ref.file


# ---------------------------------------------------------------------------------------------- check


def check(detector: Any, bundle: Bundle, folder: Path,
          confidence: Optional[float] = None, batch_size: int = 4, progress: Progress = _no_progress) -> CheckOutcome:
    """Score fresh good parts against the current calibration: observed false-alarm rate and its exact interval."""
    calibration = current_calibration(bundle)
    if calibration is None:
        raise CalibrationError(f"{bundle.path}: the bundle has no calibration to check; run `patchcore-edge calibrate "
                               "BUNDLE NOMINAL_DIR` first")
    check_binding(calibration, bundle, str(bundle.path))
    # The check measures the set-up the line runs (the detector is loaded as `run` loads it): a calibration made
    # with another backend, engine or version says nothing about it.
    actual = getattr(detector, "scored_with", None)
    problem = None if actual is None else setup_mismatch(calibration, actual)
    if problem is not None:
        raise CalibrationError(f"{bundle.path / bundle.calibration.file if bundle.calibration else bundle.path}: "
                               f"the current calibration does not apply to this set-up ({problem}); "
                               f"{REDO_CALIBRATION}")
    level = calibration.image.confidence if confidence is None else float(confidence)
    findings: List[Finding] = []
    training = training_hashes(bundle)
    masker = calibration.mask if calibration.pixel is not None else None
    scored = score_folder(detector, Path(folder), "nominal", training, masker=masker, batch_size=batch_size,
                          progress=progress)
    images, _ = _dedupe(scored.images, "nominal", findings)
    in_training = [i for i in images if i.in_training]
    if in_training:
        findings.append(Finding("training-images", f"{len(in_training)} image(s) were used to build the bundle and "
                                "were left out (they would make the check look better than reality)",
                                paths=tuple(str(i.path) for i in in_training)))
        images = [i for i in images if not i.in_training]
    if not images:
        raise CalibrationError(f"{folder}: no usable new images of good parts to check with"
                               + (f" ({len(scored.skipped)} skipped)" if scored.skipped else ""))
    scores = np.array([i.score for i in images])
    alarms = [i for i in images if calibration.decide(i.score)]
    for item in alarms:
        item.flags.append("false alarm")
    low, high = stats.clopper_pearson(len(alarms), len(images), level)
    target = calibration.image.target_false_alarm_rate
    verdict = "above target" if low > target else ("within target" if high <= target else "consistent")
    with_mask = None
    if masker is not None and all(i.has_mask is not None for i in images):
        with_mask = sum(1 for i in images if i.has_mask)
    if len(images) >= MIN_NOMINAL_IMAGES:
        shift = stats.distribution_shift(calibration.nominal_scores, scores)
        if shift.moved:
            findings.append(Finding("score-shift", f"scores moved since calibration: median {shift.new_median:.4g} vs "
                                    f"{shift.reference_median:.4g} ({shift.median_shift_iqr:+.1f} IQR), spread "
                                    f"x{shift.spread_ratio:.2f}; the scene may have changed"))
    return CheckOutcome(calibration=calibration, images=images, skipped=scored.skipped, false_alarms=len(alarms),
                        interval=(low, high), confidence=level, verdict=verdict, images_with_mask=with_mask,
                        findings=findings)


def load_detector(bundle: "Bundle | Path", backend: str = "auto") -> Any:
    """The runtime Detector for the bundle, its current calibration unread (this command replaces it).

    Given a loaded Bundle (its files verified once already), the files are not hashed again."""
    return Detector.load(bundle, backend=backend, ignore_calibration=True)


__all__ = [
    "MIN_NOMINAL_IMAGES",
    "BundleError",
    "CalibrationError",
    "CalibrationOptions",
    "CalibrationOutcome",
    "CheckOutcome",
    "Finding",
    "ScoredImage",
    "calibrate",
    "check",
    "default_min_defect_area",
    "load_detector",
    "rollback",
    "score_folder",
    "write_calibration",
]
