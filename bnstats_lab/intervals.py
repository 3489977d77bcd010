"""Confidence intervals for few paired values: Student's t distribution, the paired and the Welch
interval of a difference, and a least-squares slope.

Everything the lab's verdicts and benchmark ratios rest on, in one place and in plain Python (no
SciPy here); the comparison tool's bootstrap over test images is the plug-in's
(``d2_bnstats.compare.bootstrap``). The t quantile inverts the t CDF, written with the regularized
incomplete beta function I_x(a, b) (evaluated by its continued fraction, Abramowitz & Stegun 26.5.8;
the modified Lentz method), by bisection: t quantiles for n = 2 to 100 seeds or rounds need no more.
"""
import math
from typing import Dict, Optional, Sequence, Tuple

__all__ = ["t_cdf", "t_quantile", "mean_interval", "welch_interval", "slope_interval"]


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 3e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _regularized_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * _regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (e.g. 0.975 for a two-sided 95%
    interval)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def _interval(center: float, se: float, df: float, level: float) -> Tuple[float, float]:
    half = t_quantile(0.5 + level / 2.0, df) * se
    return center - half, center + half


def mean_interval(values: Sequence[float], level: float = 0.95) -> Optional[Dict[str, float]]:
    """The t interval of the mean of ``values`` (paired differences, log-ratios): ``mean``, ``se``,
    ``df`` and ``low``, ``high``; None for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    se = sd / math.sqrt(n)
    low, high = _interval(mean, se, n - 1, level)
    return {"mean": mean, "se": se, "df": float(n - 1), "low": low, "high": high}


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Optional[Dict[str, float]]:
    """Welch's t interval of mean(a) − mean(b) for two independent samples (unequal variances,
    Welch–Satterthwaite degrees of freedom); None unless each has 2 values or more."""
    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((v - ma) ** 2 for v in a) / (len(a) - 1) / len(a)
    vb = sum((v - mb) ** 2 for v in b) / (len(b) - 1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        df = float(len(a) + len(b) - 2)
    else:
        df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    low, high = _interval(ma - mb, se, df, level)
    return {"mean": ma - mb, "se": se, "df": df, "low": low, "high": high}


def slope_interval(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> Optional[Dict[str, float]]:
    """Least-squares slope of ``y`` on ``x`` with its t interval (n − 2 degrees of freedom); None for
    fewer than 3 points or a constant ``x``."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"x and y differ in length: {n} and {len(y)}")
    if n < 3:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((v - mx) ** 2 for v in x)
    if sxx == 0.0:
        return None
    slope = sum((u - mx) * (v - my) for u, v in zip(x, y)) / sxx
    intercept = my - slope * mx
    residual = sum((v - intercept - slope * u) ** 2 for u, v in zip(x, y))
    se = math.sqrt(residual / (n - 2) / sxx)
    low, high = _interval(slope, se, n - 2, level)
    return {"mean": slope, "intercept": intercept, "se": se, "df": float(n - 2), "low": low, "high": high}
