"""Per-row knockout conditions and prefix-shared condition scoring, against plain `knockout`."""

from __future__ import annotations

import pytest
import torch

from mechinterp.heads import parse_heads
from mechinterp.interventions.conditions import (
    generate_conditions,
    knockout_rows,
    score_conditions,
)
from mechinterp.interventions.knockout import KnockoutSpec, knockout

SPECS = [
    KnockoutSpec(),
    KnockoutSpec(heads=parse_heads("L0H1 L1H2"), mode="zero"),
    KnockoutSpec(heads=parse_heads("L1H0 L0H3"), mode="uniform_attention"),
    KnockoutSpec(heads=parse_heads("L1H1"), mode="zero"),
]


def _ids(model, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.cfg.d_vocab, (n,), generator=g).tolist()


def _reference(model, ids, answer, spec, query_from):
    """Plain knockout on the full sequence, limited to positions >= query_from."""
    a0, a1 = answer
    if spec.heads:
        spec = KnockoutSpec(
            heads=spec.heads, mode=spec.mode, query_positions=tuple(range(query_from, len(ids)))
        )
    with torch.no_grad(), knockout(model, spec):
        logits = model(torch.tensor([ids]))[0, a0 - 1 : a1 - 1].float()
    logp = logits.log_softmax(-1)
    target = torch.tensor(ids[a0:a1])
    return logp.gather(-1, target[:, None])[:, 0], logits.argmax(-1) == target


def _greedy_reference(model, ids, spec, query_from, n_new):
    """Greedy decoding with no KV cache: every step reruns the whole sequence under a plain
    knockout limited to positions >= query_from."""
    seq = list(ids)
    for _ in range(n_new):
        knock = spec
        if spec.heads:
            positions = tuple(range(query_from, len(seq)))
            knock = KnockoutSpec(heads=spec.heads, mode=spec.mode, query_positions=positions)
        with torch.no_grad(), knockout(model, knock):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids) :]


@pytest.mark.parametrize("shared", [0, 15, 19])
def test_generate_conditions_equals_uncached_greedy_decoding_per_condition(tiny, shared):
    ids = _ids(tiny, 20, seed=2)
    gens = generate_conditions(tiny, ids, SPECS, shared_prefix=shared, max_new_tokens=6)
    got = [list(g.tokens) for g in gens]
    want = [_greedy_reference(tiny, ids, spec, shared, len(got[r])) for r, spec in enumerate(SPECS)]
    assert got == want
    assert got[1] != got[0] or got[2] != got[0]  # some knockout changed what is written
    with pytest.raises(ValueError, match="shared_prefix"):
        generate_conditions(tiny, ids, SPECS, shared_prefix=len(ids))


@pytest.mark.parametrize(("shared", "max_rows"), [(0, 64), (10, 64), (10, 3)])
def test_score_conditions_equals_one_knockout_per_condition(tiny, shared, max_rows):
    ids = _ids(tiny)
    answer = (19, 24)
    got = score_conditions(tiny, ids, answer, SPECS, shared_prefix=shared, max_rows=max_rows)
    for r, spec in enumerate(SPECS):
        logp, top1 = _reference(tiny, ids, answer, spec, shared)
        torch.testing.assert_close(got.logprobs[r], logp, atol=1e-5, rtol=1e-5)
        assert torch.equal(got.top1[r], top1)
    # the knockouts moved the scores; the empty row did not
    assert not torch.allclose(got.logprobs[1], got.logprobs[0])
    assert not torch.allclose(got.logprobs[2], got.logprobs[0])


def test_knockout_rows_only_touches_its_row(tiny):
    ids = torch.tensor([_ids(tiny, 16, seed=1)]).expand(len(SPECS), -1)
    with torch.no_grad():
        plain = tiny(ids[:1])
        with knockout_rows(tiny, SPECS) as stats:
            rows = tiny(ids)
    assert stats["forwards"] == 1 and stats["edited"] > 0
    torch.testing.assert_close(rows[0], plain[0], atol=1e-5, rtol=1e-5)
    for r in range(1, len(SPECS)):
        assert not torch.allclose(rows[r], plain[0], atol=1e-4)


def test_knockout_rows_rejects_mismatched_batches_and_modes(tiny):
    with pytest.raises(ValueError, match="2 rows but 4 specs"):
        with torch.no_grad(), knockout_rows(tiny, SPECS):
            tiny(torch.tensor([_ids(tiny, 8)] * 2))
    with pytest.raises(ValueError, match="supports modes"):
        with knockout_rows(tiny, [KnockoutSpec(heads=parse_heads("L0H0"), mode="mean")]):
            pass
    with pytest.raises(ValueError, match="shared_prefix"):
        score_conditions(tiny, _ids(tiny), (10, 12), SPECS, shared_prefix=10)
