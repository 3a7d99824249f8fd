"""Correlations with percentile-bootstrap confidence intervals, for small N (the paper has 5)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

Method = Literal["spearman", "pearson"]


@dataclass(frozen=True)
class Correlation:
    method: Method
    estimate: float
    low: float
    high: float
    p_value: float
    n: int
    n_boot: int
    n_valid_boot: int  # resamples where the correlation was defined (not all-tied)
    level: float


def correlate(
    x: Sequence[float],
    y: Sequence[float],
    *,
    method: Method = "spearman",
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> Correlation:
    """Correlation of x with y, its p-value, and a percentile bootstrap CI over resampled pairs.

    Resamples whose x or y is constant (correlation undefined) are dropped and counted.
    """
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got {xa.shape} and {ya.shape}")
    if len(xa) < 3:
        raise ValueError(f"a correlation needs at least 3 pairs, got {len(xa)}")
    if np.ptp(xa) == 0 or np.ptp(ya) == 0:
        raise ValueError("x or y is constant: the correlation is undefined")
    fn = {"spearman": stats.spearmanr, "pearson": stats.pearsonr}[method]
    res = fn(xa, ya)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(xa), size=(n_boot, len(xa)))
    boots = []
    for row in idx:
        bx, by = xa[row], ya[row]
        if np.ptp(bx) > 0 and np.ptp(by) > 0:
            boots.append(fn(bx, by).statistic)
    if not boots:
        raise ValueError("no bootstrap resample had variation in both x and y")
    alpha = (1 - level) / 2
    low, high = np.quantile(boots, [alpha, 1 - alpha])
    return Correlation(
        method,
        float(res.statistic),
        float(low),
        float(high),
        float(res.pvalue),
        len(xa),
        n_boot,
        len(boots),
        level,
    )
