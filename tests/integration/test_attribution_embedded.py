"""Integration: attribution patching on the embedded SmolLM2-135M-Instruct, on a planted pair of 256
tokens: essay text with "The secret word is apple." halfway in, ending "Now answer: the secret
word is", the corrupt prompt saying "lemon"; metric logit(apple) − logit(lemon) (clean 6.45,
corrupt −7.49), heads patched over the last 8 positions.

Measured (2026-11-30): against exact per-head patching of all 270 heads (largest effect 4.0), AtP
has Spearman 0.980, and the exact top-10 heads all rank within its top 11 (with the planted
sentence a quarter in: 0.9997, top 10). On the study's 9 NIAH pairs
(`benchmarks/bench_attribution.py`) AtP's Spearman is 0.975–1.0. The tolerances (Spearman ≥ 0.9,
exact top-10 inside the top-30, the screened top-10 the exact top-10) fail for a screen that
ranks at random or misses a top head. Queries and keys: the QK-fixed estimate against exact
`patch_nodes` must reach Spearman ≥ 0.95 and not fall below AtP's (on 3 study pairs,
`benchmarks/bench_atp_star.py`, AtP's median is 0.92 for both and the QK fix's 1.00).
"""

import pytest
import torch

from mechinterp.interventions.attribution import attribution_patch
from mechinterp.interventions.patching import logit_diff_metric, patch_heads, patch_nodes
from mechinterp.tasks.haystack import essay_corpus

pytestmark = pytest.mark.integration


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.flatten().argsort().argsort().float()
    rb = b.flatten().argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@pytest.fixture(scope="module")
def pair(smollm):
    tok = smollm.tokenizer
    good, bad = tok.encode(" apple")[-1], tok.encode(" lemon")[-1]
    needle = tok.encode(" The secret word is apple.")
    tail = tok.encode(" Now answer: the secret word is")
    n_fill = 256 - len(needle) - len(tail)
    fill = tok.encode(essay_corpus()[: 8 * n_fill + 64])[:n_fill]
    clean = fill[: n_fill // 2] + needle + fill[n_fill // 2 :] + tail
    corrupt = list(clean)
    corrupt[n_fill // 2 + needle.index(good)] = bad
    return clean, corrupt, logit_diff_metric(good, bad), len(clean) - 8


def test_atp_ranks_the_heads_as_exact_patching_does(smollm, pair):
    clean, corrupt, metric, start = pair
    exact = patch_heads(smollm, clean, corrupt, metric, patch_from=start)
    assert exact.clean > 0 > exact.corrupt  # the corruption flips the answer
    effect = exact.values - exact.corrupt
    top10 = set(effect.abs().flatten().argsort(descending=True)[:10].tolist())
    for opts in ({}, {"grad_drop": True}):
        est = attribution_patch(smollm, clean, corrupt, metric, patch_from=start, **opts)
        assert spearman(est.effect, effect) >= 0.9, opts
        top30 = set(est.score.flatten().argsort(descending=True)[:30].tolist())
        assert top10 <= top30, opts
    screened = patch_heads(smollm, clean, corrupt, metric, patch_from=start, screen="atp",
                           verify_top=30)  # fmt: skip
    got = (screened.values - screened.corrupt).abs().nan_to_num(-1.0)
    assert set(got.flatten().argsort(descending=True)[:10].tolist()) == top10


@pytest.mark.parametrize("node", ["q", "k"])
def test_the_qk_fix_ranks_queries_and_keys_at_least_as_exact_patching_does(smollm, pair, node):
    clean, corrupt, metric, start = pair
    exact = patch_nodes(smollm, clean, corrupt, metric, node=node, patch_from=start)
    effect = exact.values - exact.corrupt
    plain = attribution_patch(smollm, clean, corrupt, metric, node=node, patch_from=start)
    fixed = attribution_patch(smollm, clean, corrupt, metric, node=node, patch_from=start,
                              qk_fix=True)  # fmt: skip
    assert spearman(fixed.effect, effect) >= 0.95
    assert spearman(fixed.effect, effect) >= spearman(plain.effect, effect) - 0.005
    top10 = set(effect.abs().flatten().argsort(descending=True)[:10].tolist())
    assert top10 <= set(fixed.score.flatten().argsort(descending=True)[:30].tolist())
