"""The lab's confidence intervals against published t quantiles and direct computations."""
import math
import random
import statistics

import pytest

from bnstats_lab.intervals import mean_interval, slope_interval, t_cdf, t_quantile, welch_interval

# Student's t quantiles from published tables (two-sided 95% and 90%)
T975 = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 5: 2.570582, 10: 2.228139, 30: 2.042272}
T95 = {1: 6.313752, 2: 2.919986, 3: 2.353363, 4: 2.131847, 10: 1.812461}


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantiles_match_the_tables(df):
    assert t_quantile(0.975, df) == pytest.approx(T975[df], abs=2e-6)
    assert t_quantile(0.025, df) == pytest.approx(-T975[df], abs=2e-6)
    if df in T95:
        assert t_quantile(0.95, df) == pytest.approx(T95[df], abs=2e-6)
    assert t_cdf(T975[df], df) == pytest.approx(0.975, abs=1e-6)


def test_t_cdf_of_one_degree_of_freedom_is_the_cauchy_cdf():
    for t in (-3.0, -0.5, 0.0, 0.7, 4.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-9)


def test_mean_interval_is_the_paired_t_interval():
    values = [2.6, 3.0, 3.2]
    got = mean_interval(values)
    se = statistics.stdev(values) / math.sqrt(3)
    assert got["mean"] == pytest.approx(statistics.mean(values))
    assert (got["low"], got["high"]) == pytest.approx((statistics.mean(values) - T975[2] * se,
                                                       statistics.mean(values) + T975[2] * se), abs=1e-5)
    assert mean_interval([1.0]) is None


def test_welch_interval_with_equal_variances_and_sizes_has_2n_minus_2_degrees():
    a, b = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]  # equal variances: Welch's df = 2(n − 1) = 4
    got = welch_interval(a, b)
    se = math.sqrt(1 / 3 + 1 / 3)
    assert got["df"] == pytest.approx(4.0)
    assert (got["low"], got["high"]) == pytest.approx((-3 - T975[4] * se, -3 + T975[4] * se), abs=1e-5)
    assert welch_interval([1.0], b) is None


def test_slope_interval_against_the_normal_equations():
    rng = random.Random(0)
    x = [0, 0, 0, 0.5, 0.5, 0.5, 1, 1, 1, 2, 2, 2]
    y = [0.3 + 1.2 * v + rng.gauss(0, 0.4) for v in x]
    got = slope_interval(x, y)
    n, mx, my = len(x), statistics.mean(x), statistics.mean(y)
    sxx = sum((v - mx) ** 2 for v in x)
    slope = sum((u - mx) * (v - my) for u, v in zip(x, y)) / sxx
    rss = sum((v - (my - slope * mx) - slope * u) ** 2 for u, v in zip(x, y))
    se = math.sqrt(rss / (n - 2) / sxx)
    assert got["mean"] == pytest.approx(slope) and got["se"] == pytest.approx(se)
    assert got["high"] - got["mean"] == pytest.approx(t_quantile(0.975, 10) * se)
    assert got["low"] < 1.2 < got["high"]
    assert slope_interval([1, 1, 1], [1, 2, 3]) is None
