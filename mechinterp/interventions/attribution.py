"""Attribution patching of every head's query, key, value or output node (`nodes`): every node
screened from two forwards and one backward, the top of a head ranking then verified exactly
(`patch_heads(..., screen=...)`, `patching.screen_heads`).

- AtP (Nanda 2022; Syed et al. 2023): patching node n from the source run into the target run
  moves the metric by about Î(n) = (n_source − n_target) · ∂M/∂n, the gradient taken on the
  target run. Same pairs, metric, `direction`, `patch_from` and positions as `patch_nodes`, and
  the estimate is given as the metric after patching, so `values` and `recovery` read like
  `PatchResult`'s. denoise: source = clean, target = corrupt; noise: the reverse.
- AtP* (Kramár et al. 2024) changes two things:
  - `qk_fix` (query and key nodes): the node's own head's attention logits change exactly
    (they are bilinear in q and k), its softmax is recomputed exactly, and the estimate is
    taken through the attention probabilities, Σ ∂M/∂A · (A' − A), instead of through the
    gradient at q or k (`qk_fix.QKLayer`). A value or output node has no softmax of its own
    between it and its head's output, so the fix does not apply to them.
  - `grad_drop` (every node): against cancelling paths, the estimate Î_l(n) is recomputed with
    the gradient through layer l's residual writes (attention and MLP outputs) set to zero, for
    each layer l, and nodes are ranked by score(n) = Σ_l |Î_l(n)| / (L − 1) (`score`). A node
    in layer r has Î_l = Î for l < r (no path from it runs through an earlier layer) and Î_r =
    0, so only the drops above it take a backward pass. With `qk_fix`, each drop's Î_l is the
    QK-fixed estimate under that drop's gradient: the ranking uses both.
- Gradients are taken only over the positions that are patched: the shared prefix before
  `max(first differing token, patch_from)` is read from the target's KV cache without a graph.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import pandas as pd
import torch
from torch import Tensor

from mechinterp.errors import InputError, UnsupportedError
from mechinterp.heads import Head, HeadShape
from mechinterp.interventions.knockout import family_name
from mechinterp.interventions.nodes import Node, capture, check_node, n_units, node_point
from mechinterp.interventions.qk_fix import QKLayer
from mechinterp.interventions.resume import (
    Direction,
    Metric,
    PatchResult,
    Prepared,
    check_pair,
    check_positions,
    filled_cache,
    prefix_cache,
    shared_start,
)
from mechinterp.models.kv_cache import cache_kwargs

#: Largest |difference| allowed between a layer's own scores and pattern and those rebuilt from
#: its hooked queries and keys before the QK fix trusts them, in float32 and in half precision
#: (rounding is far below either; a missing scale, cap or sink is far above).
QK_TOLERANCE = {"float": 1e-3, "half": 3e-2}


@dataclass(frozen=True)
class AttributionResult(PatchResult):
    """`values[layer, unit]` (or `[layer, unit, pos]`): the *estimated* metric after patching
    each unit of `node` (a query head for q and z, a KV head for k and v); `atp`: plain AtP's
    estimate, the first-order term AtP* starts from (= `values` without `qk_fix`), so one AtP*
    call also gives AtP; `score`: the magnitude units are ranked by (|values − target| without
    `grad_drop`, GradDrop's mean over the layer drops with it); `effect` = values − the
    target's metric."""

    node: Node = "z"
    score: Tensor | None = None
    atp: Tensor | None = None
    prepared: Prepared | None = field(default=None, repr=False, compare=False)

    @property
    def effect(self) -> Tensor:
        base = self.corrupt if self.direction == "denoise" else self.clean
        return self.values - base

    def ranking(self, units: Sequence[Head] | None = None) -> list[Head]:
        """Units (all, or `units`) by descending `score` (summed over positions when per
        position); a unit is Head(layer, index), the index a KV head's for k and v."""
        s = self.score if self.score.dim() == 2 else self.score.nansum(-1)
        n_layers, n = s.shape
        units = (
            list(units)
            if units is not None
            else [Head(la, u) for la in range(n_layers) for u in range(n)]
        )
        return sorted(units, key=lambda h: (-float(s[h.layer, h.head]), h))

    @property
    def method(self) -> str:
        """`atp`, or `atp*` with `qk_fix` or `grad_drop`."""
        return self.settings["method"]

    def frame(self) -> pd.DataFrame:
        """One row per unit of `node` (and position, per position), in the columns of
        `mechinterp atp`'s table: node, layer, head, head_name, atp (plain AtP's estimated
        metric), atp_star (this result's estimate), atp_star_score, atp_star_rank (0 = ranked
        first), atp_recovery, atp_star_recovery, clean_metric, corrupt_metric, direction."""
        from mechinterp.results import head_rows

        df = head_rows(self.atp, "atp")
        df["atp_star"] = head_rows(self.values)["value"]
        df["atp_star_score"] = head_rows(self.score)["value"]
        rank = {str(h): i for i, h in enumerate(self.ranking())}
        df["atp_star_rank"] = df["head_name"].map(rank)
        df["atp_recovery"] = head_rows(self._recovery(self.atp))["value"]
        df["atp_star_recovery"] = head_rows(self._recovery(self.values))["value"]
        df.insert(0, "node", self.node)
        return df.assign(clean_metric=self.clean, corrupt_metric=self.corrupt,
                         direction=self.direction)  # fmt: skip

    def plot(self, top_k: int | None = None, title: str | None = None):
        """The layer × head heatmap of the estimated recovery that `mechinterp atp` draws
        (`head_heatmap` of atp_star_recovery, `top_k` units labelled)."""
        from mechinterp.plots import head_heatmap

        if self.per_position:
            raise InputError(
                "a per-position result has one estimate per unit and position: plot frame() "
                "grouped by position, or estimate without per_position"
            )
        df = self.frame()
        value = "atp_star_recovery" if df["atp_star_recovery"].notna().any() else "atp_star"
        title = title or f"{self.method.upper()} estimated {value} per {self.node} unit"
        return head_heatmap(df, value=value, top_k=top_k or 10, title=title)


def _frozen(t: Tensor) -> Tensor:
    return t.detach().requires_grad_(True)


@contextmanager
def _seen_keys(model, store: dict[int, Tensor]):
    """While active, `store[layer]` receives the keys each layer's logits are computed from
    [kv_head, keys, d_head]: the KV cache's (a prefix's) followed by the new ones, as returned
    by the bridge's own cache update."""
    attns = [b.attn for b in model.blocks]
    before = [vars(attn).get("_update_kv_cache") for attn in attns]  # `adapt_bridge`'s, if any
    for la, attn in enumerate(attns):
        own = attn._update_kv_cache

        def update(k: Tensor, v: Tensor, _own=own, _la=la, **kwargs):
            k, v = _own(k, v, **kwargs)
            store[_la] = k[0].detach()
            return k, v

        object.__setattr__(attn, "_update_kv_cache", update)
    try:
        yield
    finally:
        for attn, f in zip(attns, before, strict=True):
            if f is None:
                vars(attn).pop("_update_kv_cache", None)
            else:
                object.__setattr__(attn, "_update_kv_cache", f)


@dataclass
class _Graph:
    """The target's run from `start` on with a graph: the metric, the node tensors per layer
    (in the graph), the residual streams (for `Prepared`), GradDrop's residual writes, and for
    the QK fix each layer's scores, patterns (in the graph), queries and keys."""

    metric: Tensor
    acts: dict[int, Tensor]
    resid: dict[int, Tensor]
    writes: dict[int, list[Tensor]]
    scores: dict[int, Tensor]
    patterns: dict[int, Tensor]
    queries: dict[int, Tensor]
    keys: dict[int, Tensor]


def _target_graph(model, target: Sequence[int], start: int, prefix, metric: Metric, node: Node,
                  *, qk: bool, drops: bool) -> _Graph:  # fmt: skip
    shape = HeadShape.of(model)
    g = _Graph(None, {}, {}, {}, {}, {}, {}, {})

    def keep(x: Tensor, hook, *, store: dict, layer: int, graph: bool):
        store[layer] = x if graph else x[0].detach().clone()
        return x  # returned, so that the tensor kept is the one the layer goes on with

    def keep_write(x: Tensor, hook, *, layer: int) -> None:
        g.writes.setdefault(layer, []).append(x)

    hooks = [("blocks.0.hook_resid_pre", lambda x, hook: _frozen(x))]
    for la in range(shape.n_layers):
        hooks.append((node_point(model, la, node),
                      partial(keep, store=g.acts, layer=la, graph=True)))  # fmt: skip
        hooks.append((f"blocks.{la}.hook_resid_pre",
                      partial(keep, store=g.resid, layer=la, graph=False)))  # fmt: skip
        if qk:
            hooks.append((f"blocks.{la}.attn.hook_attn_scores",
                          partial(keep, store=g.scores, layer=la, graph=False)))  # fmt: skip
            hooks.append((f"blocks.{la}.attn.hook_pattern",
                          partial(keep, store=g.patterns, layer=la, graph=True)))  # fmt: skip
            if node == "k":
                hooks.append((node_point(model, la, "q"),
                              partial(keep, store=g.queries, layer=la, graph=False)))  # fmt: skip
        if drops:
            hooks.append((f"blocks.{la}.hook_attn_out", partial(keep_write, layer=la)))
            hooks.append((f"blocks.{la}.hook_mlp_out", partial(keep_write, layer=la)))
    cache = filled_cache(model, prefix, rows=1) if prefix is not None else None
    ids = torch.tensor([list(target[start:])], device=model.cfg.device)
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks), _seen_keys(model, g.keys):
        logits = model(ids, logits_to_keep=1, **cache_kwargs(model, cache))[:, -1]
        g.metric = metric(logits)[0]
    missing = [la for la in range(shape.n_layers) if la not in g.acts]
    if missing:
        raise RuntimeError(f"{family_name(model)}: {node_point(model, missing[0], node)} did "
                           f"not fire in layers {missing[:3]}")  # fmt: skip
    if drops and any(len(g.writes.get(la, [])) != 2 for la in range(shape.n_layers)):
        raise RuntimeError(f"{family_name(model)}: GradDrop needs every layer's hook_attn_out "
                           "and hook_mlp_out, and some did not fire")  # fmt: skip
    return g


