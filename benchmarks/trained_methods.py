"""Benchmark: the trained patch-encoder methods (Patch SVDD, multi-scale) on MVTec AD bottle after a reduced,
time-boxed CPU schedule (issue 16).

    python benchmarks/trained_methods.py --method patch_svdd --minutes 5 15
    python benchmarks/trained_methods.py --method multiscale --minutes 5 15

Trains on <data>/train/good (resize 256, crop 256) under a wall-clock budget, resuming from its checkpoint for
each next budget, so the 15-minute row continues the 5-minute run. At each budget: ONNX export of the
embedding-grid network (checked against torch), training embeddings through ONNX Runtime, memory banks
(seeded uniform sample capped at --max-bank rows per scale, HNSW), then the test set through ONNX Runtime +
the numpy scorer (HNSW + exact re-rank) at batch 1: image AUROC, pixel AUROC at 256x256, median latency.
One JSON line per budget goes to out/trained_methods/<method>.jsonl (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from _machine import cpu_model  # noqa: E402
from patchcore_edge.evaluation.dataset import discover_mvtec, load_mask  # noqa: E402
from patchcore_edge.evaluation.metrics import auroc, pixel_auroc  # noqa: E402
from patchcore_edge.export.methods.grid_onnx import check_grids_parity, export_grids, grid_session  # noqa: E402
from patchcore_edge.export.methods.multiscale import Multiscale  # noqa: E402
from patchcore_edge.export.methods.patch_svdd import PatchSVDD  # noqa: E402
from patchcore_edge.export.methods.training import Schedule, TrainedOptions  # noqa: E402
from patchcore_edge.imageio import list_images, read_rgb  # noqa: E402
from patchcore_edge.methods.nearest_patch import NearestPatchScorer  # noqa: E402
from patchcore_edge.methods.patch_maps import Scale  # noqa: E402
from patchcore_edge.preprocess import InputSpec, preprocess  # noqa: E402
from patchcore_edge.search import PatchSearch, load_index  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"
SCRATCH = REPO / "out" / "trained_methods"
SPEC = InputSpec(resize=256, crop=256)
METHODS = {"patch_svdd": PatchSVDD, "multiscale": Multiscale}


def _load(paths: List[Path]) -> np.ndarray:
    return np.stack([preprocess(read_rgb(p), SPEC) for p in paths])


def _embed(onnx_path: Path, images: np.ndarray) -> Dict[str, np.ndarray]:
    run = grid_session(onnx_path)
    parts = [run(images[i:i + 1]) for i in range(images.shape[0])]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def evaluate_budget(method: Any, network: torch.nn.Module, record: Any, train: np.ndarray, options: TrainedOptions,
                    folder: Path, minutes: float) -> Dict[str, Any]:
    row: Dict[str, Any] = {"method": method.name, "budget_min": minutes, "train_s": record.seconds,
                           "steps": record.steps_done, "losses": record.final_losses}
    names = [s.output for s in method.scales]
    onnx_path = folder / f"{method.name}_{int(minutes)}.onnx"
    start = time.perf_counter()
    export_grids(network, onnx_path, names, SPEC.crop, SPEC.crop)
    row["onnx_parity_rel"] = check_grids_parity(network, onnx_path, names, train[:2])
    row["onnx_s"] = time.perf_counter() - start
    start = time.perf_counter()
    outputs = _embed(onnx_path, train)
    row["train_embed_s"] = time.perf_counter() - start
    start = time.perf_counter()
    arrays, files, params, summary = method.fit(outputs, options, log=print)
    row["bank_s"] = time.perf_counter() - start
    row["banks"] = summary["banks"]
    row["bundle_bytes"] = onnx_path.stat().st_size + sum(a.nbytes for a in arrays.values()) + sum(
        len(b) for b in files.values())
    searches = []
    for scale in method.scales:
        bank = arrays[f"bank_{scale.output}"]
        index_path = folder / f"index_{scale.output}.hnsw"
        index_path.write_bytes(files[f"index_{scale.output}.hnsw"])
        searches.append(PatchSearch(bank, load_index(index_path, bank.shape[1], bank.shape[0]), threads=1))
    scorer = NearestPatchScorer(method.scales, searches, method.combine, method.window)
    dataset = discover_mvtec(DATA)
    run = grid_session(onnx_path)
    scores, labels, maps, masks, latency = [], [], [], [], []
    for sample in dataset.samples:
        image = read_rgb(sample.path)
        start = time.perf_counter()
        batch = preprocess(image, SPEC)[None]
        result = scorer.score(run(batch))[0]
        latency.append(time.perf_counter() - start)
        scores.append(result.score)
        labels.append(sample.label)
        maps.append(cv2.resize(result.cell_map, (SPEC.crop, SPEC.crop), interpolation=cv2.INTER_LINEAR))
        mask = None if sample.mask_path is None else load_mask(sample.mask_path)
        masks.append(None if mask is None else cv2.resize(mask.astype(np.uint8), (SPEC.crop, SPEC.crop),
                                                         interpolation=cv2.INTER_NEAREST).astype(bool))
    row["image_auroc"] = auroc(scores, labels).value
    row["pixel_auroc"] = pixel_auroc(maps, masks).value
    row["latency_ms_median"] = 1000 * float(np.median(latency))
    row["test_images"] = len(scores)
    row["load_after"] = os.getloadavg()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=sorted(METHODS), required=True)
    parser.add_argument("--minutes", type=float, nargs="+", default=[5.0, 15.0])
    parser.add_argument("--images-per-step", type=int, default=8)
    parser.add_argument("--patches-per-image", type=int, default=8)
    parser.add_argument("--max-bank", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = SCRATCH / args.method
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "checkpoint.pt"
    if checkpoint.exists():
        checkpoint.unlink()  # our own scratch file from an earlier run of this script
    paths, _ = list_images(DATA / "train" / "good")
    train = _load(sorted(paths))
    method = METHODS[args.method]()
    header = {"machine": f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.platform()}", "torch": torch.__version__,
              "load_before": os.getloadavg(), "train_images": int(train.shape[0])}
    print(json.dumps(header))
    with (SCRATCH / f"{args.method}.jsonl").open("a") as out:
        out.write(json.dumps(header) + "\n")
        for minutes in args.minutes:
            schedule = Schedule(steps=1_000_000, images_per_step=args.images_per_step,
                                patches_per_image=args.patches_per_image, seed=args.seed,
                                max_seconds=60.0 * minutes, checkpoint_every=20)
            options = TrainedOptions(schedule=schedule, checkpoint=checkpoint, max_bank=args.max_bank)
            network, record = method.train_network(train, options)
            row = evaluate_budget(method, network, record, train, options, folder, minutes)
            print(json.dumps(row))
            out.write(json.dumps(row) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
