"""Claims from planted tables: known effects give known estimates, CIs and verdicts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mechinterp.experiments.study.claims import compute_claims, headline, verdict
from mechinterp.experiments.study.config import ClaimSettings, StudyConfig

SETTINGS = ClaimSettings(k=2)


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


def _patch(retrieval: float, random: float, n=5, gaps=None, recoveries=None):
    """Planted patch rows: pair e has clean − corrupt gap `gaps[e]` (1 + e by default) and the
    retrieval set recovers `recoveries[e]` of it (`retrieval` for every pair by default)."""
    gaps = [1.0 + e for e in range(n)] if gaps is None else gaps
    recoveries = [retrieval] * n if recoveries is None else recoveries
    rows = []
    for e, (gap, rec) in enumerate(zip(gaps, recoveries, strict=True)):
        base = {"example_id": f"e{e}", "flipped": True, "kind": "set", "clean_metric": gap - 1.0,
                "corrupt_metric": -1.0}  # fmt: skip

        def at(r, gap=gap):
            return {"recovery": r, "value": -1.0 + r * gap}

        rows.append({**base, "name": "retrieval", "n_heads": 3, "in_set": True, **at(rec)})
        rows.append({**base, "name": "random-s0", "n_heads": 3, "in_set": False, **at(random)})
        rows.append({**base, "name": "all", "n_heads": 9, "in_set": False, **at(1.0)})
        for h in range(4):
            rows.append({**base, "kind": "head", "name": f"L0H{h}", "n_heads": 1,
                         "in_set": h < 2, **at(0.3 if h < 2 else 0.0)})  # fmt: skip
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


def test_verdicts_need_the_effect_not_just_a_point_estimate():
    assert verdict(0.25, 0.5, null=0.0, minimum=0.2) == "supported"
    # the interval excludes the null but its lower end misses the minimum: not enough
    assert verdict(0.1, 0.5, null=0.0, minimum=0.2) == "inconclusive"
    assert verdict(0.02, 0.98, null=0.0, minimum=0.5) == "inconclusive"  # recovery 0.51 [.02, .98]
    assert verdict(-0.1, 0.5, null=0.0, minimum=0.2) == "inconclusive"
    assert verdict(0.01, 0.15, null=0.0, minimum=0.2) == "not supported"
    # a minimum of 0 (an excess over random): the interval must lie above the null
    assert verdict(0.0, 0.3, null=0.0, minimum=0.0) == "inconclusive"
    assert verdict(0.01, 0.3, null=0.0, minimum=0.0) == "supported"
    # too few clusters: never a verdict either way
    assert verdict(0.25, 0.5, null=0.0, minimum=0.2, trusted=False) == "inconclusive"
    assert verdict(0.01, 0.15, null=0.0, minimum=0.2, trusted=False) == "inconclusive"


def test_rows_on_fewer_than_five_clusters_are_untrusted_and_inconclusive():
    """The same planted effects as above, with the 6 detection instances on 3 needles and the
    10 knockout examples on 4: the estimates stand, the verdicts do not."""
    per_instance = _per_instance().assign(needle_index=lambda d: d["instance_id"].str[1:]
                                          .astype(int) % 3)  # fmt: skip
    knockout = _knockout(top_ok=0.0, random_ok=1.0)
    knockout["needle_index"] = knockout["example_id"].str[1:].astype(int) % 4
    claims = compute_claims({"detect_instances": per_instance, "knockout": knockout}, _config())
    sparse, nec = _row(claims, "sparse", "share_of_heads"), _row(claims, "necessary", "retrieved")
    assert sparse["estimate"] == pytest.approx(2 / 50) and sparse["n_clusters"] == 3
    assert nec["estimate"] == 1.0 and nec["n_clusters"] == 4
    assert not sparse["trusted"] and not nec["trusted"]
    assert sparse["verdict"] == nec["verdict"] == "inconclusive"
    assert "3 needles (6 detection instances)" == sparse["resampled"]


def test_sufficiency_is_a_ratio_of_sums_that_a_small_gap_cannot_dominate():
    """Five pairs: four with gap 4 recover half of it; one with gap 0.1 overshoots to 5 × its
    gap (a small gap turns noise into a large ratio). The mean of per-pair recoveries is
    (4 × 0.5 + 5) / 5 = 1.4; Σ recovered / Σ gap is (4 × 2 + 0.5) / 16.1 = 0.528."""
    patch = _patch(0.5, 0.0, gaps=[4.0, 4.0, 4.0, 4.0, 0.1], recoveries=[0.5] * 4 + [5.0])
    claims = compute_claims({"detect_instances": _per_instance(), "patch": patch}, _config())
    primary = claims[(claims["claim"] == "sufficient") & claims["primary"]].iloc[0]
    assert primary["estimate"] == pytest.approx(8.5 / 16.1)
    assert primary["per_pair_mean"] == pytest.approx(1.4)
    assert primary["min_gap"] == pytest.approx(0.1)
    assert primary["ci_low"] < primary["estimate"] < primary["ci_high"]


def test_no_flipped_pair_makes_sufficiency_inconclusive_not_supported():
    patch = _patch(0.9, 0.1).assign(flipped=False)
    tables = {"detect_instances": _per_instance(), "patch": patch}
    claims = compute_claims(tables, _config())
    row = claims[claims["claim"] == "sufficient"].iloc[0]
    assert row["verdict"] == "inconclusive" and row["n"] == 0
    assert headline(claims).set_index("claim").loc["necessary", "verdict"] == "not tested"


#: The compared heads of each same-heads comparison in `_paths_table`, and the share of the
#: planted recovery each carries.
_SAME = {"receiver_groups": ("L2H0,L2H1", 2, 1, 1.0),
         "whole_groups": ("L1H0,L1H1,L2H0,L2H1", 4, 2, 0.5)}  # fmt: skip


def _paths_table(rq: list[float], rk: list[float],
                 comparisons=("receiver_groups", "whole_groups")) -> pd.DataFrame:  # fmt: skip
    """Path-patching rows of receivers L1H0,L2H0,L2H1 (2 query heads per KV head): pair i
    (gap 2, needle i) recovers rq[i] through the queries and rk[i] through the keys of the
    KV group wholly inside them (`receiver_groups`), half of each through their whole KV groups
    (`whole_groups`); the receivers' own inputs (`kind = set`: 3 queries against 4 heads' keys)
    recover 0 and 0.9, which no same-heads row may read."""
    rows = []
    for i, (q, k) in enumerate(zip(rq, rk, strict=True)):
        base = {"example_id": f"ex{i}", "needle_index": i, "flipped": True, "clean_metric": 1.0,
                "corrupt_metric": -1.0, "receivers": "L1H0,L2H0,L2H1"}  # fmt: skip
        for inp, rec in (("q", 0.0), ("k", 0.9)):
            rows.append({**base, "kind": "set", "receiver_input": inp, "recovery": rec,
                         "value": -1.0 + 2 * rec})  # fmt: skip
        for comparison in comparisons:
            heads, n_heads, n_groups, part = _SAME[comparison]
            for inp, rec in (("q", q * part), ("k", k * part)):
                rows.append({**base, "kind": "same_heads", "receiver_input": inp,
                             "recovery": rec, "value": -1.0 + 2 * rec, "comparison": comparison,
                             "compared_heads": heads, "n_compared_heads": n_heads,
                             "n_kv_groups": n_groups})  # fmt: skip
    return pd.DataFrame(rows)


def test_queries_and_keys_are_compared_on_the_same_heads_with_a_share_only_when_both_carry():
    from mechinterp.experiments.study.claims import path_rows

    rq = [0.6, 0.5, 0.7, 0.55, 0.65, 0.6]
    rk = [0.2, 0.25, 0.15, 0.2, 0.2, 0.1]
    rows = path_rows(_paths_table(rq, rk), SETTINGS)
    assert [(r["comparison"], r["metric"]) for r in rows] == [
        (c, m) for c in ("receiver_groups", "whole_groups")
        for m in ("recovery_q", "recovery_k", "query_share")]  # fmt: skip
    q_row, k_row, share, wq, wk, wshare = rows
    assert q_row["estimate"] == pytest.approx(np.mean(rq)) and q_row["ci_low"] > 0
    assert k_row["estimate"] == pytest.approx(np.mean(rk)) and k_row["ci_low"] > 0
    assert share["estimate"] == pytest.approx(np.mean(rq) / (np.mean(rq) + np.mean(rk)))
    assert share["verdict"] == "supported" and share["ci_low"] > 0.5  # queries carry more
    assert "2 query heads of the 1 KV groups wholly inside the 3" in q_row["label"]
    assert q_row["compared_heads"] == k_row["compared_heads"] == "L2H0,L2H1"
    assert (wq["estimate"], wk["estimate"]) == pytest.approx((np.mean(rq) / 2, np.mean(rk) / 2))
    assert wshare["estimate"] == pytest.approx(share["estimate"])
    assert (wq["n_compared_heads"], wq["n_kv_groups"]) == (4, 2)
    _, _, swapped, *_ = path_rows(_paths_table(rk, rq), SETTINGS)
    assert swapped["verdict"] == "not supported"
    # the keys carry nothing (or take some away): no share, whatever the queries do
    _, _, none, *_ = path_rows(_paths_table(rq, [0.01, -0.02, 0.0, 0.01, -0.01, 0.0]),
                               SETTINGS)  # fmt: skip
    assert np.isnan(none["estimate"]) and "no share to split" in none["label"]


def test_without_a_kv_group_inside_the_receivers_their_whole_groups_are_compared_and_said():
    from mechinterp.experiments.study.claims import path_rows

    rq, rk = [0.6, 0.5, 0.7, 0.55, 0.65, 0.6], [0.2, 0.25, 0.15, 0.2, 0.2, 0.1]
    rows = path_rows(_paths_table(rq, rk, comparisons=("whole_groups",)), SETTINGS)
    assert [r["comparison"] for r in rows] == ["whole_groups"] * 3
    assert all("no KV group lies wholly inside the 3" in r["label"] for r in rows[:2])
    assert rows[0]["estimate"] == pytest.approx(np.mean(rq) / 2)
    assert path_rows(_paths_table(rq, rk).assign(flipped=False), SETTINGS) == []