def _qk_layers(model, g: _Graph, node: Node) -> dict[int, QKLayer]:
    """Each layer's `QKLayer`, checked against the layer's own scores and pattern."""
    n_units_q = HeadShape.of(model).n_heads
    out = {}
    for la in range(HeadShape.of(model).n_layers):
        q = g.acts[la].detach()[0] if node == "q" else g.queries[la]
        q = q.view(q.shape[0], n_units_q, -1).transpose(0, 1)  # [head, rows, d]
        hf = model.blocks[la].attn.original_component
        sink = getattr(hf, "sinks", None)
        layer = QKLayer(
            scores=g.scores[la], queries=q, keys=g.keys[la],
            scale=float(getattr(hf, "scaling", q.shape[-1] ** -0.5)),
            cap=getattr(hf, "attn_logit_softcapping", None),
            sink=None if sink is None else sink.detach(),
        )  # fmt: skip
        off = layer.mismatch(g.patterns[la].detach()[0])
        half = g.scores[la].dtype in (torch.float16, torch.bfloat16)
        if not off <= QK_TOLERANCE["half" if half else "float"]:
            raise UnsupportedError(
                f"{family_name(model)}: layer {la}'s attention logits are not scale · q · k "
                f"(soft-capped, masked) of its hooked queries and keys (largest difference "
                f"{off:.2g}), so the QK fix cannot recompute its softmax; use qk_fix=False"
            )
        out[la] = layer
    return out


