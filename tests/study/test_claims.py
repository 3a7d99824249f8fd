"""Claims from planted tables: known effects give known estimates, CIs and verdicts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mechinterp.analysis.stats import cluster_bootstrap
from mechinterp.experiments.study.claims import compute_claims, headline, verdict
from mechinterp.experiments.study.config import ClaimSettings, StudyConfig

SETTINGS = ClaimSettings(k=2, n_boot=500)


def _per_instance(n_inst=6, n_heads=50, hot=(0, 1)):
    rows = []
    for i in range(n_inst):
        for h in range(n_heads):
            rows.append({"instance_id": f"i{i}", "counted": True, "layer": h // 10,
                         "head": h % 10, "value": 0.5 if h in hot else 0.0})  # fmt: skip
    return pd.DataFrame(rows)


def _knockout(top_ok: float, random_ok: float, n=10):
    rng = np.random.default_rng(0)
    rows = []
    for e in range(n):
        base = {"example_id": f"e{e}", "task": "niah", "mode": "zero", "k": 2}
        rows.append({**base, "condition": "top", "seed": -1,
                     "retrieved": bool(rng.random() < top_ok), "answer_logprob": -3.0})  # fmt: skip
        for s in range(3):
            rows.append({**base, "condition": "random", "seed": s,
                         "retrieved": bool(rng.random() < random_ok),
                         "answer_logprob": -1.0})  # fmt: skip
    return pd.DataFrame(rows)


def _patch(retrieval: float, random: float, n=5):
    rows = []
    for e in range(n):
        base = {"example_id": f"e{e}", "flipped": True, "kind": "set"}
        rows.append({**base, "name": "retrieval", "n_heads": 3, "recovery": retrieval,
                     "in_set": True})  # fmt: skip
        rows.append({**base, "name": "random-s0", "n_heads": 3, "recovery": random,
                     "in_set": False})  # fmt: skip
        rows.append({**base, "name": "all", "n_heads": 9, "recovery": 1.0, "in_set": False})
        for h in range(4):
            rows.append({**base, "kind": "head", "name": f"L0H{h}", "n_heads": 1,
                         "in_set": h < 2, "recovery": 0.3 if h < 2 else 0.0})  # fmt: skip
    return pd.DataFrame(rows)


def _config():
    from mechinterp.experiments.study.config import KnockoutStage

    return StudyConfig(knockout=KnockoutStage(ks=(1, 2)), claims=SETTINGS)


def _row(claims: pd.DataFrame, claim: str, metric: str) -> pd.Series:
    """The one row of `claims` for (claim, metric). (A `.loc` on a (claim, metric) index that
    is not unique gives a frame or a row depending on the pandas release.)"""
    rows = claims[(claims["claim"] == claim) & (claims["metric"] == metric)]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_planted_effects_give_the_planted_estimates_and_verdicts():
    tables = {
        "detect_instances": _per_instance(),
        "knockout": _knockout(top_ok=0.0, random_ok=1.0),
        "patch": _patch(retrieval=0.8, random=0.1),
    }
    claims = compute_claims(tables, _config())
    sparse = _row(claims, "sparse", "share_of_heads")
    assert sparse["estimate"] == pytest.approx(2 / 50) and sparse["verdict"] == "supported"
    nec = _row(claims, "necessary", "retrieved")
    assert nec["estimate"] == 1.0 and nec["ci_low"] == 1.0 and nec["verdict"] == "supported"
    assert _row(claims, "necessary", "answer_logprob")["estimate"] == pytest.approx(2.0)
    suf = claims[(claims["claim"] == "sufficient")].set_index("label")
    assert suf.iloc[0]["estimate"] == pytest.approx(0.8) and suf.iloc[0]["verdict"] == "supported"
    assert suf.filter(like="minus random", axis=0)["estimate"].item() == pytest.approx(0.7)
    assert suf.filter(like="per-head", axis=0)["estimate"].item() == pytest.approx(0.3)
    assert set(headline(claims)["verdict"]) == {"supported"}


def test_no_effect_is_not_supported_and_a_dense_set_is_not_sparse():
    tables = {
        "detect_instances": _per_instance(hot=range(20)),  # 40% of heads
        "knockout": _knockout(top_ok=1.0, random_ok=1.0),
        "patch": _patch(retrieval=0.05, random=0.05),
    }
    head = headline(compute_claims(tables, _config())).set_index("claim")["verdict"]
    assert head.to_dict() == {
        "sparse": "not supported",
        "necessary": "not supported",
        "sufficient": "not supported",
    }


def test_verdict_rules():
    assert verdict(0.1, 0.5, 0.3, null=0.0, minimum=0.2) == "supported"
    assert verdict(-0.1, 0.5, 0.3, null=0.0, minimum=0.2) == "inconclusive"
    assert verdict(0.01, 0.15, 0.1, null=0.0, minimum=0.2) == "not supported"


def test_the_cluster_bootstrap_moves_whole_clusters_weighted_by_their_items():
    """Cluster A holds one item (0), cluster B three (1): a resample is AA, AB or BB, whose item
    means are 0, 3/4 and 1 (not the 1/2 a mean of cluster means would give)."""
    iv = cluster_bootstrap([0.0, 1.0, 1.0, 1.0], ["A", "B", "B", "B"], n_boot=4000, seed=0)
    assert iv.estimate == 0.75 and (iv.low, iv.high) == (0.0, 1.0)
    assert (iv.n_items, iv.n_clusters, iv.n_draws) == (4, 2, 1)
    assert iv.unit("needles") == "2 needles (4 examples)"
    # every item its own cluster: the ordinary bootstrap of a mean
    iv = cluster_bootstrap(np.array([0.0, 1.0] * 20), n_boot=2000, seed=0)
    assert iv.estimate == 0.5 and 0.3 < iv.low < 0.45 and 0.55 < iv.high < 0.7
    assert iv.unit() == "40 examples"
    with pytest.raises(ValueError, match="NaN"):
        cluster_bootstrap([0.0, float("nan")])
    with pytest.raises(ValueError, match="cluster labels"):
        cluster_bootstrap([0.0, 1.0], ["A"])


def _coverage(sample, *, clusters, level=0.9, reps=200):
    hits = 0
    for rep in range(reps):
        x = sample(np.random.default_rng(rep))
        iv = cluster_bootstrap(x, clusters, n_boot=400, level=level, seed=rep)
        hits += iv.low <= 0.0 <= iv.high
    return hits / reps


def test_intervals_cover_a_planted_mean_only_when_they_resample_every_source_of_variance():
    """Planted: 8 needles × 5 examples, a needle effect (SD 1) shared by its examples, item noise
    SD 0.5, true mean 0. Clustered 90 % intervals cover 0 about 90 % of the time (the
    percentile bootstrap runs narrow at 8 clusters); intervals that treat the 40 examples as
    independent cover far less. Likewise a random-draw effect shared by every example: only
    resampling the draws covers it."""
    needles = np.repeat(np.arange(8), 5)

    def clustered(rng):
        return rng.normal(0, 1, 8)[needles] + rng.normal(0, 0.5, 40)

    assert 0.75 <= _coverage(clustered, clusters=needles) <= 0.97
    assert _coverage(clustered, clusters=None) < 0.6

    def with_draws(rng):  # [example, draw]: each of 10 draws shifts every example alike
        return rng.normal(0, 0.2, (40, 1)) + rng.normal(0, 1, 10)[None, :]

    assert 0.75 <= _coverage(with_draws, clusters=None) <= 0.97
    single = _coverage(lambda rng: with_draws(rng).mean(1), clusters=None)  # draws averaged
    assert single < 0.6


def test_no_flipped_pair_makes_sufficiency_inconclusive_not_supported():
    patch = _patch(0.9, 0.1).assign(flipped=False)
    tables = {"detect_instances": _per_instance(), "patch": patch}
    claims = compute_claims(tables, _config())
    row = claims[claims["claim"] == "sufficient"].iloc[0]
    assert row["verdict"] == "inconclusive" and row["n"] == 0
    assert headline(claims).set_index("claim").loc["necessary", "verdict"] == "not tested"


def test_the_bootstrap_interval_covers_a_planted_mean_at_its_level():
    """Coverage on a planted distribution: 90 % intervals of a Bernoulli(0.3) mean over 40 items
    contain 0.3 in about 90 % of 300 independent samples (binomial SD 1.7 %; the percentile
    bootstrap runs a little narrow at this n)."""
    rng = np.random.default_rng(1)
    hits = 0
    for rep in range(300):
        x = (rng.random(40) < 0.3).astype(float)
        iv = cluster_bootstrap(x, n_boot=400, level=0.9, seed=rep)
        hits += iv.low <= 0.3 <= iv.high
    assert 0.82 <= hits / 300 <= 0.96, hits / 300


def _paths_table(rq: list[float], rk: list[float]) -> pd.DataFrame:
    rows = []
    for i, (q, k) in enumerate(zip(rq, rk, strict=True)):
        for inp, rec in (("q", q), ("k", k)):
            rows.append({"example_id": f"ex{i}", "needle_index": i % 3, "kind": "set",
                         "receiver_input": inp, "recovery": rec, "flipped": True,
                         "receivers": "L1H0,L2H1"})  # fmt: skip
    return pd.DataFrame(rows)


def test_the_query_share_splits_path_recovery_only_when_there_is_some():
    from mechinterp.experiments.study.claims import path_rows

    settings = ClaimSettings(n_boot=500)
    rq = [0.6, 0.5, 0.7, 0.55, 0.65, 0.6]
    rk = [0.2, 0.25, 0.15, 0.2, 0.2, 0.1]
    (row,) = path_rows(_paths_table(rq, rk), settings)
    assert row["estimate"] == pytest.approx(np.mean(rq) / (np.mean(rq) + np.mean(rk)))
    assert row["verdict"] == "supported" and row["ci_low"] > 0.5  # queries carry more
    (swapped,) = path_rows(_paths_table(rk, rq), settings)
    assert swapped["verdict"] == "not supported"
    (none,) = path_rows(_paths_table([0.01, -0.02, 0.0, 0.01, -0.01, 0.0],
                                     [-0.01, 0.0, 0.02, -0.02, 0.0, 0.01]), settings)  # fmt: skip
    assert np.isnan(none["estimate"]) and "no share to split" in none["label"]
    assert none["verdict"] == "inconclusive"
    assert path_rows(_paths_table(rq, rk).query("receiver_input == 'q'"), settings) == []
