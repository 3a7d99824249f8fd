"""Exact path patching (Wang et al. 2022; Goldowsky-Dill et al. 2023): the effect of a sender
head on chosen receivers' inputs only, for every sender in one call.

    res = path_patch(model, clean, corrupt, metric, senders=None,
                     receivers="L18H6,L20H1", receiver_input="q")

Two passes per batch of senders (one variant per sender, batched like `patch_heads`):

1. Run the target with the sender's z taken from the source run (from the first patched position
   on) and every other head frozen at its target output; MLPs recompute (`via_mlps=True`, the
   sender's effect through them counts) or are frozen too (`via_mlps=False`: only the direct
   edge, TransformerLens' `get_act_patch_direct_path`). Record the receivers' inputs.
2. Run the target with only those inputs replaced by the recorded ones; everything else
   recomputes. The metric there is the sender's effect through the receivers.

Receiver inputs: `q` (the receiver heads' query projections, `hook_q`), `k` / `v` (key / value
projections, `hook_k` / `hook_v`; under GQA a key or value input belongs to a KV group, so the
group's input is patched and every query head in it receives the path; `settings` names the
groups), or `resid` (the whole residual stream entering layer r, `receivers=[r]`; r = n_layers
is the stream the unembedding reads, so one sender with `via_mlps=False` gives that head's
direct effect on the logits).

Where a layer's q (or k) norm normalises every head's queries (keys) together, as OLMo-2's
RMSNorm over n_heads · d_head does, `hook_q` / `hook_k` fire before that norm, and a query
written there would reach the layer's other heads through it. There the receivers' queries
(keys) are recorded and written after the norm instead (`q_norm.hook_out` / `k_norm.hook_out`,
the receiver's d_head columns). A per-head norm (Qwen3, Gemma 3: over d_head alone) maps each
head's query to its own, so `hook_q` / `hook_k` stay exact there. A norm whose reach cannot be
read from its weight, or one that spans heads with no hook after it, is refused.
`settings["hook_points"]` names the point used per receiver layer.

Both passes start at the first layer they change from the cached target residual stream and
share the target's KV cache for the prefix nobody patches (as `patch_heads`).

`path_patch_inputs(..., receiver_inputs=("q", "k"))` patches several of q / k / v into the same
receivers from one pass 1 per batch (pass 1 does not depend on the input recorded), one
`PatchResult` per input.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechinterp.errors import InputError
from mechinterp.heads import Head, HeadShape, parse_heads
from mechinterp.interventions.resume import (
    Direction,
    Metric,
    PatchResult,
    Prepared,
    check_pair,
    layer_batches,
    reading,
    run_from_layer,
)

ReceiverInput = Literal["q", "k", "v", "resid"]
RECEIVER_INPUTS: tuple[ReceiverInput, ...] = ("q", "k", "v", "resid")


class _Recorded(Exception):
    """Ends pass 1 once the last receiver input is recorded."""


def _receiver_units(receivers, receiver_input: str, shape: HeadShape) -> dict[int, list[int]]:
    """{layer: the indices patched there}: query heads for q, KV groups for k / v, [] for resid
    (the whole stream entering that layer)."""
    if receiver_input == "resid":
        layers = [receivers] if isinstance(receivers, int) else list(receivers)
        if len(layers) != 1 or not all(isinstance(r, int) for r in layers):
            raise InputError(
                "receiver_input='resid' takes one layer index as receivers "
                f"(1..{shape.n_layers}; {shape.n_layers} = the unembedding's input)"
            )
        (r,) = layers
        if not 0 < r <= shape.n_layers:
            raise InputError(f"a resid receiver is a layer in 1..{shape.n_layers} "
                             f"({shape.n_layers}: the unembedding's input), got {r}")  # fmt: skip
        return {r: []}
    heads = list(parse_heads(receivers, shape))
    if not heads:
        raise InputError("no receivers: name the receiver heads (e.g. 'L18H6,L20H1')")
    units: dict[int, set[int]] = {}
    for h in heads:
        unit = h.head if receiver_input == "q" else shape.kv_head(h)
        units.setdefault(h.layer, set()).add(unit)
    return {la: sorted(u) for la, u in sorted(units.items())}


#: The attribute names a q / k norm goes by on HF attention modules.
_QK_NORMS = {"q": ("q_norm", "q_layernorm"), "k": ("k_norm", "k_layernorm")}


def _norm_spans_heads(model, layer: int, receiver_input: str) -> str | None:
    """The attribute name of `layer`'s q (or k) norm when it normalises every head's queries
    (keys) together (OLMo-2: one RMSNorm over n_heads · d_head); None without a norm or with a
    per-head one (weight of shape (d_head,) or (heads, d_head): Qwen3, Gemma 3, Cohere)."""
    hf = model.blocks[layer].attn.original_component
    found = [n for n in _QK_NORMS[receiver_input] if getattr(hf, n, None) is not None]
    if not found:
        return None
    norm = getattr(hf, found[0])
    weight = getattr(getattr(norm, "original_component", norm), "weight", None)
    shape = HeadShape.of(model)
    units = shape.n_heads if receiver_input == "q" else shape.n_kv_heads
    d_head = model.cfg.d_head
    if isinstance(weight, Tensor) and weight.ndim >= 1:
        if weight.shape[-1] == d_head:
            return None
        if weight.ndim == 1 and weight.numel() == units * d_head:
            return found[0]
    raise InputError(
        f"path patching into {receiver_input!r} on {type(hf).__name__}: cannot tell whether "
        f"layer {layer}'s {found[0]} normalises each head alone or all heads together (weight "
        f"{None if weight is None else tuple(weight.shape)}, d_head {d_head}); patch "
        "receiver_input='v' or 'resid' instead"
    )


def _point(model, receiver_input: str, layer: int) -> str:
    """The hook where `layer`'s receiver input is recorded and written: after a q / k norm
    that spans heads (so a write moves no other head), else `hook_q` / `hook_k` / `hook_v`;
    the residual stream entering the layer for `resid`."""
    n_layers = model.cfg.n_layers
    if receiver_input == "resid":
        return (f"blocks.{layer}.hook_resid_pre" if layer < n_layers
                else f"blocks.{n_layers - 1}.hook_resid_post")  # fmt: skip
    norm = _norm_spans_heads(model, layer, receiver_input) if receiver_input != "v" else None
    if norm is None:
        return f"blocks.{layer}.attn.hook_{receiver_input}"
    point = f"blocks.{layer}.attn.{receiver_input}_norm.hook_out"
    if point not in model.hook_dict:
        raise InputError(
            f"path patching into {receiver_input!r}: layer {layer}'s {norm} normalises all "
            "heads together and the bridge has no hook after it, so a write there would move "
            "every head of the layer; patch receiver_input='v' or 'resid' instead"
        )
    return point


def _shaped(x: Tensor, units: int) -> Tensor:
    """x as [batch, pos, unit, d] (hooks may hand heads flattened)."""
    return x.view(*x.shape[:2], units, -1)


@torch.no_grad()
def path_patch(
    model,
    clean: Sequence[int],
    corrupt: Sequence[int],
    metric: Metric,
    *,
    receivers,
    receiver_input: ReceiverInput = "q",
    senders: Sequence[Head] | str | None = None,
    sets: dict[str, Sequence[Head]] | None = None,
    direction: Direction = "denoise",
    patch_from: int = 0,
    via_mlps: bool = True,
    batch_size: int = 32,
    progress: bool = False,
    prepared: Prepared | None = None,
) -> PatchResult:
    """The metric after patching the path from each sender head (alone) into `receivers`'
    `receiver_input`, `values[layer, head]` (NaN for heads that are not senders). Default
    senders: every head below the last receiver layer. `sets`: named sender sets whose paths
    are patched jointly (all members at once; members not below the last receiver layer are
    dropped), in `result.sets`; with `sets`, `senders=[]` skips the single senders.
    `prepared`: the pair's runs (`Prepared.of`) from an earlier call on the same pair and
    direction, so that calls into other receivers skip them. See the module docstring."""
    return path_patch_inputs(
        model, clean, corrupt, metric, receivers=receivers, receiver_inputs=(receiver_input,),
        senders=senders, sets=sets, direction=direction, patch_from=patch_from,
        via_mlps=via_mlps, batch_size=batch_size, progress=progress, prepared=prepared,
    )[receiver_input]  # fmt: skip


@torch.no_grad()
def path_patch_inputs(
    model,
    clean: Sequence[int],
    corrupt: Sequence[int],
    metric: Metric,
    *,
    receivers,
    receiver_inputs: Sequence[ReceiverInput] = ("q", "k"),
    senders: Sequence[Head] | str | None = None,
    sets: dict[str, Sequence[Head]] | None = None,
    direction: Direction = "denoise",
    patch_from: int = 0,
    via_mlps: bool = True,
    batch_size: int = 32,
    progress: bool = False,
    prepared: Prepared | None = None,
) -> dict[str, PatchResult]:
    """`path_patch` into each of `receiver_inputs` of the same receivers, {input: result}: one
    pass 1 per batch of senders records every input, then one pass 2 per input. `resid` is
    patched alone (its receivers are a layer, not heads)."""
    check_pair(model, clean, corrupt, direction, batch_size)
    inputs = list(dict.fromkeys(receiver_inputs))
    bad = [i for i in inputs if i not in RECEIVER_INPUTS]
    if bad or not inputs:
        raise InputError(f"receiver_input must be one of {RECEIVER_INPUTS}, got {bad or inputs}")
    if "resid" in inputs and len(inputs) > 1:
        raise InputError("receiver_input='resid' is patched alone: call path_patch once for it")
    shape = HeadShape.of(model)
    n_layers, n_pos = shape.n_layers, len(clean)
    units = {inp: _receiver_units(receivers, inp, shape) for inp in inputs}
    points = {inp: {la: _point(model, inp, la) for la in units[inp]} for inp in inputs}
    last = max(max(u) for u in units.values())
    if senders is None:
        senders = [h for h in shape.all_heads() if h.layer < last]
    senders = list(parse_heads(senders, shape)) if senders else []
    late = [str(h) for h in senders if h.layer >= last]
    if late:
        raise InputError(f"senders {late[:3]} are not below any receiver (last receiver layer "
                         f"{last}): no path leads from them into the receivers")  # fmt: skip
    if not senders and not sets:
        raise InputError("no senders: every sender must sit below the last receiver layer")
    if not 0 <= patch_from < n_pos:
        raise InputError(f"patch_from must lie in [0, {n_pos}), got {patch_from}")
    t0 = time.perf_counter()
    prep = prepared or Prepared.of(model, clean, corrupt, metric, direction, patch_from)
    if prep.target_z is None:
        raise InputError(
            "prepared= lacks the target's z (it came from attribution patching): "
            "pass Prepared.of(model, clean, corrupt, metric, direction, patch_from)"
        )
    start, prefix, m_clean, m_corrupt = prep.start, prep.prefix, prep.m_clean, prep.m_corrupt
    t_resid, t_z, s_z = prep.target_resid, prep.target_z, prep.source_z
    target = corrupt if direction == "denoise" else clean
    m_target = m_corrupt if direction == "denoise" else m_clean
    values = {inp: torch.full((n_layers, shape.n_heads), float("nan")) for inp in inputs}
    joint: dict[str, dict[str, float]] = {inp: {} for inp in inputs}
    settings = {inp: {
        "receiver_input": inp,
        "receivers": {f"L{la}": u for la, u in units[inp].items()},
        "receiver_units": "heads" if inp == "q" else
                          "kv_groups" if inp in ("k", "v") else "residual stream",
        "hook_points": {f"L{la}": p for la, p in points[inp].items()},
        "via_mlps": via_mlps, "n_senders": len(senders), "n_positions": n_pos,
        "shared_prefix": start, "patch_from": patch_from, "batch_size": batch_size,
    } for inp in inputs}  # fmt: skip

    def results() -> dict[str, PatchResult]:
        return {inp: PatchResult(values[inp], m_clean, m_corrupt, direction, False, settings[inp],
                                 joint[inp]) for inp in inputs}  # fmt: skip

    if start == n_pos:
        for inp in inputs:
            for h in senders:
                values[inp][h] = m_target
            joint[inp] = dict.fromkeys(sets or {}, m_target)
        return results()
    mlp_out = None if via_mlps else _mlp_outputs(model, target, start)

    def both_passes(variants: list[list[Head]]) -> dict[str, Tensor]:
        recorded = _pass_one(model, variants, t_resid, t_z, s_z, mlp_out, points, prefix)
        return {inp: metric(_pass_two(model, recorded[inp], units[inp], points[inp], inp,
                                      t_resid, prefix, len(variants))).float().cpu()
                for inp in inputs}  # fmt: skip

    bar = tqdm(total=len(senders), desc=f"path patch ({','.join(inputs)})",
               disable=not progress, leave=False)  # fmt: skip
    with reading(model, metric):  # a metric read from attention rows reads pass 2's
        for chunk in layer_batches(sorted(senders), batch_size, n_layers):
            for inp, vals in both_passes([[h] for h in chunk]).items():
                for h, v in zip(chunk, vals, strict=True):
                    values[inp][h] = v
            bar.update(len(chunk))
        bar.close()
        for name, members in (sets or {}).items():
            members = [h for h in parse_heads(members, shape) if h.layer < last]
            got = both_passes([members]) if members else {}
            for inp in inputs:
                joint[inp][name] = float(got[inp][0]) if members else m_target
    seconds = round(time.perf_counter() - t0, 3)
    for inp in inputs:
        settings[inp]["seconds"] = seconds
        settings[inp]["receiver_inputs_together"] = inputs
    return results()


def _mlp_outputs(model, target: Sequence[int], start: int) -> dict[int, Tensor]:
    """The target's MLP writes per layer, from `start` on (for `via_mlps=False`)."""
    out: dict[int, Tensor] = {}

    def grab(x: Tensor, hook, *, layer: int) -> None:
        out[layer] = x[0, start:].detach().clone()

    hooks = [(f"blocks.{la}.hook_mlp_out", partial(grab, layer=la))
             for la in range(model.cfg.n_layers)]  # fmt: skip
    with model.hooks(fwd_hooks=hooks):
        model(torch.tensor([list(target)], device=model.cfg.device), logits_to_keep=1)
    return out


