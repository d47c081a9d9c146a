"""SPADE and PaDiM on MVTec bottle: fit time, bundle array size, per-stage latency, image/pixel AUROC, AUPRO.

    OMP_NUM_THREADS=1 python benchmarks/methods_bench.py ../shared/data/mvtec_ad/bottle [--crop 224]

Network stage: ONNX Runtime (1 thread), batch 1; scorer stage: the numpy runtime scorer, batch 1; medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from patchcore_edge.evaluation.dataset import discover_mvtec, load_mask
from patchcore_edge.evaluation.metrics import aupro, auroc, pixel_auroc
from patchcore_edge.export.methods.padim import build_padim_network, fit_padim
from patchcore_edge.export.methods.spade import OUTPUTS as SPADE_OUTPUTS, build_spade_network, fit_spade
from patchcore_edge.imageio import list_images, read_rgb
from patchcore_edge.methods.padim import PadimScorer
from patchcore_edge.methods.spade import SpadeScorer
from patchcore_edge.preprocess import InputSpec, geometry, map_to_image, preprocess
from patchcore_edge.maps import anomaly_map


def session(network: torch.nn.Module, spec: InputSpec, names, folder: Path) -> ort.InferenceSession:
    path = folder / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (torch.zeros(2, 3, spec.crop, spec.crop),), str(path), input_names=["image"],
                          output_names=list(names), dynamic_axes={n: {0: "b"} for n in ["image", *names]},
                          opset_version=17, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run(name: str, network, names, fit, make_scorer, score_one, root: Path, spec: InputSpec) -> str:
    train, _ = list_images(root / "train" / "good")
    dataset = discover_mvtec(root)
    with tempfile.TemporaryDirectory() as folder:
        sess = session(network, spec, names, Path(folder))
        start = time.perf_counter()
        outs = [sess.run(list(names), {"image": preprocess(read_rgb(p), spec)[None]}) for p in train]
        stacked = {n: np.concatenate([o[i] for o in outs]) for i, n in enumerate(names)}
        feature_s = time.perf_counter() - start
        start = time.perf_counter()
        fitted = fit(stacked)
        fit_s = time.perf_counter() - start
        scorer = make_scorer(fitted)
        size_mb = sum(a.nbytes for a in fitted.arrays.values()) / 2**20
        scores, labels, maps, masks, net_ms, score_ms = [], [], [], [], [], []
        for sample in dataset.samples:
            image = read_rgb(sample.path)
            batch = preprocess(image, spec)[None]
            t0 = time.perf_counter()
            out = dict(zip(names, sess.run(list(names), {"image": batch})))
            t1 = time.perf_counter()
            score, patch_map = score_one(scorer, out)
            t2 = time.perf_counter()
            net_ms.append((t1 - t0) * 1e3)
            score_ms.append((t2 - t1) * 1e3)
            scores.append(score)
            labels.append(sample.label)
            geo = geometry(image.shape[0], image.shape[1], spec)
            maps.append(map_to_image(anomaly_map(patch_map, spec.crop, 4.0), geo))
            masks.append(load_mask(sample.mask_path, image.shape[:2]) if sample.mask_path else None)
    return (f"| {name} | {auroc(scores, labels).value:.3f} | {pixel_auroc(maps, masks).value:.3f} | "
            f"{aupro(maps, masks).value:.3f} | {statistics.median(net_ms):.1f} | {statistics.median(score_ms):.1f} | "
            f"{size_mb:.1f} | {feature_s:.1f} + {fit_s:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("category", type=Path)
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = InputSpec(resize=args.resize, crop=args.crop)
    print("| method | image AUROC | pixel AUROC | AUPRO | network ms | scorer ms | arrays MB | export s (features + fit) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    network, info = build_padim_network("mobilenet_v2", None, spec)
    print(run("PaDiM (d=64)", network, ("features",),
              lambda o: fit_padim(o["features"], info["channels"], info["seed"]),
              lambda f: PadimScorer(f.arrays["mean"], f.arrays["precision"], f.params, spec.crop, 4.0),
              lambda s, o: s.score_batch(o["features"])[0], args.category, spec), flush=True)
    network, _ = build_spade_network("mobilenet_v2", None, spec)
    print(run("SPADE (K=50, kappa=1)", network, SPADE_OUTPUTS,
              lambda o: fit_spade(o["features"], o["global"]),
              lambda f: SpadeScorer(f.arrays["global_features"], f.arrays["gallery"], f.params, threads=1),
              lambda s, o: (lambda r: (r.score, r.patch_map))(s.score_batch(o["global"], o["features"])[0]),
              args.category, spec), flush=True)


if __name__ == "__main__":
    main()
