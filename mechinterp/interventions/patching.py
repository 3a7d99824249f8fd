"""Activation patching of per-head outputs (`hook_z`), fast: many patched variants per forward
(batches filled across layers), and no recomputation below a batch's first patched layer.

- `patch_heads(model, clean, corrupt, metric)`: every head (or a subset), all positions or each
  position separately, denoising (clean z into the corrupt run; sufficiency) or noising (corrupt z
  into the clean run; necessity). Returns a `layer × head` (or `layer × head × pos`) tensor of
  the metric, with the clean and corrupt baselines.
- `patch_nodes`: the same for a head's query, key or value (`mechinterp.interventions.nodes`),
  the exact values attribution patching estimates.
- `normalised_recovery`: (M_patched − M_corrupt) / (M_clean − M_corrupt).
- `run_from_layer`: resume a forward from a cached residual stream at block k, running only blocks
  k.. (the bridge's own `start_at_layer` still executes the blocks below and discards them).

Cross-model patching (donor head outputs into a recipient of the same shape) is `cross_patch` in
`mechinterp.interventions.cross`; attribution patching (AtP, AtP*, and `patch_heads(...,
screen="atp*")`, with its false-negative diagnostic) is in `mechinterp.interventions.attribution`;
path patching in `mechinterp.interventions.paths`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from functools import partial
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechinterp.errors import InputError
from mechinterp.heads import Head, HeadShape, parse_heads
from mechinterp.interventions.knockout import _by_layer
from mechinterp.interventions.nodes import (
    Node,
    capture,
    check_node,
    check_units,
    n_units,
    node_point,
)
from mechinterp.interventions.resume import (  # noqa: F401  (re-exported: the patching API)
    Direction,
    Metric,
    PatchResult,
    Prepared,
    _cache,
    check_pair,
    check_positions,
    check_resumable,
    filled_cache,
    layer_batches,
    logit_diff_metric,
    logprob_metric,
    normalised_recovery,
    prefix_cache,
    reading,
    resumable,
    run_from_layer,
    shared_cache,
    shared_start,
)


def _write_z(
    z: Tensor,
    hook,
    *,
    heads: list[int],
    positions: list[int | None],
    source: Tensor,
    start: int,
    rows: list[int] | None = None,
):
    """Batch row rows[i] (default: i) writes the source's activation at position pos_i, unit
    head_i into z[row, pos_i, head_i] (pos None: all); z is any node point's tensor, [batch,
    pos, unit, d_head] or with the last two flattened. z and `source` both hold the positions
    from `start` on (after a cached prefix)."""
    z = z.clone()
    shaped = z.view(*z.shape[:2], source.shape[1], -1)
    rows = range(len(heads)) if rows is None else rows
    for i, h, p in zip(rows, heads, positions, strict=True):
        if p is None:
            shaped[i, :, h] = source[:, h]
        else:
            shaped[i, p - start, h] = source[p - start, h]
    return z


def _patch_units(model, units: list[Head], point, source: dict[int, Tensor],
                 target_resid: dict[int, Tensor], start: int, prefix, metric: Metric,
                 m_target: float, out_shape: tuple, pos_list: list[int], *, n_pos: int,
                 per_position: bool, batch_size: int, progress: bool,
                 desc: str) -> Tensor:  # fmt: skip
    """The metric with each unit (and with `per_position` each position) patched alone: a
    unit of layer l is written at `point(l)` from `source[l]` ([pos from `start`, unit,
    d_head]), one batch row per variant, each batch resumed from its first layer on the
    target's residual stream. Variants that change nothing (`start == n_pos`, or a position
    before `start`) keep the target's metric."""
    values = torch.full(out_shape, float("nan"))
    by_layer: dict[int, list[tuple[int, int | None]]] = {}
    for h in units:
        for p in pos_list if per_position else [None]:
            if start == n_pos or (p is not None and p < start):
                values[(h.layer, h.head) + (() if p is None else (p,))] = m_target
            else:
                by_layer.setdefault(h.layer, []).append((h.head, p))
    total = sum(len(v) for v in by_layer.values())
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    variants = [(layer, h, p) for layer, vs in sorted(by_layer.items()) for h, p in vs]
    with reading(model, metric):
        _patch_chunks(model, variants, point, source, target_resid, start, prefix, metric,
                      values, per_position=per_position, batch_size=batch_size,
                      bar=bar)  # fmt: skip
    bar.close()
    return values


