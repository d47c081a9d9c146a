"""Distribution-free statistics for thresholds: exact binomial tails, order-statistic thresholds, intervals.

No scipy: every probability here is an exact binomial sum evaluated in log space.

The image threshold (derivation)
--------------------------------
Let X_1..X_n be the scores of n nominal calibration images, i.i.d. with a continuous distribution F, and
X_(1) <= ... <= X_(n) their order statistics. A new nominal image is flagged when its score is > t. Taking
t = X_(k), the true false-alarm rate is FAR_k = 1 - F(X_(k)) = 1 - U_(k), where U_(k) = F(X_(k)) is the k-th order
statistic of n uniforms, U_(k) ~ Beta(k, n-k+1); hence FAR_k ~ Beta(n-k+1, k), whatever F is. Then

    P(FAR_k > alpha) = P(U_(k) < 1 - alpha)
                     = P(at least k of the n uniforms fall below 1 - alpha)
                     = P(Binomial(n, 1 - alpha) >= k)
                     = P(Binomial(n, alpha) <= n - k).

Since this decreases as k grows, the threshold is X_(k) for the smallest k with P(Binomial(n, alpha) <= n-k) <= delta
(delta = 1 - confidence): j = n - k nominal calibration scores may lie above the threshold. With k = n (the
maximum) the condition is (1 - alpha)^n <= delta, so n >= ceil(log(delta) / log(1 - alpha)) images are needed:
299 for alpha = 0.01 at 95 %. With fewer images no order statistic carries the guarantee; the maximum is the best
one can do and it guarantees, at the same confidence, only the rate a* = 1 - delta^(1/n).

The same tail gives, for any threshold with j of n calibration scores above it, the rate it guarantees: the
smallest a with P(Binomial(n, a) <= j) <= delta (the one-sided Clopper-Pearson upper bound).

Ties and discrete scores only make these statements conservative: with X = F^-1(U), F(X_(k)) >= U_(k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

# Scores arrive as numpy arrays or plain lists.
Scores = Union[Sequence[float], np.ndarray]

QUANTILE_LEVELS: Dict[str, float] = {"q01": 0.01, "q05": 0.05, "q25": 0.25, "q50": 0.5, "q75": 0.75, "q95": 0.95,
                                     "q99": 0.99}

# Median shift (in units of the reference IQR) above which the nominal scores are said to have moved. For n
# nominal images the median's standard error is about 0.93 IQR / sqrt(n) (normal case), so with two sets of 20
# images a shift of 1 IQR is more than 3 standard errors: false warnings are rare, a moved camera is not missed.
SHIFT_LIMIT_IQR = 1.0
# Ratio of spreads (IQR new / IQR reference) outside [1/SPREAD_LIMIT, SPREAD_LIMIT] is reported as well.
SPREAD_LIMIT = 2.5
# Tukey's "far out" fence: nominal scores above Q3 + 3 IQR are flagged as likely defects or a changed scene.
OUTLIER_FENCE_IQR = 3.0


# ---------------------------------------------------------------------------------------------- binomial


def _check_probability(p: float, name: str = "p") -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"{name} must be in [0, 1], got {p}")
    return p


def binom_logpmf(n: int, p: float) -> np.ndarray:
    """log P(Binomial(n, p) = i) for i = 0..n (float64, -inf where the probability is exactly 0)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    p = _check_probability(p)
    i = np.arange(n + 1, dtype=np.float64)
    if p == 0.0:
        out = np.full(n + 1, -np.inf)
        out[0] = 0.0
        return out
    if p == 1.0:
        out = np.full(n + 1, -np.inf)
        out[n] = 0.0
        return out
    lgamma = np.vectorize(math.lgamma, otypes=[np.float64])
    log_choose = math.lgamma(n + 1) - lgamma(i + 1) - lgamma(n - i + 1)
    out = log_choose + i * math.log(p) + (n - i) * math.log1p(-p)
    return np.asarray(out, dtype=np.float64)


