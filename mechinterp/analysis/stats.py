"""Correlations for small N (the paper has 5 variants per task): the estimate, its exact
permutation p-value (the verdict's basis: at N ≤ 10 a percentile bootstrap alone is not one, and
it collapses to a zero-width interval at ρ = 1), and a percentile-bootstrap CI as a description."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
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
    p_permutation: float = float("nan")  # two-sided: share of pairings with |r| >= |r observed|
    n_permutations: int = 0  # every pairing when exact (N <= EXACT_UP_TO), else seeded draws
    exact: bool = False


#: Up to this N the permutation test enumerates every pairing (10! = 3.6M).
EXACT_UP_TO = 10


def _rows_corr(x: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Pearson correlation of x with each row of ys."""
    xc = x - x.mean()
    yc = ys - ys.mean(axis=1, keepdims=True)
    return (yc @ xc) / (np.sqrt((yc**2).sum(axis=1)) * np.sqrt((xc**2).sum()))


def permutation_test(
    x: Sequence[float],
    y: Sequence[float],
    *,
    method: Method = "spearman",
    n_draws: int = 100_000,
    seed: int = 0,
) -> tuple[float, int, bool]:
    """Two-sided permutation p-value of the correlation of x with y: (p, permutations, exact).

    Exact (every pairing of y with x) for N <= EXACT_UP_TO; otherwise `n_draws` seeded random
    pairings with the +1 correction. Spearman permutes ranks (average ranks for ties)."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if method == "spearman":
        xa, ya = stats.rankdata(xa), stats.rankdata(ya)
    observed = abs(_rows_corr(xa, ya[None, :])[0])
    n = len(xa)
    tol = 1e-12 * max(1.0, observed)
    if n <= EXACT_UP_TO:
        hits, total = 0, 0
        perms = itertools.permutations(range(n))
        while chunk := list(itertools.islice(perms, 200_000)):
            r = np.abs(_rows_corr(xa, ya[np.asarray(chunk)]))
            hits += int((r >= observed - tol).sum())
            total += len(chunk)
        assert total == math.factorial(n)
        return hits / total, total, True
    rng = np.random.default_rng(seed)
    hits = 0
    for done in range(0, n_draws, 10_000):  # in blocks: memory stays ~10k × N
        draws = np.argsort(rng.random((min(10_000, n_draws - done), n)), axis=1)
        hits += int((np.abs(_rows_corr(xa, ya[draws])) >= observed - tol).sum())
    return (hits + 1) / (n_draws + 1), n_draws, False


def correlate(
    x: Sequence[float],
    y: Sequence[float],
    *,
    method: Method = "spearman",
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> Correlation:
    """Correlation of x with y, its exact permutation p-value (`permutation_test`), scipy's
    asymptotic p-value, and a percentile bootstrap CI over resampled pairs.

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
    p_perm, n_perm, exact = permutation_test(xa, ya, method=method, seed=seed)
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
        p_perm,
        n_perm,
        exact,
    )


def _within(values: np.ndarray, groups: list[np.ndarray], rank: bool) -> np.ndarray:
    """`values` ranked (when `rank`) and centred within each group of indices."""
    out = np.zeros(len(values))
    for idx in groups:
        v = stats.rankdata(values[idx]) if rank else values[idx]
        out[idx] = v - v.mean()
    return out


def _pooled_r(xw: np.ndarray, yw: np.ndarray) -> np.ndarray:
    """Correlation of centred xw with each row of centred yw [rows, n] (no re-centring)."""
    return (yw @ xw) / (np.sqrt((yw**2).sum(axis=1)) * np.sqrt((xw**2).sum()))


