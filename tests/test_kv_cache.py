"""Cached decoding equals an independent reference (catches a transformers cache-API break).

Our cached greedy decoding must equal HF `generate()` on a plain HF model (no bridge) loaded from
the same weights, token for token, and the logits of every cached step must equal an uncached
forward of the same prefix. The tolerance is from measurement: float32 cached vs uncached logits
differ by at most 2.4e-7 on the tiny models (5.0e-5 on the embedded model, in
tests/integration/test_embedded.py).
"""

from __future__ import annotations

import torch
from decoding import cached_step_errors, hf_greedy

from mechinterp.evaluate import generate
from mechinterp.models.kv_cache import adapt_bridge, cache_kwargs, cache_name, new_cache
from mechinterp.models.load import load_hf

TOL = 1e-5  # measured max |cached − uncached| on tiny float32 models: ~2e-7


def _prompts(model):
    texts = ["The grass is green.", "Hi", "The sky is blue and the sun is yellow today."]
    return [model.tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def _plain_hf(model):
    """The same weights as a plain HF model: transformers alone, no TransformerLens."""
    hf, *_ = load_hf(model.mechinterp_card.source)
    return hf.eval()


def test_a_cached_forward_extends_the_cache_it_is_given(tiny):
    cache = new_cache(tiny)
    with torch.no_grad():
        tiny(torch.tensor([[10, 11, 12, 13]]), **cache_kwargs(tiny, cache))
        assert cache.get_seq_length() == 4
        tiny(torch.tensor([[14]]), **cache_kwargs(tiny, cache))
    assert cache.get_seq_length() == 5
    assert all(layer.keys.shape[2] == 5 for layer in cache.layers)


def test_cached_logits_equal_an_uncached_forward_at_every_step(tiny):
    errors = cached_step_errors(tiny, _prompts(tiny), n_steps=10)
    assert max(errors) < TOL, errors


def test_cached_greedy_decoding_equals_plain_hf_generate(tiny):
    hf = _plain_hf(tiny)
    prompts = _prompts(tiny)
    for batch_size in (1, 3):  # one prompt, and a left-padded batch
        ours = generate(tiny, prompts, max_new_tokens=12, batch_size=batch_size,
                        stop_ids=frozenset())
        for prompt, gen in zip(prompts, ours, strict=True):
            assert list(gen.tokens) == hf_greedy(hf, prompt, 12)


def test_the_cache_goes_by_the_name_transformers_takes(tiny):
    import inspect

    params = inspect.signature(tiny.original_model.forward).parameters
    assert cache_name(tiny) in params
    assert cache_kwargs(tiny, None) == {"use_cache": False}
    assert adapt_bridge(tiny) == 0  # every attention component was adapted at load, once