def _logsumexp(values: np.ndarray) -> float:
    if values.size == 0:
        return -math.inf
    top = float(np.max(values))
    if top == -math.inf:
        return -math.inf
    return top + math.log(float(np.sum(np.exp(values - top))))


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), exact up to float64 rounding (summed in log space)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    logpmf = binom_logpmf(n, p)
    # Sum the shorter tail: its terms are the small ones, so the result keeps its relative precision.
    if k < n / 2:
        return min(1.0, math.exp(_logsumexp(logpmf[: k + 1])))
    return max(0.0, 1.0 - math.exp(_logsumexp(logpmf[k + 1:])))


def binom_sf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) >= k) (note: >= k, the upper tail including k)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    logpmf = binom_logpmf(n, p)
    if k > n / 2:
        return min(1.0, math.exp(_logsumexp(logpmf[k:])))
    return max(0.0, 1.0 - math.exp(_logsumexp(logpmf[:k])))


def _bisect_decreasing(function: Callable[[float], float], target: float, tolerance: float = 1e-12) -> float:
    """The p in [0, 1] where a decreasing function of p crosses target; returns the upper end (conservative)."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if function(mid) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < tolerance:
            break
    return hi


# ---------------------------------------------------------------------------------------------- guarantees


def _check_rates(alpha: float, confidence: float) -> Tuple[float, float]:
    alpha = float(alpha)
    confidence = float(confidence)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"the false-alarm rate must be between 0 and 1 (e.g. 0.01 for 1 %), got {alpha}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"the confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")
    return alpha, 1.0 - confidence


def far_exceedance_probability(n: int, k: int, alpha: float) -> float:
    """P(true false-alarm rate of threshold X_(k) > alpha) = P(Binomial(n, alpha) <= n - k), for 1 <= k <= n."""
    if not 1 <= k <= n:
        raise ValueError(f"rank k must be in 1..n, got k={k}, n={n}")
    return binom_cdf(n - k, n, _check_probability(alpha, "alpha"))


def min_images(alpha: float, confidence: float) -> int:
    """The fewest nominal images for which some order statistic (the maximum) guarantees FAR <= alpha."""
    alpha, delta = _check_rates(alpha, confidence)
    n = max(1, math.ceil(math.log(delta) / math.log1p(-alpha)))
    # Guard the float division at the boundary: check the exact condition (1 - alpha)^n <= delta on both sides.
    while n > 1 and (n - 1) * math.log1p(-alpha) <= math.log(delta):
        n -= 1
    while n * math.log1p(-alpha) > math.log(delta):
        n += 1
    return n


def threshold_rank(n: int, alpha: float, confidence: float) -> Optional[int]:
    """The smallest rank k (1-based) with P(FAR of X_(k) > alpha) <= 1 - confidence, or None if n is too small."""
    alpha, delta = _check_rates(alpha, confidence)
    if n < 1:
        return None
    logpmf = binom_logpmf(n, alpha)
    # cdf[j] = P(Binomial(n, alpha) <= j), increasing in j; the largest admissible j gives the smallest k.
    log_cdf = np.logaddexp.accumulate(logpmf)
    admissible = np.nonzero(log_cdf <= math.log(delta))[0]
    if admissible.size == 0:
        return None
    return n - int(admissible[-1])


def guaranteed_rate(n: int, exceedances: int, confidence: float) -> float:
    """The false-alarm rate a threshold guarantees at the confidence, when `exceedances` of n nominal calibration
    scores lie above it: the smallest a with P(Binomial(n, a) <= exceedances) <= 1 - confidence."""
    if n < 1:
        raise ValueError("need at least one nominal score")
    if not 0 <= exceedances <= n:
        raise ValueError(f"exceedances must be in 0..n, got {exceedances} of {n}")
    delta = 1.0 - float(confidence)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"the confidence must be between 0 and 1, got {confidence}")
    if exceedances == n:
        return 1.0
    if exceedances == 0:
        return 1.0 - float(delta ** (1.0 / n))
    return _bisect_decreasing(lambda a: binom_cdf(exceedances, n, a), delta)


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> Tuple[float, float]:
    """Exact two-sided Clopper-Pearson interval for a binomial proportion, from the binomial tails."""
    if trials < 1:
        raise ValueError("need at least one trial")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in 0..trials, got {successes} of {trials}")
    half = (1.0 - float(confidence)) / 2.0
    if not 0.0 < half < 0.5:
        raise ValueError(f"the confidence must be between 0 and 1, got {confidence}")
    if successes == 0:
        lower = 0.0
    else:
        # P(Binomial(trials, p) >= successes) increases with p: lower is where it reaches half.
        lower = 1.0 - _bisect_decreasing(lambda q: binom_sf(successes, trials, 1.0 - q), half)
    if successes == trials:
        upper = 1.0
    else:
        upper = _bisect_decreasing(lambda p: binom_cdf(successes, trials, p), half)
    return max(0.0, lower), min(1.0, upper)


# ---------------------------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class ImageThreshold:
    """An image threshold from nominal scores and what it guarantees. Decision: anomalous iff score > threshold."""

    threshold: float
    rank: int  # 1-based rank k of the order statistic used
    n: int
    n_required: int  # nominal images needed for the guarantee at the target rate
    target_rate: float
    confidence: float
    guarantee_met: bool
    guaranteed_rate: float  # the rate this threshold guarantees at the confidence
    expected_rate: float  # E[true FAR] = (n - k + 1) / (n + 1)
    exceedances: int  # nominal calibration scores strictly above the threshold


def image_threshold(nominal_scores: Scores, alpha: float, confidence: float) -> ImageThreshold:
    """The order-statistic threshold for a false-alarm rate alpha at the confidence (see the module docstring).

    With too few images the maximum is used and `guarantee_met` is False; `guaranteed_rate` then says what the
    maximum does guarantee at that confidence.
    """
    alpha, _ = _check_rates(alpha, confidence)
    scores = np.sort(np.asarray(nominal_scores, dtype=np.float64).ravel())
    n = int(scores.size)
    if n == 0:
        raise ValueError("no nominal scores")
    if not np.all(np.isfinite(scores)):
        raise ValueError("nominal scores contain NaN or infinity")
    rank = threshold_rank(n, alpha, confidence)
    met = rank is not None
    k = rank if rank is not None else n
    threshold = float(scores[k - 1])
    exceedances = int(np.count_nonzero(scores > threshold))
    return ImageThreshold(
        threshold=threshold, rank=k, n=n, n_required=min_images(alpha, confidence), target_rate=alpha,
        confidence=float(confidence), guarantee_met=met,
        guaranteed_rate=guaranteed_rate(n, n - k, confidence), expected_rate=(n - k + 1) / (n + 1),
        exceedances=exceedances)


@dataclass(frozen=True)
class F1Point:
    threshold: float
    f1: float
    precision: float
    recall: float


def best_f1_threshold(negative_scores: Scores, positive_scores: Scores) -> F1Point:
    """The threshold (decision: > threshold) with the best F1 for positives vs negatives.

    Candidate thresholds are midpoints between consecutive distinct scores, so the chosen one keeps a margin to
    both classes instead of sitting on a calibration image's score.
    """
    negatives = np.asarray(negative_scores, dtype=np.float64).ravel()
    positives = np.asarray(positive_scores, dtype=np.float64).ravel()
    if positives.size == 0:
        raise ValueError("best-F1 needs positive (defect) examples")
    return _best_f1(np.concatenate([negatives, positives]),
                    np.concatenate([np.zeros(negatives.size, bool), np.ones(positives.size, bool)]))


def _best_f1(values: np.ndarray, labels: np.ndarray) -> F1Point:
    order = np.argsort(-values, kind="stable")
    sorted_values = values[order]
    sorted_labels = labels[order]
    true_pos = np.cumsum(sorted_labels, dtype=np.int64)
    false_pos = np.cumsum(~sorted_labels, dtype=np.int64)
    # A cut is only possible after the last of a run of equal values.
    last_of_run = np.ones(sorted_values.size, dtype=bool)
    last_of_run[:-1] = sorted_values[:-1] != sorted_values[1:]
    # Cutting after the very last value would flag everything; not a threshold anyone wants.
    last_of_run[-1] = False
    positives = int(labels.sum())
    if not np.any(last_of_run):
        top = float(sorted_values[0])
        return F1Point(threshold=top, f1=0.0, precision=0.0, recall=0.0)
    idx = np.nonzero(last_of_run)[0]
    tp = true_pos[idx].astype(np.float64)
    fp = false_pos[idx].astype(np.float64)
    f1 = 2.0 * tp / (tp + fp + positives)
    best = int(np.argmax(f1))
    i = int(idx[best])
    threshold = 0.5 * (float(sorted_values[i]) + float(sorted_values[i + 1]))
    if not float(sorted_values[i + 1]) < threshold < float(sorted_values[i]):
        # Neighbouring floats: the midpoint rounds onto one of them; the lower value keeps "score > t" exact.
        threshold = float(sorted_values[i + 1])
    precision = tp[best] / (tp[best] + fp[best])
    return F1Point(threshold=threshold, f1=float(f1[best]), precision=float(precision),
                   recall=float(tp[best] / positives))


def best_f1_pixel_threshold(values: np.ndarray, labels: np.ndarray) -> F1Point:
    """Best-F1 threshold over pooled pixel values (float) and mask labels (bool)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    if values.shape != labels.shape:
        raise ValueError("pixel values and labels differ in size")
    if not labels.any():
        raise ValueError("the defect masks mark no pixel as defective")
    return _best_f1(values, labels)


