"""The extension report's claims and figures on planted tables with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mechinterp.experiments.extension import ExtensionConfig
from mechinterp.experiments.extension.report import CLAIMS, compute_claims, cross_summary


@pytest.fixture
def config():
    # variant names must parse, so the planted variants are real ones
    return ExtensionConfig(
        variants=("realistic-low", "templated-high", "templated-low", "symbolic")
    )


@pytest.fixture
def heads(config):
    ref = "L1H0 L1H1 L2H0 L2H1"
    return pd.DataFrame({
        "model_variant": ["realistic-high", *config.variants],
        "recall": [1.0, 0.25, 0.5, 0.75, 1.0],
        "performance": [0.9, 0.2, 0.4, 0.6, 0.8],
        # subset shares 1, 0.5, 1, 1 -> mean 0.875
        "subset_share": [1.0, 1.0, 0.5, 1.0, 1.0],
        "heads": [ref, "L1H0", "L1H0 L1H1 L5H5 L6H6", "L1H0 L1H1 L2H0", ref],
    })  # fmt: skip


@pytest.fixture
def cross():
    rows = []
    for v in ("realistic-low", "templated-high"):
        for ex in range(3):
            for cond, f1, lp in (("recipient", 0.0, -3.0), ("donor", 1.0, -0.5),
                                 ("inter", 1.0, -1.0), ("rand-s0", 0.0, -3.0),
                                 ("rand-s1", 0.5, -2.0)):  # fmt: skip
                rows.append({"model_variant": v, "example_id": f"e{ex}", "condition": cond,
                             "f1": f1, "answer_logprob": lp, "n_heads": 2})  # fmt: skip
    return pd.DataFrame(rows)


def test_planted_tables_give_known_estimates_and_verdicts(config, heads, cross):
    claims = compute_claims({"cross": cross}, heads, config)
    assert set(claims["claim"]) == {"recall_predicts", "subset", "inter_beats_rand"}
    prim = claims[claims["primary"]].set_index("claim")
    # a perfectly monotone recall -> F1 relation across 4 variants
    assert prim.loc["recall_predicts", "estimate"] == pytest.approx(1.0)
    assert prim.loc["recall_predicts", "n"] == 4  # the reference is not a data point
    # ...yet 4 points cannot decide it: 2 of the 4! = 24 pairings reach |ρ| = 1 (p = 1/12),
    # although the bootstrap CI collapses to [1, 1].
    assert prim.loc["recall_predicts", "p_permutation"] == pytest.approx(2 / 24)
    assert prim.loc["recall_predicts", "ci_low"] == pytest.approx(1.0)
    assert prim.loc["recall_predicts", "verdict"] == "inconclusive"
    assert prim.loc["subset", "estimate"] == pytest.approx(0.875)
    # 4 synthetic models are too few clusters for an interval to be read
    assert not prim.loc["subset", "trusted"] and prim.loc["subset", "verdict"] == "inconclusive"
    # Inter F1 1.0 minus the mean of Rand (0 and 0.5) on each of 6 (model, example) pairs
    assert prim.loc["inter_beats_rand", "estimate"] == pytest.approx(0.75)
    assert prim.loc["inter_beats_rand", "n"] == 6
    assert prim.loc["inter_beats_rand", "resampled"] == (
        "3 examples (6 model × example pairs) × 2 random draws"
    )
    # 3 examples and 2 draws: not trusted, whatever the interval
    assert prim.loc["inter_beats_rand", "verdict"] == "inconclusive"
    # 6 examples and 5 draws that all leave Rand at 0.25: a certain gain of 0.75
    steady = pd.DataFrame([
        {"model_variant": v, "example_id": f"e{ex}", "condition": cond, "f1": f1,
         "answer_logprob": -1.0, "n_heads": 2}
        for v in ("realistic-low", "templated-high") for ex in range(6)
        for cond, f1 in (("recipient", 0.0), ("donor", 1.0), ("inter", 1.0),
                         *((f"rand-s{d}", 0.25) for d in range(5)))
    ])  # fmt: skip
    row = compute_claims({"cross": steady}, heads, config)
    row = row[(row["claim"] == "inter_beats_rand") & row["primary"]].iloc[0]
    assert row["estimate"] == pytest.approx(0.75) and row["trusted"]
    assert row["verdict"] == "supported"
    # a recipient already as good as the donor has nothing to recover: left out, not a zero
    solved = cross[cross["model_variant"] == "templated-high"].assign(
        model_variant="templated-low", f1=1.0
    )
    again = compute_claims({"cross": pd.concat([cross, solved])}, heads, config)
    row = again[(again["claim"] == "inter_beats_rand") & again["primary"]].iloc[0]
    assert row["estimate"] == pytest.approx(0.75) and row["n"] == 6
    per = claims[(claims["claim"] == "subset") & ~claims["primary"]].set_index("model_variant")
    assert per.loc["templated-high", "estimate"] == pytest.approx(0.5)  # 2 of its 4 heads
    logprob = claims[(claims["claim"] == "inter_beats_rand") & ~claims["primary"]]
    assert logprob["estimate"].iloc[0] == pytest.approx(-1.0 - (-2.5))


def test_no_variation_and_no_patching_are_inconclusive_not_errors(config, heads):
    flat = heads.assign(performance=0.5)
    claims = compute_claims({}, flat, config)
    prim = claims[claims["primary"]].set_index("claim")
    assert np.isnan(prim.loc["recall_predicts", "estimate"])
    assert prim.loc["recall_predicts", "verdict"] == "inconclusive"
    assert prim.loc["inter_beats_rand", "verdict"] == "inconclusive"
    assert set(CLAIMS) >= set(claims["claim"])


def test_a_synthetic_model_outside_the_reference_set_is_not_supported(config, heads):
    disjoint = heads.assign(subset_share=[1.0, 0.0, 0.0, 0.0, 0.0])
    claims = compute_claims({}, disjoint, config)
    prim = claims[claims["primary"]].set_index("claim")
    assert prim.loc["subset", "estimate"] == 0.0 and prim.loc["subset", "ci_high"] == 0.0
    # ...but 4 models are too few clusters for a verdict either way
    assert prim.loc["subset", "verdict"] == "inconclusive"


def test_cross_summary_recovers_the_planted_f1(cross):
    s = cross_summary(cross).set_index(["model_variant", "condition"])
    assert s.loc[("realistic-low", "inter"), "f1_recovery"] == pytest.approx(1.0)
    assert s.loc[("realistic-low", "rand-s1"), "f1_recovery"] == pytest.approx(0.5)
    assert s.loc[("templated-high", "donor"), "n"] == 3


def test_extension_figures_draw_what_the_tables_say(cross):
    from mechinterp.plots import cross_patch_by_variant, knockout_by_model, overlap_heatmap

    fig = overlap_heatmap({"ref": ["L1H0", "L1H1"], "syn": ["L1H0", "L5H5", "L6H6"]})
    z = np.array(fig.data[0].z, dtype=float)
    np.testing.assert_allclose(z, [[1.0, 0.5], [1 / 3, 1.0]])  # |A∩B|/|A|, row A
    fig = cross_patch_by_variant(cross)
    bars = {t.name.split(" ")[0]: list(t.y) for t in fig.data}
    assert bars["Rand"] == [0.25, 0.25]  # the mean over the two seeds
    assert bars["Inter"] == [1.0, 1.0] and bars["recipient"] == [0.0, 0.0]
    ko = pd.DataFrame({"model_variant": ["m", "m", "m"], "condition": ["none", "top", "random"],
                       "value": [1.0, 0.2, 0.9], "lo": [1.0, 0.0, 0.7], "hi": [1.0, 0.4, 1.0],
                       "k": [0, 10, 10]})  # fmt: skip
    fig = knockout_by_model(ko)
    assert [t.name for t in fig.data] == ["no knockout", "own top-10", "random-10, same layers"]
    assert list(fig.data[1].error_y.arrayminus) == pytest.approx([0.2])
    with pytest.raises(ValueError, match="needs columns"):
        knockout_by_model(ko.drop(columns="value"))


def test_inter_minus_rand_resamples_the_rand_draws(config, heads):
    """One Rand draw happens to be as good as Inter, the other useless: the effect (0.5) rests
    on two draws, so its interval must reach below 0 (an interval over pairs of the mean over
    draws would call it a certain 0.5)."""
    rows = []
    for v in ("realistic-low", "templated-high"):
        for ex in range(4):
            for cond, f1 in (("recipient", 0.0), ("donor", 1.0), ("inter", 1.0),
                             ("rand-s0", 0.0), ("rand-s1", 1.0)):  # fmt: skip
                rows.append({"model_variant": v, "example_id": f"e{ex}", "condition": cond,
                             "f1": f1, "answer_logprob": -f1, "n_heads": 2})  # fmt: skip
    claims = compute_claims({"cross": pd.DataFrame(rows)}, heads, config)
    row = claims[(claims["claim"] == "inter_beats_rand") & claims["primary"]].iloc[0]
    assert row["estimate"] == pytest.approx(0.5)
    assert row["ci_low"] < 0.0 and row["ci_high"] == 1.0  # two draws: t with 1 df, clipped
    assert row["verdict"] == "inconclusive"
