"""Fused attention wherever nothing reads the pattern: the default path of `load_model`
(`attention="sdpa"`; `attention="eager"` keeps the explicit computation everywhere).

The bridge reimplements attention and materialises every layer's T × T pattern on each forward.
`use_sdpa(bridge)`, which `load_model` calls unless told `attention="eager"`, lets each eligible
layer hand its forward to the HF attention module, which runs the fused kernel (SDPA) instead,
whenever no hook is attached to a point only the explicit computation has: the scores, the
pattern, post-RoPE q/k and the rotary cos/sin. `hook_q`, `hook_k`, `hook_v`, `hook_z` (the input
of the output projection) and the residual hooks fire in both modes, so interventions on z,
patching, cross-model patching and cached generation run on SDPA. `ModelCard.attention` records
which path a loaded model takes.

Readers of a few pattern rows (the retrieval score's decode row, QR's question rows) use
`read_rows`: on a fused layer the rows are recomputed, in blocks, from the very q, k and mask the
kernel was given (after the KV-cache update), so memory is rows × keys, never T × T; on an
explicit layer they are sliced from `hook_pattern`. Score-level knockouts (`uniform_attention`,
`edge_knockout`) use `edit_scores`: on a fused layer the kernel's output is kept except for the
edited heads' rows, recomputed in row blocks from their edited scores; on an explicit layer they
edit `hook_attn_scores`. A layer with both a reader and an editor attached, or with a hook on one
of the explicit-only points, takes the explicit path for that forward. On the tiny models the
fused rows, edits and outputs equal the explicit computation to float32 rounding
(tests/test_fast_attention.py).

Eligible: layers of the plain rotary attention bridge (Llama, Mistral, Qwen2, Gemma 3, OLMo 2,
...) whose HF module supports SDPA, without logit soft-capping or learned sinks. A model with any
ineligible layer keeps the explicit path everywhere.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from mechinterp.errors import UnsupportedError

#: Hook points only the bridge's explicit attention computes.
SCORE_HOOKS = ("hook_attn_scores", "hook_pattern", "hook_rot_q", "hook_rot_k", "hook_cos",
               "hook_sin")  # fmt: skip


def _needs_scores(attn) -> bool:
    return any(
        getattr(attn, name, None) is not None and getattr(attn, name)._forward_hooks
        for name in SCORE_HOOKS
    )


#: The HF attention-interface name of "SDPA, then hand the chosen pattern rows to a reader".
ROWS = "mechinterp_rows"


@dataclass(frozen=True)
class RowReader:
    """Which query rows of a layer's pattern to read, and what to do with them.

    `rows(n_queries, n_keys)` gives this forward's query indices: `[rows]`, the same for every
    batch row, or `[batch, rows]`. `read(pattern)` receives `[batch, head, rows, keys]`, float32,
    exactly `hook_pattern[:, :, rows]` of the explicit computation (keys as the layer sees them:
    a KV cache's keys included, a sliding-window cache's only the kept ones)."""

    rows: Callable[[int, int], Tensor]
    read: Callable[[Tensor], None]


def _take_rows(x: Tensor, rows: Tensor) -> Tensor:
    """x[:, :, rows] for `rows` of shape [R] or [batch, R]."""
    rows = rows.to(x.device)
    if rows.dim() == 1:
        return x[:, :, rows]
    index = rows[:, None, :, None].expand(x.shape[0], x.shape[1], rows.shape[1], x.shape[-1])
    return x.gather(2, index)


def _masked(s: Tensor, rows: Tensor, attention_mask: Tensor | None, tq: int,
            heads: Tensor | None = None) -> Tensor:  # fmt: skip
    """Scores `s` [B, n, R, Tk] of query rows `rows` [B, R] under the mask SDPA was given, as
    the kernel reads it: None (causal from the first key when Tq > 1, every key for a single
    query), boolean (True = attend) or additive float [B | 1, 1 | H, Tq, Tk]. Hidden keys get
    the dtype's minimum, as the explicit path's masked scores."""
    low = torch.finfo(s.dtype).min
    if attention_mask is None:
        if tq == 1:
            return s
        kpos = torch.arange(s.shape[-1], device=s.device)
        return s.masked_fill((kpos[None, None, :] > rows[:, :, None])[:, None], low)
    m = attention_mask.expand(s.shape[0], -1, -1, -1)
    if m.shape[1] != 1 and heads is not None:
        m = m[:, heads.to(m.device)]
    m = _take_rows(m, rows)
    if m.dtype == torch.bool:
        return s.masked_fill(~m, low)
    return (s + m.to(s.dtype)).clamp(min=low)


def pattern_rows(
    query: Tensor,
    key: Tensor,
    rows: Tensor,
    attention_mask: Tensor | None,
    *,
    scaling: float | None = None,
    block: int = 256,
) -> Tensor:
    """Softmax rows `rows` ([R] or [B, R]) of the attention of `query` [B, H, Tq, D] on `key`
    [B, Hkv, Tk, D] (post-RoPE, not repeated for GQA) under the mask SDPA was given (`_masked`).
    Returns [B, H, R, Tk] float32; work and memory are R × Tk per head, in blocks of `block`."""
    b, h, tq, d = query.shape
    n_kv, tk = key.shape[1], key.shape[2]
    scaling = d**-0.5 if scaling is None else scaling
    rows = rows.to(query.device).long()
    flat = rows if rows.dim() == 2 else rows[None].expand(b, -1)
    out = []
    for r in flat.split(block, dim=1):
        q = _take_rows(query, r).reshape(b, n_kv, h // n_kv, r.shape[1], d)
        s = torch.matmul(q, key[:, :, None].transpose(-2, -1)).reshape(b, h, r.shape[1], tk)
        s = _masked(s * scaling, r, attention_mask, tq)
        out.append(torch.softmax(s, dim=-1, dtype=torch.float32))
    return torch.cat(out, dim=2)


@dataclass(frozen=True)
class ScoreEditor:
    """An edit of some heads' pre-softmax scores on some query rows of one layer.

    `rows(batch, n_queries, n_keys)` gives this forward's query indices any batch row edits
    (called once per forward, before `edit`); `edit(scores, rows)` receives the masked scores
    [batch, len(heads), R, keys] of `heads` at those rows (hidden keys hold the dtype's minimum)
    and returns them edited. `check(scores)`, where given, inspects the full scores on the
    explicit path (e.g. that they are pre-softmax)."""

    heads: tuple[int, ...]
    rows: Callable[[int, int, int], Tensor]
    edit: Callable[[Tensor, Tensor], Tensor]
    check: Callable[[Tensor], None] | None = None


def _edited_output(editor: ScoreEditor, out, query, key, value, attention_mask, scaling,
                   block: int = 256) -> Tensor:  # fmt: skip
    """`out` [B, Tq, H, D] (the kernel's) with the editor's heads and rows recomputed from their
    edited scores: R × Tk per head in blocks, never T × T."""
    b, h, tq, d = query.shape
    n_kv, tk = key.shape[1], key.shape[2]
    rows = editor.rows(b, tq, tk).to(query.device).long()
    if rows.numel() == 0:
        return out
    scaling = d**-0.5 if scaling is None else scaling
    heads = torch.tensor(editor.heads, device=query.device)
    kv = heads // (h // n_kv)
    q, k, v = query[:, heads], key[:, kv], value[:, kv]
    out = out.clone()
    for r in rows.split(block):
        s = torch.matmul(q[:, :, r], k.transpose(-2, -1)) * scaling  # [B, n, R, Tk]
        s = editor.edit(_masked(s, r[None].expand(b, -1), attention_mask, tq, heads), r)
        z = torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(v.dtype), v)
        out[:, r[:, None], heads[None, :]] = z.permute(0, 2, 1, 3).to(out.dtype)
    return out


def _rows_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """SDPA, then the attached editor's rows recomputed and the reader's rows read, from the same
    q, k, v and mask the kernel was given (registered as `ROWS`)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = module.__dict__["_mechinterp_fused"]
    state["calls"] += 1
    reader: RowReader | None = state["reader"]
    if reader is not None and state["editor"] is None:  # read first: a reader may end the forward
        rows = reader.rows(query.shape[2], key.shape[2])
        with torch.no_grad():
            reader.read(pattern_rows(query, key, rows, attention_mask, scaling=scaling))
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask,
                                          scaling=scaling, **kwargs)  # fmt: skip
    if state["editor"] is not None:
        out = _edited_output(state["editor"], out, query, key, value, attention_mask, scaling)
        if reader is not None:
            rows = reader.rows(query.shape[2], key.shape[2])
            with torch.no_grad():
                reader.read(pattern_rows(query, key, rows, attention_mask, scaling=scaling))
    return out, weights


def _register_rows() -> None:
    from transformers.modeling_utils import AttentionInterface

    if ROWS not in AttentionInterface._global_mapping:
        AttentionInterface.register(ROWS, _rows_attention)


def _explicit_reader(reader: RowReader):
    """A `hook_pattern` hook giving `reader` its rows from the explicit pattern."""

    def hook(pattern: Tensor, hook) -> None:
        reader.read(_take_rows(pattern, reader.rows(pattern.shape[2], pattern.shape[3])).float())

    return hook


def _explicit_editor(editor: ScoreEditor):
    """A `hook_attn_scores` hook applying `editor` to the explicit scores."""

    def hook(scores: Tensor, hook) -> Tensor:
        if editor.check is not None:
            editor.check(scores)
        b, _, tq, tk = scores.shape
        rows = editor.rows(b, tq, tk).to(scores.device).long()
        if rows.numel() == 0:
            return scores
        heads = torch.tensor(editor.heads, device=scores.device)
        scores = scores.clone()
        sub = scores[:, heads[:, None], rows[None, :]]  # [B, n, R, Tk]
        scores[:, heads[:, None], rows[None, :]] = editor.edit(sub, rows)
        return scores

    return hook


def _run_fused(self, reader: RowReader | None, editor: ScoreEditor | None, args, kwargs):
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    hf = self.original_component
    config = hf.config
    before = config._attn_implementation
    state = {"reader": reader, "editor": editor, "calls": 0}
    hf.__dict__["_mechinterp_fused"] = state
    config._attn_implementation = ROWS
    try:
        output = AttentionBridge.forward(self, *args, **kwargs)
    finally:
        config._attn_implementation = before
        del hf.__dict__["_mechinterp_fused"]
    if state["calls"] != 1:
        raise UnsupportedError(
            f"{type(hf).__name__} did not run its attention through transformers' attention "
            "interface, so its pattern rows cannot be read or edited on the fused path; load "
            "the model with attention='eager'"
        )
    return output


def _dispatch(self, *args, **kwargs):
    """SDPA through the HF module unless a hook reads this layer's scores. A `RowReader`
    (`read_rows`) and a `ScoreEditor` (`edit_scores`) attached to the layer act on whichever
    path runs; with both attached the explicit path runs (the reader must see edited rows)."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    reader = self.__dict__.get("_mechinterp_reader")
    editor = self.__dict__.get("_mechinterp_editor")
    if _needs_scores(self) or (reader is not None and editor is not None):
        handles = []
        if editor is not None:
            edit = _explicit_editor(editor)
            handles.append(self.hook_attn_scores.register_forward_hook(
                lambda module, inputs, output: edit(output, None)))  # fmt: skip
        if reader is not None:
            read = _explicit_reader(reader)
            handles.append(self.hook_pattern.register_forward_hook(
                lambda module, inputs, output: read(output, None)))  # fmt: skip
        try:
            return type(self).forward(self, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
    if reader is not None or editor is not None:
        return _run_fused(self, reader, editor, args, kwargs)
    return AttentionBridge.forward(self, *args, **kwargs)


def fused(attn) -> bool:
    """Whether this attention layer takes the fused path when unobserved (`use_sdpa` ran)."""
    forward = attn.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _dispatch


@contextmanager
def _attached(model, name: str, point: str, items: dict, explicit_hook) -> Iterator[None]:
    """Attach `items[layer]` as `name` to fused layers; hook `point` on the others."""
    hooks, attached = [], []
    try:
        for layer, item in items.items():
            attn = model.blocks[layer].attn
            if fused(attn):
                if name in attn.__dict__:
                    raise RuntimeError(f"layer {layer} already has a {name.strip('_')} attached")
                object.__setattr__(attn, name, item)
                attached.append(attn)
            else:
                hooks.append((f"blocks.{layer}.attn.{point}", explicit_hook(item)))
        with model.hooks(fwd_hooks=hooks) if hooks else nullcontext():
            yield
    finally:
        for attn in attached:
            attn.__dict__.pop(name, None)


def read_rows(model, readers: dict[int, RowReader]):
    """While active, every forward hands `readers[layer]` its rows of that layer's pattern.

    Fused layers compute only those rows (`pattern_rows`); explicit ones slice `hook_pattern`.
    Either way the reader sees the same values, to float32 rounding."""
    return _attached(model, "_mechinterp_reader", "hook_pattern", readers, _explicit_reader)


def edit_scores(model, editors: dict[int, ScoreEditor]):
    """While active, every forward applies `editors[layer]` to that layer's pre-softmax scores.

    Fused layers keep the kernel's output except for the edited heads' rows, recomputed from
    their edited scores in row blocks; explicit ones edit `hook_attn_scores`. Either way the
    output is the same, to float32 rounding."""
    return _attached(model, "_mechinterp_editor", "hook_attn_scores", editors, _explicit_editor)


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
    _register_rows()
    for attn in attns:
        attn.original_component.config._attn_implementation = "sdpa"
        # BaseComponent.__setattr__ forwards unknown names to the HF module: set it on ours.
        object.__setattr__(attn, "forward", types.MethodType(_dispatch, attn))
    hf.config._attn_implementation = "sdpa"
    return True


def output_projection(model, layer: int) -> tuple[Tensor, Tensor | None]:
    """(weight `[d_model, head · d_head]`, bias) of `layer`'s attention output projection: an
    `nn.Linear`, or GPT-2's `Conv1D` (weight stored transposed)."""
    from transformers.pytorch_utils import Conv1D

    o = model.blocks[layer].attn.o
    proj = getattr(o, "original_component", o)
    if isinstance(proj, torch.nn.Linear):
        return proj.weight, proj.bias
    if isinstance(proj, Conv1D):
        return proj.weight.T, proj.bias
    raise UnsupportedError(
        f"{model.original_model.config.model_type}, layer {layer}: the attention output "
        f"projection is a {type(proj).__name__}, neither a Linear nor a Conv1D; use "
        "patched='z' instead"
    )
