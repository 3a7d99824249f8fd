"""The one place that knows how transformers names its KV cache (the compatibility seam).

transformers 5.24 renamed the forward argument `past_key_values` to `cache`: the old name still
works but warns (a `FutureWarning` per module, removed in 5.40), and the model passes the cache
down to each attention module as `cache=`. TransformerLens 4.3's attention components read only
`past_key_values` (or `layer_past`) from their keyword arguments, so under 5.24 they never
update the cache and every cached decode step attends to itself alone: greedy decoding writes
garbage after the first token.

Every cached forward in mechinterp goes through this module:

- `new_cache(model)` makes the cache object (we always own it and pass it in, so we never read a
  cache back from a model output under either name);
- `cache_kwargs(model, cache)` names it the way the installed transformers expects;
- `passed_cache(kwargs)` finds a cache in a forward's keyword arguments under either name;
- `adapt_bridge(bridge)` (called by every `load_model`) lets each attention component of a
  bridge read the cache under the new name.

Supported: transformers 5.23 (`past_key_values`) and 5.24 or newer in the 5.x line (`cache`),
with TransformerLens 4.3. The lock installs 5.24; `tests/test_kv_cache.py` checks cached decoding
against an uncached forward and against HF `generate` on a plain HF model.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

OLD_NAME = "past_key_values"
NEW_NAME = "cache"


def hf_model(model):
    """The HF model inside a bridge (or the HF model itself)."""
    return getattr(model, "original_model", model)


def cache_name(model) -> str:
    """The keyword under which `model`'s HF forward takes its KV cache."""
    params = inspect.signature(hf_model(model).forward).parameters
    return NEW_NAME if NEW_NAME in params else OLD_NAME


def new_cache(model):
    """An empty `DynamicCache` laid out for `model`'s layers (sliding-window layers included)."""
    from transformers import DynamicCache

    return DynamicCache(config=hf_model(model).config)


def cache_kwargs(model, cache) -> dict[str, Any]:
    """Forward keyword arguments that run `model` on (and extend) `cache`; for `None`, ones that
    keep the model from building a cache of its own."""
    if cache is None:
        return {"use_cache": False}
    return {cache_name(model): cache, "use_cache": True}


def passed_cache(kwargs: Mapping[str, Any]):
    """The KV cache in a forward's keyword arguments, under either name (`None` if absent)."""
    cache = kwargs.get(NEW_NAME)
    return cache if cache is not None else kwargs.get(OLD_NAME)


def adapt_bridge(bridge) -> int:
    """Let every attention component of `bridge` update a cache passed as `cache=`.

    Wraps each component's `_update_kv_cache` (instance attribute; the class is untouched) so
    that a `cache` keyword reaches it as `past_key_values`, the name TransformerLens reads.
    Idempotent; returns the number of components adapted.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    adapted = 0
    for module in bridge.modules():
        if not isinstance(module, AttentionBridge) or "_update_kv_cache" in vars(module):
            continue
        update = module._update_kv_cache

        def update_either(k, v, _update=update, **kwargs):
            if kwargs.get(OLD_NAME) is None and kwargs.get(NEW_NAME) is not None:
                kwargs[OLD_NAME] = kwargs.pop(NEW_NAME)
            return _update(k, v, **kwargs)

        module._update_kv_cache = update_either
        adapted += 1
    return adapted