class _Estimator:
    """Î for every unit of one layer from that layer's gradients: AtP from ∂M/∂n, or with the
    QK fix from ∂M/∂A ([unit] per head, [unit, pos] per position)."""

    def __init__(self, delta: dict[int, Tensor], qk: dict[int, QKLayer] | None, node: Node,
                 per_position: bool):  # fmt: skip
        self.delta, self.qk, self.node, self.per_position = delta, qk, node, per_position

    def atp(self, la: int, grad: Tensor) -> Tensor:
        d = self.delta[la]  # [pos, unit, d]
        e = (d.double() * grad[0].view(d.shape).double()).sum(-1)  # [pos, unit]
        return e.T if self.per_position else e.sum(0)

    def fixed(self, la: int, grad_pattern: Tensor) -> Tensor:
        layer, d, g = self.qk[la], self.delta[la], grad_pattern[0]
        if self.node == "q":
            e = layer.query_estimates(d, g)  # [head, pos]
            return e if self.per_position else e.sum(-1)
        if self.per_position:
            return layer.key_estimates_per_position(d, g)
        return layer.key_estimates(d, g)

    def __call__(self, la: int, grad: Tensor, grad_pattern: Tensor | None) -> Tensor:
        return self.atp(la, grad) if self.qk is None else self.fixed(la, grad_pattern)


