"""Intervals and correlations for small N. Cluster-robust t intervals for means, ratios and
any statistic of clustered items (`cluster_mean`, `cluster_ratio`, `cluster_jackknife`), and
correlations for small N (the paper has 5 variants per task): the estimate, its exact
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

from mechinterp.errors import InputError

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
    _check_level(level)
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise InputError(f"x and y must be 1-D of equal length, got {xa.shape} and {ya.shape}")
    if len(xa) < 3:
        raise InputError(f"a correlation needs at least 3 pairs, got {len(xa)}")
    if np.ptp(xa) == 0 or np.ptp(ya) == 0:
        raise InputError("x or y is constant: the correlation is undefined")
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
        raise InputError("no bootstrap resample had variation in both x and y")
    low, high = _percentiles(np.asarray(boots), level)
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


def _percentiles(boots: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boots, [alpha, 1 - alpha])
    return float(lo), float(hi)


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
    _check_level(level)
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    labels = np.asarray(strata, dtype=object).astype(str)
    if not xa.shape == ya.shape == labels.shape or xa.ndim != 1:
        raise InputError(f"x, y and strata must be 1-D of equal length, got {xa.shape}, "
                         f"{ya.shape} and {labels.shape}")  # fmt: skip
    keep = np.isin(labels, [s for s in np.unique(labels) if (labels == s).sum() > 1])
    xa, ya, labels = xa[keep], ya[keep], labels[keep]
    groups = [np.flatnonzero(labels == s) for s in np.unique(labels)]
    if len(xa) < 3:
        raise InputError(f"a stratified correlation needs at least 3 pairs in strata of 2 or "
                         f"more, got {len(xa)}")  # fmt: skip
    rank = method == "spearman"
    xw, yw = _within(xa, groups, rank), _within(ya, groups, rank)
    if not np.any(xw) or not np.any(yw):
        raise InputError("x or y is constant within every stratum: the correlation is undefined")
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
        raise InputError("no bootstrap resample had variation in both x and y")
    low, high = _percentiles(np.asarray(boots), level)
    return Correlation(method, observed, low, high, p_value, n, n_boot, len(boots), level,
                       p_perm, n_perm, exact)  # fmt: skip


# ---------------------------------------------------------------- clustered intervals

#: Below this many clusters no interval is trusted: the claims report calls such a row
#: inconclusive, whatever its interval says.
MIN_CLUSTERS = 5


@dataclass(frozen=True)
class Interval:
    """An estimate with a cluster-robust t interval and what it rests on: `n_clusters` clusters
    (holding `n_items` items), crossed with `n_draws` random baseline draws when the values
    carry them; `df` are the t quantile's degrees of freedom and `method` names the interval."""

    estimate: float
    low: float
    high: float
    n_items: int
    n_clusters: int
    n_draws: int = 1
    df: float = float("nan")
    method: str = "cluster t"

    @property
    def trusted(self) -> bool:
        """Whether there are enough clusters (`MIN_CLUSTERS`) for the interval to be read."""
        return self.n_clusters >= MIN_CLUSTERS

    def unit(self, cluster: str = "clusters", item: str = "examples") -> str:
        """What the interval rests on, for a report: "5 needles (45 examples) × 10 draws"."""
        if self.n_clusters == self.n_items:
            text = f"{self.n_items} {item}"
        else:
            text = f"{self.n_clusters} {cluster} ({self.n_items} {item})"
        return text + (f" × {self.n_draws} random draws" if self.n_draws > 1 else "")


def _cluster_index(clusters: Sequence | None, n: int) -> np.ndarray:
    """Each item's cluster as 0..G−1 (`None`: every item its own cluster)."""
    if clusters is None:
        return np.arange(n)
    labels = np.asarray(clusters, dtype=object).astype(str)
    if labels.shape != (n,):
        raise InputError(f"{len(labels)} cluster labels for {n} items")
    return np.unique(labels, return_inverse=True)[1].ravel()


