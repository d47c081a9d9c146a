"""Find the labelled test images of one category: the MVTec AD layout, or a plain good/bad pair of folders.

MVTec AD layout (one category folder):

    <category>/test/good/*.png                       defect-free test images
    <category>/test/<defect>/*.png                   anomalous test images, one folder per defect type
    <category>/ground_truth/<defect>/<stem>_mask.png pixel masks (0 = nominal, any non-zero value = defect)

A defect image without a mask still counts for the image metrics; it is left out of the pixel metrics.
Discovery only lists files; `check_masks` reads every mask and compares its size with its image.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ..imageio import IMAGE_SUFFIXES, ImageReadError, list_images, read_rgb
from ..errors import FileProblem

GOOD = "good"
PLAIN_DEFECT = "bad"
MASK_SUFFIX = "_mask"


class DatasetError(FileProblem):
    """A dataset problem, naming the file or folder and what to do about it."""



@dataclass(frozen=True)
class Sample:
    path: Path
    defect: str  # GOOD for defect-free images, else the defect type ("bad" in the plain layout)
    mask_path: Optional[Path] = None

    @property
    def label(self) -> int:
        return 0 if self.defect == GOOD else 1


@dataclass(frozen=True)
class EvalDataset:
    root: Path
    layout: str  # "mvtec" or "plain"
    samples: Tuple[Sample, ...]
    warnings: Tuple[str, ...] = field(default_factory=tuple)

    @property
    def defects(self) -> List[str]:
        return sorted({s.defect for s in self.samples if s.label == 1})

    def counts(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for s in self.samples:
            counts[s.defect] = counts.get(s.defect, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (kv[0] != GOOD, kv[0])))

    def name(self, sample: Sample) -> str:
        """The sample's path relative to the dataset root, for reports."""
        try:
            return sample.path.relative_to(self.root).as_posix()
        except ValueError:
            return sample.path.as_posix()


def _images(folder: Path, warnings: List[str]) -> List[Path]:
    images, skipped = list_images(folder)
    warnings.extend(f"{error.path}: skipped, {error.reason}" for error in skipped)
    return images


def _find_mask(ground_truth: Path, defect: str, stem: str) -> Optional[Path]:
    folder = ground_truth / defect
    preferred = folder / f"{stem}{MASK_SUFFIX}.png"
    if preferred.is_file():
        return preferred
    for suffix in sorted(IMAGE_SUFFIXES):
        candidate = folder / f"{stem}{MASK_SUFFIX}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _not_mvtec_hint(folder: Path) -> str:
    if folder.name == "test" and (folder / GOOD).is_dir():
        return f"this is the test/ folder; pass its parent, the category folder {folder.parent}"
    categories = sorted(p.name for p in folder.iterdir() if (p / "test").is_dir())
    if categories:
        shown = ", ".join(categories[:8]) + (", ..." if len(categories) > 8 else "")
        return f"this holds several categories ({shown}); pass one of them, e.g. {folder / categories[0]}"
    return ("no test/ folder: expected the MVTec AD layout <category>/test/good/, <category>/test/<defect>/, "
            "<category>/ground_truth/<defect>/<name>_mask.png, or use --good DIR --bad DIR")