def _patch_chunks(model, variants, point, source, target_resid, start, prefix, metric, values,
                  *, per_position: bool, batch_size: int, bar) -> None:  # fmt: skip
    """`_patch_units`' patched forwards, a batch of (layer, unit, position) variants at a time,
    each batch's metric written into `values`."""
    for chunk in layer_batches(variants, batch_size, model.cfg.n_layers):
        first = chunk[0][0]
        hooks = []
        for la in sorted({v[0] for v in chunk}):
            rows = [i for i, v in enumerate(chunk) if v[0] == la]
            hook = partial(_write_z, rows=rows, heads=[chunk[i][1] for i in rows],
                           positions=[chunk[i][2] for i in rows], source=source[la],
                           start=start)  # fmt: skip
            hooks.append((point(la), hook))
        resid = target_resid[first][None].expand(len(chunk), -1, -1)
        logits = run_from_layer(model, resid, first, hooks=hooks, prefix_kv=prefix)
        vals = metric(logits).float().cpu()
        for (la, h, p), v in zip(chunk, vals, strict=True):
            values[(la, h) + ((p,) if per_position else ())] = v
        bar.update(len(chunk))


def _patch_set(model, members, shape, source_z, target_resid, start: int, prefix,
               metric: Metric, m_target: float, n_pos: int) -> float:  # fmt: skip
    """The metric with every head of `members` patched at once (the target's when none is, or
    nothing differs from `start` on)."""
    by_set = _by_layer(parse_heads(members, shape))
    if not by_set or start == n_pos:
        return m_target
    hooks = [
        (
            f"blocks.{la}.attn.hook_z",
            partial(_write_z, heads=[hs], positions=[None], source=source_z[la], start=start),
        )
        for la, hs in by_set.items()
    ]
    first = min(by_set)
    resid = target_resid[first][None]
    logits = run_from_layer(model, resid, first, hooks=hooks, prefix_kv=prefix)
    return float(metric(logits)[0])


