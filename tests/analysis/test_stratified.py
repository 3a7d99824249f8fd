"""The within-strata (task-stratified) correlation of the multi-task extension: oracle cases,
brute-force enumeration of the stratified permutation test, and its sampled form."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as sps

from mechinterp.analysis.stats import correlate, stratified_correlation


def test_one_stratum_is_the_plain_spearman_correlation_and_its_permutation_test():
    x, y = [0.1, 0.4, 0.2, 0.9, 0.5], [0.3, 0.5, 0.1, 0.8, 0.9]
    a = stratified_correlation(x, y, ["t"] * 5, n_boot=200)
    b = correlate(x, y, n_boot=200)
    assert a.estimate == pytest.approx(b.estimate) == pytest.approx(0.8)
    assert a.p_permutation == pytest.approx(b.p_permutation) == pytest.approx(16 / 120)
    assert a.exact and a.n_permutations == 120


def _planted():
    """Three tasks of four variants: perfectly monotone within each task, while the task
    offsets run the other way (an easy task whose models recall least)."""
    x, y, s = [], [], []
    for t, (ox, oy) in enumerate([(0, 2), (1, 1), (2, 0)]):
        for i in range(4):
            x.append(ox + 0.1 * i)
            y.append(oy + 0.1 * i)
            s.append(f"task{t}")
    return x, y, s


def test_between_task_differences_neither_make_nor_hide_the_within_task_effect():
    x, y, s = _planted()
    assert sps.spearmanr(x, y).statistic < -0.7  # pooled naively: strongly negative
    r = stratified_correlation(x, y, s, n_boot=300)
    assert r.estimate == pytest.approx(1.0)
    # |r| = 1 only when every task keeps its order, or every task reverses it: 2 of 24³
    assert r.exact and r.n_permutations == 24**3
    assert r.p_permutation == pytest.approx(2 / 24**3)
    assert r.low == pytest.approx(1.0)  # no within-task resample breaks the order


def test_the_estimate_is_the_mean_within_task_spearman_for_equal_sized_tasks():
    rng = np.random.default_rng(1)
    x, y = rng.random(12), rng.random(12)
    s = np.repeat(["a", "b", "c"], 4)
    within = [sps.spearmanr(x[s == t], y[s == t]).statistic for t in "abc"]
    r = stratified_correlation(x, y, s, n_boot=100)
    assert r.estimate == pytest.approx(np.mean(within))


def test_the_permutation_p_value_equals_brute_force_within_task_enumeration():
    rng = np.random.default_rng(3)
    x, y = rng.random(7), rng.random(7)
    s = np.array(["a", "a", "a", "b", "b", "b", "b"])
    r = stratified_correlation(x, y, s, n_boot=100)
    a, b = np.flatnonzero(s == "a"), np.flatnonzero(s == "b")

    def stat(yy):
        return stratified_correlation(x, yy, s, n_boot=1).estimate

    hits, total = 0, 0
    for pa in itertools.permutations(a):
        for pb in itertools.permutations(b):
            yy = y.copy()
            yy[a], yy[b] = y[list(pa)], y[list(pb)]
            hits += abs(stat(yy)) >= abs(r.estimate) - 1e-12
            total += 1
    assert total == 6 * 24 == r.n_permutations
    assert r.p_permutation == pytest.approx(hits / total)


def test_sampled_permutations_agree_with_the_exact_test():
    x, y, s = _planted()
    rng = np.random.default_rng(0)
    y = np.asarray(y) + rng.normal(0, 0.15, 12)  # a noisy, imperfect within-task order
    exact = stratified_correlation(x, y, s, n_boot=100)
    sampled = stratified_correlation(x, y, s, n_boot=100, exact_up_to=10, n_draws=40_000)
    assert not sampled.exact and sampled.n_permutations == 40_000
    assert sampled.estimate == exact.estimate
    assert sampled.p_permutation == pytest.approx(exact.p_permutation, abs=0.01)


def test_a_task_with_one_model_carries_no_within_task_information_and_is_left_out():
    x, y, s = _planted()
    r = stratified_correlation([*x, 5.0], [*y, -5.0], [*s, "lonely"], n_boot=100)
    assert r.n == 12 and r.estimate == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("x", "y", "s", "match"),
    [
        ([1, 2], [1, 2], ["a", "a"], "at least 3 pairs"),
        ([1, 2, 3, 4], [1, 1, 2, 2], ["a", "a", "b", "b"], "constant within every stratum"),
        ([1, 2, 3], [1, 2], ["a", "a", "a"], "equal length"),
    ],
)
def test_undefined_correlations_are_refused(x, y, s, match):
    with pytest.raises(ValueError, match=match):
        stratified_correlation(x, y, s, n_boot=10)
