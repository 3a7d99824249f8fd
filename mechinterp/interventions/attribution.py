"""Attribution patching of per-head outputs (`hook_z`): every head screened from two forwards and
one backward, then the top of the ranking verified exactly (`patch_heads(..., screen=...)`,
`patching.screen_heads`).

- AtP (Nanda 2022; Syed et al. 2023): patching head h from the source run into the target run
  moves the metric by about (z_source − z_target)_h · ∂M/∂z_h, the gradient taken on the target
  run. Same pairs, metric, `direction`, `patch_from` and positions as `patch_heads`, and the
  estimate is given as the metric after patching, so `values` and `recovery` read like
  `PatchResult`'s.
- AtP* (Kramár et al. 2024) adds two options:
  - `qk_fix`: a head's own pattern is never linearised here (z is patched whole), but its change
    reaches later heads through their queries and keys, where a saturated softmax makes the
    gradient lie. For every later head the sender's write (z_src − z_tgt)·W_O is added to that
    head's residual input, its query and key rows are recomputed, its softmax is taken exactly,
    and the exact change of its pattern replaces the linear one (`_qk_fix`).
  - `grad_drop`: against cancellation between paths, the estimate is recomputed with the
    gradient through each layer's residual writes dropped in turn, and heads are ranked by
    the mean |estimate| over the L − 1 drops (`score`), not by one signed sum.
- Gradients are taken only over the positions that are patched: the shared prefix before
  `max(first differing token, patch_from)` is read from the target's KV cache without a graph.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from mechinterp.heads import Head, HeadShape
from mechinterp.interventions.resume import (
    Direction,
    Metric,
    PatchResult,
    Prepared,
    _cache,
    check_pair,
    filled_cache,
    prefix_cache,
    shared_start,
)
from mechinterp.models.kv_cache import cache_kwargs


@dataclass(frozen=True)
class AttributionResult(PatchResult):
    """`values[layer, head]` (or `[layer, head, pos]`): the *estimated* metric after patching each
    head; `score`: the magnitude heads are ranked by (|estimate − target| for AtP, the GradDrop
    mean for `grad_drop`); `effect` = values − the target's metric; `atp`: plain AtP's estimate,
    the first-order term AtP* starts from (= `values` without `qk_fix`), so one AtP* call also
    gives AtP (`settings["seconds_atp"]`: the time it took)."""

    score: Tensor | None = None
    atp: Tensor | None = None
    prepared: Prepared | None = field(default=None, repr=False, compare=False)

    @property
    def effect(self) -> Tensor:
        base = self.corrupt if self.direction == "denoise" else self.clean
        return self.values - base

    def ranking(self, heads: Sequence[Head] | None = None) -> list[Head]:
        """Heads by descending `score` (summed over positions when per position)."""
        s = self.score if self.score.dim() == 2 else self.score.nansum(-1)
        n_layers, n_heads = s.shape
        heads = list(heads) if heads is not None else [
            Head(la, h) for la in range(n_layers) for h in range(n_heads)
        ]
        return sorted(heads, key=lambda h: (-float(s[h.layer, h.head]), h))


def _frozen(t: Tensor) -> Tensor:
    return t.detach().requires_grad_(True)


def _target_graph(model, target: Sequence[int], start: int, prefix, *, keep_outputs: bool,
                  keep_inputs: bool):  # fmt: skip
    """Run the target from `start` on (its prefix from the KV cache) with a graph: returns the
    last-position logits, each layer's z [pos, head, d_head] (in the graph), with
    `keep_outputs` each layer's attention and MLP writes (for GradDrop's tensor hooks), and
    with `keep_inputs` each layer's residual input [pos, d_model] and the values its attention
    reads [kv_head, keys, d_head] (the prefix's from the cache, then the new ones; for the QK
    fix)."""
    shape = HeadShape.of(model)
    device = model.cfg.device
    z: dict[int, Tensor] = {}
    writes: dict[int, list[Tensor]] = {}
    resid: dict[int, Tensor] = {}
    values: dict[int, Tensor] = {}

    def keep_resid(x: Tensor, hook, *, layer: int) -> None:
        resid[layer] = x[0].detach()

    def keep_v(x: Tensor, hook, *, layer: int) -> None:
        values[layer] = x[0].detach().reshape(x.shape[1], shape.n_kv_heads, -1).transpose(0, 1)

    def keep_z(x: Tensor, hook, *, layer: int) -> Tensor:
        z[layer] = x
        return x  # returned, so that the tensor kept is the one the layer goes on with

    def keep_write(x: Tensor, hook, *, layer: int) -> None:
        writes.setdefault(layer, []).append(x)

    hooks = [("blocks.0.hook_resid_pre", lambda x, hook: _frozen(x))]
    for la in range(shape.n_layers):
        hooks.append((f"blocks.{la}.attn.hook_z", partial(keep_z, layer=la)))
        hooks.append((f"blocks.{la}.hook_resid_pre", partial(keep_resid, layer=la)))
        if keep_inputs:
            hooks.append((f"blocks.{la}.attn.hook_v", partial(keep_v, layer=la)))
        if keep_outputs:
            hooks.append((f"blocks.{la}.hook_attn_out", partial(keep_write, layer=la)))
            hooks.append((f"blocks.{la}.hook_mlp_out", partial(keep_write, layer=la)))
    cache = filled_cache(model, prefix, rows=1) if prefix is not None else None
    ids = torch.tensor([list(target[start:])], device=device)
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(ids, logits_to_keep=1, **cache_kwargs(model, cache))[:, -1]
    if keep_inputs and prefix is not None:
        for la, v in values.items():
            values[la] = torch.cat([prefix.layers[la].values[0].detach(), v], dim=1)
    return logits, z, writes, resid, values


@torch.no_grad()
def _effects(dz: dict[int, Tensor], grads: Sequence[Tensor], layers: list[int],
             per_position: bool, shape: HeadShape) -> Tensor:  # fmt: skip
    """Σ_d Δz·g per head (and per position): [layer, head] or [layer, head, pos-from-start]."""
    out = []
    for la, g in zip(layers, grads, strict=True):
        g = g[0].reshape(g.shape[1], shape.n_heads, -1).float()
        e = (dz[la].float() * g).sum(-1)  # [pos, head]
        out.append(e.T if per_position else e.sum(0))
    return torch.stack(out)


def attribution_patch(
    model,
    clean: Sequence[int],
    corrupt: Sequence[int],
    metric: Metric,
    *,
    direction: Direction = "denoise",
    per_position: bool = False,
    positions: Sequence[int] | None = None,
    patch_from: int = 0,
    qk_fix: bool = False,
    grad_drop: bool = False,
) -> AttributionResult:
    """AtP (and AtP* with `qk_fix` and `grad_drop`) for every head: the estimated metric after
    patching each head's z from the source run into the target run at every position from
    `max(first differing token, patch_from)` on (or each such position alone with
    `per_position`). denoise: source = clean, target = corrupt; noise: the reverse.
    The QK fix batches every sender of a receiver layer into one forward, as far as
    `QK_BLOCK_BYTES` allows. `result.prepared` holds the pair's runs for `patch_heads`."""
    check_pair(model, clean, corrupt, direction, 1)
    if qk_fix and per_position:
        raise ValueError("qk_fix estimates whole heads; use per_position with plain AtP")
    shape = HeadShape.of(model)
    n_pos = len(clean)
    if not 0 <= patch_from < n_pos:
        raise ValueError(f"patch_from must lie in [0, {n_pos}), got {patch_from}")
    pos_list = list(range(n_pos)) if positions is None else list(positions)
    if any(not 0 <= p < n_pos for p in pos_list):
        raise ValueError(f"positions must lie in [0, {n_pos}), got {sorted(pos_list)[:3]}…")
    t0 = time.perf_counter()
    start = shared_start(clean, corrupt, patch_from)
    device = model.cfg.device
    keep = min(start, n_pos - 1)
    source, target = (clean, corrupt) if direction == "denoise" else (corrupt, clean)
    _, z_src, logits_src = _cache(model, torch.tensor([list(source)], device=device), keep)
    prefix = prefix_cache(model, target[:start]) if 0 < start < n_pos else None
    out_shape = (shape.n_layers, shape.n_heads) + ((n_pos,) if per_position else ())
    settings = {"method": "atp*" if (qk_fix or grad_drop) else "atp", "qk_fix": qk_fix,
                "grad_drop": grad_drop, "n_positions": n_pos, "shared_prefix": start,
                "patch_from": patch_from}  # fmt: skip
    if start == n_pos:  # nothing differs where patching is allowed: every estimate is 0
        with torch.no_grad():
            m = float(metric(model(torch.tensor([list(target)], device=device),
                                   logits_to_keep=1)[:, -1])[0])  # fmt: skip
        m_src = float(metric(logits_src)[0])
        clean_m, corrupt_m = (m_src, m) if direction == "denoise" else (m, m_src)
        zeros = torch.zeros(out_shape)
        settings["seconds"] = settings["seconds_atp"] = round(time.perf_counter() - t0, 3)
        return AttributionResult(zeros + m, clean_m, corrupt_m, direction, per_position,
                                 settings, score=zeros, atp=zeros + m)  # fmt: skip
    logits, z_tgt, writes, resid, vals = _target_graph(
        model, target, start, prefix, keep_outputs=grad_drop, keep_inputs=qk_fix
    )
    with torch.enable_grad():
        m_tgt = metric(logits)[0]
    layers = list(range(shape.n_layers))
    offset = start - keep  # _cache kept positions from `keep`; the graph starts at `start`
    dz = {
        la: (z_src[la][offset:] - z_tgt[la][0].detach().reshape(n_pos - start, shape.n_heads, -1))
        for la in layers
    }
    zs = [z_tgt[la] for la in layers]
    grads = _grads(m_tgt, zs, retain_graph=grad_drop)
    first_order = _effects(dz, grads, layers, per_position, shape)
    settings["seconds_atp"] = round(time.perf_counter() - t0, 3)
    effect = first_order
    if qk_fix:
        effect = effect + _qk_fix(model, start, prefix, dz, grads, resid, vals)
    score = effect.abs()
    if grad_drop:
        score = _grad_drop(m_tgt, zs, writes, dz, layers, per_position, shape)
    m_target = float(m_tgt.detach())
    m_source = float(metric(logits_src)[0])
    clean_m, corrupt_m = (m_source, m_target) if direction == "denoise" else (m_target, m_source)
    values = effect + m_target
    if per_position:  # (never with the QK fix: first_order is effect)
        values = torch.full(out_shape, float("nan"))
        values[..., start:] = effect + m_target
        values[..., :start] = m_target
        drop = [p for p in range(n_pos) if p not in set(pos_list)]
        values[..., drop] = float("nan")
        full = torch.zeros(out_shape)
        full[..., start:] = score
        score = full
    atp = values if first_order is effect else first_order + m_target
    settings["seconds"] = round(time.perf_counter() - t0, 3)
    prepared = Prepared(start, clean_m, corrupt_m, resid, z_src, prefix)
    return AttributionResult(values, clean_m, corrupt_m, direction, per_position, settings,
                             score=score, atp=atp, prepared=prepared)  # fmt: skip


