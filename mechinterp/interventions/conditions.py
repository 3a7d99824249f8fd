"""Many knockout conditions in one batch: row i of every forward gets its own `KnockoutSpec`.

    with knockout_rows(model, [KnockoutSpec(), top10, random10_seed0, ...]):
        model(tokens.expand(3, -1))

`score_conditions` builds on it to score a sweep's conditions on one example in one batched
forward over the positions the knockout covers: the positions before `shared_prefix` (for a
knockout scope, `knockout.scope_start(prompt, scope)`) run once without hooks and their KV cache
is shared by every row; the rows then run the rest (the teacher-forced response, and for scope
`query` the question and template too) under their own knockout. `generate_conditions` does the
same for free greedy generation.

Modes: `zero` and `uniform_attention` (the sweep modes; both need no per-example reference).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from jaxtyping import Float
from torch import Tensor

from mechinterp.errors import InputError
from mechinterp.heads import HeadShape
from mechinterp.interventions.context import single_use
from mechinterp.interventions.knockout import (
    KnockoutSpec,
    check_pre_softmax,
    check_uniform_attention,
    family_name,
    masked_threshold,
)
from mechinterp.models.attention import ScoreEditor
from mechinterp.models.attention import edit_scores as fused_edit_scores
from mechinterp.models.kv_cache import cache_kwargs

ROW_MODES = ("zero", "uniform_attention")


def _row_masks(specs: Sequence[KnockoutSpec], shape: HeadShape) -> dict[str, Tensor]:
    """Per mode, a bool [layer, row, head] mask of what each row knocks out."""
    masks = {
        m: torch.zeros(shape.n_layers, len(specs), shape.n_heads, dtype=torch.bool)
        for m in ROW_MODES
    }
    for r, spec in enumerate(specs):
        if not spec.heads:
            continue
        if spec.mode not in ROW_MODES:
            raise InputError(f"knockout_rows supports modes {ROW_MODES}, not {spec.mode!r}")
        if spec.scope != "all" or spec.query_positions is not None:
            raise InputError(
                "knockout_rows applies each row's spec to every position it runs; leave scope "
                "and query_positions at their defaults (a shared prefix of "
                "scope_start(prompt, scope) positions sets the scope)"
            )
        for h in spec.heads:
            shape.validate(h)
            masks[spec.mode][h.layer, r, h.head] = True
    return masks


@single_use
def knockout_rows(model, specs: Sequence[KnockoutSpec]) -> Iterator[dict]:
    """Row i of every forward inside the block is knocked out by `specs[i]` (empty spec: none).

    Every forward must have `len(specs)` rows. Yields counters (`forwards`, `edited`)."""
    if not specs:
        raise InputError("knockout_rows needs at least one spec (one per batch row)")
    shape = HeadShape.of(model)
    masks = _row_masks(specs, shape)
    uniform_layers = masks["uniform_attention"].flatten(1).any(-1).nonzero()[:, 0]
    check_uniform_attention(model, uniform_layers.tolist())
    stats = {"forwards": 0, "edited": 0}
    checked: list[bool] = []

    def rows_of(x: Tensor) -> None:
        if x.shape[0] != len(specs):
            raise InputError(f"the batch has {x.shape[0]} rows but {len(specs)} specs were given")

    def check(scores: Tensor) -> None:
        rows_of(scores)
        if not checked:
            check_pre_softmax(scores, family_name(model))
            checked.append(True)

    def every_row(b: int, q: int, k: int) -> Tensor:
        if b != len(specs):
            raise InputError(f"the batch has {b} rows but {len(specs)} specs were given")
        stats["edited"] += 1
        return torch.arange(q)

    def edit_scores(sub: Tensor, rows: Tensor, *, layer: int, heads: Tensor) -> Tensor:
        """`sub` [row, n, R, k]: scores of the layer's `heads` that some row makes uniform."""
        mask = masks["uniform_attention"][layer][:, heads].to(sub.device)  # [row, n]
        visible = sub > masked_threshold(sub.dtype)
        return torch.where(mask[:, :, None, None] & visible, torch.zeros_like(sub), sub)

    def edit_z(z: Tensor, hook, *, layer: int) -> Tensor:
        rows_of(z)
        mask = masks["zero"][layer].to(z.device)  # [row, head]
        shaped = z.view(*z.shape[:2], shape.n_heads, -1)
        stats["edited"] += 1
        return torch.where(mask[:, None, :, None], torch.zeros_like(shaped), shaped).view(z.shape)

    def count(resid: Tensor, hook) -> None:
        rows_of(resid)
        stats["forwards"] += 1

    hooks = [("blocks.0.hook_resid_pre", count)]
    editors = {}
    for layer in range(shape.n_layers):
        heads = masks["uniform_attention"][layer].any(0).nonzero()[:, 0]
        if len(heads):
            edit = partial(edit_scores, layer=layer, heads=heads)
            editors[layer] = ScoreEditor(tuple(heads.tolist()), every_row, edit, check)
        if bool(masks["zero"][layer].any()):
            hooks.append((f"blocks.{layer}.attn.hook_z", partial(edit_z, layer=layer)))
    with model.hooks(fwd_hooks=hooks), fused_edit_scores(model, editors):
        yield stats


