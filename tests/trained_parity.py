"""Shared check of the trained patch-encoder methods: a tiny training on real bottle images, ONNX export, and
the runtime (ONNX Runtime + numpy scorer with HNSW and exact re-rank) against the torch reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchcore_edge.export.onnx_export import check_onnx_parity, export_onnx
from patchcore_edge.export.methods.patch_reference import reference_scores
from patchcore_edge.export.methods.training import Schedule, TrainedOptions
from patchcore_edge.imageio import read_rgb
from patchcore_edge.methods.nearest_patch import NearestPatchScorer
from patchcore_edge.preprocess import InputSpec, preprocess
from patchcore_edge.runtime.backends import OnnxRuntimeFeatures
from patchcore_edge.search import PatchSearch

SPEC = InputSpec(resize=192, crop=192)


def runtime_matches_torch(method: Any, bottle: Path, tmp_path: Path, map_atol: float = 0.0) -> None:
    """map_atol: absolute map tolerance as a fraction of the map's maximum, for codes of a barely trained
    encoder whose distances are tiny next to the codes' norms: there the runtime's float32 exact search
    (BLAS expansion, then the chosen row's distance recomputed) can pick a near-tie row, which the float64
    reference does not. The image score is always held to rtol 1e-4."""
    torch.set_num_threads(1)
    train = np.stack([preprocess(read_rgb(p), SPEC) for p in sorted((bottle / "train" / "good").glob("*.png"))[:3]])
    test = np.stack([preprocess(read_rgb(p), SPEC) for p in
                     [sorted((bottle / "test" / "good").glob("*.png"))[0],
                      sorted((bottle / "test" / "broken_large").glob("*.png"))[0]]])
    options = TrainedOptions(schedule=Schedule(steps=2, images_per_step=2, patches_per_image=4), max_bank=1500)
    network, record = method.train_network(train, options)
    assert record.steps_done == 2 and np.isfinite(record.final_losses["total"])
    names = [s.output for s in method.scales]
    onnx_path = export_onnx(network, tmp_path / "grids.onnx", SPEC, output_names=names)
    assert check_onnx_parity(network, onnx_path, test, output_names=names).max_rel < 1e-4
    run = OnnxRuntimeFeatures(onnx_path, "image", names, threads=1).run
    outputs = run(train)
    arrays, files, params, summary, _ = method.fit_arrays(outputs, options)
    assert params["combine"] == method.combine and [s["output"] for s in params["scales"]] == names
    banks = [arrays[f"bank_{name}"] for name in names]
    for scale, bank in zip(method.scales, banks):
        assert bank.shape[0] == min(1500, summary["banks"][scale.output]["embeddings"])
    searches = [PatchSearch.from_bank(bank) for bank in banks]
    for search in searches:
        search.set_ef(2)  # a poor index, so that the re-rank has work to do
    got = NearestPatchScorer(method.scales, searches, method.combine, method.window).score(run(test))
    exact = NearestPatchScorer(method.scales, searches, method.combine, method.window,
                               exact_search=True).score(run(test))
    want_scores, want_maps = reference_scores(network, torch.from_numpy(test), banks, method.scales,
                                              method.combine, method.window)
    for result, full, want, want_map in zip(got, exact, want_scores, want_maps):
        assert result.score == full.score  # HNSW + re-rank gives the exact search's score
        np.testing.assert_allclose(result.score, want, rtol=1e-4)
        cell = SPEC.crop // full.cell_map.shape[0]
        upsampled = np.repeat(np.repeat(full.cell_map, cell, 0), cell, 1)
        np.testing.assert_allclose(upsampled, want_map, rtol=1e-4, atol=1e-6 + map_atol * float(want_map.max()))
    assert got[1].score != got[0].score