def _grads(m: Tensor, zs: list[Tensor], *, retain_graph: bool) -> list[Tensor]:
    """∂m/∂z for each z; zero where m does not depend on it (a hook cut the path)."""
    grads = torch.autograd.grad(m, zs, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(z) if g is None else g for z, g in zip(zs, grads, strict=True)]


def _grad_drop(m: Tensor, zs: list[Tensor], writes: dict[int, list[Tensor]],
               dz: dict[int, Tensor], layers: list[int], per_position: bool,
               shape: HeadShape) -> Tensor:  # fmt: skip
    """GradDrop (Kramár et al. 2024): for each layer l, the AtP estimate with the gradient
    through layer l's residual writes (attention and MLP outputs) set to zero; the score is
    the mean |estimate| over the drops, divided by L − 1 (a head's own layer's drop gives 0)."""
    state = {"drop": -1}
    handles = []
    for la, tensors in writes.items():
        for t in tensors:
            handles.append(t.register_hook(
                lambda g, la=la: torch.zeros_like(g) if state["drop"] == la else g
            ))  # fmt: skip
    total = None
    try:
        for la in layers:
            state["drop"] = la
            grads = _grads(m, zs, retain_graph=True)
            e = _effects(dz, grads, layers, per_position, shape).abs()
            total = e if total is None else total + e
    finally:
        for h in handles:
            h.remove()
    return total / max(len(layers) - 1, 1)


