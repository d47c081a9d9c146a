"""Patch SVDD: losses, patch sampling, fully convolutional encoders, map aggregation, runtime vs torch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from patchcore_edge.export.methods.patch_encoders import EmbeddingGrids, HierarchicalEncoder, PatchEncoder  # noqa: E402
from patchcore_edge.export.methods.patch_losses import relation_loss, svdd_loss  # noqa: E402
from patchcore_edge.export.methods.patch_reference import pixel_mean_map, reference_scores  # noqa: E402
from patchcore_edge.export.methods.patch_sampling import (NEIGHBOURS, crop_patches, neighbour_pairs,  # noqa: E402
                                                          svdd_pairs)
from patchcore_edge.export.methods.patch_svdd import PatchSVDD, PatchSVDDModel  # noqa: E402
from patchcore_edge.export.methods.training import CheckpointError, Schedule, train  # noqa: E402
from patchcore_edge.methods.nearest_patch import NearestPatchScorer  # noqa: E402
from patchcore_edge.methods.patch_maps import MapLayout, Scale, cover_mean, parse_params, to_params  # noqa: E402
from patchcore_edge.search import PatchSearch  # noqa: E402

from trained_parity import runtime_matches_torch  # noqa: E402


# ----------------------------------------------------------------------------------------------- losses

def test_svdd_loss_is_the_mean_euclidean_distance() -> None:
    first = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    second = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert float(svdd_loss(first, second)) == pytest.approx(3.0)  # (5 + 1) / 2


def test_relation_loss_is_cross_entropy() -> None:
    assert float(relation_loss(torch.zeros(2, 8), torch.tensor([0, 5]))) == pytest.approx(math.log(8))
    sure = torch.full((1, 8), -20.0)
    sure[0, 3] = 20.0
    assert float(relation_loss(sure, torch.tensor([3]))) < 1e-6
    assert float(relation_loss(sure, torch.tensor([2]))) == pytest.approx(40.0, rel=1e-4)


# ---------------------------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("kernel, jitter", [(32, 1), (64, 2)])
def test_svdd_pairs_are_distinct_close_neighbours_inside_the_image(kernel: int, jitter: int) -> None:
    anchor, near = svdd_pairs(np.random.default_rng(0), 4000, 100, 120, kernel)
    offsets = near - anchor
    assert np.abs(offsets).max() == jitter and (np.abs(offsets).max(axis=1) > 0).all()
    assert len({tuple(o) for o in offsets}) == (2 * jitter + 1) ** 2 - 1
    for p in (anchor, near):
        assert p.min() >= 0 and (p[:, 0] <= 100 - kernel).all() and (p[:, 1] <= 120 - kernel).all()


def test_neighbour_pairs_label_the_direction_of_the_second_patch() -> None:
    anchor, second, labels = neighbour_pairs(np.random.default_rng(1), 4000, 256, 256, 32)
    offsets = second - anchor
    # Cells 24 pixels apart, jitter at most 8: the nearest cell is the labelled neighbour.
    np.testing.assert_array_equal(np.rint(offsets / 24.0), NEIGHBOURS[labels])
    assert (np.abs(offsets - 24 * NEIGHBOURS[labels]) <= 8).all() and (np.abs(offsets) > 0).any(axis=1).all()
    assert np.abs(offsets).max() <= 24 + 8 and set(labels) == set(range(8))
    assert anchor.min() >= 0 and second.min() >= 0 and max(anchor.max(), second.max()) <= 256 - 32
    with pytest.raises(ValueError, match="does not fit"):
        neighbour_pairs(np.random.default_rng(1), 10, 60, 60, 32)


def test_crop_patches_cuts_the_named_windows() -> None:
    images = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).reshape(2, 3, 10, 12)
    patches = crop_patches(images, np.array([1, 0]), np.array([[2, 3], [0, 7]]), 4)
    assert torch.equal(patches[0], images[1, :, 2:6, 3:7]) and torch.equal(patches[1], images[0, :, 0:4, 7:11])


# ---------------------------------------------------------------------------------------------- encoders

def test_encoders_run_fully_convolutionally_like_patch_by_patch() -> None:
    torch.manual_seed(0)
    image = torch.randn(1, 3, 96, 104)
    for encoder in (PatchEncoder(32), HierarchicalEncoder()):
        kernel = encoder.kernel
        with torch.no_grad():
            grid = encoder(image)
            assert grid.shape[2:] == ((96 - kernel) // 2 + 1, (104 - kernel) // 2 + 1)
            for i, j in [(0, 0), (3, 5), (grid.shape[2] - 1, grid.shape[3] - 1)]:
                patch = image[:, :, 2 * i:2 * i + kernel, 2 * j:2 * j + kernel]
                torch.testing.assert_close(grid[0, :, i, j], encoder.codes(patch)[0], rtol=1e-5, atol=1e-6)


def test_hierarchical_encoder_encodes_the_four_quarters_with_the_small_encoder() -> None:
    torch.manual_seed(1)
    encoder = HierarchicalEncoder()
    patches = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(encoder(patches)[:, :, 0, 0], encoder.codes(patches), rtol=1e-5, atol=1e-6)
        # Changing one quarter changes only that quarter's code, i.e. the inner encoder sees 32x32 parts.
        codes = [encoder.inner(patches[:, :, r:r + 32, c:c + 32]) for r in (0, 32) for c in (0, 32)]
        edited = patches.clone()
        edited[:, :, 32:, 32:] = 0
        assert torch.equal(encoder.inner(edited[:, :, :32, 32:]), codes[1])


def test_embedding_grids_sample_the_inference_strides_channels_last() -> None:
    torch.manual_seed(2)
    model = PatchSVDDModel(64, 1e-3)
    network = PatchSVDD().grids(model)
    image = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        emb64, emb32 = network(image)
        assert emb64.shape == (1, 5, 5, 64) and emb32.shape == (1, 25, 25, 64)
        for (i, j) in [(0, 0), (2, 4), (4, 4)]:
            patch = image[:, :, 16 * i:16 * i + 64, 16 * j:16 * j + 64]
            torch.testing.assert_close(emb64[0, i, j], model.encoders["64"].codes(patch)[0], rtol=1e-5, atol=1e-6)
        patch = image[:, :, 4 * 7:4 * 7 + 32, 4 * 3:4 * 3 + 32]
        torch.testing.assert_close(emb32[0, 7, 3], model.encoders["32"].codes(patch)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not a multiple"):
        EmbeddingGrids([PatchEncoder(32)], [3])


# ------------------------------------------------------------------------------------------------- maps

def test_cover_mean_averages_the_covering_patches() -> None:
    grid = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    expected = np.array([[1, 1.5, 2], [2, 2.5, 3], [3, 3.5, 4]], dtype=np.float32)  # kernel 2, stride 1
    np.testing.assert_allclose(cover_mean(grid, 2, 1), expected)
    # Kernel 2 cells, stride 2: no overlap, each patch fills its own 2x2 block.
    np.testing.assert_array_equal(cover_mean(grid, 2, 2), np.kron(grid, np.ones((2, 2))))
    # Kernel 3, stride 2: the middle row/column is shared by two patches.
    middle = cover_mean(grid, 3, 2)
    assert middle.shape == (5, 5) and middle[2, 2] == 2.5 and middle[0, 2] == 1.5 and middle[4, 4] == 4.0
    torch.testing.assert_close(torch.from_numpy(cover_mean(grid, 3, 2)),
                               pixel_mean_map(torch.from_numpy(grid)[None], 3, 2)[0])


def test_patch_svdd_map_is_the_product_of_the_scales_and_the_score_its_maximum() -> None:
    scales = [Scale("emb64", 64, 16), Scale("emb32", 32, 4)]
    layout = MapLayout(scales, [(2, 2), (13, 13)], "product")
    assert layout.cell == 4 and layout.image_size == (64 + 16, 64 + 16) and layout.cells == (20, 20)
    big = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    small = np.full((13, 13), 2.0, dtype=np.float32)
    small[12, 12] = 10.0  # the bottom-right 32 patch: cells 12..19
    cell_map = layout.cell_map([big, small])
    # Top-left cell: only big patch 0 (value 1) and small patch 0 (value 2) cover it.
    assert cell_map[0, 0] == 2.0
    # Bottom-right cell: big patch 3 alone (4) times the small patch 12,12 alone (10).
    assert cell_map[19, 19] == 40.0
    # A cell under all four 64 patches (cells 4..15 are shared) and 8 small patches of value 2.
    assert cell_map[8, 8] == pytest.approx(2.5 * 2.0)
    assert layout.location_values(cell_map).max() == 40.0
    assert layout.contributors(19, 19) == [(slice(1, 2), slice(1, 2)), (slice(12, 13), slice(12, 13))]
    assert parse_params(to_params(scales, "product", None)) == (scales, "product", None)
    with pytest.raises(ValueError, match="different image areas"):
        MapLayout(scales, [(2, 2), (8, 8)], "product")


def test_rerank_gives_the_exact_score_from_a_poor_index() -> None:
    rng = np.random.default_rng(3)
    scales = [Scale("emb64", 64, 16), Scale("emb32", 32, 4)]
    banks = [np.tanh(rng.standard_normal((600, 8))).astype(np.float32) for _ in scales]
    outputs = {"emb64": np.tanh(rng.standard_normal((3, 3, 3, 8))).astype(np.float32),
               "emb32": np.tanh(rng.standard_normal((3, 17, 17, 8))).astype(np.float32)}
    searches = [PatchSearch.from_bank(b, m=2, ef_construction=2) for b in banks]
    for s in searches:
        s.set_ef(1)
    approx = NearestPatchScorer(scales, searches, "product").score(outputs)
    exact = NearestPatchScorer(scales, searches, "product", exact_search=True).score(outputs)
    for a, e in zip(approx, exact):
        assert a.score == e.score and a.details["reranked"] < 3 * 3 + 17 * 17
    # The approximate map is an upper bound of the exact one.
    assert all((a.cell_map >= e.cell_map).all() for a, e in zip(approx, exact))
    scores, _ = reference_scores(_Grids(outputs), torch.zeros(3, 3, 96, 96), banks, scales, "product")
    np.testing.assert_allclose([e.score for e in exact], scores, rtol=1e-5)


class _Grids(torch.nn.Module):
    """Stands in for a network whose outputs are given (the reference only needs the grids)."""

    def __init__(self, outputs: dict) -> None:
        super().__init__()
        self.grids = tuple(torch.from_numpy(v) for v in outputs.values())

    def forward(self, _images: torch.Tensor) -> tuple:
        return self.grids


# ---------------------------------------------------------------------------------------------- training

def _tiny_images() -> np.ndarray:
    return np.random.default_rng(4).standard_normal((3, 3, 128, 128)).astype(np.float32)


def _model() -> PatchSVDDModel:
    torch.manual_seed(0)
    return PatchSVDDModel(16, 1e-3)


def test_training_is_seeded_and_resumes_to_the_same_weights(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    schedule = Schedule(steps=4, images_per_step=2, patches_per_image=2, checkpoint_every=2)
    whole = _model()
    record = train(whole, _tiny_images(), schedule)
    assert record.steps_done == 4 and record.stopped_by == "steps" and set(record.final_losses) == {
        "svdd64", "pos64", "svdd32", "pos32", "total"}
    again = _model()
    train(again, _tiny_images(), schedule)
    checkpoint = tmp_path / "run.pt"
    first = _model()
    train(first, _tiny_images(), Schedule(steps=2, images_per_step=2, patches_per_image=2, checkpoint_every=2),
          checkpoint=checkpoint)
    resumed = _model()  # a fresh process would rebuild the model; the checkpoint brings the state
    record = train(resumed, _tiny_images(), schedule, checkpoint=checkpoint)
    assert record.resumed_from_step == 2 and record.steps_done == 4
    for name, value in whole.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
        assert torch.equal(value, resumed.state_dict()[name]), name
    with pytest.raises(CheckpointError, match="another schedule"):
        train(_model(), _tiny_images(), Schedule(steps=5, images_per_step=1, patches_per_image=2),
              checkpoint=checkpoint)


def test_training_stops_on_its_time_budget() -> None:
    record = train(_model(), _tiny_images(), Schedule(steps=1000, images_per_step=1, patches_per_image=1,
                                                      max_seconds=0.0))
    assert record.stopped_by == "time" and record.steps_done == 0


def test_lambda_defaults_follow_the_category_kind() -> None:
    from patchcore_edge.export.methods.training import TrainedOptions

    assert PatchSVDD.lam(TrainedOptions()) == 1e-3
    assert PatchSVDD.lam(TrainedOptions(texture=True)) == 1.0
    assert PatchSVDD.lam(TrainedOptions(lam=0.5)) == 0.5


# ------------------------------------------------------------------------------------------ real images

def test_runtime_matches_torch_on_bottle(bottle: Path, tmp_path: Path) -> None:
    runtime_matches_torch(PatchSVDD(), bottle, tmp_path)
