"""References for cached decoding: HF `generate` on a plain HF model, and uncached forwards."""

from __future__ import annotations

import torch

from mechinterp.evaluate import left_pad
from mechinterp.models.kv_cache import cache_kwargs, new_cache


def hf_greedy(hf, prompt, n: int) -> list[int]:
    """n greedy tokens from HF `generate`, never stopping early (as `stop_ids=frozenset()`)."""
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
            pad_token_id=hf.config.pad_token_id,
        )
    return out[0, len(prompt):].tolist()


def cached_step_errors(model, prompts, n_steps: int) -> list[float]:
    """Max |logits| difference, per decode step, between our cached forward of a left-padded
    batch and an uncached forward of the whole prefix so far (greedy tokens fed back)."""
    ids, mask = left_pad(model, prompts)
    cache = new_cache(model)
    errors = []
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, **cache_kwargs(model, cache))[:, -1]
        for _ in range(n_steps):
            full = model(ids, attention_mask=mask, **cache_kwargs(model, None))[:, -1]
            errors.append(float((logits - full).abs().max()))
            nxt = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            logits = model(nxt, attention_mask=mask, **cache_kwargs(model, cache))[:, -1]
            assert cache.get_seq_length() == ids.shape[1]
    return errors
