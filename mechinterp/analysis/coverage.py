"""Planted data with a known truth, shaped like the claims report's tables, and the coverage of
an interval method on it: the share of replications whose interval holds the truth.

Each design draws one replication at a given number of clusters. `coverage` runs a method over
many seeded replications. `benchmarks/interval_coverage.py` prints the table for the report's
interval methods, and the tests hold them to their nominal level.

- `mean`: examples clustered by needle (cluster effects N(0, 1), item noise N(0, 0.5)), 1–9
  examples per needle, as NIAH examples the model answered at 3 lengths × 3 depths.
- `crossed`: the same, minus a random baseline whose draws are shared by every example (draw
  effects N(0, 0.5), a cluster × draw interaction N(0, 0.25)): random − top over examples ×
  draws, as the necessity rows.
- `ratio`: pairs clustered by needle; each pair's clean–corrupt gap is positive and varies
  (1 + Gamma(2, 1)), its recovered part is the gap times a needle-level recovery (N(0.6, 0.15))
  plus noise: the sufficiency row's Σ recovered / Σ gap.
- `binary`: answers retrieved (0/1) under the top-k and under random draws, with needle-level
  rates: the necessity rows as they really are, a harder case than normal noise.
- `share`: per-instance retrieval scores of 270 heads (20 of them retrieval heads, 3 near the
  threshold), needle effects per head: the share of heads whose mean score exceeds 0.1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mechinterp.analysis.stats import Interval, cluster_jackknife, cluster_mean, cluster_ratio


@dataclass(frozen=True)
class Replication:
    """One planted data set: the interval method's inputs and the true value it estimates."""

    truth: float
    clusters: np.ndarray
    values: np.ndarray  # [item] or [item, draw]; the numerator for a ratio
    denominator: np.ndarray | None = None
    stat: Callable[[np.ndarray], float] | None = None


def _needles(rng, n_clusters: int, per: tuple[int, int] = (1, 9)) -> np.ndarray:
    sizes = rng.integers(per[0], per[1] + 1, size=n_clusters)
    return np.repeat(np.arange(n_clusters), sizes)


def plant_mean(rng, n_clusters: int) -> Replication:
    cl = _needles(rng, n_clusters)
    x = rng.normal(0, 1, n_clusters)[cl] + rng.normal(0, 0.5, len(cl))
    return Replication(0.0, cl, x)


def plant_crossed(rng, n_clusters: int, draws: int = 10) -> Replication:
    cl = _needles(rng, n_clusters)
    a = rng.normal(0, 1, n_clusters)[cl][:, None]
    b = rng.normal(0, 0.5, draws)[None, :]
    ab = rng.normal(0, 0.25, (n_clusters, draws))[cl]
    return Replication(0.0, cl, a + b + ab + rng.normal(0, 0.5, (len(cl), draws)))


def plant_ratio(rng, n_clusters: int) -> Replication:
    cl = _needles(rng, n_clusters)
    gap = 1 + rng.gamma(2.0, 1.0, len(cl))
    recovery = rng.normal(0.6, 0.15, n_clusters)[cl]
    recovered = gap * recovery + rng.normal(0, 0.3, len(cl))
    # E[gap · recovery] / E[gap] = 0.6: recovery is independent of the gap
    return Replication(0.6, cl, recovered, gap)


def plant_binary(rng, n_clusters: int, draws: int = 10) -> Replication:
    cl = _needles(rng, n_clusters)
    top = rng.beta(1, 4, n_clusters)[cl]  # answered under the top-k: mean 0.2
    rand = np.clip(rng.beta(4, 1, n_clusters)[cl][:, None]  # under random heads: mean 0.8
                   + rng.normal(0, 0.1, draws)[None, :], 0, 1)  # fmt: skip
    got_top = rng.random(len(cl)) < top
    got_rand = rng.random((len(cl), draws)) < rand
    # truth: E[rand] − E[top]; the clipped draw shift makes E[rand] a little under 0.8
    return Replication(_binary_truth(), cl, got_rand.astype(float) - got_top[:, None])


@functools.cache
def _binary_truth(n: int = 2_000_000) -> float:
    rng = np.random.default_rng(12345)
    rand = np.clip(rng.beta(4, 1, n) + rng.normal(0, 0.1, n), 0, 1)
    return float(rand.mean() - 0.2)


_SHARE_MEANS = np.concatenate([
    np.random.default_rng(7).uniform(0.0, 0.04, 250),  # ordinary heads
    np.random.default_rng(8).uniform(0.2, 0.6, 17),  # clear retrieval heads
    [0.07, 0.12, 0.14],  # near the threshold
])  # fmt: skip
SHARE_THRESHOLD = 0.1


def plant_share(rng, n_clusters: int) -> Replication:
    cl = _needles(rng, n_clusters, per=(3, 6))
    needle = rng.normal(0, 0.05, (n_clusters, len(_SHARE_MEANS)))[cl]
    scores = _SHARE_MEANS[None, :] + needle + rng.normal(0, 0.05, (len(cl), len(_SHARE_MEANS)))

    def share(w: np.ndarray) -> float:
        return float(((w @ scores) / w.sum() > SHARE_THRESHOLD).mean())

    return Replication(float((_SHARE_MEANS > SHARE_THRESHOLD).mean()), cl, scores, stat=share)


DESIGNS = {"mean": plant_mean, "crossed": plant_crossed, "ratio": plant_ratio,
           "binary": plant_binary, "share": plant_share}  # fmt: skip


def interval_for(rep: Replication, level: float) -> Interval:
    """The report's interval method for this kind of replication."""
    if rep.stat is not None:
        return cluster_jackknife(rep.stat, rep.clusters, level=level)
    if rep.denominator is not None:
        return cluster_ratio(rep.values, rep.denominator, rep.clusters, level=level)
    return cluster_mean(rep.values, rep.clusters, level=level)


def coverage(
    design: str | Callable[..., Replication],
    n_clusters: int,
    *,
    reps: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    method: Callable[[Replication, float], Interval] = interval_for,
) -> float:
    """Share of `reps` seeded replications of `design` at `n_clusters` whose interval (from
    `method`, the report's by default) holds the planted truth."""
    plant = DESIGNS[design] if isinstance(design, str) else design
    hits = 0
    for rep in range(reps):
        r = plant(np.random.default_rng([seed, n_clusters, rep]), n_clusters)
        iv = method(r, level)
        hits += iv.low <= r.truth <= iv.high
    return hits / reps
