"""Oracle tests of the knockout modes on tiny MHA/GQA/MQA models (hand-written references)."""

import json

import pytest
import torch

from mechinterp.evaluate import generate, left_pad
from mechinterp.heads import Head, HeadShape
from mechinterp.interventions import (
    MODES,
    KnockoutSpec,
    knockout,
    mean_reference,
    resample_reference,
)

PROMPTS = [[1, 10, 11, 12, 13, 14, 15, 16, 17], [1, 20, 21, 22, 23, 24]]  # left-padded batch
HEAD = Head(1, 1)


def batch(model):
    return left_pad(model, PROMPTS)


def capture(model, names, spec=None, reference=None, **kw):
    ids, mask = batch(model)
    got = {}

    def grab(x, hook):
        got[hook.name] = x.detach().clone()

    spec = spec or KnockoutSpec()
    with (
        knockout(model, spec, reference=reference),
        model.hooks(fwd_hooks=[(n, grab) for n in names]),
        torch.no_grad(),
    ):
        logits = model(ids, attention_mask=mask, **kw)
    return logits, got


def spec_for(mode, model, **kw):
    if mode == "edge_knockout":
        kw.setdefault("key_positions", (1, 2, 3))
    return KnockoutSpec(heads=(HEAD, Head(0, 2)), mode=mode, **kw)


def reference_for(mode, model):
    heads = (HEAD, Head(0, 2))
    if mode == "mean":
        return mean_reference(model, [[1, 30, 31, 32, 33, 34, 35, 36, 37], [1, 40, 41]], heads)
    if mode == "resample":
        return resample_reference(model, [1, 50, 51, 52, 53, 54, 55, 56, 57, 58], heads)
    return None


def test_empty_spec_is_bit_identical(tiny):
    base, _ = capture(tiny, [])
    ids, mask = batch(tiny)
    with knockout(tiny, KnockoutSpec()), torch.no_grad():
        assert torch.equal(tiny(ids, attention_mask=mask), base)
    with knockout(tiny, KnockoutSpec()):
        assert generate(tiny, PROMPTS, max_new_tokens=5) == generate(
            tiny, PROMPTS, max_new_tokens=5
        )


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_moves_the_logits_and_only_its_heads(tiny, mode):
    base, got0 = capture(tiny, ["blocks.0.attn.hook_z"])
    spec = spec_for(mode, tiny)
    out, got = capture(tiny, ["blocks.0.attn.hook_z"], spec, reference_for(mode, tiny))
    ids, mask = batch(tiny)
    real = mask.bool()
    assert (out - base)[real].abs().max() > 1e-4
    z0, z1 = got0["blocks.0.attn.o.hook_in"], got["blocks.0.attn.o.hook_in"]
    z0, z1 = z0.view(*z0.shape[:2], 4, -1), z1.view(*z1.shape[:2], 4, -1)
    others = [h for h in range(4) if h != 2]  # incl. head 2's KV siblings under GQA/MQA
    assert torch.equal(z0[:, :, others][real], z1[:, :, others][real])
    assert not torch.allclose(z0[:, :, 2][real], z1[:, :, 2][real])


def test_spec_round_trips_through_json():
    spec = KnockoutSpec(
        heads=("L1H1", "0-2"),
        mode="edge_knockout",
        scope="response",
        query_positions=(5, 6),
        key_positions=(1, 2),
    )
    again = KnockoutSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.heads == (Head(1, 1), Head(0, 2))


def attn_output_ref(model, z, layer):
    """o_proj(z) by hand: z [b, pos, head, d] → [b, pos, d_model]."""
    w = model.original_model.model.layers[layer].self_attn.o.original_component.weight
    return torch.einsum("bphd,mhd->bpm", z, w.view(w.shape[0], z.shape[2], z.shape[3]))