def discover_mvtec(category_dir: os.PathLike | str) -> EvalDataset:
    """All test images of one MVTec AD category, with their masks. Raises DatasetError when unusable."""
    root = Path(category_dir)
    if not root.is_dir():
        raise DatasetError(root, "not a folder" if root.exists() else "folder not found")
    test = root / "test"
    if not test.is_dir():
        raise DatasetError(root, _not_mvtec_hint(root))
    ground_truth = root / "ground_truth"
    warnings: List[str] = []
    samples: List[Sample] = []
    stray = sorted(p.name for p in test.iterdir() if p.is_file() and not p.name.startswith("."))
    if stray:
        warnings.append(f"{test}: ignored {len(stray)} file(s) outside the defect folders "
                        f"({', '.join(stray[:3])})")
    for folder in sorted(p for p in test.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = _images(folder, warnings)
        if not images:
            warnings.append(f"{folder}: no images, folder ignored")
        for image in images:
            if folder.name == GOOD:
                samples.append(Sample(image, GOOD))
                continue
            mask = _find_mask(ground_truth, folder.name, image.stem)
            if mask is None:
                expected = ground_truth / folder.name / f"{image.stem}{MASK_SUFFIX}.png"
                warnings.append(f"{image}: no mask at {expected}; counted for the image metrics only")
            samples.append(Sample(image, folder.name, mask))
    if not samples:
        raise DatasetError(test, "no images in its sub-folders (expected test/good/ and test/<defect>/)")
    _require_both_classes(samples, test / GOOD, test)
    return EvalDataset(root, "mvtec", tuple(samples), tuple(warnings))


def discover_plain(good_dir: os.PathLike | str, bad_dir: os.PathLike | str) -> EvalDataset:
    """Defect-free images in one folder, anomalous ones in another; no masks, so image metrics only."""
    folders = []
    for folder, what in ((Path(good_dir), "--good"), (Path(bad_dir), "--bad")):
        if not folder.is_dir():
            problem = "is not a folder" if folder.exists() else "not found"
            raise DatasetError(folder, f"{what} folder {problem}")
        folders.append(folder)
    warnings: List[str] = []
    samples = [Sample(p, GOOD) for p in _images(folders[0], warnings)]
    samples += [Sample(p, PLAIN_DEFECT) for p in _images(folders[1], warnings)]
    _require_both_classes(samples, folders[0], folders[1])
    root = Path(os.path.commonpath([str(folders[0].resolve()), str(folders[1].resolve())]))
    samples = [Sample(s.path.resolve(), s.defect) for s in samples]
    return EvalDataset(root, "plain", tuple(samples), tuple(warnings))


def _require_both_classes(samples: Sequence[Sample], good_place: Path, defect_place: Path) -> None:
    if not any(s.label == 0 for s in samples):
        raise DatasetError(good_place, "no defect-free (good) images: the metrics compare good and anomalous "
                                       "images, so both are needed")
    if not any(s.label == 1 for s in samples):
        raise DatasetError(defect_place, "no anomalous images (only good ones): the metrics compare good and "
                                         "anomalous images, so both are needed")


# ---------------------------------------------------------------------------------------------- masks


def load_mask(path: os.PathLike | str, image_shape: Optional[Tuple[int, int]] = None,
              image_path: os.PathLike | str | None = None) -> np.ndarray:
    """A ground-truth mask as bool (H, W): any non-zero pixel (in any channel) is a defect."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise DatasetError(path, f"cannot read mask ({error.strerror or error})") from None
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if decoded is None:
        raise DatasetError(path, "mask is not a readable image (unknown format, truncated or corrupt)")
    mask: np.ndarray = np.asarray(decoded.any(axis=2) if decoded.ndim == 3 else decoded != 0)
    if image_shape is not None and mask.shape != tuple(image_shape):
        about = f" {image_path}" if image_path is not None else ""
        raise DatasetError(path, f"mask is {mask.shape[1]}x{mask.shape[0]} pixels but its image{about} is "
                                 f"{image_shape[1]}x{image_shape[0]}; masks must have the size of their "
                                 "image")
    return mask


def image_size(path: os.PathLike | str) -> Tuple[int, int]:
    """(height, width) of an image file; PNG sizes come from the header without decoding."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(24)
    except OSError as error:
        raise ImageReadError(path, f"cannot read file ({error.strerror or error})") from None
    if len(head) == 24 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
        return int(height), int(width)
    return read_rgb(path).shape[:2]  # type: ignore[return-value]


def check_masks(dataset: EvalDataset) -> List[DatasetError]:
    """Read every mask and compare its size with its image's; one error per problem (empty list when fine)."""
    problems: List[DatasetError] = []
    for sample in dataset.samples:
        if sample.mask_path is None:
            continue
        try:
            load_mask(sample.mask_path, image_size(sample.path), sample.path)
        except DatasetError as error:
            problems.append(error)
        except ImageReadError as error:
            problems.append(DatasetError(error.path, error.reason))
    return problems
