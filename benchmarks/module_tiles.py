"""Benchmark (issue 18): tiling on a real high-resolution frame, a solar module of real electroluminescence cells.

An EL image of a PV module is a mosaic of cell images; the ELPV cells (300 x 300, `elpv-dataset`) are cut from
such modules. This script puts them back together: a 6 x 10 module is 1800 x 3000 pixels (5.4 MP), one defective
cell in a defect frame, so the defect is a small part of a large frame, the case `--tile` is for.

    python benchmarks/module_tiles.py --elpv-dir out/elpv-mono [--train-modules 8] [--test-modules 15]

Data (written under --scratch, git-ignored; the cells' licence keeps them out of the repository): training modules
from the training cells (defect probability 0), test modules from the held-out good cells, and in each defect
module one held-out defect cell (probability 1) at a random position; its mask is that cell's square (ELPV has no
pixel masks: pixel metrics against the square are coarse). Each configuration is exported with the CLI's defaults
but the geometry, then scored by `evaluation.evaluate` (image AUROC, pixel AUROC against the squares); "cell hit"
is the share of defect modules whose heat-map maximum lies inside the defect cell. Cells are sampled with
replacement (seed 0), so good cells repeat across modules.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from patchcore_edge.evaluation.dataset import discover_mvtec  # noqa: E402
from patchcore_edge.evaluation.evaluate import evaluate  # noqa: E402
from patchcore_edge.export.pipeline import ExportOptions, export_bundle  # noqa: E402
from patchcore_edge.imageio import list_images, read_rgb  # noqa: E402
from patchcore_edge.runtime.detector import Detector  # noqa: E402

CELL = 300


def _cells(folder: Path) -> List[np.ndarray]:
    paths, _ = list_images(folder)
    return [cv2.resize(read_rgb(p), (CELL, CELL), interpolation=cv2.INTER_AREA) for p in paths]


def _module(cells: Sequence[np.ndarray], rows: int, cols: int) -> np.ndarray:
    return np.vstack([np.hstack(list(cells[r * cols:(r + 1) * cols])) for r in range(rows)])


def build(elpv: Path, out: Path, rows: int, cols: int, train: int, test: int, seed: int) -> Dict[str, int]:
    rng = np.random.default_rng(seed)
    train_cells, good_cells = _cells(elpv / "train" / "good"), _cells(elpv / "test" / "good")
    defect_cells = _cells(elpv / "test" / "defect")
    n = rows * cols
    for sub in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    def write(path: Path, image: np.ndarray) -> None:
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image)

    for i in range(train):
        write(out / "train" / "good" / f"{i:03d}.png", _module([train_cells[j] for j in rng.integers(0, len(train_cells), n)], rows, cols))
    for i in range(test):
        write(out / "test" / "good" / f"{i:03d}.png", _module([good_cells[j] for j in rng.integers(0, len(good_cells), n)], rows, cols))
    for i in range(min(test, len(defect_cells))):
        cells = [good_cells[j] for j in rng.integers(0, len(good_cells), n)]
        where = int(rng.integers(0, n))
        cells[where] = defect_cells[i]
        write(out / "test" / "defect" / f"{i:03d}.png", _module(cells, rows, cols))
        mask = np.zeros((rows * CELL, cols * CELL), np.uint8)
        r, c = divmod(where, cols)
        mask[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = 255
        write(out / "ground_truth" / "defect" / f"{i:03d}_mask.png", mask)
    return {"train": train, "test_good": test, "test_defect": min(test, len(defect_cells))}


def cell_hits(bundle: Path, data: Path) -> float:
    hits, total = 0, 0
    with Detector.load(bundle, backend="onnxruntime") as detector:
        paths, _ = list_images(data / "test" / "defect")
        for path in paths:
            result = detector.predict(path)
            mask = cv2.imread(str(data / "ground_truth" / "defect" / f"{path.stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
            amap = result.anomaly_map
            y, x = np.unravel_index(int(np.argmax(amap)), amap.shape)
            hits += int(mask[y, x] > 0)
            total += 1
    return hits / max(1, total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elpv-dir", type=Path, required=True, help="scripts/prepare_elpv.py output")
    parser.add_argument("--scratch", type=Path, default=REPO / "out" / "module_tiles")
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--cols", type=int, default=10)
    parser.add_argument("--train-modules", type=int, default=8)
    parser.add_argument("--test-modules", type=int, default=15)
    parser.add_argument("--tiles", type=int, nargs="*", default=[600], help="tile sizes to try (overlap 64)")
    parser.add_argument("--pixel-size", type=int, default=750, help="longer side of the pixel metrics")
    args = parser.parse_args()
    data = args.scratch / "data"
    counts = build(args.elpv_dir, data, args.rows, args.cols, args.train_modules, args.test_modules, 0)
    print(f"modules {args.rows}x{args.cols} cells = {args.cols * CELL}x{args.rows * CELL} px; {counts}; "
          f"{time.strftime('%H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}", flush=True)
    configs = [("squash 224 (whole frame)", {})] + [(f"tile {t}, overlap 64", {"tile": t, "tile_overlap": 64})
                                                     for t in args.tiles]
    print("| geometry | image AUROC | pixel AUROC (cell squares) | cell hit | export s | load |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, geometry in configs:
        bundle = args.scratch / ("bundle-" + name.split(" (")[0].replace(" ", "").replace(",", "-"))
        start = time.perf_counter()
        export_bundle(ExportOptions(nominal_dir=data / "train" / "good", output=bundle, force=True, engine=False,
                                    **geometry))
        export_s = time.perf_counter() - start
        with Detector.load(bundle, backend="onnxruntime") as detector:
            report = evaluate(detector, discover_mvtec(data), pixel_size=args.pixel_size)
        m = report["metrics"]
        hit = cell_hits(bundle, data)
        print(f"| {name} | {m['image_auroc']:.4f} | {m['pixel_auroc']:.4f} | {hit:.3f} | {export_s:.0f} | "
              f"{os.getloadavg()[0]:.1f} |", flush=True)
        (args.scratch / f"{bundle.name}.json").write_text(json.dumps(m, indent=1))


if __name__ == "__main__":
    main()