def stratified_correlation(
    x: Sequence[float],
    y: Sequence[float],
    strata: Sequence,
    *,
    method: Method = "spearman",
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
    n_draws: int = 100_000,
    exact_up_to: int = 500_000,
) -> Correlation:
    """The correlation of x with y *within* strata (e.g. tasks), pooled over strata.

    x and y are ranked (Spearman) and centred within each stratum, then correlated: differences
    between strata (one task is easier and its models recall more) neither create nor hide the
    effect. With equal-sized strata and no ties the estimate is the mean within-stratum
    Spearman ρ. A stratum of one item carries no within-stratum information and is left out.

    - `p_permutation`: two-sided, y permuted *within* each stratum; exact (every within-stratum
      pairing) when there are at most `exact_up_to` of them (3 strata of 4: 24³ = 13,824), else
      `n_draws` seeded draws with the +1 correction.
    - `p_value`: the t approximation with n − 1 − n_strata degrees of freedom (NaN below 1).
    - CI: percentile bootstrap resampling items within each stratum (a description, as in
      `correlate`)."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    labels = np.asarray(strata, dtype=object).astype(str)
    if not xa.shape == ya.shape == labels.shape or xa.ndim != 1:
        raise ValueError(f"x, y and strata must be 1-D of equal length, got {xa.shape}, "
                         f"{ya.shape} and {labels.shape}")  # fmt: skip
    keep = np.isin(labels, [s for s in np.unique(labels) if (labels == s).sum() > 1])
    xa, ya, labels = xa[keep], ya[keep], labels[keep]
    groups = [np.flatnonzero(labels == s) for s in np.unique(labels)]
    if len(xa) < 3:
        raise ValueError(f"a stratified correlation needs at least 3 pairs in strata of 2 or "
                         f"more, got {len(xa)}")  # fmt: skip
    rank = method == "spearman"
    xw, yw = _within(xa, groups, rank), _within(ya, groups, rank)
    if not np.any(xw) or not np.any(yw):
        raise ValueError("x or y is constant within every stratum: the correlation is undefined")
    observed = float(_pooled_r(xw, yw[None, :])[0])
    n, k = len(xa), len(groups)
    df = n - 1 - k
    if df >= 1 and abs(observed) < 1:
        t = observed * math.sqrt(df / (1 - observed**2))
        p_value = float(2 * stats.t.sf(abs(t), df))
    else:
        p_value = 0.0 if df >= 1 else float("nan")
    # permutations of y within strata
    tol = 1e-12 * max(1.0, abs(observed))
    total = math.prod(math.factorial(len(g)) for g in groups)
    rng = np.random.default_rng(seed)
    if total <= exact_up_to:
        orders = np.array(
            [np.concatenate(c) for c in itertools.product(*(
                [g[list(p)] for p in itertools.permutations(range(len(g)))] for g in groups))]
        )  # fmt: skip
        place = np.concatenate(groups)  # orders[:, j] is the item that goes to place[j]
        perm = np.empty_like(orders)
        perm[:, place] = orders
        hits = int((np.abs(_pooled_r(xw, yw[perm])) >= abs(observed) - tol).sum())
        p_perm, n_perm, exact = hits / total, total, True
    else:
        hits = 0
        for done in range(0, n_draws, 10_000):
            m = min(10_000, n_draws - done)
            perm = np.tile(np.arange(n), (m, 1))
            for g in groups:
                perm[:, g] = g[np.argsort(rng.random((m, len(g))), axis=1)]
            hits += int((np.abs(_pooled_r(xw, yw[perm])) >= abs(observed) - tol).sum())
        p_perm, n_perm, exact = (hits + 1) / (n_draws + 1), n_draws, False
    boots = []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(g, size=len(g)) for g in groups])
        sub = [np.arange(i, i + len(g)) for i, g in zip(
            np.cumsum([0] + [len(g) for g in groups[:-1]]), groups, strict=True)]  # fmt: skip
        bx, by = _within(xa[idx], sub, rank), _within(ya[idx], sub, rank)
        if np.any(bx) and np.any(by):
            boots.append(float(_pooled_r(bx, by[None, :])[0]))
    if not boots:
        raise ValueError("no bootstrap resample had variation in both x and y")
    low, high = _percentiles(np.asarray(boots), level)
    return Correlation(method, observed, low, high, p_value, n, n_boot, len(boots), level,
                       p_perm, n_perm, exact)  # fmt: skip


# ---------------------------------------------------------------- clustered intervals


@dataclass(frozen=True)
class Interval:
    """A percentile-bootstrap interval and what it resampled: `n_clusters` clusters (holding
    `n_items` items) and, when the values carry random baseline draws, `n_draws` draws."""

    estimate: float
    low: float
    high: float
    n_items: int
    n_clusters: int
    n_draws: int = 1

    def unit(self, cluster: str = "clusters", item: str = "examples") -> str:
        """How the interval resampled, for a report: "5 needles (45 examples) × 10 draws"."""
        if self.n_clusters == self.n_items:
            text = f"{self.n_items} {item}"
        else:
            text = f"{self.n_clusters} {cluster} ({self.n_items} {item})"
        return text + (f" × {self.n_draws} random draws" if self.n_draws > 1 else "")


def _cluster_weights(clusters: Sequence, n_boot: int, rng) -> tuple[np.ndarray, int]:
    """[n_boot, n_items] weights: each item gets its cluster's multiplicity in a resample of the
    clusters with replacement (items inside a cluster move together)."""
    _, which = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    n_clusters = int(which.max()) + 1
    counts = rng.multinomial(n_clusters, np.full(n_clusters, 1 / n_clusters), size=n_boot)
    return counts[:, which].astype(float), n_clusters


def _percentiles(boots: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boots, [alpha, 1 - alpha])
    return float(lo), float(hi)


def cluster_bootstrap(
    values: Sequence[float] | np.ndarray,
    clusters: Sequence | None = None,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """The mean of `values` with a hierarchical percentile-bootstrap interval.

    `values` is [item] or [item, draw]: column d holds the items' values under random baseline
    draw d (one draw is shared by every item, as a random head set is shared by every example).
    Each resample draws the clusters with replacement (all items of a drawn cluster come along:
    examples that share a needle, a document or a haystack are not independent) and, crossed
    with them, the draws with replacement. `clusters=None` makes every item its own cluster.
    The estimate is the plain mean over items and draws."""
    x = np.asarray(values, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"values must be [item] or [item, draw] with items, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("values contain NaN or inf: drop those items before bootstrapping")
    n, d = x.shape
    labels = np.arange(n) if clusters is None else np.asarray(clusters, dtype=object)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} cluster labels for {n} items")
    rng = np.random.default_rng(seed)
    w, n_clusters = _cluster_weights(labels, n_boot, rng)  # [boot, item]
    v = rng.multinomial(d, np.full(d, 1 / d), size=n_boot).astype(float)  # [boot, draw]
    boots = np.einsum("bi,id,bd->b", w, x, v) / (w.sum(1) * v.sum(1))
    lo, hi = _percentiles(boots, level)
    return Interval(float(x.mean()), lo, hi, n, n_clusters, d)


def cluster_bootstrap_stat(
    stat: Callable[[np.ndarray], float],
    clusters: Sequence,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Any statistic of weighted items: `stat(weights)` with all weights 1 is the estimate; the
    interval resamples the clusters as `cluster_bootstrap` does (weights = multiplicities)."""
    n = len(clusters)
    if n < 1:
        raise ValueError("the bootstrap needs at least one item")
    rng = np.random.default_rng(seed)
    w, n_clusters = _cluster_weights(clusters, n_boot, rng)
    boots = np.array([stat(row) for row in w], dtype=float)
    lo, hi = _percentiles(boots, level)
    return Interval(float(stat(np.ones(n))), lo, hi, n, n_clusters)