def _as_items(values, name: str) -> np.ndarray:
    """`values` as a finite [item, draw] array."""
    x = np.asarray(values, dtype=float)
    x = x[:, None] if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise InputError(f"{name} must be [item] or [item, draw] with items, got {x.shape}")
    if not np.isfinite(x).all():
        raise InputError(f"{name} contain NaN or inf: drop those items first")
    return x


def _cluster_df(z: np.ndarray, which: np.ndarray) -> float:
    """Degrees of freedom of the CR2 variance of a mean of `z` over the clusters `which`
    (Bell & McCaffrey 2002), under the working model Imbens & Kolesár (2016) recommend: items
    share a cluster effect, with the intra-cluster correlation ρ from a one-way ANOVA. With
    B = (I − 11ᵀ/N)·A, A's column g = (1 − n_g/N)^−½ 1_g / N, and Ω = (1 − ρ) I + ρ·[same
    cluster]: df = (tr K)² / ‖K‖², K = Bᵀ Ω B. Equal clusters give G − 1."""
    n = len(z)
    sizes = np.bincount(which).astype(float)
    g = len(sizes)
    means = np.bincount(which, weights=z) / sizes
    within = float(((z - means[which]) ** 2).sum()) / max(n - g, 1)
    between = float((sizes * (means - z.mean()) ** 2).sum()) / (g - 1)
    n0 = (n - (sizes**2).sum() / n) / (g - 1)
    var_cluster = max((between - within) / n0, 0.0)
    rho = var_cluster / (var_cluster + within) if var_cluster + within > 0 else 0.0
    a = np.zeros((n, g))
    a[np.arange(n), which] = (1 - sizes / n)[which] ** -0.5 / n
    b = a - a.mean(0, keepdims=True)
    sums = np.zeros((g, g))
    np.add.at(sums, which, b)  # [cluster, column]: b summed over each cluster's items
    k = b.T @ ((1 - rho) * b + rho * sums[which])
    return float(np.trace(k) ** 2 / (k**2).sum())


def _t_interval(estimate: float, z: np.ndarray, which: np.ndarray, level: float, *,
                n_items: int, bounds: tuple[float, float] | None = None) -> Interval:  # fmt: skip
    """The interval of `estimate` from its influence values `z` [item, draw] (sum 0).

    One draw: the CR2 cluster-robust variance, each cluster's sum of z scaled by
    (1 − n_g / N)^−½, with Bell–McCaffrey degrees of freedom (`_cluster_df`). Draws crossed
    with clusters (a random head set shared by every example): a two-way random-effects
    variance from the [cluster, draw] sums t, V = V_clusters + V_draws − V_interaction, the
    moment estimator of a crossed design (unbiased when balanced), floored at the larger
    one-way term, with Satterthwaite degrees of freedom. `bounds` clips the interval to the
    values the quantity can take (its coverage is unchanged: the truth lies inside them)."""
    n, d = z.shape
    total = n * d
    sizes = np.bincount(which).astype(float)
    g = len(sizes)
    if g < 2:  # one cluster says nothing about the spread between clusters
        return Interval(estimate, float("nan"), float("nan"), n_items, g, d)
    t = np.zeros((g, d))
    np.add.at(t, which, z)  # [cluster, draw] sums
    rows, w = t.sum(1), sizes / sizes.sum()
    v_clusters = float((rows**2 / (1 - w)).sum()) / total**2
    df_clusters = _cluster_df(z.mean(1), which)
    if d == 1:
        v, df = v_clusters, df_clusters
    else:
        cols = t.sum(0)
        v_draws = d / (d - 1) * float((cols**2).sum()) / total**2
        resid = t - rows[:, None] / d - w[:, None] * cols[None, :]
        v_inter = g * d / ((g - 1) * (d - 1)) * float((resid**2).sum()) / total**2
        v = max(v_clusters + v_draws - v_inter, v_clusters, v_draws)
        parts = (v_clusters**2 / df_clusters + v_draws**2 / (d - 1)
                 + v_inter**2 / ((g - 1) * (d - 1)))  # fmt: skip
        df = v**2 / parts if parts > 0 else df_clusters
    half = float(stats.t.ppf(0.5 + level / 2, df)) * math.sqrt(v) if v > 0 else 0.0
    low, high = estimate - half, estimate + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Interval(estimate, low, high, n_items, g, d, df)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise InputError(f"level must lie in (0, 1), got {level}")


