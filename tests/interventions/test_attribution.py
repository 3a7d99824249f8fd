"""Oracle tests of attribution patching (AtP, AtP*) and screen-then-verify on tiny models."""

from functools import partial

import pytest
import torch
from hand_references import hand_atp

from mechinterp.interventions.attribution import attribution_patch
from mechinterp.interventions.patching import logit_diff_metric, patch_heads

CLEAN = [1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
CORRUPT = [1, 10, 11, 40, 41, 14, 15, 16, 17, 18, 19, 20, 21, 22]  # positions 3-4 replaced


def metric_for(model):
    with torch.no_grad():
        lc = model(torch.tensor([CLEAN]))[0, -1]
        lx = model(torch.tensor([CORRUPT]))[0, -1]
    return logit_diff_metric(int((lc - lx).argmax()), int((lx - lc).argmax()))


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("patch_from", [0, 9])
def test_atp_equals_a_hand_written_gradient(tiny, direction, patch_from):
    metric = metric_for(tiny)
    res = attribution_patch(tiny, CLEAN, CORRUPT, metric, direction=direction,
                            patch_from=patch_from)  # fmt: skip
    source, target = (CLEAN, CORRUPT) if direction == "denoise" else (CORRUPT, CLEAN)
    ref, m_target = hand_atp(tiny, source, target, metric, start=max(3, patch_from))
    torch.testing.assert_close(res.effect, ref, atol=2e-6, rtol=1e-4)
    assert ref.abs().max() > 1e-4
    assert (res.corrupt if direction == "denoise" else res.clean) == pytest.approx(m_target)
    per_pos = attribution_patch(tiny, CLEAN, CORRUPT, metric, direction=direction,
                                patch_from=patch_from, per_position=True)  # fmt: skip
    torch.testing.assert_close(per_pos.effect.nansum(-1), ref, atol=2e-6, rtol=1e-4)
    assert torch.all(per_pos.effect[..., : max(3, patch_from)] == 0)


@pytest.fixture(scope="module")
def linear_model(tmp_path_factory):
    """A 3-layer GQA Llama whose MLPs write nothing (down projections zeroed)."""
    from mechinterp.models.tiny import tiny_model

    model = tiny_model(n_layers=3, n_kv_heads=2, seed=3,
                       directory=tmp_path_factory.mktemp("linear"))  # fmt: skip
    with torch.no_grad():
        for layer in model.original_model.model.layers:
            layer.mlp.down_proj.weight.zero_()
    return model


def frozen_hooks(model, ids, start):
    """Hooks that hold every pattern and every norm scale at their values on `ids`, for the
    positions a forward computes: all, the cached prefix's `start`, or the rest after it."""
    kept = {}

    def grab(x, hook, *, name):
        kept[name] = x.detach().clone()

    names = [n for la in range(model.cfg.n_layers)
             for n in (f"blocks.{la}.attn.hook_pattern", f"blocks.{la}.ln1.hook_scale",
                       f"blocks.{la}.ln2.hook_scale")] + ["ln_final.hook_scale"]  # fmt: skip
    with torch.no_grad(), model.hooks(fwd_hooks=[(n, partial(grab, name=n)) for n in names]):
        model(torch.tensor([ids]))

    def hold(x, hook, *, name):
        v = kept[name]
        n = x.shape[-2] if "pattern" in name else x.shape[1]
        rows = slice(0, n) if n == start else slice(len(ids) - n, len(ids))
        if "pattern" in name:
            return v[..., rows, : rows.stop].expand_as(x).clone()
        return v[:, rows].expand_as(x).clone()

    return [(n, partial(hold, name=n)) for n in names]


@pytest.mark.parametrize("patch_from", [0, 9])
def test_atp_equals_exact_patching_when_everything_downstream_is_linear(linear_model, patch_from):
    metric = metric_for(linear_model)
    start = max(3, patch_from)  # the first corrupted position is 3
    with linear_model.hooks(fwd_hooks=frozen_hooks(linear_model, CORRUPT, start)):
        exact = patch_heads(linear_model, CLEAN, CORRUPT, metric, patch_from=patch_from)
        atp = attribution_patch(linear_model, CLEAN, CORRUPT, metric, patch_from=patch_from)
    torch.testing.assert_close(atp.values, exact.values, atol=1e-5, rtol=1e-5)
    assert (exact.values - exact.corrupt).abs().max() > 1e-3
    # the same comparison with the patterns and norms free fails: the test can tell
    free = patch_heads(linear_model, CLEAN, CORRUPT, metric, patch_from=patch_from)
    free_atp = attribution_patch(linear_model, CLEAN, CORRUPT, metric, patch_from=patch_from)
    assert (free.values - free_atp.values).abs().max() > 1e-4


def test_qk_fix_replaces_the_linear_pattern_change_with_the_exact_one(tiny, tmp_path):
    """Two layers: the fix for a layer-0 head is Σ (A' − A − lin)·∂M/∂A over layer 1's
    pattern, A' the pattern with the head's write added to layer 1's residual input; computed
    here from the explicit path's scores and an autograd gradient on the pattern."""
    metric = metric_for(tiny)
    start = 3
    plain = attribution_patch(tiny, CLEAN, CORRUPT, metric)
    fixed = attribution_patch(tiny, CLEAN, CORRUPT, metric, qk_fix=True)
    n_heads, d_head = tiny.cfg.n_heads, tiny.cfg.d_head
    z = {}

    def keep(x, hook, *, store, name):
        store[name] = x.detach().clone()

    names = ["blocks.0.attn.hook_z", "blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_pattern"]
    runs = {}
    for name, ids in (("clean", CLEAN), ("corrupt", CORRUPT)):
        runs[name] = {}
        with torch.no_grad(), tiny.hooks(fwd_hooks=[(n, partial(keep, store=runs[name], name=n))
                                                    for n in names]):  # fmt: skip
            tiny(torch.tensor([ids]))
    pattern = {}

    def grad_on(x, hook):
        pattern["A"] = x
        return x

    with torch.enable_grad(), tiny.hooks(fwd_hooks=[
        ("blocks.0.hook_resid_pre", lambda x, hook: x.detach().requires_grad_(True)),
        ("blocks.1.attn.hook_pattern", grad_on),
    ]):  # fmt: skip
        m = metric(tiny(torch.tensor([CORRUPT]))[:, -1])[0]
        (dmda,) = torch.autograd.grad(m, [pattern["A"]])
    tgt = runs["corrupt"]
    A, S = tgt["blocks.1.attn.hook_pattern"][0], tgt["blocks.1.attn.hook_attn_scores"][0]
    z = {k: v["blocks.0.attn.hook_z"][0].reshape(-1, n_heads, d_head) for k, v in runs.items()}
    w_o = tiny.blocks[0].attn.W_O  # [head, d_head, d_model]
    for h in range(n_heads):
        write = torch.zeros(len(CLEAN), tiny.cfg.d_model)
        write[start:] = (z["clean"][start:, h] - z["corrupt"][start:, h]) @ w_o[h]
        got = {}
        hooks = [("blocks.1.hook_resid_pre", lambda x, hook, w=write: x + w)]
        hooks += [(n, partial(keep, store=got, name=n)) for n in names[1:]]
        with torch.no_grad(), tiny.hooks(fwd_hooks=hooks):
            tiny(torch.tensor([CORRUPT]))
        A2, S2 = got["blocks.1.attn.hook_pattern"][0], got["blocks.1.attn.hook_attn_scores"][0]
        dS = S2 - S
        lin = A * (dS - (A * dS).sum(-1, keepdim=True))
        want = float(((A2 - A - lin) * dmda[0]).sum())
        got_fix = float(fixed.effect[0, h] - plain.effect[0, h])
        assert got_fix == pytest.approx(want, abs=1e-6, rel=1e-3)
    torch.testing.assert_close(fixed.effect[1], plain.effect[1])  # no layer after the last
    torch.testing.assert_close(fixed.atp, plain.values)  # AtP* carries the AtP it starts from
    assert fixed.settings["seconds_atp"] <= fixed.settings["seconds"]


def test_grad_drop_scores_the_last_layer_by_its_atp_and_earlier_heads_by_the_drops(tiny):
    metric = metric_for(tiny)
    plain = attribution_patch(tiny, CLEAN, CORRUPT, metric)
    dropped = attribution_patch(tiny, CLEAN, CORRUPT, metric, grad_drop=True)
    torch.testing.assert_close(dropped.score[1], plain.effect[1].abs())
    torch.testing.assert_close(dropped.values, plain.values)  # the signed estimate is AtP's
    # layer 0 with 2 layers: drop 0 gives 0, drop 1 leaves the paths that skip layer 1
    freeze = [(f"blocks.1.hook_{w}_out", lambda x, hook: x.detach()) for w in ("attn", "mlp")]
    with tiny.hooks(fwd_hooks=freeze):
        direct = attribution_patch(tiny, CLEAN, CORRUPT, metric)
    torch.testing.assert_close(dropped.score[0], direct.effect[0].abs(), atol=1e-6, rtol=1e-4)


def test_screen_then_verify_patches_the_top_heads_exactly(tiny):
    metric = metric_for(tiny)
    exact = patch_heads(tiny, CLEAN, CORRUPT, metric)
    screened = patch_heads(tiny, CLEAN, CORRUPT, metric, screen="atp*", verify_top=3)
    verified = ~screened.values.isnan()
    assert int(verified.sum()) == 3
    torch.testing.assert_close(screened.values[verified], exact.values[verified])
    ranking = screened.screen.ranking()
    assert {(h.layer, h.head) for h in ranking[:3]} == set(map(tuple, verified.nonzero().tolist()))
    assert screened.settings["screen_misses"][3] == 0  # every verified head is within the top 3
    whole = patch_heads(tiny, CLEAN, CORRUPT, metric, screen="atp", verify_top=100)
    torch.testing.assert_close(whole.values, exact.values)


def test_bad_screen_options_are_clear_errors(tiny):
    metric = metric_for(tiny)
    with pytest.raises(ValueError, match="screen must be"):
        patch_heads(tiny, CLEAN, CORRUPT, metric, screen="eap")
    with pytest.raises(ValueError, match="ranks whole heads"):
        patch_heads(tiny, CLEAN, CORRUPT, metric, screen="atp", per_position=True)
    with pytest.raises(ValueError, match="qk_fix estimates whole heads"):
        attribution_patch(tiny, CLEAN, CORRUPT, metric, qk_fix=True, per_position=True)
    with pytest.raises(ValueError, match="same length"):
        attribution_patch(tiny, CLEAN, CORRUPT[:-1], metric)
