"""Benchmark: which mobilenet_v2 stages and feature dim to use, by accuracy on MVTec AD bottle and by speed.

    python benchmarks/layer_choice.py                # greedy coreset banks, all candidates
    python benchmarks/layer_choice.py --bank random            # random banks instead

Each run replaces its own section ("bank: coreset" or "bank: random") of benchmarks/results/layer_choice.md
and keeps the other sections and the hand-written decision.

For each candidate (stage pair, feature dim D, count_include_pad of the 3x3 average):
- bank: 10 % of all patch features of the 209 train/good images (built with the exporter's torch transform),
  chosen by the export's greedy k-center coreset (`export.coreset.greedy_coreset`, projection 128, seed 0) or
  by a seeded random draw; test images go through the runtime's OpenCV transform, as in the product;
- score: nearest bank distance per test patch by exact brute-force search (torch, float32), image score = max
  patch distance (no re-weighting), pixel map = bilinear upsample to the crop, Gaussian sigma 4 px, mapped
  onto the 900x900 image with `preprocess.map_to_image` (outside the centre crop: the nearest crop value);
- image AUROC over the 83 test images, pixel AUROC over the pixels of a regular 4x4 grid (225x225 of each
  900x900 image and mask: 4.2 M pixels), both with scikit-learn;
- speed: the truncated extractor exported to ONNX, ONNX Runtime CPU, 2 intra-op threads, batch 1, one real
  image; 3 repeats of --runs timed runs after 10 warm-up runs, the repeats going round-robin over the
  candidates after the accuracy part; reported: the lowest of the 3 repeat medians (the least disturbed by
  other processes on a shared machine) and the median of all runs.

The backbone runs once (to features.13) and every candidate reuses its stage outputs through the same
`PatchAggregator` the extractor uses; a check asserts this equals `build_extractor`'s output.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import cv2  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from patchcore_edge.export.backbones import BACKBONES, load_backbone, stage_sequence  # noqa: E402
from patchcore_edge.export.coreset import greedy_coreset  # noqa: E402
from patchcore_edge.export.features import PatchAggregator, TruncatedBackbone, build_extractor  # noqa: E402
from patchcore_edge.export.onnx_export import export_onnx  # noqa: E402
from patchcore_edge.export.reference import smooth  # noqa: E402
from patchcore_edge.export.transform import torch_preprocess  # noqa: E402
from patchcore_edge.imageio import read_rgb  # noqa: E402
from patchcore_edge.preprocess import InputSpec, geometry, map_to_image, preprocess  # noqa: E402

BOTTLE = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"
SPEC = InputSpec()
SIGMA = 4.0
PIXEL_STEP = 4  # evaluate every 4th pixel in each direction: 225 x 225 of 900 x 900
TAPS = ("features.3", "features.6", "features.10", "features.13")
CACHE = Path(os.environ.get("LAYER_CHOICE_CACHE", "/tmp/patchcore_edge_layer_choice"))
TIMING_REPEATS = 3


@dataclass(frozen=True)
class Candidate:
    finer: str
    coarser: str
    dim: int
    count_include_pad: bool = False

    @property
    def label(self) -> str:
        pad = ", pad counted" if self.count_include_pad else ""
        return f"{self.finer} + {self.coarser}, D={self.dim}{pad}"


CANDIDATES = [
    Candidate("features.6", "features.10", 96, count_include_pad=True),
    Candidate("features.6", "features.10", 64, count_include_pad=True),
    Candidate("features.6", "features.10", 96),
    Candidate("features.6", "features.13", 128, count_include_pad=True),
    Candidate("features.6", "features.13", 64, count_include_pad=True),
    Candidate("features.6", "features.13", 128),
    Candidate("features.3", "features.6", 56, count_include_pad=True),  # stride 4: 16x the search work
]
DEFAULT_CANDIDATES = (0, 1, 2, 3, 4, 5, 6)


@dataclass
class Row:
    candidate: Candidate
    grid: Tuple[int, int]
    bank_vectors: int
    image_auroc: float
    separation: float  # lowest defect image score / highest good image score: > 1 when perfectly separated
    pixel_auroc: float
    bank_mb: float
    ms_best: float = float("nan")
    ms_median: float = float("nan")
    onnx_mb: float = float("nan")


def load_dataset() -> Tuple[List[Path], List[Tuple[Path, int, Path | None]]]:
    train = sorted((BOTTLE / "train" / "good").glob("*.png"))
    test: List[Tuple[Path, int, Path | None]] = []
    for folder in sorted((BOTTLE / "test").iterdir()):
        for path in sorted(folder.glob("*.png")):
            if folder.name == "good":
                test.append((path, 0, None))
            else:
                test.append((path, 1, BOTTLE / "ground_truth" / folder.name / f"{path.stem}_mask.png"))
    return train, test


@torch.no_grad()
def stage_outputs(body: TruncatedBackbone, batches: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
    collected: Dict[str, List[torch.Tensor]] = {tap: [] for tap in body.taps}
    for batch in batches:
        for tap, output in zip(body.taps, body(batch)):
            collected[tap].append(output)
    return {tap: torch.cat(parts) for tap, parts in collected.items()}


def batched(tensors: List[torch.Tensor], size: int) -> List[torch.Tensor]:
    return [torch.stack(tensors[i:i + size]) for i in range(0, len(tensors), size)]


@torch.no_grad()
def aggregate(aggregator: PatchAggregator, stages: Dict[str, torch.Tensor], cand: Candidate) -> torch.Tensor:
    finer, coarser = stages[cand.finer], stages[cand.coarser]
    return torch.cat([aggregator(finer[i:i + 16], coarser[i:i + 16]) for i in range(0, finer.shape[0], 16)])


@torch.no_grad()
def nearest_distances(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean distance of every query to its nearest bank vector (chunked brute force, float32)."""
    bank_sq = (bank * bank).sum(dim=1)
    rows = max(256, (1 << 25) // bank.shape[0])
    out = []
    for start in range(0, queries.shape[0], rows):
        chunk = queries[start:start + rows]
        d2 = (chunk * chunk).sum(dim=1, keepdim=True) - 2.0 * chunk @ bank.T + bank_sq[None]
        out.append(d2.min(dim=1).values.clamp_min(0.0).sqrt())
    return torch.cat(out)


def pixel_samples(distances: torch.Tensor, image_shape: Tuple[int, int]) -> np.ndarray:
    """[h, w] patch distances -> anomaly map on the original image, sampled every PIXEL_STEP pixels."""
    up = F.interpolate(distances[None, None], size=(SPEC.crop, SPEC.crop), mode="bilinear",
                       align_corners=False)
    crop_map = smooth(up[0, 0], SIGMA).numpy()
    full = map_to_image(crop_map, geometry(image_shape[0], image_shape[1], SPEC))
    return full[PIXEL_STEP // 2::PIXEL_STEP, PIXEL_STEP // 2::PIXEL_STEP]


def time_onnx(candidates: Sequence[Candidate], sample: np.ndarray, runs: int
              ) -> List[Tuple[float, float, float]]:
    """Per candidate: (lowest repeat median ms, median of all runs ms, ONNX MB), one image at batch 1."""
    extractors = [build_extractor("mobilenet_v2", None, SPEC, cand.dim, layers=(cand.finer, cand.coarser),
                                  count_include_pad=cand.count_include_pad)[0] for cand in candidates]
    return time_extractors([(e, SPEC, sample) for e in extractors], runs)


def time_extractors(extractors: Sequence[Tuple[torch.nn.Module, InputSpec, np.ndarray]], runs: int
                    ) -> List[Tuple[float, float, float]]:
    """Per (extractor, its input spec, one input [3, H, W]), exported to ONNX and run by ONNX Runtime CPU (2
    intra-op threads, batch 1): (lowest repeat median ms, median of all runs ms, ONNX MB).

    The repeats go round-robin over the extractors, so a burst of load from other processes hits one repeat of
    several of them rather than every run of one.
    """
    import onnxruntime as ort

    sessions = []
    sizes = []
    for extractor, spec, _ in extractors:
        with tempfile.TemporaryDirectory() as folder:
            path = export_onnx(extractor, Path(folder) / "features.onnx", spec)
            sizes.append(path.stat().st_size / 2**20)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 2
            options.inter_op_num_threads = 1
            sessions.append(ort.InferenceSession(str(path), sess_options=options,
                                                 providers=["CPUExecutionProvider"]))
    feeds = [{"image": sample[None]} for _, _, sample in extractors]
    medians: List[List[float]] = [[] for _ in extractors]
    every: List[List[float]] = [[] for _ in extractors]
    for session, feed in zip(sessions, feeds):
        for _ in range(10):
            session.run(None, feed)
    for _ in range(TIMING_REPEATS):
        for index, (session, feed) in enumerate(zip(sessions, feeds)):
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, feed)
                times.append((time.perf_counter() - start) * 1000.0)
            medians[index].append(statistics.median(times))
            every[index].extend(times)
    return [(min(m), statistics.median(e), size) for m, e, size in zip(medians, every, sizes)]


def select_bank(patches: torch.Tensor, mode: str, fraction: float, seed: int) -> torch.Tensor:
    count = max(1, int(round(fraction * patches.shape[0])))
    if mode == "coreset":
        chosen = torch.from_numpy(greedy_coreset(patches.numpy(), count, projection_dim=128, seed=seed))
    else:
        chosen = torch.randperm(patches.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
    return patches[chosen].contiguous()


def cached_stage_outputs(body: TruncatedBackbone, name: str, inputs: Callable[[], List[torch.Tensor]]
                         ) -> Dict[str, torch.Tensor]:
    """Stage outputs for a list of images, cached as .npy in CACHE (the backbone pass is the slow part)."""
    files = {tap: CACHE / f"{name}-{tap}.npy" for tap in body.taps}
    if all(f.is_file() for f in files.values()):
        return {tap: torch.from_numpy(np.load(f, allow_pickle=False)) for tap, f in files.items()}
    outputs = stage_outputs(body, batched(inputs(), 16))
    CACHE.mkdir(parents=True, exist_ok=True)
    for tap, f in files.items():
        np.save(f, outputs[tap].numpy(), allow_pickle=False)
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", choices=("coreset", "random"), default="coreset")
    parser.add_argument("--bank-fraction", type=float, default=0.1)
    parser.add_argument("--candidates", type=int, nargs="+", default=list(DEFAULT_CANDIDATES),
                        help="indices into: " + "; ".join(
                            f"{i}: {c.label}" for i, c in enumerate(CANDIDATES)))
    parser.add_argument("--runs", type=int, default=50,
                        help="timed ONNX Runtime runs per repeat and candidate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "layer_choice.md")
    args = parser.parse_args()
    if not BOTTLE.is_dir():
        sys.exit(f"{BOTTLE}: MVTec AD bottle not found (expected ../shared/data beside the repository)")
    torch.set_num_threads(2)
    started = time.perf_counter()
    load_before = os.getloadavg()

    train, test = load_dataset()
    print(f"{len(train)} train images, {len(test)} test images", flush=True)
    model, weights = load_backbone("mobilenet_v2", None)
    body = TruncatedBackbone(stage_sequence("mobilenet_v2", model), TAPS).eval()

    test_images = [read_rgb(p) for p, _, _ in test]
    # Test images through the runtime's transform, training images through the exporter's, as in the product.
    test_inputs = [torch.from_numpy(preprocess(image, SPEC)) for image in test_images]
    train_stages = cached_stage_outputs(
        body, "train", lambda: [torch_preprocess(read_rgb(p), SPEC) for p in train])
    test_stages = cached_stage_outputs(body, "test", lambda: test_inputs)
    labels = np.array([label for _, label, _ in test])
    masks = []
    for (path, _, mask_path), image in zip(test, test_images):
        mask: np.ndarray | None
        if mask_path is None:
            mask = np.zeros(image.shape[:2], np.uint8)
        else:
            mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
            if mask is None or mask.shape != image.shape[:2]:
                sys.exit(f"{mask_path}: missing or not the size of {path}")
        masks.append(mask[PIXEL_STEP // 2::PIXEL_STEP, PIXEL_STEP // 2::PIXEL_STEP] > 127)
    pixel_labels = np.concatenate([m.ravel() for m in masks])
    print(f"features ready in {time.perf_counter() - started:.0f}s", flush=True)

    rows: List[Row] = []
    for index in args.candidates:
        cand = CANDIDATES[index]
        channels = (train_stages[cand.finer].shape[1], train_stages[cand.coarser].shape[1])
        aggregator = PatchAggregator(channels, cand.dim, cand.count_include_pad).eval()
        train_grid = aggregate(aggregator, train_stages, cand)
        test_grid = aggregate(aggregator, test_stages, cand)
        # The shortcut (one backbone pass for all candidates) must equal the extractor that gets exported.
        extractor, _ = build_extractor("mobilenet_v2", None, SPEC, cand.dim,
                                       layers=(cand.finer, cand.coarser),
                                       count_include_pad=cand.count_include_pad)
        with torch.no_grad():
            direct = extractor(test_inputs[0][None])
        torch.testing.assert_close(direct, test_grid[:1], rtol=1e-4, atol=1e-4)
        _, h, w, d = test_grid.shape
        t0 = time.perf_counter()
        bank = select_bank(train_grid.reshape(-1, d), args.bank, args.bank_fraction, args.seed)
        bank_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        distances = nearest_distances(test_grid.reshape(-1, d), bank).reshape(len(test), h, w)
        search_s = time.perf_counter() - t0
        image_scores = distances.reshape(len(test), -1).max(dim=1).values.numpy()
        pixel_scores = np.concatenate([pixel_samples(distances[i], test_images[i].shape[:2]).ravel()
                                       for i in range(len(test))])
        separation = float(image_scores[labels == 1].min() / image_scores[labels == 0].max())
        row = Row(cand, (h, w), int(bank.shape[0]), float(roc_auc_score(labels, image_scores)), separation,
                  float(roc_auc_score(pixel_labels, pixel_scores)), bank.numel() * 4 / 2**20)
        rows.append(row)
        print(f"{cand.label}: grid {h}x{w}, bank {row.bank_vectors} ({args.bank}, {bank_s:.0f}s), "
              f"image AUROC {row.image_auroc:.4f} (separation {row.separation:.3f}), "
              f"pixel AUROC {row.pixel_auroc:.4f}, "
              f"search {search_s:.0f}s", flush=True)

    accuracy_done = time.perf_counter()
    load_timing = os.getloadavg()
    timings = time_onnx([row.candidate for row in rows], test_inputs[0].numpy(), args.runs)
    for row, (best, median, size_mb) in zip(rows, timings):
        row.ms_best, row.ms_median, row.onnx_mb = best, median, size_mb
        print(f"{row.candidate.label}: ORT {row.ms_best:.2f} ms (median of all {row.ms_median:.2f})",
              flush=True)
    timing = {"load_before": load_timing[0], "load_after": os.getloadavg()[0],
              "seconds": time.perf_counter() - accuracy_done}
    write_report(args, rows, weights.sha256 or "", load_before[0], time.perf_counter() - started, len(train),
                 len(test), int(pixel_labels.size), timing)


def machine() -> str:
    import onnxruntime as ort

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}; Python "
            f"{platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__}")


def write_report(args: argparse.Namespace, rows: List[Row], sha256: str, load_before: float, seconds: float,
                 n_train: int, n_test: int, n_pixels: int, timing: Dict[str, float]) -> None:
    bank_rule = ("greedy k-center coreset (export.coreset, projection 128)" if args.bank == "coreset"
                 else "seeded random draw")
    strides = BACKBONES["mobilenet_v2"].strides
    command = (f"python benchmarks/layer_choice.py --bank {args.bank} --bank-fraction {args.bank_fraction} "
               f"--candidates {' '.join(map(str, args.candidates))} --runs {args.runs} --seed {args.seed}")
    lines = [
        f"## Run: bank {args.bank}",
        "",
        (f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M')}, {seconds / 60:.1f} min, load average "
         f"{load_before:.1f} at start)."),
        f"Machine: {machine()}.",
        f"Weights: torchvision mobilenet_v2 IMAGENET1K_V1 (offline package), sha256 {sha256}.",
        (f"Data: {n_train} train/good images, {n_test} test images; resize {SPEC.resize}, crop {SPEC.crop}. "
         f"Bank: {args.bank_fraction:.0%} of all train patches by {bank_rule}, seed {args.seed}. "
         f"Image score = max patch distance, exact search. Pixel AUROC over {n_pixels:,} pixels "
         f"(every {PIXEL_STEP}th pixel of each 900x900 map and mask: 225x225)."),
        (f"Speed: ONNX Runtime CPU, 2 intra-op threads, batch 1; {TIMING_REPEATS} x {args.runs} runs per "
         f"candidate, repeats round-robin over the candidates; load average {timing['load_before']:.1f} "
         f"before / {timing['load_after']:.1f} after the timing "
         "(2 cores shared with other jobs: a load above 2 inflates the times)."),
        "",
        ("Separation: lowest defect-image score / highest good-image score (above 1: every defect image "
         "scores above every good one; the margin says how safely)."),
        "",
        ("| # | stages (stride) | D | 3x3 pad counted | grid | image AUROC | separation | pixel AUROC "
         "| ms/image best (all) | ONNX MB | bank MB |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        c = row.candidate
        lines.append(
            f"| {CANDIDATES.index(c)} | {c.finer} ({strides[c.finer]}) + "
            f"{c.coarser} ({strides[c.coarser]}) | "
            f"{c.dim} | {'yes' if c.count_include_pad else 'no'} | {row.grid[0]}x{row.grid[1]} | "
            f"{row.image_auroc:.4f} | {row.separation:.3f} | {row.pixel_auroc:.4f} | "
            f"{row.ms_best:.2f} ({row.ms_median:.2f}) | "
            f"{row.onnx_mb:.2f} | {row.bank_mb:.1f} |")
    update_results(args.out, f"## Run: bank {args.bank}", "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def update_results(path: Path, title: str, section: str) -> None:
    """Replace the section starting with `title` (or add it before '## Decision'), keeping everything else."""
    header = "# Layer and feature-dim choice for mobilenet_v2 (MVTec AD bottle)\n\n"
    text = path.read_text() if path.exists() else header + "## Decision\n\n(to be written)\n"
    parts = text.split("\n## ")
    head, sections = parts[0], ["## " + p for p in parts[1:]]
    sections = [s for s in sections if not s.startswith(title)]
    decision = [s for s in sections if s.startswith("## Decision")]
    others = [s for s in sections if not s.startswith("## Decision")]
    ordered = others + [section] + decision
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head.rstrip("\n") + "\n\n" + "\n".join(p.rstrip("\n") + "\n" for p in ordered))


if __name__ == "__main__":
    main()