def test_zero_makes_the_heads_contribution_exactly_zero(tiny):
    names = ["blocks.1.attn.hook_z", "blocks.1.attn.hook_out"]
    _, base = capture(tiny, names)
    _, ko = capture(tiny, names, KnockoutSpec(heads=(HEAD,), mode="zero"))
    z = base["blocks.1.attn.o.hook_in"]
    z = z.view(*z.shape[:2], 4, -1).clone()
    z_ko = ko["blocks.1.attn.o.hook_in"].view_as(z)
    real = batch(tiny)[1].bool()  # pad positions are not touched (nothing reads them)
    assert torch.equal(z_ko[:, :, 1][real], torch.zeros_like(z_ko[:, :, 1][real]))
    z[:, :, 1] = 0
    torch.testing.assert_close(
        ko["blocks.1.attn.hook_out"][real], attn_output_ref(tiny, z, 1)[real]
    )
    # the output moved by exactly that head's contribution
    only = torch.zeros_like(z)
    only[:, :, 1] = base["blocks.1.attn.o.hook_in"].view_as(z)[:, :, 1]
    torch.testing.assert_close(
        (base["blocks.1.attn.hook_out"] - ko["blocks.1.attn.hook_out"])[real],
        (attn_output_ref(tiny, only, 1) - attn_output_ref(tiny, torch.zeros_like(z), 1))[real],
    )


def test_uniform_attention_outputs_the_mean_of_visible_values(tiny):
    names = ["blocks.1.attn.hook_z", "blocks.1.attn.hook_v"]
    _, got = capture(tiny, names, KnockoutSpec(heads=(HEAD,), mode="uniform_attention"))
    shape = HeadShape.of(tiny)
    v = got["blocks.1.attn.v.hook_out"]  # [b, pos, n_kv, d]
    z = got["blocks.1.attn.o.hook_in"].view(*v.shape[:2], 4, -1)
    ids, mask = batch(tiny)
    for r in range(len(PROMPTS)):
        start = int((mask[r] == 0).sum())
        vals = v[r, start:, shape.kv_head(HEAD)]  # the real keys of row r
        ref = vals.cumsum(0) / torch.arange(1, len(vals) + 1)[:, None]  # causal running mean
        torch.testing.assert_close(z[r, start:, 1], ref)


def test_edge_knockout_cuts_only_the_chosen_edges_and_rows_renormalise(tiny):
    names = ["blocks.1.attn.hook_pattern"]
    spec = KnockoutSpec(
        heads=(HEAD,), mode="edge_knockout", query_positions=(4, 5), key_positions=(1, 2)
    )
    _, base = capture(tiny, names)
    _, ko = capture(tiny, names, spec)
    p0, p1 = base[names[0]], ko[names[0]]
    ids, mask = batch(tiny)
    for r in range(len(PROMPTS)):
        off = int((mask[r] == 0).sum())
        q, k = [off + 4, off + 5], [off + 1, off + 2]
        row0, row1 = p0[r, 1, q], p1[r, 1, q]
        assert row1[:, k].abs().max() < 1e-6
        keep = row0.clone()
        keep[:, k] = 0
        torch.testing.assert_close(row1, keep / keep.sum(-1, keepdim=True))
        torch.testing.assert_close(p1[r, 1].sum(-1)[off:], torch.ones(len(PROMPTS[r])))
        untouched = torch.ones_like(p0[r, 1], dtype=torch.bool)
        untouched[q] = False
        assert torch.equal(p0[r, 1][untouched], p1[r, 1][untouched])
        assert torch.equal(p0[r, [0, 2, 3]], p1[r, [0, 2, 3]])


