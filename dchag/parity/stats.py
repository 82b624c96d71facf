"""Paired relative gaps over seeds, with a 95 % Student-t interval.

Each seed fixes the initial weights, the data order and the masks of every method alike, so the
gap of a method to the baseline is taken per seed (a paired comparison) and then averaged:
gap_s = (loss_method,s - loss_flat,s) / loss_flat,s; reported: mean_s gap_s +- t_{0.975, n-1} * sd / sqrt(n).
"""

from __future__ import annotations

import math

# Two-sided 95 % quantiles t_{0.975, df} of Student's t distribution, df = 1..30.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    if df < 1:
        return float("nan")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df  # within 0.1 % of the exact value past 30


def mean_interval(values: list[float]) -> dict:
    """{"mean", "half_width", "low", "high", "n"}: the 95 % interval of the mean (NaN half width for n = 1)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "half_width": float("nan"), "low": float("nan"), "high": float("nan"), "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    hw = t975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "half_width": hw, "low": mean - hw, "high": mean + hw, "n": n}


def relative_gaps(method: list[float], baseline: list[float]) -> list[float]:
    """Per seed: (method - baseline) / baseline."""
    if len(method) != len(baseline):
        raise ValueError(f"paired gaps need one value per seed on both sides, got {len(method)} and {len(baseline)}")
    return [(m - b) / b for m, b in zip(method, baseline)]
