"""The `steered` claim from planted addressing tables: planted senders are found with every needle
left out of their choice, a null table is not called steered more often than the level allows,
and the hypothesis sets are judged against their own layer-matched draws."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mechinterp.experiments.study.claims import (
    compute_claims,
    cross_fitted_excess,
    headline,
    steering_rows,
    top_senders,
)
from mechinterp.experiments.study.config import StudyConfig

CONFIG = StudyConfig()
SENDERS = [(la, h) for la in range(4) for h in range(4)]  # receivers sit in layer 4


def _table(planted: dict, *, n_pairs: int = 12, noise: float = 0.03, seed: int = 0,
           hypotheses: dict | None = None) -> pd.DataFrame:  # fmt: skip
    """Addressing rows: per corruption and pair (one needle each), gap 1 + i/n; sender (la, h)
    recovers `planted[(corruption, input)][(la, h)]` of the gap (0 when absent) plus noise.
    `hypotheses[(corruption, name)]`: (input, recovery of the set, recovery of its draws)."""
    rng = np.random.default_rng(seed)
    rows = []
    for corruption in ("question_swap", "key_swap"):
        for i in range(n_pairs):
            gap = 1.0 + i / n_pairs
            base = {"example_id": f"{corruption}-{i}", "corruption": corruption,
                    "needle_index": i, "clean_metric": gap, "corrupt_metric": 0.0,
                    "receivers": "L4H0,L4H1"}  # fmt: skip
            rows.append({**base, "kind": "pair", "apart": True})
            for inp in ("q", "k"):
                share = planted.get((corruption, inp), {})
                total = 0.0
                for la, h in SENDERS:
                    rec = share.get((la, h), 0.0) + noise * rng.standard_normal()
                    total += rec
                    rows.append({**base, "kind": "sender", "receiver_input": inp,
                                 "head_name": f"L{la}H{h}", "layer": la, "head": h,
                                 "value": rec * gap, "recovery": rec})  # fmt: skip
                rows.append({**base, "kind": "set", "receiver_input": inp,
                             "head_name": "upstream", "layer": -1, "head": -1,
                             "value": total * gap, "recovery": total})  # fmt: skip
                for (c, name), (h_inp, mine, theirs) in (hypotheses or {}).items():
                    if c != corruption or h_inp != inp:
                        continue
                    rows.append({**base, "kind": "set", "receiver_input": inp, "head_name": name,
                                 "hypothesis": name, "value": mine * gap})  # fmt: skip
                    for d in range(5):
                        rows.append({**base, "kind": "set", "receiver_input": inp,
                                     "head_name": f"{name}~random{d}", "hypothesis": name,
                                     "value": (theirs + noise * rng.standard_normal()) * gap})
                mass_gap = 0.1 * gap
                for needle in range(2 if corruption == "question_swap" else 1):
                    sign = 1 if needle == 0 else -1
                    rows.append({**base, "kind": "mass", "node": inp, "needle": needle,
                                 "layer": 4, "head": 0, "head_name": "L4H0",
                                 "clean_mass": 0.2 + sign * mass_gap / 2, "corrupt_mass": 0.2,
                                 "patched_mass": 0.2 + sign * mass_gap / 4})  # fmt: skip
    return pd.DataFrame(rows)


def _rows(table) -> pd.DataFrame:
    return pd.DataFrame(steering_rows(table, CONFIG))


def test_planted_senders_are_found_and_steer_only_where_planted():
    planted = {("key_swap", "k"): {(1, 2): 0.4, (2, 0): 0.3}}
    rows = _rows(_table(planted)).set_index(["corruption", "metric"])
    assert rows.loc[("key_swap", "top_senders_k"), "verdict"] == "supported"
    assert "L1H2" in rows.loc[("key_swap", "top_senders_k"), "senders"]
    # the two planted heads above their layers' means (0.4 - 0.1 + 0.3 - 0.075), and three of
    # noise, each less its layer's mean (0.1 in layer 1, 0.075 in layer 2, else 0)
    assert 0.3 < rows.loc[("key_swap", "top_senders_k"), "estimate"] < 0.6
    for where in (("key_swap", "top_senders_q"), ("question_swap", "top_senders_q"),
                  ("question_swap", "top_senders_k")):  # fmt: skip
        assert rows.loc[where, "verdict"] == "not supported", where
    assert rows.loc[("key_swap", "upstream_k"), "estimate"] == pytest.approx(0.7, abs=0.1)
    # primary: the input each corruption addresses, Bonferroni-widened over the two
    prim = rows[rows["primary"]]
    assert sorted(prim.index) == [("key_swap", "top_senders_k"), ("question_swap", "top_senders_q")]
    assert np.allclose(prim["level"], 1 - 0.05 / 2)
    assert rows.loc[("key_swap", "top_senders_q"), "level"] == 0.95
    claims = compute_claims({"detect_instances": _detect(), "addressing": _table(planted)},
                            CONFIG)  # fmt: skip
    head = headline(claims).set_index("claim")
    assert head.loc["steered", "verdict"] == "supported"  # one primary row suffices


def _detect() -> pd.DataFrame:
    return pd.DataFrame([{"instance_id": f"i{i}", "counted": True, "layer": h // 4,
                          "head": h % 4, "value": 0.0, "needle_index": i}
                         for i in range(6) for h in range(20)])  # fmt: skip


def test_a_null_table_is_rarely_called_steered():
    """40 tables without any steering at the report's size (12 needles): the claim (any of 2
    primary rows, Bonferroni-widened) is called supported in at most a few, as 5 % allows."""
    supported = 0
    for seed in range(40):
        rows = _rows(_table({}, seed=seed, noise=0.05))
        supported += bool((rows[rows["primary"]]["verdict"] == "supported").any())
    assert supported <= 4


def test_cross_fitting_chooses_each_needles_senders_without_it():
    table = _table({("key_swap", "k"): {(3, 3): 0.5}}, n_pairs=6, noise=0.0)
    senders = table[(table["kind"] == "sender") & (table["corruption"] == "key_swap")
                    & (table["receiver_input"] == "k")]  # fmt: skip
    assert top_senders(senders, 1) == ["L3H3"]
    clusters = pd.Series({f"key_swap-{i}": f"needle {i}" for i in range(6)})
    excess = cross_fitted_excess(senders, clusters, 1)
    # each needle's choice, made on the other five, is L3H3: 0.5 of the gap above layer 3's mean
    assert np.allclose(excess["excess"], 0.375 * excess["gap"])
    # a sender planted on one needle only is not chosen for that needle
    one = senders.copy()
    hit = (one["example_id"] == "key_swap-0") & (one["head_name"] == "L0H1")
    one.loc[hit, "value"] = 5.0
    assert top_senders(one, 1) == ["L0H1"]
    row0 = cross_fitted_excess(one, clusters, 1).set_index("example_id").loc["key_swap-0"]
    assert row0["excess"] == pytest.approx(0.375 * row0["gap"])


def test_hypothesis_sets_are_judged_against_their_own_draws():
    hyp = {("key_swap", "previous_token"): ("k", 0.6, 0.1),
           ("key_swap", "question_readers"): ("q", 0.1, 0.1)}  # fmt: skip
    rows = _rows(_table({}, hypotheses=hyp)).set_index(["corruption", "metric"])
    assert rows.loc[("key_swap", "previous_token_k"), "estimate"] == pytest.approx(0.5, abs=0.05)
    assert rows.loc[("key_swap", "previous_token_k"), "verdict"] == "supported"
    assert rows.loc[("key_swap", "question_readers_q"), "verdict"] == "not supported"
    assert not rows.loc[("key_swap", "previous_token_k"), "primary"]
    # the receivers' own inputs: a quarter of the planted mass gap patched back, both inputs
    assert rows.loc[("question_swap", "own_q"), "estimate"] == pytest.approx(0.5)
    assert rows.loc[("key_swap", "own_k"), "estimate"] == pytest.approx(0.5)
