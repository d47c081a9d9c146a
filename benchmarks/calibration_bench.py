"""Does the calibrated threshold keep its false-alarm promise? Split studies on real scores and exact checks.

Two parts:

1. synthetic (no bundle needed): draw n calibration scores from known distributions (normal, log-normal, Pareto,
   and a coarse discrete one with ties), set the threshold with `thresholds.image_threshold`, and compute the TRUE
   false-alarm rate exactly from the known distribution. Over many draws, P(true FAR > target) must be <= 1 -
   confidence whatever the distribution (and P(true FAR > stated rate) <= 1 - confidence with too few images).

2. bundle (the real pipeline): score every held-out good image once with the runtime Detector (training images of
   the bundle are recognised by sha256 and left out), then repeat random half/half splits: calibrate on one half,
   count false alarms on the other. The realised rate on a finite half is itself noisy, so each frequency is
   compared with its exact prediction under exchangeability: given the threshold X_(k) of n calibration scores,
   the number of alarms among m new ones is Beta-Binomial(m, n-k+1, k).

    python benchmarks/calibration_bench.py synthetic
    python benchmarks/calibration_bench.py bundle BUNDLE GOOD_DIR [GOOD_DIR ...] [--repeats 2000]
                                          [--cal-sizes 100 299] [--save-scores scores.npy]
    python benchmarks/calibration_bench.py scores scores.npy [--cal-sizes 100 299]

For bottle, export the bundle from part of train/good so that enough good images stay unseen, e.g.
    mkdir -p /tmp/bottle_train && ln -s $PWD/../shared/data/mvtec_ad/bottle/train/good/0[0-9]*.png /tmp/bottle_train/
    patchcore-edge export /tmp/bottle_train -o /tmp/bottle.bundle          # 100 images: 000..099
    python benchmarks/calibration_bench.py bundle /tmp/bottle.bundle ../shared/data/mvtec_ad/bottle/train/good \
        ../shared/data/mvtec_ad/bottle/test/good
For elpv (defect probability 0 = good), with scripts/prepare_elpv.py:
    python scripts/prepare_elpv.py /tmp/elpv --cell-type poly --train 200 --test-good 720
    patchcore-edge export /tmp/elpv/train/good -o /tmp/elpv.bundle
    python benchmarks/calibration_bench.py bundle /tmp/elpv.bundle /tmp/elpv/test/good
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from patchcore_edge import stats

DEFAULT_TARGETS = ((0.01, 0.95), (0.05, 0.95), (0.1, 0.9))


# ---------------------------------------------------------------------------------------------- exact predictions


def beta_binomial_sf(count: int, trials: int, a: float, b: float) -> float:
    """P(X > count) for X ~ Beta-Binomial(trials, a, b), summed in log space."""
    x = np.arange(trials + 1, dtype=np.float64)
    lg = np.vectorize(math.lgamma, otypes=[np.float64])
    log_pmf = (math.lgamma(trials + 1) - lg(x + 1) - lg(trials - x + 1) + lg(x + a) + lg(trials - x + b)
               - math.lgamma(trials + a + b) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)))
    return float(np.exp(log_pmf[count + 1:]).sum()) if count + 1 <= trials else 0.0


# ---------------------------------------------------------------------------------------------- synthetic


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


Distribution = Tuple[str, Callable[[np.random.Generator, Tuple[int, ...]], np.ndarray], Callable[[np.ndarray],
                                                                                                 np.ndarray]]

DISTRIBUTIONS: List[Distribution] = [
    ("normal(1, 0.1)", lambda r, s: r.normal(1.0, 0.1, s), lambda t: 1 - _normal_cdf((t - 1.0) / 0.1)),
    ("log-normal(0, 1)", lambda r, s: r.lognormal(0.0, 1.0, s), lambda t: 1 - _normal_cdf(np.log(t))),
    ("Pareto(alpha=1.5)", lambda r, s: (1 - r.random(s)) ** (-1 / 1.5), lambda t: np.minimum(1.0, t ** -1.5)),
    # 50 equally likely values: ties everywhere; FAR(t) = P(X > t) exactly.
    ("discrete 50 levels", lambda r, s: r.integers(0, 50, s).astype(np.float64),
     lambda t: (49 - np.floor(t)) / 50),
]


def synthetic(repeats: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    rows = ["| distribution | n | target FAR | confidence | rank k | guarantee | stated rate | "
            "P(true FAR > target) | P(true FAR > stated) | allowed | mean true FAR | E[FAR] stated |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, draw, survival in DISTRIBUTIONS:
        for n, alpha, confidence in ((64, 0.01, 0.95), (300, 0.01, 0.95), (1000, 0.01, 0.95), (200, 0.05, 0.95),
                                     (100, 0.1, 0.9)):
            samples = draw(rng, (repeats, n))
            sample = stats.image_threshold(samples[0], alpha, confidence)
            k = sample.rank
            thresholds = np.partition(samples, k - 1, axis=1)[:, k - 1]
            true_far = survival(thresholds)
            exceed = float(np.mean(true_far > sample.guaranteed_rate))
            over_target = float(np.mean(true_far > alpha))
            rows.append(f"| {name} | {n} | {alpha:.0%} | {confidence:.0%} | {k} | "
                        f"{'met' if sample.guarantee_met else 'max (too few)'} | {sample.guaranteed_rate:.4f} | "
                        f"{over_target:.4f} | {exceed:.4f} | {1 - confidence:.2f} | {true_far.mean():.4f} | {sample.expected_rate:.4f} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- bundle


def score_good_images(bundle: Path, folders: Sequence[Path], backend: str, batch_size: int
                      ) -> Tuple[np.ndarray, Dict[str, float]]:
    from patchcore_edge.bundle import Bundle
    from patchcore_edge.calibration import calibrate as flow

    loaded = Bundle.load(bundle)
    training = flow.training_hashes(loaded)
    detector = flow.load_detector(loaded, backend)
    scores: Dict[str, float] = {}
    info = {"training_left_out": 0.0, "skipped": 0.0, "seconds": 0.0}
    start = time.perf_counter()
    try:
        for folder in folders:
            scored = flow.score_folder(detector, folder, "nominal", training, batch_size=batch_size)
            info["skipped"] += len(scored.skipped)
            for image in scored.images:
                if image.in_training:
                    info["training_left_out"] += 1
                else:
                    scores.setdefault(image.sha256, image.score)  # a duplicated file counts once
    finally:
        detector.close()
    info["seconds"] = time.perf_counter() - start
    return np.array(list(scores.values()), dtype=np.float64), info


def split_study(scores: np.ndarray, alpha: float, confidence: float, repeats: int, seed: int,
                n_cal: Optional[int] = None) -> Dict[str, float]:
    """Calibrate on n_cal random images (default: half), count false alarms on the rest; repeat."""
    rng = np.random.default_rng(seed)
    n = scores.size // 2 if n_cal is None else n_cal
    if not 1 <= n < scores.size:
        raise SystemExit(f"calibration size {n} must be between 1 and {scores.size - 1}")
    m = scores.size - n
    realised = np.empty(repeats)
    stated = stats.image_threshold(scores[:n], alpha, confidence)  # rank and stated rate depend on n only
    k = stated.rank
    for r in range(repeats):
        order = rng.permutation(scores.size)
        threshold = np.partition(scores[order[:n]], k - 1)[k - 1]  # what image_threshold picks: rank k
        realised[r] = np.mean(scores[order[n:]] > threshold)
    alarms_allowed_target = math.floor(alpha * m + 1e-9)
    alarms_allowed_stated = math.floor(stated.guaranteed_rate * m + 1e-9)
    return {
        "n_cal": n, "n_eval": m, "rank": k, "met": float(stated.guarantee_met), "stated": stated.guaranteed_rate,
        "expected": stated.expected_rate, "mean_realised": float(realised.mean()),
        "median_realised": float(np.median(realised)),
        "p_over_target": float(np.mean(realised > alpha)),
        "p_over_target_pred": beta_binomial_sf(alarms_allowed_target, m, n - k + 1, k),
        "p_over_stated": float(np.mean(realised > stated.guaranteed_rate)),
        "p_over_stated_pred": beta_binomial_sf(alarms_allowed_stated, m, n - k + 1, k),
    }


def bundle_report(bundle: Optional[Path], folders: Sequence[Path], repeats: int, seed: int, backend: str,
                  batch_size: int, cal_sizes: Sequence[Optional[int]], scores_file: Optional[Path]) -> str:
    if bundle is not None:
        scores, info = score_good_images(bundle, folders, backend, batch_size)
        head = (f"bundle {bundle}: {scores.size} good images unseen by the bundle "
                f"({int(info['training_left_out'])} training images left out, {int(info['skipped'])} skipped); "
                f"scoring took {info['seconds']:.1f} s ({1000 * info['seconds'] / max(1, scores.size):.0f} ms/image)")
        if scores_file is not None:
            np.save(scores_file, scores, allow_pickle=False)
    else:
        assert scores_file is not None
        scores = np.load(scores_file, allow_pickle=False).astype(np.float64)
        head = f"scores of {scores.size} good images from {scores_file}"
    if scores.size < 20:
        raise SystemExit(f"only {scores.size} good images unseen by the bundle: export it from fewer images")
    lines = [head,
             f"score quantiles: {', '.join(f'{k} {v:.4g}' for k, v in stats.quantiles(scores).items() if k != 'n')}",
             "",
             "| target FAR | conf. | n cal / eval | rank k | guarantee | stated rate | E[FAR] | mean realised | "
             "P(realised > target) obs / pred | P(realised > stated) obs / pred |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n_cal, (alpha, confidence) in ((n, t) for n in cal_sizes for t in DEFAULT_TARGETS):
        s = split_study(scores, alpha, confidence, repeats, seed, n_cal)
        lines.append(
            f"| {alpha:.0%} | {confidence:.0%} | {s['n_cal']} / {s['n_eval']} | {s['rank']} | "
            f"{'met' if s['met'] else 'max (too few)'} | {s['stated']:.4f} | {s['expected']:.4f} | "
            f"{s['mean_realised']:.4f} | {s['p_over_target']:.3f} / {s['p_over_target_pred']:.3f} | "
            f"{s['p_over_stated']:.3f} / {s['p_over_stated_pred']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    syn = sub.add_parser("synthetic")
    syn.add_argument("--repeats", type=int, default=20000)
    syn.add_argument("--seed", type=int, default=0)
    bun = sub.add_parser("bundle", help="score held-out good images with a bundle, then split studies")
    bun.add_argument("bundle", type=Path)
    bun.add_argument("good_dirs", type=Path, nargs="+")
    bun.add_argument("--save-scores", type=Path, default=None, help="keep the scores (.npy) for `scores` runs")
    sco = sub.add_parser("scores", help="split studies on scores saved by `bundle --save-scores`")
    sco.add_argument("scores_file", type=Path)
    for part in (bun, sco):
        part.add_argument("--cal-sizes", type=int, nargs="+", default=None,
                          help="calibration set sizes to study (default: half of the images)")
    for part in (bun, sco):
        part.add_argument("--repeats", type=int, default=2000)
        part.add_argument("--seed", type=int, default=0)
    bun.add_argument("--backend", default="auto")
    bun.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    print(f"# calibration_bench {args.mode} -- {platform.node()} ({platform.machine()}, {platform.processor() or '?'}),"
          f" python {platform.python_version()}, numpy {np.__version__}")
    print(f"command: {' '.join(sys.argv)}\n")
    start = time.perf_counter()
    if args.mode == "synthetic":
        print(synthetic(args.repeats, args.seed))
    else:
        sizes = args.cal_sizes or [None]
        if args.mode == "bundle":
            print(bundle_report(args.bundle, args.good_dirs, args.repeats, args.seed, args.backend, args.batch_size,
                                sizes, args.save_scores))
        else:
            print(bundle_report(None, [], args.repeats, args.seed, "auto", 1, sizes, args.scores_file))
    print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
