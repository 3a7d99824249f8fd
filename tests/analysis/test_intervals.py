"""Cluster-robust intervals: against hand-computed references where a closed form exists, and
their coverage on planted data at the cluster counts the claims report uses."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from mechinterp.analysis.coverage import coverage
from mechinterp.analysis.stats import (
    MIN_CLUSTERS,
    cluster_jackknife,
    cluster_mean,
    cluster_ratio,
)


def _planted(rng, g=6, m=4, draws=None):
    cl = np.repeat(np.arange(g), m)
    x = rng.normal(0, 1, g)[cl] + rng.normal(0, 0.5, g * m)
    if draws:
        x = x[:, None] + rng.normal(0, 0.5, draws)[None, :] + rng.normal(0, 0.3, (g * m, draws))
    return cl, x


def test_equal_clusters_give_the_t_interval_of_the_cluster_means():
    """With equal clusters the item mean is the mean of cluster means, and the interval is the
    one-sample t interval of those G means (scipy), with G − 1 degrees of freedom."""
    cl, x = _planted(np.random.default_rng(0))
    means = np.array([x[cl == g].mean() for g in range(6)])
    lo, hi = stats.t.interval(0.95, 5, loc=means.mean(), scale=stats.sem(means))
    iv = cluster_mean(x, [f"needle {c}" for c in cl])
    assert (iv.low, iv.high) == pytest.approx((lo, hi), rel=1e-12)
    assert iv.df == pytest.approx(5) and iv.n_clusters == 6 and iv.n_items == 24
    assert iv.unit("needles") == "6 needles (24 examples)" and iv.trusted
    # the jackknife of the mean is the same interval
    jk = cluster_jackknife(lambda w: float(w @ x / w.sum()), cl)
    assert (jk.low, jk.high) == pytest.approx((lo, hi), rel=1e-12)


def test_every_item_its_own_cluster_is_the_ordinary_t_interval():
    x = np.random.default_rng(1).normal(2, 1, 15)
    lo, hi = stats.t.interval(0.9, 14, loc=x.mean(), scale=stats.sem(x))
    iv = cluster_mean(x, level=0.9)
    assert (iv.low, iv.high) == pytest.approx((lo, hi), rel=1e-12) and iv.unit() == "15 examples"


def test_crossed_draws_give_the_two_way_anova_variance_when_balanced():
    """Balanced clusters × draws: V = (MS_clusters + MS_draws − MS_interaction) / N from the
    two-way ANOVA of the [cluster, draw] cell means (unbiased for the variance of the grand
    mean when clusters and draws are random), computed here from sums of squares."""
    g, m, d = 6, 3, 5
    cl, x = _planted(np.random.default_rng(2), g=g, m=m, draws=d)
    cells = np.stack([x[cl == c].mean(0) for c in range(g)])  # [cluster, draw]
    grand, rows, cols = cells.mean(), cells.mean(1), cells.mean(0)
    ms_c = m * d * ((rows - grand) ** 2).sum() / (g - 1)
    ms_d = m * g * ((cols - grand) ** 2).sum() / (d - 1)
    inter = cells - rows[:, None] - cols[None, :] + grand
    ms_i = m * (inter**2).sum() / ((g - 1) * (d - 1))
    n = g * m * d
    v = max(ms_c + ms_d - ms_i, ms_c, ms_d) / n
    iv = cluster_mean(x, cl)
    half = (iv.high - iv.low) / 2
    assert half == pytest.approx(stats.t.ppf(0.975, iv.df) * np.sqrt(v), rel=1e-10)
    assert iv.n_draws == d and iv.unit("needles") == "6 needles (18 examples) × 5 random draws"
    # Satterthwaite: between the cluster factor's df and the pooled df
    assert g - 1 <= iv.df <= (g - 1) + (d - 1) + (g - 1) * (d - 1)


def test_the_ratio_is_a_ratio_of_sums_and_reduces_to_the_mean_for_a_constant_denominator():
    cl, x = _planted(np.random.default_rng(3))
    gap = np.full(len(x), 2.0)
    r, m = cluster_ratio(x, gap, cl), cluster_mean(x / 2, cl)
    assert (r.estimate, r.low, r.high) == pytest.approx((m.estimate, m.low, m.high), rel=1e-12)
    gap = np.linspace(0.5, 3, len(x))
    r = cluster_ratio(x * gap, gap, cl)
    assert r.estimate == pytest.approx((x * gap).sum() / gap.sum())
    assert r.estimate != pytest.approx(x.mean())  # not the mean of the per-item ratios


def test_too_few_clusters_and_bad_input_are_refused_or_flagged():
    x = np.arange(8.0)
    iv = cluster_mean(x, np.repeat([0, 1, 2, 3], 2))
    assert iv.n_clusters == 4 < MIN_CLUSTERS and not iv.trusted
    one = cluster_mean(x, ["a"] * 8)  # no spread between clusters to read: no interval
    assert one.estimate == 3.5 and np.isnan(one.low) and np.isnan(one.high) and not one.trusted
    with pytest.raises(ValueError, match="NaN"):
        cluster_mean([0.0, float("nan")])
    with pytest.raises(ValueError, match="cluster labels"):
        cluster_mean([0.0, 1.0], ["A"])
    with pytest.raises(ValueError, match="sums to 0"):
        cluster_ratio([1.0, 2.0], [1.0, -1.0])
    with pytest.raises(ValueError, match="level"):
        cluster_mean(x, level=95)


def test_intervals_that_ignore_the_clusters_cover_far_less():
    """8 needles × 5 examples: the clustered interval covers the planted mean; treating the 40
    examples as independent does not. Likewise a draw effect shared by every example: it is
    covered only when the draws are kept as a dimension."""
    def rate(method, reps=400):
        hits = 0
        for rep in range(reps):
            rng = np.random.default_rng(rep)
            cl = np.repeat(np.arange(8), 5)
            x = rng.normal(0, 1, 8)[cl] + rng.normal(0, 0.5, 40)
            iv = method(x, cl, rng)
            hits += iv.low <= 0 <= iv.high
        return hits / reps

    assert 0.92 <= rate(lambda x, cl, rng: cluster_mean(x, cl)) <= 0.98
    assert rate(lambda x, cl, rng: cluster_mean(x)) < 0.7

    def draws(x, cl, rng):  # 10 draws, each shifting every example alike
        return x[:, None] * 0.2 + rng.normal(0, 1, 10)[None, :]

    assert 0.92 <= rate(lambda x, cl, rng: cluster_mean(draws(x, cl, rng))) <= 0.98
    assert rate(lambda x, cl, rng: cluster_mean(draws(x, cl, rng).mean(1))) < 0.7


# Coverage at nominal 95 % over 2,000 replications (binomial SD 0.5 %), at the cluster counts the
# report uses. The bands say where the intervals hold and, as measured, where they fall short:
# 3 clusters with crossed draws, and skewed 0/1 answers below 8 clusters.
BANDS = {
    ("mean", 3): (0.93, 0.97), ("mean", 5): (0.93, 0.97), ("mean", 8): (0.93, 0.97),
    ("mean", 20): (0.93, 0.97),
    ("crossed", 3): (0.91, 0.96), ("crossed", 5): (0.93, 0.97), ("crossed", 8): (0.93, 0.97),
    ("crossed", 20): (0.93, 0.97),
    ("ratio", 3): (0.93, 0.97), ("ratio", 5): (0.93, 0.97), ("ratio", 8): (0.93, 0.97),
    ("ratio", 20): (0.93, 0.97),
    ("binary", 3): (0.89, 0.97), ("binary", 5): (0.89, 0.97), ("binary", 8): (0.91, 0.97),
    ("binary", 20): (0.93, 0.97),
    ("share", 3): (0.90, 0.97), ("share", 5): (0.95, 1.0), ("share", 8): (0.93, 1.0),
    ("share", 20): (0.95, 1.0),
}  # fmt: skip


@pytest.mark.parametrize("design,clusters", sorted(BANDS))
def test_coverage_on_planted_data(design, clusters):
    lo, hi = BANDS[design, clusters]
    assert lo <= coverage(design, clusters, reps=2000) <= hi
