"""PaDiM: Mahalanobis math on small arrays with known answers, the fit's float64 Gaussians and conditioning
check, refusal of a covariance that is not positive definite, and runtime-vs-torch parity on bottle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import onnx_outputs
from patchcore_edge.methods.padim import PadimArrayError, PadimParams, PadimScorer, precision_factors

PARAMS = PadimParams(d=2, regularisation=0.01, max_condition=1.0, channel_seed=0, channels=(0, 1))


def test_mahalanobis_has_the_known_value() -> None:
    mean = np.array([[[1.0, 2.0]]], np.float32)  # grid 1 x 1, d = 2
    precision = np.array([[[[4.0, 0.0], [0.0, 1.0]]]], np.float32)  # covariance diag(1/4, 1)
    scorer = PadimScorer(mean, precision, PARAMS, size=8, sigma=0.0)
    distances = scorer.distances(np.array([[[[2.0, 5.0]]]], np.float32))
    np.testing.assert_allclose(distances, [[[np.sqrt(4.0 * 1 + 1.0 * 9)]]], rtol=1e-6)
    (score, patch_map), = scorer.score_batch(np.array([[[[1.0, 2.0]]]], np.float32))
    assert score == 0.0 and patch_map.shape == (1, 1)


def test_correlated_covariance_matches_the_quadratic_form(rng: np.random.Generator) -> None:
    a = rng.normal(size=(6, 3, 3))
    covariance = a @ np.swapaxes(a, 1, 2) + 0.1 * np.eye(3)
    precision = np.linalg.inv(covariance).astype(np.float32).reshape(2, 3, 3, 3)
    precision = 0.5 * (precision + np.swapaxes(precision, 2, 3))
    mean = rng.normal(size=(2, 3, 3)).astype(np.float32)
    x = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    params = PadimParams(d=3, regularisation=0.1, max_condition=1.0, channel_seed=0, channels=(0, 1, 2))
    got = PadimScorer(mean, precision, params, size=8, sigma=0.0).distances(x)
    diff = (x - mean).astype(np.float64)
    expected = np.sqrt(np.einsum("bhwi,hwij,bhwj->bhw", diff, precision.astype(np.float64), diff))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_a_covariance_that_is_not_positive_definite_is_refused() -> None:
    good = np.eye(2, dtype=np.float32)
    indefinite = np.array([[1.0, 2.0], [2.0, 1.0]], np.float32)  # eigenvalues 3 and -1
    with pytest.raises(PadimArrayError, match="covariance at position 1 is not positive definite"):
        precision_factors(np.stack([good, indefinite]))
    with pytest.raises(PadimArrayError, match="position 0 is not symmetric"):
        precision_factors(np.array([[[1.0, 0.5], [0.0, 1.0]]], np.float32))
    with pytest.raises(PadimArrayError, match="precision is float32"):
        PadimScorer(np.zeros((1, 1, 2), np.float32), np.zeros((1, 2, 2, 2), np.float32), PARAMS, 8, 0.0)
    with pytest.raises(PadimArrayError, match="channels must list 2"):
        PadimParams.from_manifest({**PARAMS.to_manifest(), "channels": [0]})


def test_fit_regularises_and_checks_conditioning(rng: np.random.Generator) -> None:
    pytest.importorskip("torch")
    from patchcore_edge.export.methods.padim import PadimFitError, choose_channels, fit_padim

    grids = rng.normal(size=(50, 2, 2, 3))
    grids[..., 2] = grids[..., 1]  # two identical channels: singular without the 0.01 I
    fitted = fit_padim(grids, channels=(0, 1, 2), seed=0)
    np.testing.assert_allclose(fitted.arrays["mean"], grids.mean(axis=0), atol=1e-6)
    covariance = np.cov(grids[:, 0, 0].T) + 0.01 * np.eye(3)
    np.testing.assert_allclose(fitted.arrays["precision"][0, 0], np.linalg.inv(covariance), rtol=1e-5)
    assert fitted.params.max_condition > 100  # the near-singular direction is only held up by 0.01
    with pytest.raises(PadimFitError, match="condition number"):
        fit_padim(grids, channels=(0, 1, 2), seed=0, max_condition=10.0)
    assert choose_channels(10, 4, seed=3) == choose_channels(10, 4, seed=3)
    assert choose_channels(10, 4, seed=3) != choose_channels(10, 4, seed=4)


def test_runtime_matches_the_torch_reference_on_bottle(bottle: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from patchcore_edge.export.methods.padim import OUTPUTS, build_padim_network, fit_padim, reference_padim_scores
    from patchcore_edge.export.transform import torch_preprocess
    from patchcore_edge.imageio import read_rgb
    from patchcore_edge.preprocess import InputSpec
    from patchcore_edge.maps import anomaly_map

    spec = InputSpec(resize=72, crop=64)
    network, info = build_padim_network("mobilenet_v2", None, spec, d=16)
    train = [read_rgb(p) for p in sorted((bottle / "train" / "good").glob("*.png"))[:40]]
    tests = [read_rgb(p) for p in sorted((bottle / "test" / "broken_large").glob("*.png"))[:3]]
    tests += [read_rgb(p) for p in sorted((bottle / "test" / "good").glob("*.png"))[:3]]
    with torch.no_grad():
        grids = network(torch.stack([torch_preprocess(image, spec) for image in train])).numpy()
    batch = torch.stack([torch_preprocess(image, spec) for image in tests]).numpy()
    test_grids = onnx_outputs(network, spec, batch, OUTPUTS, tmp_path)["features"]  # ONNX Runtime, as on the device
    assert grids.shape[1:] == (8, 8, 16)
    fitted = fit_padim(grids, info["channels"], info["seed"])
    scorer = PadimScorer(fitted.arrays["mean"], fitted.arrays["precision"], fitted.params, spec.crop, 4.0)
    expected = reference_padim_scores(network, tests, spec, fitted.arrays["mean"], fitted.arrays["precision"], 4.0)
    results = scorer.score_batch(test_grids)
    scores = np.array([score for score, _ in results])
    assert len(set(np.round(scores, 3))) > 1
    np.testing.assert_allclose(scores, [e.score for e in expected], rtol=1e-4)
    assert scores[:3].mean() > scores[3:].mean()
    for (_, patch_map), ref in zip(results, expected):
        np.testing.assert_allclose(patch_map, ref.patch_map, rtol=1e-4)
        crop_map = anomaly_map(patch_map, spec.crop, 4.0)
        span = float(ref.crop_map.max() - ref.crop_map.min()) or 1.0
        np.testing.assert_allclose(crop_map, ref.crop_map, rtol=0, atol=1e-4 * span)
