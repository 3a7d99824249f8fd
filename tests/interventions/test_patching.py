"""Oracle tests of per-head activation patching on tiny MHA/GQA/MQA models."""

import pytest
import torch
from transformer_lens import patching as tl_patching

from mechinterp.heads import HeadShape
from mechinterp.interventions import KnockoutSpec, knockout, resample_reference
from mechinterp.interventions.patching import (
    logit_diff_metric,
    logprob_metric,
    normalised_recovery,
    patch_heads,
    run_from_layer,
)

CLEAN = [1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
CORRUPT = [1, 10, 11, 40, 41, 14, 15, 16, 17, 18, 19]  # positions 3-4 replaced


def metric_for(model):
    with torch.no_grad():
        lc = model(torch.tensor([CLEAN]))[0, -1]
        lx = model(torch.tensor([CORRUPT]))[0, -1]
    # the token the clean run prefers most over the corrupt run, and the reverse
    return int((lc - lx).argmax()), int((lx - lc).argmax())


def test_run_from_layer_reproduces_the_full_forward(tiny):
    ids = torch.tensor([CLEAN, CORRUPT])
    resid = []

    def keep(x, hook):
        resid.append(x.detach().clone())

    names = [f"blocks.{la}.hook_resid_pre" for la in range(tiny.cfg.n_layers)]
    with torch.no_grad(), tiny.hooks(fwd_hooks=[(n, keep) for n in names]):
        full = tiny(ids)[:, -1]
    for la in range(tiny.cfg.n_layers):
        torch.testing.assert_close(run_from_layer(tiny, resid[la], la), full)
    with pytest.raises(ValueError, match="outside the model"):
        run_from_layer(tiny, resid[0], 7)


def test_per_head_patching_equals_transformer_lens(tiny):
    good, bad = metric_for(tiny)
    ours = patch_heads(tiny, CLEAN, CORRUPT, logit_diff_metric(good, bad), batch_size=3)
    _, clean_cache = tiny.run_with_cache(torch.tensor([CLEAN]))
    theirs = tl_patching.get_act_patch_attn_head_out_all_pos(
        tiny, torch.tensor([CORRUPT]), clean_cache, lambda lg: lg[0, -1, good] - lg[0, -1, bad]
    )
    torch.testing.assert_close(ours.values, theirs.float(), atol=1e-5, rtol=0)
    assert ours.values.abs().max() > 1e-3


def test_late_corruption_shares_the_prefix_cache_and_still_equals_transformer_lens(tiny_gqa):
    corrupt = CLEAN[:8] + [60] + CLEAN[9:]
    with torch.no_grad():
        lc = tiny_gqa(torch.tensor([CLEAN]))[0, -1]
        lx = tiny_gqa(torch.tensor([corrupt]))[0, -1]
    good, bad = int((lc - lx).argmax()), int((lx - lc).argmax())
    ours = patch_heads(tiny_gqa, CLEAN, corrupt, logit_diff_metric(good, bad), direction="noise")
    assert ours.settings["shared_prefix"] == 8
    _, corrupt_cache = tiny_gqa.run_with_cache(torch.tensor([corrupt]))
    theirs = tl_patching.get_act_patch_attn_head_out_all_pos(
        tiny_gqa, torch.tensor([CLEAN]), corrupt_cache, lambda lg: lg[0, -1, good] - lg[0, -1, bad]
    )
    torch.testing.assert_close(ours.values, theirs.float(), atol=1e-5, rtol=0)


def test_per_position_patching_equals_transformer_lens(tiny_gqa):
    good, bad = metric_for(tiny_gqa)
    ours = patch_heads(tiny_gqa, CLEAN, CORRUPT, logit_diff_metric(good, bad), per_position=True)
    _, clean_cache = tiny_gqa.run_with_cache(torch.tensor([CLEAN]))
    theirs = tl_patching.get_act_patch_attn_head_out_by_pos(
        tiny_gqa,
        torch.tensor([CORRUPT]),
        clean_cache,
        lambda lg: lg[0, -1, good] - lg[0, -1, bad],
    )  # [layer, pos, head]
    torch.testing.assert_close(ours.values, theirs.permute(0, 2, 1).float(), atol=1e-5, rtol=0)


def test_clean_to_clean_patching_is_the_identity(tiny):
    good, bad = metric_for(tiny)
    res = patch_heads(tiny, CLEAN, CLEAN, logit_diff_metric(good, bad))
    torch.testing.assert_close(res.values, torch.full_like(res.values, res.clean))


def test_noising_and_denoising_bracket_the_baselines(tiny_gqa):
    good, bad = metric_for(tiny_gqa)
    den = patch_heads(tiny_gqa, CLEAN, CORRUPT, logit_diff_metric(good, bad))
    noi = patch_heads(tiny_gqa, CLEAN, CORRUPT, logit_diff_metric(good, bad), direction="noise")
    assert den.clean == noi.clean and den.corrupt == noi.corrupt and den.clean > den.corrupt
    assert not torch.allclose(den.values, noi.values)
    # Per position: before the corruption (positions 0-2) a head's z is the same in both runs, so
    # patching it leaves each run at its own baseline exactly: the bracket's two ends.
    pden = patch_heads(tiny_gqa, CLEAN, CORRUPT, logit_diff_metric(good, bad), per_position=True)
    pnoi = patch_heads(tiny_gqa, CLEAN, CORRUPT, logit_diff_metric(good, bad), per_position=True,
                       direction="noise")  # fmt: skip
    torch.testing.assert_close(pden.values[..., :3], torch.full_like(pden.values[..., :3],
                               den.corrupt), atol=1e-5, rtol=0)  # fmt: skip
    torch.testing.assert_close(pnoi.values[..., :3], torch.full_like(pnoi.values[..., :3],
                               den.clean), atol=1e-5, rtol=0)  # fmt: skip
    # Whole heads: denoising moves some heads up from the corrupt baseline and noising some down
    # from the clean one, and no single head overshoots either baseline by the whole gap.
    assert float(den.values.max()) > den.corrupt and float(noi.values.min()) < den.clean
    gap = den.clean - den.corrupt
    assert den.corrupt - gap < float(den.values.min()) <= float(den.values.max()) < den.clean + gap


def test_patching_every_head_from_clean_recovers_clean_exactly(tiny):
    """Every head's output at every layer from the clean run: the last position's residual is the
    clean one layer by layer (MLPs are per position), so recovery is 1."""
    good, bad = metric_for(tiny)
    heads = HeadShape.of(tiny).all_heads()
    ref = resample_reference(tiny, CLEAN, heads)
    with knockout(tiny, KnockoutSpec(heads, "resample"), reference=ref), torch.no_grad():
        patched = tiny(torch.tensor([CORRUPT]))[0, -1]
    with torch.no_grad():
        clean = tiny(torch.tensor([CLEAN]))[0, -1]
        corrupt = tiny(torch.tensor([CORRUPT]))[0, -1]
    m = logit_diff_metric(good, bad)
    rec = normalised_recovery(m(patched[None]), float(m(clean[None])), float(m(corrupt[None])))
    assert rec.item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(patched, clean, atol=1e-5, rtol=0)


def test_bad_inputs_are_clear_errors(tiny):
    with pytest.raises(ValueError, match="same length"):
        patch_heads(tiny, CLEAN, CORRUPT[:-1], logit_diff_metric(0, 1))
    with pytest.raises(ValueError, match="positions must lie"):
        patch_heads(
            tiny, CLEAN, CORRUPT, logit_diff_metric(0, 1), per_position=True, positions=[99]
        )
    with pytest.raises(ValueError, match="outside the model"):
        patch_heads(tiny, CLEAN, CORRUPT, logit_diff_metric(0, 1), heads="L9H0")


def test_answer_logprob_metric_matches_transformer_lens_too(tiny_gqa):
    good, _ = metric_for(tiny_gqa)
    ours = patch_heads(tiny_gqa, CLEAN, CORRUPT, logprob_metric(good))
    _, clean_cache = tiny_gqa.run_with_cache(torch.tensor([CLEAN]))
    theirs = tl_patching.get_act_patch_attn_head_out_all_pos(
        tiny_gqa, torch.tensor([CORRUPT]), clean_cache, lambda lg: lg[0, -1].log_softmax(-1)[good]
    )
    torch.testing.assert_close(ours.values, theirs.float(), atol=1e-5, rtol=0)
    assert (ours.values < 0).all() and ours.clean > ours.corrupt