def _grads(m: Tensor, xs: list[Tensor], *, retain_graph: bool) -> list[Tensor]:
    """∂m/∂x for each x; zero where m does not depend on it (a hook cut the path or replaced
    the tensor with a constant)."""
    live = [i for i, x in enumerate(xs) if x.requires_grad]
    out = [torch.zeros_like(x) for x in xs]
    if live:
        grads = torch.autograd.grad(m, [xs[i] for i in live], retain_graph=retain_graph,
                                    allow_unused=True)  # fmt: skip
        for i, d in zip(live, grads, strict=True):
            if d is not None:
                out[i] = d
    return out


def _grad_drop(g: _Graph, est: _Estimator, plain: dict[int, Tensor], qk: bool) -> Tensor:
    """GradDrop's score per unit: Σ_l |Î_l| / (L − 1), Î_l the estimate (QK-fixed with `qk`)
    with the gradient through layer l's attention and MLP writes zeroed. For a node in layer
    r, the drops below r leave Î unchanged and the drop of r gives 0, so only drops l > r
    take a backward pass (over the layers below l)."""
    n_layers = len(plain)
    state = {"drop": -1}
    handles = []
    for la, tensors in g.writes.items():
        for t in tensors:
            handles.append(t.register_hook(
                lambda d, la=la: torch.zeros_like(d) if state["drop"] == la else d
            ))  # fmt: skip
    total = {r: r * plain[r].abs() for r in range(n_layers)}
    try:
        for drop in range(1, n_layers):
            state["drop"] = drop
            below = list(range(drop))
            xs = [g.acts[r] for r in below] + ([g.patterns[r] for r in below] if qk else [])
            grads = _grads(g.metric, xs, retain_graph=True)
            for i, r in enumerate(below):
                total[r] = total[r] + est(r, grads[i], grads[drop + i] if qk else None).abs()
    finally:
        for h in handles:
            h.remove()
    return torch.stack([total[r] for r in range(n_layers)]) / (n_layers - 1)


def attribution_patch(
    model,
    clean: Sequence[int],
    corrupt: Sequence[int],
    metric: Metric,
    *,
    node: Node = "z",
    direction: Direction = "denoise",
    per_position: bool = False,
    positions: Sequence[int] | None = None,
    patch_from: int = 0,
    qk_fix: bool = False,
    grad_drop: bool = False,
) -> AttributionResult:
    """AtP (and AtP* with `qk_fix` and `grad_drop`) for every unit of `node` (`nodes`: q, k,
    v, z): the estimated metric after patching the unit from the source run into the target
    run at every position from `max(first differing token, patch_from)` on (or at each such
    position alone with `per_position`). denoise: source = clean, target = corrupt; noise: the
    reverse. `result.prepared` (node z) holds the pair's runs for `patch_heads`; `patch_nodes`
    computes the exact values these estimate. See the module docstring."""
    if hasattr(metric, "reading"):
        raise InputError("a metric read from attention rows (MassMetric) needs exact patching "
                         "(patch_nodes, path_patch): no gradient flows from a read row")
    pos_list = _check(model, clean, corrupt, node=node, direction=direction, positions=positions,
                      patch_from=patch_from, qk_fix=qk_fix, grad_drop=grad_drop)  # fmt: skip
    shape = HeadShape.of(model)
    n_pos = len(clean)
    t0 = time.perf_counter()
    start = shared_start(clean, corrupt, patch_from)
    device = model.cfg.device
    keep = min(start, n_pos - 1)
    source, target = (clean, corrupt) if direction == "denoise" else (corrupt, clean)
    _, src, logits_src = capture(model, torch.tensor([list(source)], device=device), node, keep)
    m_source = float(metric(logits_src)[0])
    prefix = prefix_cache(model, target[:start]) if 0 < start < n_pos else None
    units = n_units(model, node)
    settings = {"method": "atp*" if (qk_fix or grad_drop) else "atp", "node": node,
                "qk_fix": qk_fix, "grad_drop": grad_drop, "n_positions": n_pos,
                "shared_prefix": start, "patch_from": patch_from}  # fmt: skip

    def result(effect: Tensor, atp: Tensor, score: Tensor, m_target: float, prepared=None):
        clean_m, corrupt_m = (
            (m_source, m_target) if direction == "denoise" else (m_target, m_source)
        )
        values, atp_values = effect + m_target, atp + m_target
        if per_position:  # positions before `start` change nothing; unlisted ones are NaN
            values, atp_values, score = (
                _per_position(t, start, pos_list, fill) for t, fill in
                ((values, m_target), (atp_values, m_target), (score, 0.0))
            )  # fmt: skip
        settings["seconds"] = round(time.perf_counter() - t0, 3)
        return AttributionResult(values.float(), clean_m, corrupt_m, direction, per_position,
                                 settings, node=node, score=score.float(),
                                 atp=atp_values.float(), prepared=prepared)  # fmt: skip

    if start == n_pos:  # nothing differs where patching is allowed: every estimate is 0
        with torch.no_grad():
            logits = model(torch.tensor([list(target)], device=device), logits_to_keep=1)
        zeros = torch.zeros((shape.n_layers, units) + ((0,) if per_position else ()))
        settings["seconds_atp"] = round(time.perf_counter() - t0, 3)
        return result(zeros, zeros, zeros, float(metric(logits[:, -1])[0]))
    g = _target_graph(model, target, start, prefix, metric, node, qk=qk_fix, drops=grad_drop)
    offset = start - keep  # the source was kept from `keep`; the graph starts at `start`
    delta = {la: acts[offset:] - g.acts[la].detach()[0].view(acts[offset:].shape)
             for la, acts in src.items()}  # fmt: skip
    atp, effect, score, t_atp = _estimates(model, g, delta, node, per_position=per_position,
                                           qk_fix=qk_fix, grad_drop=grad_drop)  # fmt: skip
    settings["seconds_atp"] = round(t_atp - t0, 3)
    m_target = float(g.metric.detach())
    prepared = None
    if node == "z":
        clean_m, corrupt_m = (
            (m_source, m_target) if direction == "denoise" else (m_target, m_source)
        )
        prepared = Prepared(start, clean_m, corrupt_m, g.resid, src, prefix)
    return result(effect, atp, score, m_target, prepared)