def _pass_one(model, variants: list[list[Head]], t_resid, t_z, s_z, mlp_out,
              points: dict[str, dict[int, str]], prefix) -> dict[str, dict[int, Tensor]]:
    """Pass 1, one batch row per variant (a list of sender heads patched together): the
    senders' source z, every other head (and with `mlp_out`, every MLP) frozen at the target's;
    returns, per receiver input, the receivers' inputs (recorded at `points[input][layer]`) per
    receiver layer [batch, pos, unit, d] ([batch, pos, d_model] for resid)."""
    n_layers = model.cfg.n_layers
    rows = len(variants)
    first = min(h.layer for v in variants for h in v)
    recorded: dict[str, dict[int, Tensor]] = {inp: {} for inp in points}
    # receivers at or below `first` are never reached: their inputs stay unpatched
    n_points = sum(la > first for p in points.values() for la in p)
    shape = HeadShape.of(model)

    def write_z(z: Tensor, hook, *, la: int) -> Tensor:
        out = t_z[la][None].expand(rows, -1, -1, -1).clone()
        for i, variant in enumerate(variants):
            for h in variant:
                if h.layer == la:
                    out[i, :, h.head] = s_z[la][:, h.head]
        return out.reshape(z.shape)

    def frozen_mlp(x: Tensor, hook, *, la: int) -> Tensor:
        return mlp_out[la][None].expand(rows, -1, -1).to(x.dtype)

    def record(x: Tensor, hook, *, inp: str, la: int) -> None:
        x = x.detach().clone()
        n_units = shape.n_heads if inp == "q" else shape.n_kv_heads
        recorded[inp][la] = x if inp == "resid" else _shaped(x, n_units)
        if sum(map(len, recorded.values())) == n_points:
            raise _Recorded

    hooks = [(f"blocks.{la}.attn.hook_z", partial(write_z, la=la)) for la in range(first, n_layers)]
    if mlp_out is not None:
        hooks += [(f"blocks.{la}.hook_mlp_out", partial(frozen_mlp, la=la))
                  for la in range(first, n_layers)]  # fmt: skip
    hooks += [(point, partial(record, inp=inp, la=la))
              for inp, p in points.items() for la, point in p.items() if la > first]  # fmt: skip
    resid = t_resid[first][None].expand(rows, -1, -1)
    try:
        run_from_layer(model, resid, first, hooks=hooks, prefix_kv=prefix)
    except _Recorded:
        pass
    return recorded


