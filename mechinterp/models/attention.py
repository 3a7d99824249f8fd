"""Fast attention where nothing reads the pattern (issue 17, first step; opt-in for now).

The bridge reimplements attention and materialises every layer's T × T pattern on each forward.
`use_sdpa(bridge)` lets each eligible layer hand its forward to the HF attention module, which
runs the fused kernel (SDPA) instead, whenever no hook is attached to a point only the explicit
computation has: the scores, the pattern, post-RoPE q/k and the rotary cos/sin. `hook_q`,
`hook_k`, `hook_v`, `hook_z` (the input of the output projection) and the residual hooks fire
in both modes, so interventions on z, patching, cross-model patching and cached generation run
on SDPA; retrieval and QR scores and score-level knockouts still take the explicit path, layer
by layer. Measured on the tiny models it equals the explicit computation to float32 rounding
(tests/test_fast_attention.py).

Eligible: layers of the plain rotary attention bridge (Llama, Mistral, Qwen2, Gemma 3, OLMo 2,
...) whose HF module supports SDPA, without logit soft-capping or learned sinks. A model with any
ineligible layer keeps the explicit path everywhere.
"""

from __future__ import annotations

import types

#: Hook points only the bridge's explicit attention computes.
SCORE_HOOKS = ("hook_attn_scores", "hook_pattern", "hook_rot_q", "hook_rot_k", "hook_cos",
               "hook_sin")  # fmt: skip


def _needs_scores(attn) -> bool:
    return any(
        getattr(attn, name, None) is not None and getattr(attn, name)._forward_hooks
        for name in SCORE_HOOKS
    )


def _dispatch(self, *args, **kwargs):
    """SDPA through the HF module unless a hook reads this layer's scores."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    if _needs_scores(self):
        return type(self).forward(self, *args, **kwargs)
    return AttentionBridge.forward(self, *args, **kwargs)


def eligible(attn) -> bool:
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (  # noqa: E501
        PositionEmbeddingsAttentionBridge,
    )

    hf = getattr(attn, "original_component", None)
    config = getattr(hf, "config", None)
    return (
        type(attn) is PositionEmbeddingsAttentionBridge
        and hf is not None
        and getattr(hf, "attn_logit_softcapping", None) is None
        and getattr(config, "attn_logit_softcapping", None) is None
        and getattr(hf, "sinks", None) is None
    )


def use_sdpa(bridge) -> bool:
    """Switch every layer of `bridge` to SDPA-when-unobserved; False (and nothing changed) when
    some layer is not eligible."""
    hf = bridge.original_model
    attns = [block.attn for block in bridge.blocks]
    if not getattr(hf, "_supports_sdpa", False) or not all(eligible(a) for a in attns):
        return False
    for attn in attns:
        attn.original_component.config._attn_implementation = "sdpa"
        # BaseComponent.__setattr__ forwards unknown names to the HF module: set it on ours.
        object.__setattr__(attn, "forward", types.MethodType(_dispatch, attn))
    hf.config._attn_implementation = "sdpa"
    return True