def test_mean_and_resample_write_the_reference_z(tiny):
    heads = (HEAD,)
    res = resample_reference(tiny, [1, 50, 51, 52, 53, 54, 55, 56, 57, 58], heads)
    _, got = capture(tiny, ["blocks.1.attn.hook_z"], KnockoutSpec(heads, "resample"), res)
    z = got["blocks.1.attn.o.hook_in"].view(2, 9, 4, -1)
    assert torch.equal(z[0, :, 1], res.z[:9, 0])  # row 0 is unpadded: positions 0..8
    assert torch.equal(z[1, 3:, 1], res.z[:6, 0])  # row 1 has 3 pads: its position 0 is index 3
    mean = mean_reference(tiny, [[1, 30, 31], [1, 40, 41, 42]], heads)
    _, got = capture(tiny, ["blocks.1.attn.hook_z"], KnockoutSpec(heads, "mean"), mean)
    z = got["blocks.1.attn.o.hook_in"].view(2, 9, 4, -1)
    assert torch.equal(z[0, :, 1], mean.z[0].expand(9, -1))


@pytest.mark.parametrize("mode", MODES)
def test_knockout_holds_across_cached_generation_steps(tiny_gqa, mode):
    """Greedy tokens generated under knockout with a KV cache equal those of a cache-free loop
    that re-runs the whole sequence under the same knockout at every step."""
    spec = spec_for(mode, tiny_gqa)
    ref = reference_for(mode, tiny_gqa)
    if mode == "resample":
        ref = resample_reference(tiny_gqa, list(range(1, 40)), spec.heads)
    with knockout(tiny_gqa, spec, reference=ref) as stats:
        gens = generate(tiny_gqa, PROMPTS, max_new_tokens=6, stop_ids=frozenset())
    assert stats["edited"] >= 6 * 2  # every forward, in both layers
    for p, g in zip(PROMPTS, gens, strict=True):
        seq = list(p)
        for tok in g.tokens:
            with knockout(tiny_gqa, spec, reference=ref), torch.no_grad():
                nxt = int(tiny_gqa(torch.tensor([seq]))[0, -1].argmax())
            assert nxt == tok
            seq.append(nxt)
    plain = generate(tiny_gqa, PROMPTS, max_new_tokens=6, stop_ids=frozenset())
    assert [g.tokens for g in plain] != [g.tokens for g in gens] or mode == "edge_knockout"


def _last_logits(model, seq, spec, **kw):
    with knockout(model, spec, **kw), torch.no_grad():
        return model(torch.tensor([seq]))[0, -1]


@pytest.mark.parametrize("mode", ["zero", "uniform_attention"])
def test_response_scope_means_the_same_positions_in_generation_and_teacher_forcing(tiny_gqa, mode):
    """Scope `response` = the prompt's last position and every later one, whether read off cached
    generation (inferred) or given as starts= to one teacher-forced forward; the old `decode`
    scope missed the prompt's last position, which writes the first token."""
    spec = KnockoutSpec(heads=(HEAD, Head(0, 2)), mode=mode, scope="response")
    with knockout(tiny_gqa, spec) as stats:
        gens = generate(tiny_gqa, PROMPTS, max_new_tokens=5, stop_ids=frozenset())
    assert stats["in_scope"] == 2 * 5  # per row: the prompt's last position, then 4 steps
    for p, g in zip(PROMPTS, gens, strict=True):
        seq = list(p)
        for tok in g.tokens:  # each step: one cache-free forward over everything so far
            nxt = int(_last_logits(tiny_gqa, seq, spec, starts=len(p) - 1).argmax())
            assert nxt == tok
            seq.append(nxt)
    # the first token is written under knockout: its logits are not the plain model's
    p = PROMPTS[0]
    plain = _last_logits(tiny_gqa, p, KnockoutSpec())
    knocked = _last_logits(tiny_gqa, p, spec, starts=len(p) - 1)
    assert (plain - knocked).abs().max() > 1e-3
    # and a start past the prompt leaves that position alone: only later positions are in scope
    with pytest.raises(ValueError, match="covered no position"):
        _last_logits(tiny_gqa, p, spec, starts=len(p))


