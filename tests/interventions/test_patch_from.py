"""Patching restricted to late positions (`patch_from`) and joint head-set patching."""

import pytest
import torch

from mechinterp.heads import HeadShape, parse_heads
from mechinterp.interventions.patching import logit_diff_metric, patch_heads, patch_sets

CLEAN = [1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
CORRUPT = [1, 10, 11, 40, 41, 14, 15, 16, 17, 18, 19]
FROM = 7


def _metric(model):
    with torch.no_grad():
        lc = model(torch.tensor([CLEAN]))[0, -1]
        lx = model(torch.tensor([CORRUPT]))[0, -1]
    return logit_diff_metric(int((lc - lx).argmax()), int((lx - lc).argmax()))


def _reference(model, heads, metric):
    """Hand-written: the corrupt run with the clean z of `heads` written at positions >= FROM."""
    _, cache = model.run_with_cache(torch.tensor([CLEAN]))
    n_heads = model.cfg.n_heads

    def write(z, hook, layer):
        shaped = z.view(*z.shape[:2], n_heads, -1).clone()
        clean = cache[hook.name].view(*z.shape[:2], n_heads, -1)
        for h in heads:
            if h.layer == layer:
                shaped[:, FROM:, h.head] = clean[:, FROM:, h.head]
        return shaped.view(z.shape)

    hooks = [
        (f"blocks.{la}.attn.hook_z", lambda z, hook, la=la: write(z, hook, la))
        for la in {h.layer for h in heads}
    ]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        return float(metric(model(torch.tensor([CORRUPT]))[:, -1])[0])


def test_patch_from_equals_a_hand_written_late_position_patch(tiny):
    metric = _metric(tiny)
    res = patch_heads(tiny, CLEAN, CORRUPT, metric, patch_from=FROM)
    assert res.settings["shared_prefix"] == FROM
    for h in HeadShape.of(tiny).all_heads():
        assert res.values[h.layer, h.head].item() == pytest.approx(
            _reference(tiny, [h], metric), abs=1e-4
        )


def test_patching_every_head_jointly_recovers_the_clean_metric_exactly(tiny):
    metric = _metric(tiny)
    shape = HeadShape.of(tiny)
    some = parse_heads("L1H0 L0H2", shape)
    out = patch_sets(
        tiny,
        CLEAN,
        CORRUPT,
        metric,
        {"all": shape.all_heads(), "some": some, "none": []},
        patch_from=FROM,
    )
    assert out["clean"] != pytest.approx(out["corrupt"], abs=1e-3)
    assert out["all"] == pytest.approx(out["clean"], abs=1e-4)  # recovery = 1
    assert out["none"] == out["corrupt"]
    assert out["some"] == pytest.approx(_reference(tiny, some, metric), abs=1e-4)


def test_patch_from_outside_the_sequence_is_an_error(tiny):
    with pytest.raises(ValueError, match="patch_from"):
        patch_heads(tiny, CLEAN, CORRUPT, _metric(tiny), patch_from=len(CLEAN))
