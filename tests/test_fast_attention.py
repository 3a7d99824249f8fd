"""`load_model(attention="sdpa")`: the fused kernel wherever no hook reads the pattern, equal to the
bridge's explicit attention to float32 rounding on every eligible architecture family; pattern
hooks still get the explicit computation, layer by layer; ineligible families stay explicit."""

from __future__ import annotations

import pytest
import torch

from mechinterp.models import load_model
from mechinterp.models.tiny import FAMILIES, tiny_family

ATOL = 1e-5  # float32: the two paths differ by rounding (measured ≤ 3e-7 on logits)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    """(explicit, sdpa) copies of one tiny family, loaded from the same files."""
    directory = tmp_path_factory.mktemp(f"fast-{request.param}")
    tiny_family(request.param, directory=directory)
    return request.param, load_model(directory, device="cpu"), load_model(
        directory, device="cpu", attention="sdpa")  # fmt: skip


def _ids(model, n: int = 40, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, model.cfg.d_vocab, (batch, n), generator=g)


def test_sdpa_is_taken_exactly_where_it_is_safe(pair):
    name, explicit, fast = pair
    expected = name in ("llama-mha", "llama-gqa", "llama-mqa", "mistral", "qwen2", "gemma3",
                        "olmo2")  # fmt: skip
    assert explicit.mechinterp_card.attention == "eager"
    assert (fast.mechinterp_card.attention == "sdpa") == expected, name


def test_logits_head_outputs_and_pattern_hooks_equal_the_explicit_path(pair):
    name, explicit, fast = pair
    ids = _ids(explicit)
    keep = lambda n: n.endswith(("hook_z", "hook_resid_pre", "hook_q", "hook_v"))  # noqa: E731
    want_logits, want = explicit.run_with_cache(ids, names_filter=keep)
    got_logits, got = fast.run_with_cache(ids, names_filter=keep)
    torch.testing.assert_close(got_logits, want_logits, atol=ATOL, rtol=0)
    for key in want.keys():
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0, msg=f"{name} {key}")
    pattern = "blocks.1.attn.hook_pattern"  # a hook on one layer's pattern: explicit there
    _, want_p = explicit.run_with_cache(ids, names_filter=lambda n: n == pattern)
    got_logits, got_p = fast.run_with_cache(ids, names_filter=lambda n: n == pattern)
    torch.testing.assert_close(got_p[pattern], want_p[pattern], atol=ATOL, rtol=0)
    torch.testing.assert_close(got_logits, want_logits, atol=ATOL, rtol=0)


def test_patching_knockout_and_cached_generation_agree(pair):
    from mechinterp.evaluate import evaluate
    from mechinterp.interventions import KnockoutSpec, knockout
    from mechinterp.interventions.patching import logit_diff_metric, patch_heads
    from mechinterp.tasks.mdqa import synthetic_mdqa

    name, explicit, fast = pair
    clean = _ids(explicit, 24, 1)[0].tolist()
    corrupt = [*clean[:-3], (clean[-3] + 1) % explicit.cfg.d_vocab, *clean[-2:]]
    metric = logit_diff_metric(5, 9)
    want = patch_heads(explicit, clean, corrupt, metric, progress=False)
    got = patch_heads(fast, clean, corrupt, metric, progress=False)
    torch.testing.assert_close(got.values, want.values, atol=ATOL, rtol=0)
    examples = synthetic_mdqa(2, n_docs=2, realism="templated", diversity="low", doc_words=12)
    for spec in (None, KnockoutSpec(heads=["L1H1", "L0H2"], mode="zero")):
        results = []  # plain cached generation runs SDPA; knockout takes the explicit path
        for model in (explicit, fast):
            with knockout(model, spec) if spec else torch.no_grad():
                results.append(evaluate(model, examples, max_new_tokens=6, score=True,
                                        progress=False))  # fmt: skip
        assert results[0]["prediction"].tolist() == results[1]["prediction"].tolist(), name
        assert results[1]["answer_logprob"].tolist() == pytest.approx(
            results[0]["answer_logprob"].tolist(), abs=1e-4)  # fmt: skip


def test_attention_must_be_eager_or_sdpa(tmp_path):
    with pytest.raises(ValueError, match="attention must be 'eager' or 'sdpa'"):
        load_model("smollm2-135m", attention="flash")


def test_z_level_knockouts_run_on_the_fused_path(monkeypatch, tmp_path):
    """zero / mean / resample edit hook_z only, so no layer needs its scores: every layer stays
    on SDPA under them (score-level modes still take the explicit path)."""
    from mechinterp.interventions import KnockoutSpec, knockout
    from mechinterp.models import attention

    tiny_family("llama-gqa", directory=tmp_path)
    fast = load_model(tmp_path, device="cpu", attention="sdpa")
    seen = []
    real = attention._needs_scores
    monkeypatch.setattr(attention, "_needs_scores", lambda a: seen.append(real(a)) or seen[-1])
    ids = _ids(fast, 16, 1)
    for mode, explicit in (("zero", False), ("uniform_attention", True)):
        seen.clear()
        with knockout(fast, KnockoutSpec(heads=["L1H1"], mode=mode, scope="all")):
            fast(ids)
        assert seen and any(seen) == explicit, mode