@dataclass(frozen=True)
class ConditionScores:
    """Per condition (row): the answer tokens' teacher-forced log-probs and whether each is the
    greedy choice."""

    logprobs: Float[Tensor, "row answer"]
    top1: torch.Tensor  # bool [row, answer]

    @property
    def mean_logprob(self) -> Tensor:
        return self.logprobs.mean(-1)

    @property
    def retrieved(self) -> Tensor:
        """Greedy decoding would still write every answer token (given the same response
        before it)."""
        return self.top1.all(-1)


@torch.no_grad()
def score_conditions(
    model,
    ids: Sequence[int],
    answer: tuple[int, int],
    specs: Sequence[KnockoutSpec],
    *,
    shared_prefix: int = 0,
    max_rows: int = 16,
) -> ConditionScores:
    """Score `ids[answer[0]:answer[1]]` (teacher-forced, given everything before) under each
    spec, one batch row per spec (in batches of at most `max_rows`: each row holds its own copy
    of the prefix's KV cache). Positions before `shared_prefix` run once with no knockout and
    are shared from the KV cache; the knockout acts on every later position.
    """
    from mechinterp.interventions.patching import prefix_cache, shared_cache

    a0, a1 = answer
    n = len(ids)
    if not 0 < a0 < a1 <= n:
        raise InputError(f"answer span {answer} must lie inside the {n} tokens, after position 0")
    if not 0 <= shared_prefix < a0:
        raise InputError(f"shared_prefix {shared_prefix} must lie before the answer (at {a0})")
    if max_rows < 1:
        raise InputError(f"max_rows must be >= 1, got {max_rows}")
    device = model.cfg.device
    ids = list(ids[:a1])
    prefix = prefix_cache(model, ids[:shared_prefix]) if shared_prefix else None
    n_answer = a1 - a0
    logps, top1s = [], []
    for start in range(0, len(specs), max_rows):
        chunk = specs[start : start + max_rows]
        rows = len(chunk)
        cache = shared_cache(model, prefix, rows=rows) if prefix is not None else None
        tail = torch.tensor([ids[shared_prefix:]], device=device).expand(rows, -1)
        with knockout_rows(model, chunk):
            logits = model(tail, logits_to_keep=n_answer + 1, **cache_kwargs(model, cache))
        logits = logits[:, :n_answer].float()  # the positions that predict each answer token
        target = torch.tensor(ids[a0:a1], device=logits.device)[None, :, None].expand(rows, -1, 1)
        logps.append(logits.log_softmax(-1).gather(-1, target)[..., 0].cpu())
        top1s.append((logits.argmax(-1) == target[..., 0]).cpu())
    return ConditionScores(torch.cat(logps), torch.cat(top1s))


@torch.no_grad()
def generate_conditions(
    model,
    ids: Sequence[int],
    specs: Sequence[KnockoutSpec],
    *,
    shared_prefix: int = 0,
    max_new_tokens: int = 32,
):
    """Greedy generation from the prompt `ids` under each spec, one batch row per spec
    (`evaluate.Generation` per row). Positions before `shared_prefix` run once with no knockout
    and are shared from the KV cache; the knockout acts on every later prompt position and on
    every generated one."""
    from mechinterp.evaluate import generate_batch, stop_token_ids
    from mechinterp.interventions.patching import filled_cache, prefix_cache

    if not 0 <= shared_prefix < len(ids):
        raise InputError(f"shared_prefix {shared_prefix} must lie inside the {len(ids)} tokens")
    rows = len(specs)
    cache = None
    if shared_prefix:
        cache = filled_cache(model, prefix_cache(model, ids[:shared_prefix]), rows=rows)
    tail = [list(ids[shared_prefix:])] * rows
    with knockout_rows(model, specs):
        return generate_batch(model, tail, max_new_tokens, stop_token_ids(model), cache=cache)
