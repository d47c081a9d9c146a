from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BOTTLE = SHARED_DATA / "mvtec_ad" / "bottle"


def elpv_images_dir() -> Path | None:
    try:
        import elpv_dataset
    except ImportError:
        return None
    folder = Path(elpv_dataset.__file__).parent / "data" / "images"
    return folder if folder.is_dir() else None


@pytest.fixture
def bottle() -> Path:
    if not BOTTLE.is_dir():
        pytest.skip("../shared/data/mvtec_ad/bottle is absent")
    return BOTTLE


@pytest.fixture
def elpv_images() -> Path:
    folder = elpv_images_dir()
    if folder is None:
        pytest.skip("the elpv-dataset package is not installed")
    return folder


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
