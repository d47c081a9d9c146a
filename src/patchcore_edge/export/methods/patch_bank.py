"""Memory banks of the trained patch-encoder methods: every training patch embedding per scale, optionally
reduced by the greedy k-center coreset, each with its hnswlib index (the runtime's HNSW + exact re-rank)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from ...methods.patch_maps import Scale
from ...search import build_index, save_index
from ..coreset import coreset_size, greedy_coreset

Log = Callable[[str], None]


def bank_key(scale: Scale) -> str:
    return f"bank_{scale.output}"


def index_file(scale: Scale) -> str:
    return f"index_{scale.output}.hnsw"


def fit_banks(outputs: Mapping[str, np.ndarray], scales: Sequence[Scale], coreset_ratio: Optional[float] = None,
              seed: int = 0, log: Log = lambda _m: None, max_bank: Optional[int] = None
              ) -> Tuple[Dict[str, np.ndarray], Dict[str, bytes], Dict[str, Any], Dict[str, np.ndarray]]:
    """(arrays, files, summary, origins): per scale the bank [M, D] float32, its index file bytes, and the
    training image each bank row came from (int64 [M], for the leave-one-image-out training scores).

    outputs: each scale's embedding grids over the training images, [N, h, w, D].
    max_bank: cap on the bank rows per scale, reached by a seeded uniform sample of the embeddings (before
    any coreset). The greedy coreset and the HNSW build cost minutes per 50k rows on a small CPU, and a
    32-pixel scale has ~680k embeddings for 209 training images; the sample is recorded in the summary.
    """
    arrays: Dict[str, np.ndarray] = {}
    files: Dict[str, bytes] = {}
    summary: Dict[str, Any] = {"coreset_ratio": coreset_ratio, "max_bank": max_bank, "banks": {}}
    origins: Dict[str, np.ndarray] = {}
    for scale in scales:
        grids = np.asarray(outputs[scale.output], dtype=np.float32)
        if grids.ndim != 4:
            raise ValueError(f"output {scale.output!r} must be [N, h, w, D], got {grids.shape}")
        embeddings = np.ascontiguousarray(grids.reshape(-1, grids.shape[3]))
        rows = np.arange(embeddings.shape[0])
        if max_bank is not None and embeddings.shape[0] > max_bank:
            rows = np.sort(np.random.default_rng(seed).choice(embeddings.shape[0], size=max_bank, replace=False))
            log(f"{scale.output}: uniform sample of {max_bank} / {embeddings.shape[0]} embeddings")
            embeddings = np.ascontiguousarray(embeddings[rows])
        bank = embeddings
        if coreset_ratio is not None and coreset_ratio < 1.0:
            size = coreset_size(embeddings.shape[0], ratio=coreset_ratio)
            log(f"{scale.output}: coreset of {size} / {embeddings.shape[0]} embeddings")
            chosen = np.sort(greedy_coreset(embeddings, size, seed=seed))
            bank = np.ascontiguousarray(embeddings[chosen])
            rows = rows[chosen]
        log(f"{scale.output}: HNSW index over {bank.shape[0]} x {bank.shape[1]}")
        index = build_index(bank, seed=seed)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / index_file(scale)
            save_index(index, path)
            files[index_file(scale)] = path.read_bytes()
        arrays[bank_key(scale)] = bank
        origins[scale.output] = rows // (grids.shape[1] * grids.shape[2])
        summary["banks"][scale.output] = {"embeddings": int(grids.shape[0] * grids.shape[1] * grids.shape[2]),
                                          "sampled": int(embeddings.shape[0]), "bank": int(bank.shape[0])}
    return arrays, files, summary, origins