def test_scopes_that_cannot_be_placed_are_refused(tiny_gqa):
    ids = torch.tensor([PROMPTS[0]])
    with pytest.raises(ValueError, match="applies to cached generation only"):
        with knockout(tiny_gqa, KnockoutSpec(heads=(HEAD,), scope="response")):
            tiny_gqa(ids)  # a teacher-forced forward: where the response starts is unknown
    with pytest.raises(ValueError, match="needs starts="):
        with knockout(tiny_gqa, KnockoutSpec(heads=(HEAD,), scope="query")):
            pass
    with pytest.raises(ValueError, match="'decode' is 'response'"):
        KnockoutSpec(heads=(HEAD,), scope="decode")
    with pytest.raises(ValueError, match="starts has 3 entries but the batch has 1 rows"):
        _last_logits(tiny_gqa, PROMPTS[0], KnockoutSpec(heads=(HEAD,), scope="query"),
                     starts=[1, 2, 3])


def test_the_condition_scorer_knocks_out_the_scopes_positions(tiny_gqa):
    """score_conditions with a shared prefix of scope_start positions = one forward under
    knockout(starts=scope_start): the same positions, so the same answer log-probs."""
    from mechinterp.interventions.conditions import score_conditions

    prompt = PROMPTS[0]
    ids = list(prompt) + [30, 31, 32]
    answer = (len(prompt), len(ids))
    start = len(prompt) - 1  # scope_start(prompt, "response")
    for mode in ("zero", "uniform_attention"):
        spec = KnockoutSpec(heads=(HEAD, Head(0, 2)), mode=mode)
        scored = score_conditions(tiny_gqa, ids, answer, [KnockoutSpec(), spec],
                                  shared_prefix=start)  # fmt: skip
        scoped = KnockoutSpec(heads=spec.heads, mode=mode, scope="response")
        with knockout(tiny_gqa, scoped, starts=start), torch.no_grad():
            logits = tiny_gqa(torch.tensor([ids]))[0, answer[0] - 1 : answer[1] - 1]
        logp = logits.float().log_softmax(-1).gather(-1, torch.tensor(ids[answer[0]:])[:, None])
        torch.testing.assert_close(scored.logprobs[1], logp[:, 0], atol=1e-5, rtol=0)
        assert (scored.logprobs[1] - scored.logprobs[0]).abs().max() > 1e-4


def test_bad_specs_are_clear_errors(tiny):
    with pytest.raises(ValueError, match="outside the model"):
        with knockout(tiny, KnockoutSpec(heads=(Head(5, 0),))):
            pass
    with pytest.raises(ValueError, match="needs key_positions"):
        KnockoutSpec(heads=(HEAD,), mode="edge_knockout")
    with pytest.raises(ValueError, match="needs reference="):
        with knockout(tiny, KnockoutSpec(heads=(HEAD,), mode="mean")):
            pass
    with pytest.raises(ValueError, match="unknown knockout mode"):
        KnockoutSpec(heads=(HEAD,), mode="ablate")
    far = KnockoutSpec(heads=(HEAD,), mode="zero", query_positions=(3, 40))
    with pytest.raises(ValueError, match=r"query_positions \[40\] lie outside every sequence"):
        capture(tiny, [], far)  # the longest prompt has 9 positions
    far = KnockoutSpec(heads=(HEAD,), mode="edge_knockout", key_positions=(9,))
    with pytest.raises(ValueError, match="longest has 9 positions"):
        capture(tiny, [], far)
    short = resample_reference(tiny, [1, 2, 3], (HEAD,))
    with pytest.raises(ValueError, match="covers 3 positions"):
        capture(tiny, [], KnockoutSpec((HEAD,), "resample"), short)


def test_post_softmax_scores_are_refused(tiny):
    """A bridge whose hook_attn_scores carries probabilities would drop edits: refuse it."""

    def to_probs(scores, hook):
        return scores.softmax(-1)

    ids, mask = batch(tiny)
    with tiny.hooks(fwd_hooks=[("blocks.1.attn.hook_attn_scores", to_probs)]):
        with pytest.raises(RuntimeError, match="post-softmax"):
            with knockout(tiny, KnockoutSpec(heads=(HEAD,), mode="uniform_attention")):
                tiny(torch.tensor([PROMPTS[0]]))
