"""Lay out solar-cell images of the `elpv-dataset` package as an anomaly-detection task (symlinks, no copies).

    OUT/train/good        nominal cells (defect probability 0) of one type, for export
    OUT/test/good         held-out nominal cells of the same type
    OUT/test/defect       cells rated defective with probability 1

The images stay in site-packages: their licence (CC BY-NC-SA 4.0) keeps them out of this repository.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--cell-type", choices=("mono", "poly"), default="mono")
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test-good", type=int, default=60)
    parser.add_argument("--test-defect", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import elpv_dataset

    root = Path(elpv_dataset.__file__).parent / "data"
    good, bad = [], []
    with open(root / "labels.csv", newline="") as handle:
        for row in csv.reader(handle, delimiter=" ", skipinitialspace=True):
            path, probability, cell_type = row[0], float(row[1]), row[2]
            if cell_type != args.cell_type:
                continue
            if probability == 0.0:
                good.append(root / path)
            elif probability == 1.0:
                bad.append(root / path)
    rng = random.Random(args.seed)
    rng.shuffle(good)
    rng.shuffle(bad)
    if len(good) < args.train + args.test_good or len(bad) < args.test_defect:
        raise SystemExit(f"not enough {args.cell_type} cells: {len(good)} good, {len(bad)} defective")
    split = {
        "train/good": good[: args.train],
        "test/good": good[args.train: args.train + args.test_good],
        "test/defect": bad[: args.test_defect],
    }
    for folder, paths in split.items():
        target = args.out / folder
        target.mkdir(parents=True, exist_ok=True)
        for path in paths:
            link = target / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
    print(" ".join(f"{k}={len(v)}" for k, v in split.items()), "->", args.out)


if __name__ == "__main__":
    main()
