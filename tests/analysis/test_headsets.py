import json

import pytest
import torch

from mechinterp.analysis.headsets import (
    jaccard,
    precision,
    random_complement,
    rank_heads,
    recall,
    score_correlations,
    select_heads,
    top_k_overlap,
)
from mechinterp.analysis.stats import correlate
from mechinterp.analysis.wu_json import read_wu_scores, write_wu_scores
from mechinterp.heads import Head, HeadShape, parse_heads

SCORES = torch.tensor([[0.00, 0.30, 0.05], [0.12, 0.00, 0.30], [0.00, 0.50, 0.08]])


def test_ranking_is_by_score_with_seeded_random_ties():
    ranked = rank_heads(SCORES)
    assert ranked[0] == Head(2, 1) and ranked[3] == Head(1, 0)
    assert set(ranked[1:3]) == set(parse_heads("L0H1 L1H2"))  # tied at 0.30
    assert rank_heads(SCORES) == ranked  # seeded: the same order every time
    # 267 heads tied at 0 behind 3 retrieval heads: a top-20 must not be layers 0-2 in order
    many = torch.zeros(30, 9)
    many[17, 3], many[18, 6], many[23, 2] = 0.6, 0.5, 0.4
    top20 = rank_heads(many)[:20]
    assert top20[:3] == parse_heads("L17H3 L18H6 L23H2")
    tail = top20[3:]
    assert len({h.layer for h in tail}) >= 8, tail  # spread over layers, not layer 0 first
    orders = {tuple(rank_heads(many, seed=s)[3:20]) for s in range(3)}
    assert len(orders) == 3  # the tie-break is the seed's, not the grid's


def test_selection_by_threshold_top_k_and_share():
    first4 = parse_heads("L2H1 L0H1 L1H2 L1H0")
    assert set(select_heads(SCORES, threshold=0.1)) == set(first4)
    assert set(select_heads(SCORES, threshold=0.0)) == set(first4) | {Head(2, 2), Head(0, 2)}
    assert select_heads(SCORES, top_k=1) == parse_heads("L2H1")
    assert len(select_heads(SCORES, top_k=2)) == 2
    assert select_heads(SCORES, share=1 / 3)[:3] == rank_heads(SCORES)[:3]
    with pytest.raises(ValueError, match="exactly one"):
        select_heads(SCORES, top_k=2, threshold=0.1)


def test_set_metrics_on_hand_made_sets():
    real = parse_heads("L0H0 L0H1 L1H0 L1H1")
    syn = parse_heads("L0H0 L0H1 L2H2")
    assert recall(syn, real) == 0.5  # 2 of the 4 real heads
    assert precision(syn, real) == pytest.approx(2 / 3)
    assert jaccard(syn, real) == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="non-empty reference"):
        recall(syn, [])


def test_top_k_overlap_and_correlations():
    other = SCORES.clone()
    other[0, 1] = 0.0  # L0H1 leaves the top 3; L1H0 comes in
    assert top_k_overlap(SCORES, other, 3) == pytest.approx(2 / 3)
    c = score_correlations(SCORES, SCORES * 2)
    assert c["pearson"] == pytest.approx(1) and c["cosine"] == pytest.approx(1)
    c = score_correlations(SCORES, -SCORES)
    assert c["spearman"] == pytest.approx(-1)


def test_comparing_models_of_different_shapes_is_refused():
    with pytest.raises(ValueError, match="different shapes"):
        score_correlations(SCORES, torch.zeros(4, 3))


@pytest.mark.parametrize("seed", range(20))
def test_random_complement_never_returns_a_ranked_head(seed):
    shape = HeadShape(30, 9, 3)
    ranked = [Head(layer, h) for layer in range(30) for h in range(9) if (layer + h) % 3 == 0]
    drawn = random_complement(ranked, 20, shape, seed=seed)
    assert len(set(drawn)) == 20 and not set(drawn) & set(ranked)
    assert drawn == random_complement(ranked, 20, shape, seed=seed)


def test_random_complement_can_match_layers():
    top = parse_heads("L2H1 L0H1 L2H0")
    drawn = random_complement(top, 3, HeadShape(3, 4, 1), seed=0, match_layers=top)
    assert sorted(h.layer for h in drawn) == [0, 2, 2]
    # layer 2's complement is exactly {L2H2, L2H3}; layer 0's draw avoids L0H1
    assert {Head(2, 2), Head(2, 3)} <= set(drawn) and Head(0, 1) not in drawn
    # with 3 heads per layer, layer 2 has one head left (L2H2): the other comes from the nearest
    # layer with heads to spare (layer 1, distance 1; never layer 0, distance 2)
    short = random_complement(top, 3, HeadShape(3, 3, 1), seed=0, match_layers=top)
    assert Head(2, 2) in short and sorted(h.layer for h in short) == [0, 1, 2]
    assert not set(short) & set(top)


def test_layer_matched_draws_follow_the_top_k_and_uniform_draws_do_not():
    from mechinterp.analysis.headsets import draw_baseline

    shape = HeadShape(30, 9, 3)
    top = parse_heads("L17H3 L18H6 L18H7 L23H2 L17H4 L20H6 L23H7 L21H8 L24H4 L23H1")
    layers = sorted(h.layer for h in top)
    uniform_layers = []
    for s in range(10):
        matched = draw_baseline(top, top, shape, seed=s, draw="layer_matched")
        assert sorted(h.layer for h in matched) == layers and not set(matched) & set(top)
        uniform = draw_baseline(top, top, shape, seed=s, draw="uniform")
        assert len(uniform) == 10 and not set(uniform) & set(top)
        uniform_layers += [h.layer for h in uniform]
    assert min(uniform_layers) < 10  # uniform draws reach the early layers the top-10 avoid


