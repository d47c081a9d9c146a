"""The calibration statistics against exact arithmetic, published values, scikit-learn and simulation."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from patchcore_edge import stats as t


def exact_cdf(k: int, n: int, p: Fraction) -> Fraction:
    return sum((Fraction(math.comb(n, i)) * p**i * (1 - p) ** (n - i) for i in range(k + 1)), Fraction(0))


@pytest.mark.parametrize("n,k,p", [(10, 3, Fraction(3, 10)), (40, 0, Fraction(1, 100)), (60, 57, Fraction(9, 10)),
                                   (25, 12, Fraction(1, 2)), (120, 4, Fraction(1, 50))])
def test_binomial_tails_match_exact_rational_arithmetic(n: int, k: int, p: Fraction) -> None:
    expected = exact_cdf(k, n, p)
    assert t.binom_cdf(k, n, float(p)) == pytest.approx(float(expected), rel=1e-10, abs=1e-300)
    # P(X >= k+1) is the complement of P(X <= k).
    assert t.binom_sf(k + 1, n, float(p)) == pytest.approx(float(1 - expected), rel=1e-9, abs=1e-15)


def test_binomial_tails_at_the_edges() -> None:
    assert t.binom_cdf(-1, 10, 0.3) == 0.0
    assert t.binom_cdf(10, 10, 0.3) == 1.0
    assert t.binom_cdf(0, 10, 0.0) == 1.0
    assert t.binom_cdf(9, 10, 1.0) == 0.0
    assert t.binom_sf(0, 10, 0.3) == 1.0
    # A far tail stays accurate in log space instead of rounding to 0.
    assert t.binom_cdf(0, 5000, 0.01) == pytest.approx(math.exp(5000 * math.log1p(-0.01)), rel=1e-9)


def test_binomial_matches_scipy_where_installed() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    for _ in range(30):
        n = int(rng.integers(1, 3000))
        k = int(rng.integers(0, n + 1))
        p = float(rng.uniform(0.001, 0.999))
        assert t.binom_cdf(k, n, p) == pytest.approx(stats.binom.cdf(k, n, p), rel=1e-7, abs=1e-14)


def test_known_answer_299_images_for_one_percent_at_95() -> None:
    assert t.min_images(0.01, 0.95) == 299
    assert 1 - 0.99**299 >= 0.95 > 1 - 0.99**298
    assert t.threshold_rank(299, 0.01, 0.95) == 299  # the maximum
    assert t.threshold_rank(298, 0.01, 0.95) is None
    assert t.min_images(0.05, 0.95) == 59  # 0.95^59 = 0.0485, 0.95^58 = 0.051
    assert t.min_images(0.001, 0.99) == 4603


@pytest.mark.parametrize("n,alpha,confidence", [(299, 0.01, 0.95), (500, 0.01, 0.95), (1000, 0.01, 0.95),
                                                (200, 0.05, 0.9), (3000, 0.002, 0.99)])
def test_rank_is_the_smallest_that_keeps_the_guarantee(n: int, alpha: float, confidence: float) -> None:
    k = t.threshold_rank(n, alpha, confidence)
    assert k is not None
    delta = 1 - confidence
    # Defining property, checked with exact rationals: rank k keeps P(FAR > alpha) <= delta, rank k-1 does not.
    a = Fraction(alpha).limit_denominator(10**6)
    assert exact_cdf(n - k, n, a) <= Fraction(delta).limit_denominator(10**6)
    if k > 1:
        assert exact_cdf(n - k + 1, n, a) > Fraction(delta).limit_denominator(10**6)


def test_far_of_the_order_statistic_matches_simulation() -> None:
    """The derivation itself: with uniform scores the true FAR of X_(k) is 1 - X_(k); simulate it."""
    rng = np.random.default_rng(0)
    n, alpha, confidence, trials = 700, 0.01, 0.95, 5000
    k = t.threshold_rank(n, alpha, confidence)
    assert k is not None and k < n - 1
    samples = np.partition(rng.random((trials, n)), k - 1, axis=1)[:, k - 1]
    exceed = np.mean(1.0 - samples > alpha)
    predicted = t.far_exceedance_probability(n, k, alpha)
    assert predicted <= 1 - confidence
    standard_error = math.sqrt(predicted * (1 - predicted) / trials)
    assert abs(exceed - predicted) < 4 * standard_error + 1e-3
    # The next lower rank breaks the guarantee, in simulation as in theory.
    looser = np.mean(1.0 - np.partition(rng.random((trials, n)), k - 2, axis=1)[:, k - 2] > alpha)
    assert looser > 1 - confidence


def test_image_threshold_with_enough_images() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(5.0, 1.0, 1000)
    result = t.image_threshold(scores, 0.01, 0.95)
    ordered = np.sort(scores)
    assert result.guarantee_met
    assert result.threshold == ordered[result.rank - 1]
    assert result.exceedances == 1000 - result.rank
    assert result.guaranteed_rate <= 0.01
    assert result.expected_rate == pytest.approx((1000 - result.rank + 1) / 1001)


def test_image_threshold_with_too_few_images_uses_the_maximum_and_states_its_rate() -> None:
    scores = np.linspace(1.0, 2.0, 100)
    result = t.image_threshold(scores, 0.01, 0.95)
    assert not result.guarantee_met
    assert result.threshold == 2.0 and result.rank == 100
    assert result.n_required == 299
    assert result.guaranteed_rate == pytest.approx(1 - 0.05 ** (1 / 100))
    assert result.guaranteed_rate > 0.01


def test_guaranteed_rate_solves_the_binomial_equation() -> None:
    for n, j in ((50, 0), (500, 3), (2000, 25)):
        rate = t.guaranteed_rate(n, j, 0.95)
        assert t.binom_cdf(j, n, rate) == pytest.approx(0.05, abs=1e-9)
        assert t.binom_cdf(j, n, rate * 0.99) > 0.05
    assert t.guaranteed_rate(10, 10, 0.95) == 1.0


def test_clopper_pearson_against_published_values() -> None:
    # Clopper-Pearson 95 % for 5/10 is [0.1871, 0.8129]; for 0/10 the upper end is 1 - 0.025^(1/10) = 0.3085.
    low, high = t.clopper_pearson(5, 10, 0.95)
    assert (round(low, 4), round(high, 4)) == (0.1871, 0.8129)
    low, high = t.clopper_pearson(0, 10, 0.95)
    assert low == 0.0 and high == pytest.approx(1 - 0.025**0.1, abs=1e-9)
    low, high = t.clopper_pearson(10, 10, 0.95)
    assert high == 1.0 and low == pytest.approx(0.025**0.1, abs=1e-9)


def test_clopper_pearson_covers_at_least_the_confidence() -> None:
    n = 30
    for p in (0.02, 0.1, 0.37):
        pmf = np.exp(t.binom_logpmf(n, p))
        coverage = sum(pmf[x] for x in range(n + 1) if t.clopper_pearson(x, n, 0.95)[0] <= p
                       <= t.clopper_pearson(x, n, 0.95)[1])
        assert coverage >= 0.95 - 1e-9


def test_best_f1_matches_scikit_learn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    good = rng.normal(0, 1, 300)
    bad = rng.normal(2.0, 1, 60)
    point = t.best_f1_threshold(good, bad)
    labels = np.r_[np.zeros(good.size), np.ones(bad.size)]
    precision, recall, _ = metrics.precision_recall_curve(labels, np.r_[good, bad])
    f1 = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))
    assert point.f1 == pytest.approx(f1, rel=1e-9)
    # The threshold reproduces the F1 it claims with the decision rule score > threshold.
    tp = np.sum(bad > point.threshold)
    fp = np.sum(good > point.threshold)
    assert 2 * tp / (2 * tp + fp + (bad.size - tp)) == pytest.approx(point.f1)
    assert not np.any(np.r_[good, bad] == point.threshold)  # a midpoint, not a calibration score


def test_best_f1_with_perfect_separation_sits_between_the_classes() -> None:
    point = t.best_f1_threshold([1.0, 2.0, 3.0], [5.0, 6.0])
    assert point.f1 == 1.0 and point.threshold == 4.0


def test_pixel_best_f1_and_bad_input() -> None:
    values = np.r_[np.linspace(0, 1, 1000), np.linspace(2, 3, 100)]
    labels = np.r_[np.zeros(1000, bool), np.ones(100, bool)]
    point = t.best_f1_pixel_threshold(values, labels)
    assert point.f1 == 1.0 and 1.0 < point.threshold < 2.0
    with pytest.raises(ValueError, match="no pixel"):
        t.best_f1_pixel_threshold(values, np.zeros(values.size, bool))


def test_distribution_shift_test() -> None:
    rng = np.random.default_rng(4)
    reference = t.quantiles(rng.normal(10, 1, 300))
    assert not t.distribution_shift(reference, rng.normal(10, 1, 40)).moved
    shifted = t.distribution_shift(reference, rng.normal(13, 1, 40))
    assert shifted.moved and shifted.median_shift_iqr > 1.5
    wider = t.distribution_shift(reference, rng.normal(10, 4, 40))
    assert wider.moved and wider.spread_ratio > 2.5


def test_upper_outliers_flags_a_planted_defect() -> None:
    rng = np.random.default_rng(5)
    scores = np.r_[rng.normal(1.0, 0.05, 50), 3.0]
    flags = t.upper_outliers(scores)
    assert flags[-1] and flags.sum() == 1


@pytest.mark.parametrize("alpha,confidence", [(0.0, 0.95), (1.0, 0.95), (0.01, 1.0), (0.01, 0.0), (-0.1, 0.9)])
def test_rates_out_of_range_are_refused(alpha: float, confidence: float) -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        t.image_threshold([1.0, 2.0], alpha, confidence)