def cluster_mean(
    values: Sequence[float] | np.ndarray,
    clusters: Sequence | None = None,
    *,
    level: float = 0.95,
    bounds: tuple[float, float] | None = None,
) -> Interval:
    """The mean of `values` with a cluster-robust t interval that holds with few clusters.

    `values` is [item] or [item, draw]: column d holds the items' values under random baseline
    draw d (one draw is shared by every item, as a random head set is shared by every
    example), so the draws are a second random factor crossed with the clusters. Items of one
    cluster (examples that share a needle) are not independent; `clusters=None` makes every
    item its own cluster; with a single cluster there is no interval (NaN bounds). The
    estimate is the plain mean over items and draws; the interval is `_t_interval`'s,
    clipped to `bounds` (e.g. (0, 1) for a rate) when given. Its coverage on planted data is
    measured by `benchmarks/interval_coverage.py`."""
    _check_level(level)
    x = _as_items(values, "values")
    which = _cluster_index(clusters, len(x))
    est = float(x.mean())
    return _t_interval(est, x - est, which, level, n_items=len(x), bounds=bounds)


def cluster_ratio(
    numerator: Sequence[float] | np.ndarray,
    denominator: Sequence[float] | np.ndarray,
    clusters: Sequence | None = None,
    *,
    level: float = 0.95,
) -> Interval:
    """The ratio of sums Σ numerator / Σ denominator with a cluster-robust t interval.

    `numerator` is [item] or [item, draw], `denominator` [item] (each item's gap, shared by its
    draws). Items with a large denominator weigh more, unlike a mean of per-item ratios. The
    interval linearises the ratio R: influence values (y − R·x) / mean(x), then as
    `cluster_mean`."""
    _check_level(level)
    y = _as_items(numerator, "numerator")
    x = _as_items(denominator, "denominator")
    if x.shape != (len(y), 1):
        raise InputError(f"denominator must be [item] with {len(y)} items, got {x.shape}")
    if x.sum() == 0:
        raise InputError("the denominator sums to 0: the ratio is undefined")
    ratio = float(y.mean() / x.mean())
    which = _cluster_index(clusters, len(y))
    return _t_interval(ratio, (y - ratio * x) / x.mean(), which, level, n_items=len(y))


def cluster_jackknife(
    stat: Callable[[np.ndarray], float],
    clusters: Sequence,
    *,
    level: float = 0.95,
) -> Interval:
    """Any statistic of weighted items with a delete-one-cluster jackknife t interval.

    `stat(weights)` with all weights 1 is the estimate; the jackknife leaves out one cluster
    at a time (its items' weights 0). Its variance, (G − 1)/G · Σ (θ₋g − θ̄)², equals the
    cluster t interval's for a mean over equal clusters; the quantile is t with G − 1 degrees
    of freedom. For a statistic that jumps (a share of heads above a threshold) it is
    conservative where no head sits near the threshold; see `benchmarks/interval_coverage.py`."""
    _check_level(level)
    which = _cluster_index(clusters, len(clusters))
    if not len(which):
        raise InputError("the jackknife needs at least one item")
    g = int(which.max()) + 1
    est = float(stat(np.ones(len(which))))
    if g < 2:  # one cluster says nothing about the spread between clusters
        nan = float("nan")
        return Interval(est, nan, nan, len(which), g, 1, method="cluster jackknife t")
    leave = np.array([stat((which != c).astype(float)) for c in range(g)], dtype=float)
    if not np.isfinite(leave).all():
        raise InputError("the statistic is undefined with a cluster left out")
    v = (g - 1) / g * float(((leave - leave.mean()) ** 2).sum())
    half = float(stats.t.ppf(0.5 + level / 2, g - 1)) * math.sqrt(v)
    return Interval(est, est - half, est + half, len(which), g, 1, g - 1, "cluster jackknife t")