class _Stop(Exception):
    """Ends a forward once the layer being read has given its pattern rows."""


#: Largest pattern block (bytes) one QK-fix forward holds: [variants, head, rows, keys] float32.
QK_BLOCK_BYTES = 64 * 2**20


@torch.no_grad()
def _qk_fix(model, start: int, prefix, dz: dict[int, Tensor], grads: Sequence[Tensor],
            resid: dict[int, Tensor], values: dict[int, Tensor]) -> Tensor:  # fmt: skip
    """AtP*'s QK fix for head-output nodes, [layer, head]: for every later layer r and every
    sender head h below it, the sender's write Δz_h·W_O[h] is added to the residual entering r
    (positions from `start` on), r's pattern rows are recomputed exactly from it (its own
    queries, keys, norms, rotary, mask and cache: `read_rows`), and

        correction(h) = Σ_r Σ_{t,s} (A'_r − A_r − lin_r)[t, s] · ∂M/∂A_r[t, s],

    lin_r = A_r ⊙ (Δs − Σ_s A_r Δs) the softmax's linearisation at the same score change
    (Δs = log A' − log A up to a per-row constant, which lin ignores), and ∂M/∂A_r[t, s] =
    g_z(r)[t] · v(r)[s]. AtP's own term for that path is lin's, so the sum replaces it with the
    exact pattern change. Paths from h into r's queries and keys through layers in between stay
    linear."""
    from mechinterp.interventions.resume import run_from_layer
    from mechinterp.models.attention import RowReader, output_projection, read_rows

    shape = HeadShape.of(model)
    n_layers, n_heads = shape.n_layers, shape.n_heads
    out = torch.zeros(n_layers, n_heads)
    writes = {}
    for la in range(n_layers - 1):
        w, _ = output_projection(model, la)  # [d_model, head · d_head]
        d_head = w.shape[1] // n_heads
        w = w.float().reshape(w.shape[0], n_heads, d_head)
        writes[la] = torch.einsum("phd,mhd->hpm", dz[la].float(), w)  # [head, pos, d_model]
    for r in range(1, n_layers):
        senders = [(la, h) for la in range(r) for h in range(n_heads)
                   if bool(writes[la][h].abs().amax() > 0)]  # fmt: skip
        if not senders:
            continue
        g = grads[r][0].reshape(grads[r].shape[1], n_heads, -1).float()  # [P, head, d]
        v = values[r].float().repeat_interleave(shape.group_size, dim=0)  # [head, Tk, d]
        dmdA = torch.einsum("phd,hkd->hpk", g, v)  # [head, P, Tk]
        per_variant = 4 * dmdA.numel()
        size = max(1, QK_BLOCK_BYTES // max(per_variant, 1) - 1)  # all senders, memory allowing
        base = resid[r].float()  # [P, d_model]
        A = None
        for b in range(0, len(senders), size):
            chunk = senders[b : b + size]
            batch = torch.stack([base] + [base + writes[la][h] for la, h in chunk])
            got: list[Tensor] = []

            def read(pattern: Tensor, got=got) -> None:
                got.append(pattern)
                raise _Stop

            reader = RowReader(rows=lambda tq, tk: torch.arange(tq), read=read)
            try:
                with read_rows(model, {r: reader}):
                    run_from_layer(model, batch.to(resid[r].dtype), r, prefix_kv=prefix)
            except _Stop:
                pass
            (pat,) = got
            if A is None:  # row 0 is unpatched: the target's own pattern, and what follows of it
                A = pat[0]
                log_a = A.clamp_min(1e-45).log()
                live = (A > 0).float()
                a_g = A * dmdA  # [head, P, Tk]
                base_term = float(a_g.sum())
                a_g_rows = a_g.sum(-1)  # [head, P]
            A2 = pat[1:]
            # Σ (A2 − A − lin)·G with lin = A ⊙ (ds − Σ_s A ds), ds = log A2 − log A where both
            # are positive (0 elsewhere), summed without materialising A2 − A or lin
            ds = A2.clamp_min(1e-45).log_().sub_(log_a).mul_(live).masked_fill_(A2 == 0, 0.0)
            exact = torch.einsum("bhts,hts->b", A2, dmdA) - base_term
            mean_ds = torch.einsum("bhts,hts->bht", ds, A)
            lin = torch.einsum("bhts,hts->b", ds, a_g)
            lin -= torch.einsum("bht,ht->b", mean_ds, a_g_rows)
            for (la, h), v in zip(chunk, (exact - lin).tolist(), strict=True):
                out[la, h] += v
    return out