def _pass_two(model, recorded: dict[int, Tensor], units: dict[int, list[int]],
              points: dict[int, str], receiver_input: str, t_resid, prefix,
              rows: int) -> Tensor:  # fmt: skip
    """Pass 2: the target with only the receivers' inputs replaced by the recorded ones, at
    `points[layer]` (under GQA a key or value input is its KV group's: every query head of the
    group reads it)."""
    n_layers = model.cfg.n_layers
    if receiver_input == "resid":
        (r,) = units
        if r < n_layers:
            return run_from_layer(model, recorded[r], r, prefix_kv=prefix)
        hook = (f"blocks.{n_layers - 1}.hook_resid_post", lambda x, hook: recorded[r])
        resid = t_resid[n_layers - 1][None].expand(rows, -1, -1)
        return run_from_layer(model, resid, n_layers - 1, hooks=[hook], prefix_kv=prefix)

    def write(x: Tensor, hook, *, la: int) -> Tensor:
        if la not in recorded:  # a receiver at or below the senders' layer: its input is unchanged
            return x
        x = x.clone()
        rec = recorded[la]
        _shaped(x, rec.shape[2])[:, :, units[la]] = rec[:, :, units[la]]
        return x

    hooks = [(points[la], partial(write, la=la)) for la in units]
    first = min(units)
    resid = t_resid[first][None].expand(rows, -1, -1)
    return run_from_layer(model, resid, first, hooks=hooks, prefix_kv=prefix)
