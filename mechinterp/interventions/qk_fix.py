"""AtP*'s QK fix (Kramár et al. 2024): the estimate for a query or key node taken through the
exact change of its own head's attention pattern instead of the gradient at its query or key.

Patching a query q_t of head h, or a key k_s of KV head g, changes that head's attention logits
exactly by a bilinear term: Δlogit[t, s] = scale · Δq_t · k_s, or scale · q_t · Δk_s for every
query row t of every query head of g (soft-capped logits go through the cap exactly). The rows
it touches are renormalised exactly, and the metric's change is taken to first order in the
*probabilities*:

    Î(n) = Σ_{t,s} ∂M/∂A[t, s] · (A'[t, s] − A[t, s]),

A the target's pattern and A' the pattern with the node patched. A saturated softmax, whose
gradient at the logits is near zero, no longer hides a node that moves its attention.

`QKLayer` holds one layer's target scores, queries and keys as the layer saw them (the cached
prefix's keys included) and computes Î for every node of that layer from any gradient ∂M/∂A
(GradDrop reuses it with each dropped layer's gradient). Everything is in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Scores at or below this count as masked (the bridge fills masked logits with the minimum).
MASKED = torch.finfo(torch.float32).min / 2
#: exp() arguments are clipped here: a pattern row taken over entirely by one key stays finite.
_EXP_CAP = 600.0


@dataclass(frozen=True)
class QKLayer:
    """One attention layer of the target run, for the rows that can be patched.

    `scores` [head, rows, keys]: pre-softmax logits as the layer's softmax reads them (mask and
    soft-capping applied); `queries` [head, rows, d_head] and `keys` [kv_head, keys, d_head]:
    the queries of those rows and every key the rows attend to, as they enter the logits (the
    last `rows` keys are the rows' own); `scale`: the logit scale; `cap`: the logit soft-cap, if
    any; `sink` [head]: a learned sink logit joining each row's softmax, if any."""

    scores: Tensor
    queries: Tensor
    keys: Tensor
    scale: float
    cap: float | None = None
    sink: Tensor | None = None

    @property
    def group(self) -> int:
        return self.queries.shape[0] // self.keys.shape[0]

    def _keys(self) -> Tensor:
        return self.keys.double().repeat_interleave(self.group, dim=0)  # [head, keys, d]

    def raw(self) -> Tensor:
        """scale · q · k for every row and key, before the cap and the mask."""
        return self.scale * torch.einsum("htd,hsd->hts", self.queries.double(), self._keys())

    def live(self) -> Tensor:
        return self.scores.double() > MASKED

    def capped(self, raw: Tensor) -> Tensor:
        return raw if self.cap is None else self.cap * torch.tanh(raw / self.cap)

    def pattern(self, scores: Tensor | None = None) -> Tensor:
        """Softmax of `scores` (default: the target's) over the keys and the sink, sink dropped."""
        s = self.scores.double() if scores is None else scores
        if self.sink is None:
            return torch.softmax(s, dim=-1)
        sink = self.sink.double()[:, None, None].expand(*s.shape[:2], 1)
        return torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]

    def mismatch(self, pattern: Tensor) -> float:
        """Largest difference between the scores and pattern rebuilt from the queries and keys
        and the layer's own (`pattern`): 0 up to rounding when this layer is what it claims."""
        live = self.live()
        s = self.scores.double()
        rebuilt = self.capped(self.raw())
        d_scores = ((rebuilt - s).abs() / (1.0 + s.abs())).masked_fill(~live, 0.0).max()
        d_pattern = (self.pattern() - pattern.double()).abs().max()
        return float(torch.maximum(d_scores, d_pattern))

    def _shifted(self, d_raw: Tensor) -> Tensor:
        """The target's scores with the raw logits moved by `d_raw` where not masked."""
        s = self.scores.double()
        if self.cap is None:
            delta = d_raw
        else:
            raw = self.raw()
            delta = self.capped(raw + d_raw) - self.capped(raw)
        return s + delta.masked_fill(~self.live(), 0.0)

    # ---------------------------------------------------------------- nodes

    def query_change(self, dq: Tensor) -> Tensor:
        """A' − A [head, rows, keys] with every row's query moved by `dq` [rows, head, d]: the
        rows are independent, so row t's change is exactly the change of patching q_t alone."""
        d_raw = self.scale * torch.einsum("thd,hsd->hts", dq.double(), self._keys())
        return self.pattern(self._shifted(d_raw)) - self.pattern()

    def key_change(self, dk: Tensor) -> Tensor:
        """A' − A [head, rows, keys] with the rows' own keys (the last `rows` keys) of every KV
        head moved together by `dk` [rows, kv_head, d]."""
        n_rows, n_keys = self.scores.shape[1], self.scores.shape[2]
        dk = dk.double().repeat_interleave(self.group, dim=1)  # [rows, head, d]
        d_new = self.scale * torch.einsum("htd,jhd->htj", self.queries.double(), dk)
        d_raw = torch.zeros_like(self.scores, dtype=torch.float64)
        d_raw[..., n_keys - n_rows :] = d_new
        return self.pattern(self._shifted(d_raw)) - self.pattern()

    def query_estimates(self, dq: Tensor, grad: Tensor) -> Tensor:
        """Î per query head and row [head, rows] for each row's query patched alone."""
        return (grad.double() * self.query_change(dq)).sum(-1)

    def key_estimates(self, dk: Tensor, grad: Tensor) -> Tensor:
        """Î per KV head [kv_head] for all the rows' own keys of that KV head patched together
        (one KV head at a time: heads of other groups are untouched, so each group's share of
        the joint change is exactly its own)."""
        per_head = (grad.double() * self.key_change(dk)).sum((-1, -2))  # [head]
        return per_head.view(-1, self.group).sum(-1)

    def key_estimates_per_position(self, dk: Tensor, grad: Tensor) -> Tensor:
        """Î per KV head and key [kv_head, rows] for each of the rows' own keys patched alone.

        Changing one logit c of a row by δ renormalises the row in closed form: with e = exp(s −
        max), Z = Σ e (sink included) and u = e_c·exp(δ), the new row is e / (Z − e_c + u) with
        e_c replaced by u, so Σ_s g·(A' − A) = G_r·(1/Z' − 1/Z) + g_c·(u/Z' − e_c/Z), G_r =
        Σ_{s≠c} g·e. G_r of a row's largest logit is summed directly, never as a difference,
        so a saturated row keeps its precision."""
        g = grad.double()
        s = self.scores.double()
        n_rows, n_keys = s.shape[1], s.shape[2]
        cols = torch.arange(n_keys - n_rows, n_keys)
        dk = dk.double().repeat_interleave(self.group, dim=1)
        d_raw = self.scale * torch.einsum("htd,jhd->htj", self.queries.double(), dk)
        if self.cap is None:
            delta = d_raw
        else:
            raw = self.raw()[..., cols]
            delta = self.capped(raw + d_raw) - self.capped(raw)
        delta = delta.masked_fill(~self.live()[..., cols], 0.0)  # [head, t, j]
        top = s.max(-1).values
        if self.sink is not None:
            top = torch.maximum(top, self.sink.double()[:, None])
        e = torch.exp(s - top[..., None])
        sink_e = 0.0 if self.sink is None else torch.exp(self.sink.double()[:, None] - top)
        arg = s.argmax(-1, keepdim=True)  # each row's largest logit
        e_rest = e.scatter(-1, arg, 0.0)
        z = e.sum(-1) + sink_e
        e_c, g_c = e[..., cols], g[..., cols]
        is_top = cols[None, None, :] == arg
        g_rest = torch.where(is_top, (g * e_rest).sum(-1, keepdim=True),
                             (g * e).sum(-1, keepdim=True) - g_c * e_c)  # fmt: skip
        z_rest = torch.where(is_top, (e_rest.sum(-1) + sink_e)[..., None],
                             z[..., None] - e_c)  # fmt: skip
        u = torch.exp((s[..., cols] + delta - top[..., None]).clamp(max=_EXP_CAP))
        z_new = z_rest + u
        est = g_rest * (1.0 / z_new - 1.0 / z[..., None]) + g_c * (u / z_new - e_c / z[..., None])
        est = est.masked_fill(delta == 0, 0.0).sum(1)  # over rows t: [head, j]
        return est.view(-1, self.group, n_rows).sum(1)
