"""Oracle tests of attribution patching (AtP, AtP*), node patching and screen-then-verify on tiny
models.

References: `hand_references.hand_atp` (autograd on the bridge's hook_z) and `hf_reference`
(the plain HF model reloaded from disk, its attention run by a test function: none of the
bridge, its hooks or the library's caching), by brute force, one forward per variant, on a
pre-norm family (Llama, GQA) and a post-norm one (OLMo-2: q/k norms over all heads, norms after
attention and MLP)."""

from functools import partial

import hf_reference as ref
import pytest
import torch
from hand_references import hand_atp

from mechinterp.analysis.false_negatives import max_above, p_all_missed, p_at_most
from mechinterp.interventions.attribution import attribution_patch
from mechinterp.interventions.patching import logit_diff_metric, patch_heads, patch_nodes

CLEAN = [1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
CORRUPT = [1, 10, 11, 40, 41, 14, 15, 16, 17, 18, 19, 20, 21, 22]  # positions 3-4 replaced
START = 3


def metric_for(model):
    with torch.no_grad():
        lc = model(torch.tensor([CLEAN]))[0, -1]
        lx = model(torch.tensor([CORRUPT]))[0, -1]
    return logit_diff_metric(int((lc - lx).argmax()), int((lx - lc).argmax()))


def effect(res):
    return (res.values - res.corrupt).nan_to_num()


@pytest.fixture(scope="module", params=["llama", "olmo2"])
def pair_model(request, tmp_path_factory):
    """(bridge, reference) of a 3-layer tiny model: Llama with 2 KV heads, or OLMo-2."""
    return ref.bridge_and_reference(request.param, tmp_path_factory.mktemp(request.param))


# ---------------------------------------------------------------- against the HF reference


@pytest.mark.parametrize("node", ["q", "k", "v", "z"])
@pytest.mark.parametrize("per_position", [False, True])
def test_node_patching_equals_patching_the_hf_model(pair_model, node, per_position):
    model, hf = pair_model
    metric = metric_for(model)
    got = patch_nodes(model, CLEAN, CORRUPT, metric, node=node, per_position=per_position)
    want = ref.exact(hf, CLEAN, CORRUPT, metric, node, START, per_position)
    assert got.values.shape == want.shape  # k and v: one unit per KV head
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(effect(got), want, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("node", ["q", "k", "v", "z"])
@pytest.mark.parametrize("per_position", [False, True])
def test_atp_equals_an_hf_autograd_gradient(pair_model, node, per_position):
    model, hf = pair_model
    metric = metric_for(model)
    got = attribution_patch(model, CLEAN, CORRUPT, metric, node=node, per_position=per_position)
    want = ref.atp(hf, CLEAN, CORRUPT, metric, node, START, per_position)
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(effect(got), want, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(got.atp, got.values)  # without options AtP* is AtP


@pytest.mark.parametrize("node", ["q", "k"])
@pytest.mark.parametrize("per_position", [False, True])
def test_qk_fix_is_the_exact_pattern_change_through_the_pattern_gradient(pair_model, node,
                                                                         per_position):  # fmt: skip
    """Σ ∂M/∂A · (A' − A), A' read from a forward of the HF model with the node patched."""
    model, hf = pair_model
    metric = metric_for(model)
    got = attribution_patch(model, CLEAN, CORRUPT, metric, node=node, per_position=per_position,
                            qk_fix=True)  # fmt: skip
    want = ref.qk_fix(hf, CLEAN, CORRUPT, metric, node, START, per_position)
    plain = ref.atp(hf, CLEAN, CORRUPT, metric, node, START, per_position)
    torch.testing.assert_close(effect(got), want, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(got.atp - got.corrupt, plain, atol=2e-6, rtol=1e-4)
    assert (want - plain).abs().max() > 1e-3  # the fix changes the estimate here


@pytest.mark.parametrize("node,qk", [("z", False), ("v", False), ("q", True), ("k", True)])
def test_grad_drop_is_the_mean_magnitude_over_every_dropped_layer(pair_model, node, qk):
    """All L backward passes of the reference (a layer dropped by detaching its attention and
    MLP outputs), summed without the shortcut the implementation takes below the node."""
    model, hf = pair_model
    metric = metric_for(model)
    got = attribution_patch(model, CLEAN, CORRUPT, metric, node=node, qk_fix=qk, grad_drop=True)
    estimate = ref.qk_fix if qk else ref.atp
    want = ref.grad_drop(hf, CLEAN, CORRUPT, metric, node, START, False, estimate)
    torch.testing.assert_close(got.score, want, atol=2e-6, rtol=1e-4)
    assert (got.score - effect(got).abs()).abs().max() > 1e-4  # GradDrop changed the scores
    if qk:  # the ranking score uses the QK-fixed estimates, not AtP's
        unfixed = attribution_patch(model, CLEAN, CORRUPT, metric, node=node, grad_drop=True)
        assert (got.score - unfixed.score).abs().max() > 1e-4


# ---------------------------------------------------------------- where the estimate is exact


@pytest.fixture(scope="module")
def linear_model(tmp_path_factory):
    """A 3-layer GQA Llama whose MLPs write nothing (down projections zeroed)."""
    from mechinterp.models.tiny import tiny_model

    model = tiny_model(n_kv_heads=2, n_layers=3, seed=3,
                       directory=tmp_path_factory.mktemp("linear"))  # fmt: skip
    with torch.no_grad():
        for layer in model.original_model.model.layers:
            layer.mlp.down_proj.weight.zero_()
    return model


def frozen_hooks(model, ids, start, *, free_layer: int | None = None):
    """Hooks that hold every pattern (but `free_layer`'s) and every norm scale at their values
    on `ids`, for the positions a forward computes: all, the cached prefix's `start`, or the
    rest after it."""
    kept = {}

    def grab(x, hook, *, name):
        kept[name] = x.detach().clone()

    names = [n for la in range(model.cfg.n_layers) if la != free_layer
             for n in (f"blocks.{la}.attn.hook_pattern",)]  # fmt: skip
    names += [n for la in range(model.cfg.n_layers)
              for n in (f"blocks.{la}.ln1.hook_scale", f"blocks.{la}.ln2.hook_scale")]  # fmt: skip
    names.append("ln_final.hook_scale")
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


@pytest.mark.parametrize("node", ["q", "k"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_qk_fix_equals_exact_patching_when_only_the_own_softmax_is_nonlinear(linear_model, node,
                                                                             layer):  # fmt: skip
    """Every other pattern, every norm scale frozen and the MLPs silent: the metric is linear
    in the pattern of the node's own layer, so the QK-fixed estimate is exact and AtP (the
    softmax linearised at the target) is not."""
    metric = metric_for(linear_model)
    with linear_model.hooks(fwd_hooks=frozen_hooks(linear_model, CORRUPT, START,
                                                   free_layer=layer)):  # fmt: skip
        units = [f"L{layer}H{u}" for u in range(2 if node == "k" else 4)]
        exact = patch_nodes(linear_model, CLEAN, CORRUPT, metric, node=node, units=units)
        star = attribution_patch(linear_model, CLEAN, CORRUPT, metric, node=node, qk_fix=True)
    torch.testing.assert_close(star.values[layer], exact.values[layer], atol=1e-5, rtol=1e-4)
    assert effect(exact)[layer].abs().max() > 1e-3
    assert (star.atp[layer] - exact.values[layer]).abs().max() > 1e-4


def test_qk_fix_finds_the_heads_a_saturated_softmax_hides(tmp_path):
    """Queries and keys scaled up 6x: patterns near one-hot, whose gradient at the logits is
    near zero. AtP ranks the wrong query and key heads first; AtP*'s QK fix ranks the heads
    exact patching ranks first, and its ranking agrees with exact patching's."""
    from mechinterp.models.tiny import tiny_model

    model = tiny_model(n_kv_heads=2, n_layers=2, seed=2, directory=tmp_path)
    with torch.no_grad():
        for layer in model.original_model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    metric = metric_for(model)

    def spearman(a, b):
        ranks = torch.stack([a.flatten().argsort().argsort(), b.flatten().argsort().argsort()])
        return float(torch.corrcoef(ranks.float())[0, 1])

    for node in ("q", "k"):
        exact = effect(patch_nodes(model, CLEAN, CORRUPT, metric, node=node)).abs()
        plain = attribution_patch(model, CLEAN, CORRUPT, metric, node=node)
        star = attribution_patch(model, CLEAN, CORRUPT, metric, node=node, qk_fix=True)
        best = int(exact.flatten().argmax())
        assert int(star.score.flatten().argmax()) == best, node
        assert int(plain.score.flatten().argmax()) != best, node
        assert spearman(star.score, exact) > spearman(plain.score, exact) + 0.5, node


# ---------------------------------------------------------------- hand-written gradient, z


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("patch_from", [0, 9])
def test_atp_equals_a_hand_written_gradient(tiny, direction, patch_from):
    metric = metric_for(tiny)
    res = attribution_patch(tiny, CLEAN, CORRUPT, metric, direction=direction,
                            patch_from=patch_from)  # fmt: skip
    source, target = (CLEAN, CORRUPT) if direction == "denoise" else (CORRUPT, CLEAN)
    want, m_target = hand_atp(tiny, source, target, metric, start=max(3, patch_from))
    torch.testing.assert_close(res.effect, want, atol=2e-6, rtol=1e-4)
    assert want.abs().max() > 1e-4
    assert (res.corrupt if direction == "denoise" else res.clean) == pytest.approx(m_target)
    per_pos = attribution_patch(tiny, CLEAN, CORRUPT, metric, direction=direction,
                                patch_from=patch_from, per_position=True)  # fmt: skip
    torch.testing.assert_close(per_pos.effect.nansum(-1), want, atol=2e-6, rtol=1e-4)
    assert torch.all(per_pos.effect[..., : max(3, patch_from)] == 0)


# ---------------------------------------------------------------- screen, verify, diagnose


def test_screen_verifies_the_top_and_a_random_sample_of_the_rest_exactly(tiny):
    metric = metric_for(tiny)
    exact = patch_heads(tiny, CLEAN, CORRUPT, metric)
    screened = patch_heads(tiny, CLEAN, CORRUPT, metric, screen="atp*", verify_top=2, sample=3)
    ranking = screened.screen.ranking()
    fn = screened.settings["false_negatives"]
    drawn = set(fn["sampled"])
    assert len(drawn) == 3 and not drawn & {str(h) for h in ranking[:2]}
    patched = {f"L{la}H{h}" for la, h in (~screened.values.isnan()).nonzero().tolist()}
    assert patched == {str(h) for h in ranking[:2]} | drawn
    done = ~screened.values.isnan()
    torch.testing.assert_close(screened.values[done], exact.values[done])
    # the diagnostic recomputed from exact patching of every head
    cut = 0.05 * abs(exact.clean - exact.corrupt)
    above = {str(h) for h in ranking[2:] if abs(float(exact.values[h]) - exact.corrupt) > cut}
    assert set(fn["found"]) == above & drawn
    assert fn["n_unverified"] == 6 and fn["p_miss_one"] == pytest.approx(0.5)
    assert fn["max_above"] == max_above(6, 3, len(fn["found"]), confidence=0.95)
    # sampling every unverified head: the bound is the true count
    whole = patch_heads(tiny, CLEAN, CORRUPT, metric, screen="atp", verify_top=2, sample=6)
    assert whole.settings["false_negatives"]["max_above"] == len(
        {str(h) for h in whole.screen.ranking()[2:]
         if abs(float(exact.values[h]) - exact.corrupt) > cut}
    )  # fmt: skip
    torch.testing.assert_close(whole.values, exact.values)


def test_the_subsampling_bound_by_hand():
    # 5 unverified, 2 sampled: P(none of K above is sampled) = C(5 - K, 2) / C(5, 2)
    assert [p_all_missed(5, k, 2) for k in range(5)] == pytest.approx([1, 0.6, 0.3, 0.1, 0])
    assert max_above(5, 2, 0, confidence=0.9) == 2  # K = 3 gives 0.1, rejected at 0.1
    assert max_above(5, 2, 0, confidence=0.65) == 1  # K = 2 gives 0.3 <= 0.35
    assert max_above(5, 2, 1, confidence=0.9) == 4  # 1 found; all 3 unsampled may be above
    assert p_at_most(1, 5, 3, 2) == pytest.approx(0.7)  # 1 - C(3, 2) / C(5, 2)
    assert max_above(40, 40, 4) == 4
    with pytest.raises(ValueError, match="found <= n_sampled"):
        max_above(5, 2, 3)


def test_bad_options_are_clear_errors(tiny, tiny_gqa):
    metric = metric_for(tiny)
    with pytest.raises(ValueError, match="screen must be"):
        patch_heads(tiny, CLEAN, CORRUPT, metric, screen="eap")
    with pytest.raises(ValueError, match="ranks whole heads"):
        patch_heads(tiny, CLEAN, CORRUPT, metric, screen="atp", per_position=True)
    with pytest.raises(ValueError, match="qk_fix applies to query and key nodes"):
        attribution_patch(tiny, CLEAN, CORRUPT, metric, qk_fix=True)
    with pytest.raises(ValueError, match="node must be one of"):
        attribution_patch(tiny, CLEAN, CORRUPT, metric, node="o")
    with pytest.raises(ValueError, match="same length"):
        attribution_patch(tiny, CLEAN, CORRUPT[:-1], metric)
    with pytest.raises(ValueError, match="KV heads for k and v"):
        patch_nodes(tiny_gqa, CLEAN, CORRUPT, metric_for(tiny_gqa), node="k", units=["L0H3"])