@torch.no_grad()
def patch_heads(
    model,
    clean: Sequence[int],
    corrupt: Sequence[int],
    metric: Metric,
    *,
    direction: Direction = "denoise",
    heads: Sequence[Head] | str | None = None,
    per_position: bool = False,
    positions: Sequence[int] | None = None,
    patch_from: int = 0,
    sets: dict[str, Sequence[Head]] | None = None,
    batch_size: int = 32,
    progress: bool = False,
    screen: Literal["atp", "atp*"] | None = None,
    verify_top: int = 30,
    sample: int = 0,
    prepared: Prepared | None = None,
) -> PatchResult:
    """Patch each head's output from the source run into the target run, one variant per head
    (and per position with `per_position`), and evaluate `metric` on the last-position logits.

    denoise: source = clean, target = corrupt (does this head restore the clean answer?).
    noise: source = corrupt, target = clean (does corrupting this head break it?).
    `patch_from`: patch only positions >= it (e.g. the question and answer positions, where a
    retrieval head copies); the target's run before it is shared from the KV cache.
    `sets`: named head sets also patched *jointly* (all their heads at once, every position
    from `patch_from`), in `result.sets`; with `sets`, `heads=[]` skips the per-head variants.
    Heads not listed (or positions not listed) are NaN in the result.
    `screen="atp*"` (or `"atp"`): rank the heads by attribution patching first and patch only
    the `verify_top` best exactly, and `sample` more drawn from the rest for the false-negative
    diagnostic (`screen_heads`; the ranking is `result.screen`).
    `prepared`: the pair's runs from an earlier call on the same pair (`Prepared`).
    """
    if screen is not None:
        if per_position or sets or positions is not None:
            raise InputError("screen= ranks whole heads: drop per_position, positions and sets")
        return screen_heads(model, clean, corrupt, metric, screen=screen, verify_top=verify_top,
                            sample=sample, heads=heads, direction=direction,
                            patch_from=patch_from, batch_size=batch_size,
                            progress=progress)  # fmt: skip
    check_pair(model, clean, corrupt, direction, batch_size)
    shape = HeadShape.of(model)
    heads = shape.all_heads() if heads is None else list(parse_heads(heads, shape))
    if not heads and not sets:
        raise InputError("no heads to patch")
    n_pos = len(clean)
    pos_list = check_positions(n_pos, positions, patch_from)
    t0 = time.perf_counter()
    # Before the first corrupted token both runs are identical (causal attention): patching there
    # changes nothing, and every variant shares the target's KV cache for that prefix.
    prep = prepared or Prepared.of(model, clean, corrupt, metric, direction, patch_from)
    start, prefix, m_clean, m_corrupt = prep.start, prep.prefix, prep.m_clean, prep.m_corrupt
    target_resid, source_z = prep.target_resid, prep.source_z
    m_target = m_corrupt if direction == "denoise" else m_clean
    out_shape = (shape.n_layers, shape.n_heads) + ((n_pos,) if per_position else ())
    values = _patch_units(model, heads, lambda la: f"blocks.{la}.attn.hook_z", source_z,
                          target_resid, start, prefix, metric, m_target, out_shape, pos_list,
                          n_pos=n_pos, per_position=per_position, batch_size=batch_size,
                          progress=progress, desc=f"patch ({direction})")  # fmt: skip
    joint = {}
    with reading(model, metric):
        for name, members in (sets or {}).items():
            joint[name] = _patch_set(model, members, shape, source_z, target_resid, start,
                                     prefix, metric, m_target, n_pos)  # fmt: skip
    settings = {
        "n_heads_patched": len(heads),
        "n_positions": n_pos,
        "shared_prefix": start,
        "patch_from": patch_from,
        "batch_size": batch_size,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return PatchResult(values, m_clean, m_corrupt, direction, per_position, settings, joint)


@torch.no_grad()
def patch_nodes(
    model,
    clean: Sequence[int],
    corrupt: Sequence[int],
    metric: Metric,
    *,
    node: Node,
    units: Sequence[Head] | str | None = None,
    direction: Direction = "denoise",
    per_position: bool = False,
    positions: Sequence[int] | None = None,
    patch_from: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> PatchResult:
    """Exact activation patching of one node type (`mechinterp.interventions.nodes`): each
    unit's query (`q`), key (`k`), value (`v`) or output (`z`) taken from the source run into
    the target run, alone, at every position from `max(first differing token, patch_from)` on
    (or each position alone with `per_position`). `values[layer, unit]` (`[layer, unit, pos]`);
    a unit is a query head for q and z and a KV head for k and v. `node="z"` is `patch_heads`.
    The reference `attribution_patch` estimates."""
    check_node(model, node)
    if node == "z":
        return patch_heads(model, clean, corrupt, metric, direction=direction, heads=units,
                           per_position=per_position, positions=positions,
                           patch_from=patch_from, batch_size=batch_size,
                           progress=progress)  # fmt: skip
    check_pair(model, clean, corrupt, direction, batch_size)
    shape = HeadShape.of(model)
    n_pos = len(clean)
    chosen = check_units(model, node, units) if units is not None else None
    pos_list = check_positions(n_pos, positions, patch_from)
    t0 = time.perf_counter()
    device = model.cfg.device
    start = shared_start(clean, corrupt, patch_from)
    keep = min(start, n_pos - 1)
    with reading(model, metric):  # each run's metric right after its forward
        resid_c, acts_c, logits_c = capture(model, torch.tensor([list(clean)], device=device),
                                            node, keep)  # fmt: skip
        m_clean = float(metric(logits_c)[0])
        resid_x, acts_x, logits_x = capture(model, torch.tensor([list(corrupt)], device=device),
                                            node, keep)  # fmt: skip
        m_corrupt = float(metric(logits_x)[0])
    target, target_resid, source = (
        (corrupt, resid_x, acts_c) if direction == "denoise" else (clean, resid_c, acts_x)
    )
    m_target = m_corrupt if direction == "denoise" else m_clean
    prefix = prefix_cache(model, target[:start]) if 0 < start < n_pos else None
    n = n_units(model, node)
    if chosen is None:
        chosen = [Head(la, u) for la in range(shape.n_layers) for u in range(n)]
    out_shape = (shape.n_layers, n) + ((n_pos,) if per_position else ())
    values = _patch_units(model, chosen, lambda la: node_point(model, la, node), source,
                          target_resid, start, prefix, metric, m_target, out_shape, pos_list,
                          n_pos=n_pos, per_position=per_position, batch_size=batch_size,
                          progress=progress, desc=f"patch {node} ({direction})")  # fmt: skip
    settings = {"node": node, "n_units_patched": len(chosen), "n_positions": n_pos,
                "shared_prefix": start, "patch_from": patch_from, "batch_size": batch_size,
                "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    return PatchResult(values, m_clean, m_corrupt, direction, per_position, settings)


def screen_heads(
    model,
    clean: Sequence[int],
    corrupt: Sequence[int],
    metric: Metric,
    *,
    screen: Literal["atp", "atp*"] = "atp*",
    node: Node = "z",
    verify_top: int = 30,
    sample: int = 0,
    threshold: float = 0.05,
    confidence: float = 0.95,
    seed: int = 0,
    heads: Sequence[Head] | str | None = None,
    direction: Direction = "denoise",
    patch_from: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> PatchResult:
    """Rank every unit of `node` (default: each head's output) by AtP (`screen="atp"`) or AtP*
    (`"atp*"`: GradDrop, and for query and key nodes the QK fix), then patch the top
    `verify_top` exactly and run the false-negative diagnostic on `sample` of the rest
    (`verify_screen`). `heads`: rank only these units."""
    from mechinterp.interventions.attribution import attribution_patch

    if screen not in ("atp", "atp*"):
        raise InputError(f"screen must be 'atp' or 'atp*', got {screen!r}")
    star = screen == "atp*"
    est = attribution_patch(model, clean, corrupt, metric, node=node, direction=direction,
                            patch_from=patch_from, qk_fix=star and node in ("q", "k"),
                            grad_drop=star)  # fmt: skip
    res = verify_screen(model, clean, corrupt, metric, est, units=heads, verify_top=verify_top,
                        sample=sample, threshold=threshold, confidence=confidence, seed=seed,
                        batch_size=batch_size, progress=progress)  # fmt: skip
    res.settings["screen"] = screen
    return res


def verify_screen(
    model,
    clean: Sequence[int],
    corrupt: Sequence[int],
    metric: Metric,
    screen,
    *,
    units: Sequence[Head] | str | None = None,
    verify_top: int = 30,
    sample: int = 0,
    threshold: float = 0.05,
    confidence: float = 0.95,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> PatchResult:
    """Patch exactly the `verify_top` units an attribution screen (`screen`, an
    `AttributionResult` of the same pair) ranks highest, and return the exact `PatchResult`
    (NaN for units not patched) with the screen in `result.screen`.

    The false-negative diagnostic (Kramár et al. 2024): with `sample` > 0, that many of the
    unverified units, drawn uniformly (`seed`), are patched exactly too, and
    `settings["false_negatives"]` says how many of them move the metric by more than
    `threshold` × |clean − corrupt| (`found`), the `confidence` upper bound on how many
    unverified units do (`max_above`), and the chance that any one such unit escaped the
    sample (`p_miss_one`; `mechinterp.analysis.false_negatives`)."""
    from mechinterp.analysis.false_negatives import max_above

    if verify_top < 1:
        raise InputError(f"verify_top must be >= 1, got {verify_top}")
    if sample < 0 or threshold < 0:
        raise InputError(f"sample and threshold must be >= 0, got {sample} and {threshold}")
    node = screen.node
    pool = None if units is None else check_units(model, node, units)
    ranked = screen.ranking(pool)
    verified, rest = ranked[:verify_top], ranked[verify_top:]
    drawn = sorted(random.Random(seed).sample(rest, min(sample, len(rest))))
    todo = verified + drawn
    direction, patch_from = screen.direction, screen.settings["patch_from"]
    if node == "z":
        exact = patch_heads(model, clean, corrupt, metric, direction=direction, heads=todo,
                            patch_from=patch_from, batch_size=batch_size, progress=progress,
                            prepared=screen.prepared)  # fmt: skip
    else:
        exact = patch_nodes(model, clean, corrupt, metric, node=node, units=todo,
                            direction=direction, patch_from=patch_from, batch_size=batch_size,
                            progress=progress)  # fmt: skip
    settings = {**exact.settings, "node": node, "screen": screen.settings["method"],
                "verify_top": len(verified),
                "screen_seconds": screen.settings["seconds"]}  # fmt: skip
    if sample:
        base = exact.corrupt if direction == "denoise" else exact.clean
        cut = threshold * abs(exact.clean - exact.corrupt)
        effect = {h: abs(float(exact.values[h]) - base) for h in drawn}
        found = [h for h in drawn if effect[h] > cut]
        settings["false_negatives"] = {
            "threshold": threshold, "threshold_effect": cut, "n_unverified": len(rest),
            "n_sampled": len(drawn), "sampled": [str(h) for h in drawn],
            "found": [str(h) for h in found],
            "largest_sampled_effect": max(effect.values(), default=0.0),
            "max_above": max_above(len(rest), len(drawn), len(found), confidence=confidence),
            "confidence": confidence,
            "p_miss_one": 1.0 - len(drawn) / len(rest) if rest else 0.0, "seed": seed,
        }  # fmt: skip
    return PatchResult(exact.values, exact.clean, exact.corrupt, direction, False, settings,
                       exact.sets, screen=screen)  # fmt: skip


def patch_sets(
    model,
    clean: Sequence[int],
    corrupt: Sequence[int],
    metric: Metric,
    sets: dict[str, Sequence[Head]],
    *,
    direction: Direction = "denoise",
    patch_from: int = 0,
) -> dict[str, float]:
    """The metric after patching each named head set *jointly* (all its heads at once, at every
    position >= `patch_from`), plus `"clean"` and `"corrupt"` baselines. Sufficiency of a set:
    does patching all of it restore the clean answer?"""
    res = patch_heads(
        model, clean, corrupt, metric, direction=direction, heads=[], sets=sets,
        patch_from=patch_from,
    )  # fmt: skip
    return {"clean": res.clean, "corrupt": res.corrupt, **res.sets}