def test_random_complement_too_large_is_refused():
    with pytest.raises(ValueError, match="cannot draw 8 heads from a complement of 6"):
        random_complement(parse_heads("L0H0 L0H1 L0H2"), 8, HeadShape(3, 3, 1), seed=0)


def test_bootstrap_correlation_with_five_points():
    recall_ = [0.2, 0.4, 0.5, 0.7, 0.9]
    f1 = [0.30, 0.35, 0.50, 0.55, 0.70]
    r = correlate(recall_, f1, method="spearman", n_boot=2000, seed=0)
    assert r.estimate == pytest.approx(1.0) and r.n == 5
    # every resample of a monotone relation is monotone: the percentile CI collapses to [1, 1]
    # (why it is no verdict at this N); the exact permutation p is 2 / 5! (ρ = +1 or −1)
    assert r.low == pytest.approx(1.0) and r.high == pytest.approx(1.0)
    assert 1000 < r.n_valid_boot < 2000  # resamples with a constant x or y are dropped
    assert r.p_permutation == pytest.approx(2 / 120) and r.exact
    p = correlate(recall_, f1, method="pearson", n_boot=2000, seed=0)
    assert 0.9 < p.estimate < 1.0 and p.low < p.estimate
    assert correlate(recall_, f1, n_boot=500, seed=1) == correlate(recall_, f1, n_boot=500, seed=1)
    with pytest.raises(ValueError, match="constant"):
        correlate([1, 1, 1], [1, 2, 3])


def test_wu_json_round_trip_and_errors(tmp_path):
    per = {Head(0, 1): [1.0, 0.0], Head(1, 2): [0.25, 0.25, 0.5]}
    path = write_wu_scores(tmp_path / "heads.json", per)
    assert json.loads(path.read_text()) == {"0-1": [1.0, 0.0], "1-2": [0.25, 0.25, 0.5]}
    scores, back = read_wu_scores(path, HeadShape(2, 3, 1))
    assert back == per and scores.shape == (2, 3)
    assert scores[0, 1] == 0.5 and scores[1, 2] == pytest.approx(1 / 3) and scores[0, 0] == 0
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        read_wu_scores(tmp_path / "empty.json")
    (tmp_path / "bad.json").write_text('{"0_1": [1]}')
    with pytest.raises(ValueError, match="not 'layer-head'"):
        read_wu_scores(tmp_path / "bad.json")
    (tmp_path / "big.json").write_text('{"5-1": [1]}')
    with pytest.raises(ValueError, match="outside the model"):
        read_wu_scores(tmp_path / "big.json", HeadShape(2, 3, 1))


def test_head_sets_from_models_of_different_shapes_are_refused():
    untied = SCORES.clone()
    untied[1, 2] = 0.29
    small = select_heads(untied, top_k=2)
    big = select_heads(torch.rand(4, 3), top_k=2)
    assert small.grid == (3, 3) and small == parse_heads("L2H1 L0H1")
    for metric in (recall, precision, jaccard):
        with pytest.raises(ValueError, match="different shapes"):
            metric(small, big)
    assert recall(small, select_heads(SCORES, threshold=0.1)) == 0.5  # same shape: fine
    assert recall(small, parse_heads("L2H1")) == 1.0  # plain tuples carry no shape


def test_random_complements_vary_with_the_seed_and_avoid_the_ranked_set():
    from mechinterp.analysis.headsets import random_complements

    shape = HeadShape(30, 9, 3)
    ranked = select_heads(torch.rand(30, 9, generator=torch.Generator().manual_seed(0)), top_k=10)
    draws = random_complements(ranked, 10, shape, seeds=range(5))
    assert len({tuple(d) for d in draws.values()}) == 5
    assert all(len(d) == 10 and not set(d) & set(ranked) for d in draws.values())
    assert all(d.grid == (30, 9) for d in draws.values())


def test_the_permutation_p_value_equals_brute_force_enumeration():
    import itertools

    from scipy import stats as sps

    from mechinterp.analysis.stats import correlate

    x, y = [1, 2, 3, 4, 5], [1, 3, 2, 5, 4]
    r = correlate(x, y, n_boot=500)
    assert r.estimate == pytest.approx(0.8) and r.exact and r.n_permutations == 120
    observed = abs(sps.spearmanr(x, y).statistic)
    hits = sum(
        abs(sps.spearmanr(x, list(p)).statistic) >= observed - 1e-12
        for p in itertools.permutations(y)
    )
    assert r.p_permutation == pytest.approx(hits / 120)
    assert r.p_permutation == pytest.approx(16 / 120)  # the p = 0.13 at N = 5
    assert r.low > 0  # where a percentile bootstrap alone would call ρ = 0.8 "supported"


def test_claims_at_small_n_rest_on_the_permutation_p_value():
    from mechinterp.experiments.study.claims import _row

    def row(p):
        return _row("c", "l", "correlation", 0.8, 0.11, 1.0, 5, "ρ", primary=True, null=0.0,
                    minimum=0.5, rule="correlation", p_permutation=p, alpha=0.05)["verdict"]

    assert row(16 / 120) == "inconclusive"
    assert row(0.01) == "supported"