def rate_above(threshold: float, scores: Scores) -> float:
    """Fraction of scores strictly above threshold (recall on defects, false-alarm rate on nominal)."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        return float("nan")
    return float(np.count_nonzero(values > threshold) / values.size)


# ---------------------------------------------------------------------------------------------- robust summaries


def quantiles(scores: Scores) -> Dict[str, float]:
    """The quantiles of QUANTILE_LEVELS plus min, max and n, as recorded in calibration.json."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("no scores")
    out = {name: float(np.quantile(values, level)) for name, level in QUANTILE_LEVELS.items()}
    out.update({"min": float(values.min()), "max": float(values.max()), "n": int(values.size)})
    return out


@dataclass(frozen=True)
class ShiftResult:
    """Median shift in units of the reference IQR and the ratio of spreads; `moved` when beyond the limits."""

    median_shift_iqr: float
    spread_ratio: float
    moved: bool
    reference_median: float
    new_median: float


def distribution_shift(reference: Dict[str, float], scores: Scores) -> ShiftResult:
    """Compare new nominal scores with reference quantiles (needs q25, q50, q75): a robust location/scale test."""
    try:
        ref_q25, ref_q50, ref_q75 = float(reference["q25"]), float(reference["q50"]), float(reference["q75"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"reference quantiles need q25, q50 and q75 ({error})") from None
    new = quantiles(scores)
    # A degenerate reference IQR (identical scores) would make any shift infinite; floor it at a tiny scale.
    ref_iqr = max(ref_q75 - ref_q25, 1e-6 * max(abs(ref_q50), 1e-12))
    new_iqr = max(new["q75"] - new["q25"], 1e-6 * max(abs(new["q50"]), 1e-12))
    shift = (new["q50"] - ref_q50) / ref_iqr
    ratio = new_iqr / ref_iqr
    moved = abs(shift) > SHIFT_LIMIT_IQR or not (1.0 / SPREAD_LIMIT <= ratio <= SPREAD_LIMIT)
    return ShiftResult(median_shift_iqr=float(shift), spread_ratio=float(ratio), moved=bool(moved),
                       reference_median=ref_q50, new_median=new["q50"])


def upper_outliers(scores: Scores, fence_iqr: float = OUTLIER_FENCE_IQR) -> np.ndarray:
    """Boolean mask of scores above Q3 + fence_iqr * IQR (Tukey's far-out fence for fence_iqr = 3)."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size < 4:
        return np.zeros(values.size, dtype=bool)
    q25, q75 = np.quantile(values, [0.25, 0.75])
    return np.asarray(values > q75 + fence_iqr * (q75 - q25), dtype=bool)
