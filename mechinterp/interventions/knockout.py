"""Attention-head knockout: a frozen spec plus a context manager that attaches hooks and always
removes them.

    with knockout(model, KnockoutSpec(heads=parse_heads("L17H3 L18H6"), mode="zero")):
        generate(model, prompts)

Modes (defined in docs/concepts/interventions.md):

- `zero`: z_h ← 0 (the head's output before the output projection).
- `mean`: z_h ← its mean over a reference set (`mean_over="pooled"`: over positions too;
  `"position"`: one mean per absolute position). Pass `reference=mean_reference(...)`.
- `resample`: z_h ← z_h of another input at the same absolute position (`reference=`).
- `uniform_attention`: the head attends uniformly to every key it may see (causal and padding
  masks kept): its output is the mean of the visible values.
- `edge_knockout`: attention logits from the chosen query positions to `key_positions` are set to
  a large negative number (not −inf) and the row renormalises over the remaining keys.

Scope is a set of query positions (docs/concepts/interventions.md), never a property of how a
forward is chunked: `all` — every position; `response` — the prompt's last position (it writes the
first response token, and the retrieval score reads its row) and every later one; `query` — from the
end of the context on (question, template, response). `scope_start(prompt, scope)` gives the first
position, and the same start serves cached generation, teacher-forced scoring (`score_conditions`'s
shared prefix) and patching (`patch_from`). `query_positions` further limits the intervention to
those absolute positions. Positions count from each row's first real token, so left padding is
handled. Heads are query heads: under GQA an intervention on one query head leaves its KV siblings
intact.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechinterp.errors import InputError, UnsupportedError
from mechinterp.heads import Head, HeadShape, parse_heads
from mechinterp.interventions.context import single_use
from mechinterp.models.attention import ScoreEditor
from mechinterp.models.attention import edit_scores as fused_edit_scores

KnockoutMode = Literal["zero", "mean", "resample", "uniform_attention", "edge_knockout"]
Scope = Literal["all", "response", "query"]
SCOPES: tuple[Scope, ...] = ("all", "response", "query")
_RENAMED = {"decode": "response", "both": "all"}
MeanOver = Literal["pooled", "position"]
MODES: tuple[KnockoutMode, ...] = ("zero", "mean", "resample", "uniform_attention", "edge_knockout")
Z_MODES = ("zero", "mean", "resample")
SCORE_MODES = ("uniform_attention", "edge_knockout")



def large_negative(dtype: torch.dtype) -> float:
    """The "large negative number" of edge knockout for scores of `dtype`: finite in every dtype
    (−1e9 is −inf in float16, and an all-cut row would become NaN), far below any real logit."""
    return torch.finfo(dtype).min / 4


def masked_threshold(dtype: torch.dtype) -> float:
    """Scores at or below this are masked out (HF masks with the dtype's minimum)."""
    return torch.finfo(dtype).min / 2


@dataclass(frozen=True)
class KnockoutSpec:
    """What to knock out. JSON-serialisable; an empty `heads` is the identity."""

    heads: tuple[Head, ...] = ()
    mode: KnockoutMode = "zero"
    scope: Scope = "all"
    query_positions: tuple[int, ...] | None = None
    key_positions: tuple[int, ...] | None = None
    mean_over: MeanOver = "pooled"

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple(parse_heads(self.heads)))
        if self.mode not in MODES:
            raise InputError(f"unknown knockout mode {self.mode!r}; expected one of {MODES}")
        if self.scope not in SCOPES:
            hint = (f" (scopes are sets of positions now: {self.scope!r} is "
                    f"{_RENAMED[self.scope]!r})" if self.scope in _RENAMED else "")  # fmt: skip
            raise InputError(f"scope must be one of {SCOPES}, got {self.scope!r}{hint}")
        if self.mean_over not in ("pooled", "position"):
            raise InputError(f"mean_over must be 'pooled' or 'position', got {self.mean_over!r}")
        for name in ("query_positions", "key_positions"):
            pos = getattr(self, name)
            if pos is not None:
                pos = tuple(int(p) for p in pos)
                if not pos or min(pos) < 0:
                    raise InputError(f"{name} must be non-empty and >= 0 (or None for all)")
                object.__setattr__(self, name, pos)
        if self.mode == "edge_knockout" and self.key_positions is None:
            raise InputError("edge_knockout needs key_positions (the keys to cut, e.g. the needle)")
        if self.mode != "edge_knockout" and self.key_positions is not None:
            raise InputError(f"key_positions applies to edge_knockout only, not {self.mode!r}")

    def to_dict(self) -> dict:
        return {
            "heads": [str(h) for h in self.heads],
            "mode": self.mode,
            "scope": self.scope,
            "query_positions": None if self.query_positions is None else list(self.query_positions),
            "key_positions": None if self.key_positions is None else list(self.key_positions),
            "mean_over": self.mean_over,
        }

    @classmethod
    def from_dict(cls, d: dict) -> KnockoutSpec:
        d = dict(d)
        d["heads"] = parse_heads(d.get("heads", ()))
        for k in ("query_positions", "key_positions"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass(frozen=True)
class Reference:
    """Replacement head outputs for `mean` / `resample`: z per selected head, `[pos, head, d_head]`
    by absolute position (a `pooled` mean has pos = 1 and applies at every position)."""

    heads: tuple[Head, ...]
    z: Float[Tensor, "pos head d_head"]
    pooled: bool = False
    source: dict = field(default_factory=dict)


def head_outputs(
    model, ids: Tensor, heads: tuple[Head, ...], attention_mask: Tensor | None = None
) -> Float[Tensor, "batch pos head d_head"]:
    """z of `heads` (in order) on `ids`, one forward."""
    by_layer = _by_layer(heads)
    got: dict[int, Tensor] = {}

    def grab(z: Tensor, hook, *, layer: int) -> None:
        got[layer] = z[:, :, by_layer[layer]].detach()

    hooks = [(f"blocks.{la}.attn.hook_z", partial(grab, layer=la)) for la in by_layer]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(ids, attention_mask=attention_mask, logits_to_keep=1)
    cols = {la: 0 for la in by_layer}
    out = []
    for h in heads:
        out.append(got[h.layer][:, :, cols[h.layer]])
        cols[h.layer] += 1
    return torch.stack(out, dim=2)


def mean_reference(
    model, sequences: list[list[int]], heads, *, over: MeanOver = "pooled"
) -> Reference:
    """Mean z of `heads` over reference sequences: pooled over positions too, or per absolute
    position (up to the shortest sequence's length)."""
    heads = tuple(parse_heads(heads, HeadShape.of(model)))
    if not sequences:
        raise InputError("mean_reference needs at least one reference sequence")
    zs = [
        head_outputs(model, torch.tensor([s], device=model.cfg.device), heads)[0] for s in sequences
    ]
    if over == "pooled":
        z = torch.cat(zs).mean(0, keepdim=True)
    else:
        n = min(z.shape[0] for z in zs)
        z = torch.stack([z[:n] for z in zs]).mean(0)
    return Reference(heads, z, pooled=over == "pooled", source={"n_sequences": len(sequences)})


def resample_reference(model, sequence: list[int], heads) -> Reference:
    """z of `heads` on one other input (the `resample` mode's source)."""
    heads = tuple(parse_heads(heads, HeadShape.of(model)))
    z = head_outputs(model, torch.tensor([sequence], device=model.cfg.device), heads)[0]
    return Reference(heads, z, pooled=False, source={"n_tokens": len(sequence)})


def _by_layer(heads: tuple[Head, ...]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for h in heads:
        out.setdefault(h.layer, []).append(h.head)
    return out


def check_pre_softmax(scores: Tensor, family: str = "this model") -> None:
    """Raise when `hook_attn_scores` holds probabilities (a native-attention bridge), where
    score edits would be dropped."""
    rows = scores[:, :, -1, :]
    if bool((rows >= 0).all()) and torch.allclose(
        rows.float().sum(-1), torch.ones(1, device=rows.device), atol=1e-3
    ):
        raise UnsupportedError(
            f"{family}: hook_attn_scores is post-softmax on this model (a native-attention "
            "bridge): knockout edits there would be dropped. Load it with load_model / "
            "boot_transformers."
        )


def family_name(model) -> str:
    """The model's family as transformers names it (`config.model_type`), for error messages."""
    config = getattr(getattr(model, "original_model", None), "config", None)
    return str(getattr(config, "model_type", None) or type(model).__name__)


def check_uniform_attention(model, layers) -> None:
    """Raise where `uniform_attention` cannot make a head attend uniformly: a learned attention
    sink (GPT-OSS) joins the softmax after `hook_attn_scores`, so zeroed scores would still give
    the sink its share and the keys less than a uniform one."""
    for layer in sorted(set(layers)):
        attn = model.blocks[layer].attn
        hf_attn = getattr(attn, "original_component", attn)
        if getattr(hf_attn, "sinks", None) is not None:
            raise UnsupportedError(
                f"{family_name(model)}: uniform_attention is refused on layer {layer}: its heads "
                "have learned attention sinks, which enter the softmax outside hook_attn_scores, "
                "so the head could not be made to attend uniformly; use zero, mean or resample "
                "knockout"
            )


class _Geometry:
    """Per forward: each row's left padding (from the attention mask) and where its queries sit."""

    def __init__(self) -> None:
        self.ran = False  # set by the bridge's forward pre-hook, cleared after the forward
        self.mask: Tensor | None = None  # the forward's 2-D attention mask (None: no padding)
        self.offsets: Tensor | None = None  # [batch] left padding of each row
        self.past = 0  # positions the KV cache held before this forward (0 without a cache)
        self.q_start = 0  # absolute (padded) index of the first query of this forward
        self.q_len = 0
        self.k_start = 0  # absolute (padded) index of the first key (> 0 in a sliding window)
        self.cached = False  # the forward runs on (and extends) a KV cache: generation
        self.starts: Tensor | None = None  # [batch] first in-scope position of each row

    def place(self, b: int, q: int, k: int, layer: int) -> None:
        """This forward's q queries are the last q of the `past + q` positions seen so far (past:
        what its KV cache held before it). A sliding-window layer's cache keeps only its last
        keys, so its k keys are the last k of those positions. The mask spans every position
        seen, so each row's leading zeros are its left padding, whatever the layer's pattern."""
        total = self.past + q
        if k > total:
            raise RuntimeError(
                f"layer {layer}: scores cover {k} keys but the forward has seen only {total} "
                "positions; knockout cannot place positions"
            )
        if self.mask is None:
            self.offsets = torch.zeros(b, dtype=torch.long)
        elif self.mask.shape != (b, total):
            raise RuntimeError(
                f"layer {layer}: {total} positions seen ({self.past} cached + {q} new) for {b} "
                f"rows but the attention mask is {tuple(self.mask.shape)}; pass a mask that "
                "covers the cached prefix and the new tokens"
            )
        else:
            self.offsets = (self.mask.long().cumsum(-1) == 0).sum(-1)
        self.q_start, self.q_len, self.k_start = total - q, q, total - k


def scope_start(prompt, scope: Scope) -> int:
    """First position (from the prompt's first token) an intervention of `scope` acts on:
    `response` — the prompt's last position, which writes the first response token (the rows a
    retrieval score reads: the prefill's last row, then every decode step); `query` — the end of
    the context (question, template and response after it); `all` — 0."""
    from mechinterp.tasks.prompt import context_end

    if scope == "response":
        return prompt.n_tokens - 1
    if scope == "query":
        return context_end(prompt)
    if scope == "all":
        return 0
    raise InputError(f"scope must be one of {SCOPES}, got {scope!r}")


def _query_mask(spec: KnockoutSpec, geo: _Geometry, starts: Tensor, device) -> Tensor:
    """[batch, q] bool: which of this forward's queries the spec touches."""
    offsets = geo.offsets.to(device)
    q_abs = geo.q_start + torch.arange(geo.q_len, device=device)[None, :] - offsets[:, None]
    inside = (q_abs >= 0) & (q_abs >= starts.to(device)[:, None])
    if spec.query_positions is None:
        return inside
    wanted = torch.tensor(spec.query_positions, device=device)
    return inside & torch.isin(q_abs, wanted)


@single_use
def knockout(
    model,
    spec: KnockoutSpec,
    *,
    reference: Reference | None = None,
    starts: Sequence[int] | int | None = None,
) -> Iterator[dict]:
    """Apply `spec` to every forward inside the block (batched, with or without a KV cache).

    `starts`: per batch row (or one for every row), the first position in the spec's scope,
    from `scope_start(prompt, spec.scope)`. Scope `all` needs none. Scope `response` without
    `starts` is read off cached generation: a forward on an empty KV cache is the prompt, and each
    row's last position starts the response. A forward without a KV cache (teacher forcing) may
    hold the response itself and cannot be told from a prompt, so it is refused there: pass
    `starts`. Scope `query` always needs `starts`.

    Yields a dict of counters (`forwards`, `edited`, `positions`: the longest sequence seen,
    `in_scope`: query positions the scope covered) for checks. Raises when a needed hook never
    fired while the model ran (a silent no-op), when the scope covered no position, when
    `query_positions` / `key_positions` name positions beyond every sequence the block ran, or
    when the model's `hook_attn_scores` is post-softmax (native attention, where score edits
    are dropped).
    """
    if spec.scope == "query" and starts is None:
        raise InputError(
            "scope 'query' needs starts= (per row: scope_start(prompt, 'query'), the end of the "
            "context)"
        )
    shape = HeadShape.of(model)
    for h in spec.heads:
        shape.validate(h)
    if spec.mode in ("mean", "resample"):
        if reference is None:
            raise InputError(
                f"{spec.mode} knockout needs reference= (mean_reference or resample_reference)"
            )
        missing = [str(h) for h in spec.heads if h not in reference.heads]
        if missing:
            raise InputError(f"the reference has no z for heads {missing}")
        if spec.mode == "mean" and reference.pooled != (spec.mean_over == "pooled"):
            raise InputError(
                f"spec.mean_over={spec.mean_over!r} but the reference is "
                f"{'pooled' if reference.pooled else 'per position'}"
            )
    if spec.mode == "uniform_attention":
        check_uniform_attention(model, [h.layer for h in spec.heads])
    stats = {"forwards": 0, "edited": 0, "located": 0, "positions": 0, "in_scope": 0}
    if not spec.heads:
        yield stats
        return
    by_layer = _by_layer(spec.heads)
    geo = _Geometry()
    checked = []
    row_starts: dict[str, Tensor | None] = {"given": None, "inferred": None}
    if starts is not None and spec.scope != "all":
        given = [starts] if isinstance(starts, int) else list(starts)
        if not given or min(given) < 0:
            raise InputError(f"starts must be non-negative positions, got {starts!r}")
        row_starts["given"] = torch.tensor(given, dtype=torch.long)

    def read_inputs(module, args, kwargs) -> None:
        from mechinterp.models.kv_cache import passed_cache

        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim != 2:
            raise InputError("knockout reads left padding from a 2-D attention mask")
        geo.ran, geo.mask, geo.starts = True, mask, None
        cache = passed_cache(kwargs)
        geo.cached = cache is not None
        geo.past = 0 if cache is None else int(cache.get_seq_length())
        if spec.scope == "response" and row_starts["given"] is None and not geo.cached:
            raise InputError(
                "scope 'response' without starts= applies to cached generation only (its prompt "
                "forward marks where the response starts); a forward without a KV cache may hold "
                "the response itself: pass starts=scope_start(prompt, 'response')"
            )

    def scope_starts(geo: _Geometry) -> Tensor:
        """[batch] first in-scope position of each row of this forward."""
        b = geo.offsets.shape[0]
        if spec.scope == "all":
            return torch.zeros(b, dtype=torch.long)
        given = row_starts["given"]
        if given is not None:
            if len(given) not in (1, b):
                raise InputError(f"starts has {len(given)} entries but the batch has {b} rows")
            return given.expand(b) if len(given) == 1 else given
        if geo.q_start == 0:  # a generation's prompt: its last real position starts the response
            row_starts["inferred"] = (geo.q_len - geo.offsets.cpu() - 1).clamp(min=0)
        elif row_starts["inferred"] is None:
            raise RuntimeError(
                "scope 'response' without starts= needs the generation's prompt forward inside "
                "the block"
            )
        return row_starts["inferred"]

    def forward_done(module, args, output) -> None:
        geo.ran, geo.mask, geo.offsets = False, None, None

    def placed(layer: int) -> _Geometry:
        if not geo.ran:
            raise RuntimeError(
                f"layer {layer}: the model ran without going through the bridge's __call__ (e.g. "
                "run_from_layer or original_model), so knockout cannot place positions"
            )
        return geo

    def locate(layer: int, b: int, q: int, k: int) -> _Geometry:
        """Place this forward's positions (once per forward, at its first knocked-out layer)."""
        geo = placed(layer)
        first = geo.offsets is None
        geo.place(b, q, k, layer)
        if first:
            geo.starts = scope_starts(geo)
            stats["in_scope"] += int(_query_mask(spec, geo, geo.starts, "cpu").sum())
        stats["located"] += 1
        stats["positions"] = max(stats["positions"], geo.past + q - int(geo.offsets.min()))
        return geo

    def check(scores: Tensor) -> None:
        if not checked:
            check_pre_softmax(scores, family_name(model))
            checked.append(True)

    qmasks: dict[int, Tensor] = {}

    def score_rows(b: int, q: int, k: int, *, layer: int) -> Tensor:
        """This forward's query rows in scope for some batch row (the rest keep the kernel's)."""
        geo = locate(layer, b, q, k)
        qmasks[layer] = _query_mask(spec, geo, geo.starts, "cpu")  # [b, q]
        stats["edited"] += 1
        return qmasks[layer].any(0).nonzero()[:, 0]

    def edit_scores(sub: Tensor, rows: Tensor, *, layer: int) -> Tensor:
        """`sub` [b, n, R, k]: the knocked-out heads' masked scores at query rows `rows`."""
        if spec.mode == "uniform_attention":
            new = torch.where(sub > masked_threshold(sub.dtype), torch.zeros_like(sub), sub)
        else:
            offsets = geo.offsets.to(sub.device)
            k = sub.shape[-1]
            k_abs = geo.k_start + torch.arange(k, device=sub.device)[None, :] - offsets[:, None]
            cut = torch.isin(k_abs, torch.tensor(spec.key_positions, device=sub.device))
            floor = large_negative(sub.dtype)
            new = torch.where(cut[:, None, None, :], torch.clamp(sub, max=floor), sub)
        inside = qmasks[layer][:, rows.cpu()].to(sub.device)  # [b, R]
        return torch.where(inside[:, None, :, None], new, sub)

    def edit_z(z: Tensor, hook, *, layer: int) -> Tensor:
        # z-level modes need no scores: positions from z's shape (every key of the forward
        # counts; only queries are knocked out), so the layer may run fused attention
        geo = locate(layer, z.shape[0], z.shape[1], placed(layer).past + z.shape[1])
        qmask = _query_mask(spec, geo, geo.starts, z.device)  # [b, q]
        heads = by_layer[layer]
        sub = z[:, :, heads]  # [b, q, n, d]
        if spec.mode == "zero":
            new = torch.zeros_like(sub)
        else:
            idx = [reference.heads.index(Head(layer, h)) for h in heads]
            ref = reference.z[:, idx].to(z.device, z.dtype)  # [pos, n, d]
            if reference.pooled:
                new = ref[0].expand_as(sub)
            else:
                q_abs = (
                    geo.q_start
                    + torch.arange(geo.q_len, device=z.device)[None, :]
                    - geo.offsets.to(z.device)[:, None]
                )
                need = int(q_abs[qmask].max()) + 1 if bool(qmask.any()) else 0
                if need > ref.shape[0]:
                    raise InputError(
                        f"the {spec.mode} reference covers {ref.shape[0]} positions but position "
                        f"{need - 1} is being knocked out; use a longer reference or pooled means"
                    )
                new = ref[q_abs.clamp(0, ref.shape[0] - 1)]  # [b, q, n, d]
        sub = torch.where(qmask[:, :, None, None], new, sub)
        z = z.clone()
        z[:, :, heads] = sub
        stats["edited"] += 1
        return z

    def count(resid: Tensor, hook) -> None:
        stats["forwards"] += 1

    hooks = [(f"blocks.{min(by_layer)}.hook_resid_pre", count)]
    editors = {}
    if spec.mode in Z_MODES:
        hooks += [(f"blocks.{la}.attn.hook_z", partial(edit_z, layer=la)) for la in by_layer]
    else:
        editors = {
            la: ScoreEditor(tuple(heads), partial(score_rows, layer=la),
                            partial(edit_scores, layer=la), check)  # fmt: skip
            for la, heads in by_layer.items()
        }
    handles = [
        model.register_forward_pre_hook(read_inputs, with_kwargs=True),
        model.register_forward_hook(forward_done),
    ]
    try:
        with model.hooks(fwd_hooks=hooks), fused_edit_scores(model, editors):
            yield stats
    finally:
        for handle in handles:
            handle.remove()
    if stats["located"] == 0 and stats["forwards"] > 0:
        where = "hook_z" if spec.mode in Z_MODES else "the attention scores"
        raise RuntimeError(f"{where} never fired: the knockout was a silent no-op")
    if stats["forwards"] and stats["in_scope"] == 0:
        raise InputError(
            f"scope {spec.scope!r} covered no position of any forward in the block: the "
            "knockout touched nothing"
        )

    for name in ("query_positions", "key_positions"):
        wanted = getattr(spec, name)
        outside = sorted(p for p in wanted or () if p >= stats["positions"])
        if stats["forwards"] and outside:
            raise InputError(
                f"{name} {outside[:5]} lie outside every sequence the block ran (the longest has "
                f"{stats['positions']} positions): that part of the knockout never applied"
            )
