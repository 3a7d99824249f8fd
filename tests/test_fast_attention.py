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
    return request.param, load_model(directory, device="cpu", attention="eager"), load_model(
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


def test_every_knockout_mode_runs_on_the_fused_path(monkeypatch, tmp_path):
    """zero / mean / resample edit hook_z; uniform_attention and edge_knockout recompute only the
    knocked-out rows of the knocked-out heads: no layer takes the explicit path under any mode,
    and the conditions of a sweep (`knockout_rows`) stay fused too."""
    from mechinterp.interventions import KnockoutSpec, knockout
    from mechinterp.interventions.conditions import knockout_rows
    from mechinterp.models import attention

    tiny_family("llama-gqa", directory=tmp_path)
    fast = load_model(tmp_path, device="cpu", attention="sdpa")
    seen = []
    real = attention._needs_scores
    monkeypatch.setattr(attention, "_needs_scores", lambda a: seen.append(real(a)) or seen[-1])
    ids = _ids(fast, 16, 1)
    with torch.no_grad():
        plain = fast(ids)
    for mode in ("zero", "uniform_attention", "edge_knockout"):
        seen.clear()
        kw = {"key_positions": (2, 3)} if mode == "edge_knockout" else {}
        with knockout(fast, KnockoutSpec(heads=["L1H1"], mode=mode, scope="all", **kw)) as stats:
            with torch.no_grad():
                out = fast(ids)
        assert seen and not any(seen), mode
        assert stats["edited"] == 1 and (out - plain).abs().max() > 1e-4, mode
    seen.clear()
    specs = [KnockoutSpec(), KnockoutSpec(heads=["L1H1", "L0H3"], mode="uniform_attention")]
    with knockout_rows(fast, specs), torch.no_grad():
        out = fast(ids.expand(2, -1))
    assert seen and not any(seen)
    torch.testing.assert_close(out[0], plain[0], atol=1e-5, rtol=0)
    assert (out[1] - plain[0]).abs().max() > 1e-4


def _rows_of_every_layer(model, ids, rows, **kwargs) -> dict[int, torch.Tensor]:
    from mechinterp.models.attention import RowReader, read_rows

    got: dict[int, list[torch.Tensor]] = {}
    readers = {
        layer: RowReader(lambda tq, tk: rows(tq, tk), got.setdefault(layer, []).append)
        for layer in range(model.cfg.n_layers)
    }
    with read_rows(model, readers), torch.no_grad():
        model(ids, **kwargs)
    return {layer: torch.cat(v, 2) if len(v) > 1 else v[0] for layer, v in got.items()}


def test_pattern_rows_equal_the_explicit_pattern_without_it(pair, monkeypatch):
    """`read_rows` on a fused layer computes only the asked rows (never the explicit forward),
    per batch row, under left padding, and equals `hook_pattern`'s rows."""
    from mechinterp.models import attention

    name, explicit, fast = pair
    ids = _ids(explicit)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    rows = torch.tensor([[39, 20, 12], [39, 9, 31]])
    only_patterns = lambda n: n.endswith("hook_pattern")  # noqa: E731
    _, cache = explicit.run_with_cache(ids, attention_mask=mask, names_filter=only_patterns)
    seen = []
    real = attention._needs_scores
    monkeypatch.setattr(attention, "_needs_scores", lambda a: seen.append(real(a)) or seen[-1])
    for model in (explicit, fast):
        got = _rows_of_every_layer(model, ids, lambda tq, tk: rows, attention_mask=mask)
        for layer, value in got.items():
            want = cache[f"blocks.{layer}.attn.hook_pattern"]
            want = want.gather(2, rows[:, None, :, None].expand(2, want.shape[1], 3, 40))
            torch.testing.assert_close(value, want, atol=1e-6, rtol=0, msg=f"{name} L{layer}")
    assert not any(seen), "a fused layer took the explicit path to read its rows"


def test_decode_rows_under_a_kv_cache_and_a_sliding_window(tmp_path):
    """The retrieval score's row: each step's single query against every cached key (Mistral's
    window of 5 hides the rest), equal to the explicit pattern's last row at every step."""
    from mechinterp.evaluate import generate_batch

    tiny_family("mistral", directory=tmp_path)
    explicit = load_model(tmp_path, device="cpu", attention="eager")
    fast = load_model(tmp_path, device="cpu", attention="sdpa")
    prompt = _ids(explicit, 20, 1)[0].tolist()
    last = lambda tq, tk: torch.tensor([tq - 1])  # noqa: E731
    steps = {}
    for key, model in (("explicit", explicit), ("fast", fast)):
        from mechinterp.models.attention import RowReader, read_rows

        got: list[torch.Tensor] = []
        with read_rows(model, {1: RowReader(last, got.append)}):
            gens = generate_batch(model, [prompt], 6, frozenset())
        steps[key] = (got, gens[0].tokens)
    (want, want_tokens), (got, got_tokens) = steps["explicit"], steps["fast"]
    assert got_tokens == want_tokens and len(got) == len(want) == 6
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape, step
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0)
    # decode steps see the prompt and the generated tokens through the window only
    assert (got[-1][0, :, 0] > 0).sum(-1).max() <= 5


def test_a_user_pattern_hook_does_not_silence_a_reader(tmp_path):
    """A hook on the layer's pattern sends it down the explicit path; the reader still reads."""
    from mechinterp.models.attention import RowReader, read_rows

    tiny_family("llama-gqa", directory=tmp_path)
    fast = load_model(tmp_path, device="cpu", attention="sdpa")
    ids = _ids(fast, 16, 1)
    got, user = [], []
    hook = ("blocks.0.attn.hook_pattern", lambda p, hook: user.append(p))
    reader = RowReader(lambda tq, tk: torch.tensor([15]), got.append)
    with fast.hooks(fwd_hooks=[hook]), read_rows(fast, {0: reader}):
        fast(ids)
    assert len(got) == len(user) == 1
    torch.testing.assert_close(got[0], user[0][:, :, [15]], atol=0, rtol=0)


def test_a_module_that_bypasses_the_attention_interface_is_refused(tmp_path, monkeypatch):
    """Rows can only be read where the HF module calls transformers' attention interface;
    otherwise the reader would silently see nothing: refuse."""
    from transformers.integrations import sdpa_attention

    from mechinterp.models import attention
    from mechinterp.models.attention import RowReader, read_rows

    tiny_family("llama-gqa", directory=tmp_path)
    fast = load_model(tmp_path, device="cpu", attention="sdpa")
    monkeypatch.setitem(
        __import__("transformers").modeling_utils.AttentionInterface._global_mapping,
        attention.ROWS, sdpa_attention.sdpa_attention_forward,
    )
    with pytest.raises(RuntimeError, match="attention interface"):
        with read_rows(fast, {0: RowReader(lambda tq, tk: torch.tensor([0]), print)}):
            fast(_ids(fast, 8, 1))
