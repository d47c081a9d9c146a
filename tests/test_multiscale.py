"""Multi-scale patch learning: cosine and k-means losses, angle and near/far sampling, the 16 encoder, the
summed map and windowed image score, runtime vs torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from patchcore_edge.export.methods.multiscale import Multiscale  # noqa: E402
from patchcore_edge.export.methods.patch_encoders import PatchEncoder  # noqa: E402
from patchcore_edge.export.methods.patch_losses import cosine_loss, kmeans_centres, kmeans_loss  # noqa: E402
from patchcore_edge.export.methods.patch_reference import pixel_mean_map  # noqa: E402
from patchcore_edge.export.methods.patch_sampling import angle_offsets, angle_pairs, near_far_triplets  # noqa: E402
from patchcore_edge.methods.patch_maps import MapLayout, Scale, Window  # noqa: E402

from trained_parity import runtime_matches_torch  # noqa: E402


def test_cosine_loss_wants_the_near_patch_more_similar_by_the_margin() -> None:
    a = torch.tensor([[1.0, 0.0]])
    same, other = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    assert float(cosine_loss(a, same, other, margin=0.1)) == pytest.approx(0.0)  # relu(0 - 1 + 0.1)
    assert float(cosine_loss(a, other, same, margin=0.1)) == pytest.approx(1.1)  # relu(1 - 0 + 0.1)


def test_kmeans_finds_two_clusters_and_the_loss_is_the_squared_distance_to_them() -> None:
    codes = torch.tensor([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 2.0]])
    centres = kmeans_centres(codes, 2, torch.Generator().manual_seed(0))
    assert sorted(centres.tolist()) == [[0.0, 1.0], [10.0, 1.0]]
    assert float(kmeans_loss(codes, centres)) == pytest.approx(1.0)
    assert kmeans_centres(codes, 50, torch.Generator().manual_seed(0)).shape == (4, 2)  # k capped at n


def test_angle_classes_are_thirty_degrees_apart_counter_clockwise() -> None:
    offsets = angle_offsets(24.0)
    assert offsets[0].tolist() == [0, 24] and offsets[3].tolist() == [-24, 0]
    assert offsets[6].tolist() == [0, -24] and offsets[9].tolist() == [24, 0] and offsets[1].tolist() == [-12, 21]
    anchor, second, labels = angle_pairs(np.random.default_rng(0), 3000, 200, 200, 32)
    d = second - anchor
    recovered = np.rint(np.rad2deg(np.arctan2(-d[:, 0], d[:, 1])) / 30.0).astype(int) % 12
    np.testing.assert_array_equal(recovered, labels)
    assert set(labels) == set(range(12)) and min(anchor.min(), second.min()) >= 0
    assert max(anchor.max(), second.max()) <= 200 - 32


def test_far_patches_do_not_overlap_the_anchor_and_near_ones_do() -> None:
    anchor, near, far = near_far_triplets(np.random.default_rng(1), 2000, 128, 128, 32)
    assert (np.abs(far - anchor).max(axis=1) >= 32).all()
    assert (np.abs(near - anchor).max(axis=1) == 1).all()
    assert far.min() >= 0 and far.max() <= 128 - 32


def test_sixteen_encoder_runs_fully_convolutionally_like_patch_by_patch() -> None:
    torch.manual_seed(0)
    encoder = PatchEncoder(16)
    image = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        grid = encoder(image)
        assert grid.shape[2:] == (13, 17)
        for i, j in [(0, 0), (6, 11), (12, 16)]:
            patch = image[:, :, 2 * i:2 * i + 16, 2 * j:2 * j + 16]
            torch.testing.assert_close(grid[0, :, i, j], encoder.codes(patch)[0], rtol=1e-5, atol=1e-6)


def test_multiscale_map_is_the_sum_and_the_score_the_best_window_mean() -> None:
    scales = [Scale("emb64", 64, 16), Scale("emb32", 32, 4), Scale("emb16", 16, 4)]
    layout = MapLayout(scales, [(2, 2), (13, 13), (17, 17)], "sum", Window(8, 4))
    assert layout.cell == 4 and layout.cells == (20, 20)
    rng = np.random.default_rng(2)
    grids = [rng.random(shape).astype(np.float32) for shape in [(2, 2), (13, 13), (17, 17)]]
    grids[2][5, 9] = 30.0  # one hot 16 patch: pixels 20..35 x 36..51
    cell_map = layout.cell_map(grids)
    pixels = sum(pixel_mean_map(torch.from_numpy(g)[None], s.kernel, s.stride)[0] for g, s in zip(grids, scales))
    torch.testing.assert_close(torch.from_numpy(np.kron(cell_map, np.ones((4, 4), np.float32))), pixels)
    windows = layout.location_values(cell_map)
    expected = torch.nn.functional.avg_pool2d(pixels[None, None], 8, 4)[0, 0]
    assert windows.shape == (19, 19)
    torch.testing.assert_close(torch.from_numpy(windows), expected)
    best = np.unravel_index(int(windows.argmax()), windows.shape)
    # The best 8x8 window lies inside the hot patch (pixels 20..35 x 36..51: windows 5..7 x 9..11).
    assert 5 <= best[0] <= 7 and 9 <= best[1] <= 11
    blocks = layout.contributors(*best)
    # 16 patches (4 cells, stride 1 cell) reaching the window's cells r..r+1: patches r-3 .. r+1.
    assert blocks[2] == (slice(best[0] - 3, best[0] + 2), slice(best[1] - 3, best[1] + 2))


def test_runtime_matches_torch_on_bottle(bottle: Path, tmp_path: Path) -> None:
    runtime_matches_torch(Multiscale(), bottle, tmp_path, map_atol=0.005)