def _check(model, clean, corrupt, *, node: str, direction: str, positions, patch_from: int,
           qk_fix: bool, grad_drop: bool) -> list[int]:  # fmt: skip
    """Refuse options `attribution_patch` cannot honour, naming the fix; the positions asked."""
    check_pair(model, clean, corrupt, direction, 1)
    check_node(model, node)
    if qk_fix and node not in ("q", "k"):
        raise InputError(
            f"qk_fix applies to query and key nodes (node='q' or 'k'), not node={node!r}: a "
            "value or output reaches its head's output through no softmax of its own (AtP* of "
            "a value or output node is AtP with grad_drop)"
        )
    if grad_drop and HeadShape.of(model).n_layers < 2:
        raise InputError("grad_drop drops one layer at a time among at least 2 layers")
    return check_positions(len(clean), positions, patch_from)


def _estimates(model, g: _Graph, delta: dict[int, Tensor], node: Node, *, per_position: bool,
               qk_fix: bool, grad_drop: bool) -> tuple[Tensor, Tensor, Tensor, float]:  # fmt: skip
    """(AtP, AtP* (QK-fixed with `qk_fix`), the ranking score, when AtP was done) per unit
    [layer, unit] (or [layer, unit, pos from start]) from the target's graph and the deltas."""
    layers = sorted(delta)
    plain = _Estimator(delta, None, node, per_position)
    xs = [g.acts[la] for la in layers] + ([g.patterns[la] for la in layers] if qk_fix else [])
    grads = _grads(g.metric, xs, retain_graph=grad_drop)
    atp = torch.stack([plain(la, grads[la], None) for la in layers])
    t_atp = time.perf_counter()
    est = _Estimator(delta, _qk_layers(model, g, node), node, per_position) if qk_fix else plain
    fixed = {la: est(la, grads[la], grads[len(layers) + la] if qk_fix else None)
             for la in layers}  # fmt: skip
    effect = torch.stack([fixed[la] for la in layers])
    score = _grad_drop(g, est, fixed, qk_fix) if grad_drop else effect.abs()
    return atp, effect, score, t_atp


def _per_position(t: Tensor, start: int, pos_list: list[int], fill: float) -> Tensor:
    """[layer, unit, pos from start] → [layer, unit, pos]: `fill` before `start`, NaN at the
    positions not asked for."""
    n_pos = start + t.shape[-1]
    out = torch.full((*t.shape[:2], n_pos), float("nan"), dtype=t.dtype)
    out[..., start:] = t
    out[..., :start] = fill
    asked = set(pos_list)
    drop = [p for p in range(n_pos) if p not in asked]
    out[..., drop] = float("nan")
    return out
