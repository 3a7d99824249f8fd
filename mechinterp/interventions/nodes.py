"""The nodes attribution and activation patching act on: each head's query, key, value and
output, at each position (Kramár et al. 2024 take queries, keys and values per head and
position as the attention nodes).

- `q`: a query head's query as it enters the attention logits (after any q norm and rotary
  embedding: `hook_rot_q`; `hook_q` on models without rotary embeddings or q/k norms).
- `k`: a KV head's key as it enters the logits (`hook_rot_k` / `hook_k`). Under GQA one key head
  serves its whole group of query heads, so a `k` node belongs to a KV head.
- `v`: a KV head's value (`hook_v`).
- `z`: a query head's output before the output projection (`hook_z`), what `patch_heads`
  patches.

A node's unit index is the query head for `q` and `z` and the KV head for `k` and `v`
(`n_units`); a `Head(layer, index)` names it either way. Every hook point these nodes use hands
its tensor as `[batch, pos, unit, d_head]` (or with the last two flattened), positions first.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from torch import Tensor

from mechinterp.errors import InputError, UnsupportedError
from mechinterp.heads import Head, HeadShape
from mechinterp.interventions.knockout import family_name

Node = Literal["q", "k", "v", "z"]
NODES: tuple[Node, ...] = ("q", "k", "v", "z")


def check_node(model, node: str) -> None:
    """Raise for an unknown node, or for `q` / `k` on a model whose bridge does not hook the
    query and key as they enter the attention logits, naming the fix."""
    if node not in NODES:
        raise InputError(f"node must be one of {NODES}, got {node!r}")
    if node in ("q", "k"):
        _qk_point(model, 0, node)


def n_units(model, node: Node) -> int:
    """Heads of a node type per layer: query heads for q and z, KV heads for k and v."""
    shape = HeadShape.of(model)
    return shape.n_heads if node in ("q", "z") else shape.n_kv_heads


def all_units(model, node: Node) -> list[Head]:
    """Every unit of `node`, layer by layer."""
    n = n_units(model, node)
    return [Head(la, u) for la in range(HeadShape.of(model).n_layers) for u in range(n)]


def check_units(model, node: Node, units) -> list[Head]:
    """`units` as Heads, each inside the model's layers and `node`'s units per layer."""
    from mechinterp.heads import parse_heads

    shape = HeadShape.of(model)
    out = list(parse_heads(units, shape))
    n = n_units(model, node)
    bad = [str(h) for h in out if h.head >= n]
    if bad:
        raise InputError(f"node {node!r} has {n} units per layer (KV heads for k and v): "
                         f"{bad[:3]} do not exist")  # fmt: skip
    return out


def _qk_point(model, layer: int, node: str) -> str:
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (  # noqa: E501
        PositionEmbeddingsAttentionBridge,
    )

    attn = model.blocks[layer].attn
    if isinstance(attn, PositionEmbeddingsAttentionBridge):
        return f"blocks.{layer}.attn.hook_rot_{node}"
    rotary = getattr(model.cfg, "positional_embedding_type", None) == "rotary"
    normed = any(n in getattr(attn, "submodules", {}) for n in ("q_norm", "k_norm"))
    if not rotary and not normed:
        return f"blocks.{layer}.attn.hook_{node}"
    raise UnsupportedError(
        f"{family_name(model)}: its attention bridge ({type(attn).__name__}) applies "
        f"{'rotary embeddings' if rotary else 'q/k norms'} inside a computation it does not "
        f"hook, so the {'query' if node == 'q' else 'key'} as it enters the attention logits "
        "can be neither read nor patched; use node='v' or node='z'"
    )


def node_point(model, layer: int, node: Node) -> str:
    """The hook point of `node` in `layer`."""
    if node == "z":
        return f"blocks.{layer}.attn.hook_z"
    if node == "v":
        return f"blocks.{layer}.attn.hook_v"
    if node in ("q", "k"):
        return _qk_point(model, layer, node)
    raise InputError(f"node must be one of {NODES}, got {node!r}")


def shaped(x: Tensor, units: int) -> Tensor:
    """A node point's tensor as [batch, pos, unit, d_head]."""
    return x.view(*x.shape[:2], units, -1)


@torch.no_grad()
def capture(model, ids: Tensor, node: Node, keep_from: int = 0):
    """(resid_pre per layer [pos, d_model], `node` per layer [pos, unit, d_head], last-position
    logits) of one run of `ids` [1, pos], kept from position `keep_from` on."""
    n_layers = HeadShape.of(model).n_layers
    units = n_units(model, node)
    resid: dict[int, Tensor] = {}
    acts: dict[int, Tensor] = {}

    def keep(x, hook, *, store, layer, unit):
        x = x[0, keep_from:].detach().clone()
        store[layer] = x if unit is None else x.view(x.shape[0], unit, -1)

    hooks = []
    for la in range(n_layers):
        hooks.append((f"blocks.{la}.hook_resid_pre",
                      partial(keep, store=resid, layer=la, unit=None)))  # fmt: skip
        hooks.append((node_point(model, la, node),
                      partial(keep, store=acts, layer=la, unit=units)))  # fmt: skip
    with model.hooks(fwd_hooks=hooks):
        logits = model(ids, logits_to_keep=1)[:, -1]
    missing = [la for la in range(n_layers) if la not in acts]
    if missing:
        raise RuntimeError(f"{family_name(model)}: {node_point(model, missing[0], node)} did not "
                           f"fire in layers {missing[:3]}")  # fmt: skip
    return resid, acts, logits
