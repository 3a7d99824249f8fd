"""Head sets: select from a score matrix, compare two sets or score vectors, sample baselines.

Scores are a `layer × head` tensor (query heads). Ranking is by score, descending; ties break by
(layer, head) ascending so every ranking is deterministic.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Iterable, Sequence
from typing import Literal

import torch
from jaxtyping import Float
from scipy import stats
from torch import Tensor

from mechinterp.errors import InputError
from mechinterp.heads import Head, HeadSet, HeadShape
from mechinterp.selection import check_selection

HeadScores = Float[Tensor, "layer head"]
#: The second operand of a comparison: its shape is checked by `_same_shape` with a clear error,
#: not bound to the first's by the type checker.
OtherHeadScores = Float[Tensor, "_layer _head"]


def _shape_of(scores: HeadScores) -> HeadShape:
    if scores.ndim != 2:
        raise InputError(
            f"head scores must be a layer × head matrix, got shape {tuple(scores.shape)}"
        )
    return HeadShape(scores.shape[0], scores.shape[1], 1)


#: Seed of the tie-break among equal scores (every ranking in the suite uses it).
TIE_SEED = 0


def rank_order(scores, *, seed: int = TIE_SEED) -> list[int]:
    """Indices of `scores` (1-D, layer-major when flattened heads), best first. Equal scores are
    ordered by a seeded random permutation, never by position: otherwise the many heads tied at
    score 0 would rank layer 0 first, and a large top-k would knock out the first layers."""
    values = [float(v) for v in scores]
    if any(math.isnan(v) for v in values):
        raise InputError("head scores contain NaN")
    key = random.Random(seed).sample(range(len(values)), len(values))
    return sorted(range(len(values)), key=lambda i: (-values[i], key[i]))


def rank_heads(scores: HeadScores, *, seed: int = TIE_SEED) -> HeadSet:
    """Every head, best score first; ties in a seeded random order (`rank_order`)."""
    n_layers, n_heads = _shape_of(scores).n_layers, scores.shape[1]
    order = rank_order(scores.flatten().tolist(), seed=seed)
    return HeadSet((Head(i // n_heads, i % n_heads) for i in order), grid=(n_layers, n_heads))


def select_heads(
    scores: HeadScores,
    *,
    threshold: float | None = None,
    top_k: int | None = None,
    share: float | None = None,
) -> HeadSet:
    """Heads by exactly one rule: score > `threshold`, the `top_k` best, or the best `share`
    (a fraction of all heads, rounded to the nearest count). Returned in rank order."""
    rules = [r for r in (threshold, top_k, share) if r is not None]
    if len(rules) != 1:
        raise InputError("select_heads takes exactly one of threshold=, top_k=, share=")
    ranked = rank_heads(scores)
    if threshold is not None:
        chosen = (h for h in ranked if float(scores[h.layer, h.head]) > threshold)
        return HeadSet(chosen, grid=ranked.grid)
    n = len(ranked)
    if top_k is not None:
        if not 0 <= top_k <= n:
            raise InputError(f"top_k must be in [0, {n}], got {top_k}")
        return HeadSet(ranked[:top_k], grid=ranked.grid)
    if not 0.0 <= share <= 1.0:
        raise InputError(f"share must be in [0, 1], got {share}")
    return HeadSet(ranked[: round(share * n)], grid=ranked.grid)


# ---------------------------------------------------------------- comparing two head sets


def _same_grid(a: Collection[Head], b: Collection[Head]) -> None:
    ga, gb = getattr(a, "grid", None), getattr(b, "grid", None)
    if ga is not None and gb is not None and ga != gb:
        raise InputError(
            f"head sets come from models of different shapes ({ga[0]}×{ga[1]} vs {gb[0]}×{gb[1]} "
            "layers × heads); compare heads of one architecture"
        )


def recall(found: Collection[Head], reference: Collection[Head]) -> float:
    """|found ∩ reference| / |reference| (the paper's recall of H_real by H_syn)."""
    _same_grid(found, reference)
    reference = set(reference)
    if not reference:
        raise InputError("recall needs a non-empty reference set")
    return len(set(found) & reference) / len(reference)


def precision(found: Collection[Head], reference: Collection[Head]) -> float:
    """|found ∩ reference| / |found|."""
    _same_grid(found, reference)
    found = set(found)
    if not found:
        raise InputError("precision needs a non-empty found set")
    return len(found & set(reference)) / len(found)


def jaccard(a: Collection[Head], b: Collection[Head]) -> float:
    _same_grid(a, b)
    a, b = set(a), set(b)
    if not a and not b:
        raise InputError("jaccard of two empty sets is undefined")
    return len(a & b) / len(a | b)


def top_k_overlap(a: HeadScores, b: OtherHeadScores, k: int) -> float:
    """Share of the top-k heads of `a` that are also in the top-k of `b`."""
    _same_shape(a, b)
    if k < 1:
        raise InputError("k must be >= 1")
    return len(set(rank_heads(a)[:k]) & set(rank_heads(b)[:k])) / k


def score_correlations(a: HeadScores, b: OtherHeadScores) -> dict[str, float]:
    """Pearson, Spearman and cosine similarity of two per-head score vectors."""
    _same_shape(a, b)
    x, y = a.flatten().double(), b.flatten().double()
    cos = float(torch.nn.functional.cosine_similarity(x, y, dim=0))
    return {
        "pearson": float(stats.pearsonr(x.numpy(), y.numpy()).statistic),
        "spearman": float(stats.spearmanr(x.numpy(), y.numpy()).statistic),
        "cosine": cos,
    }


def _same_shape(a: HeadScores, b: OtherHeadScores) -> None:
    _shape_of(a), _shape_of(b)
    if a.shape != b.shape:
        raise InputError(
            f"head scores come from models of different shapes ({tuple(a.shape)} vs "
            f"{tuple(b.shape)} layers × heads); compare heads of one architecture"
        )


# ---------------------------------------------------------------- random baselines


def random_complement(
    ranked: Iterable[Head],
    k: int,
    shape: HeadShape,
    *,
    seed: int,
    match_layers: Sequence[Head] | None = None,
) -> HeadSet:
    """k heads drawn uniformly from the heads *not* in `ranked`.

    With `match_layers` (usually the top-k set itself) the draw is layer-matched: in each layer it
    takes as many heads as `match_layers` has there, from that layer's complement. Where a layer's
    complement runs short (the ranked heads fill it), the rest come from the nearest layers that
    still have heads (seeded among equally near ones). The result never holds a head of `ranked`
    (unlike the Wu reference sampler).
    """
    excluded = set(ranked)
    for h in excluded:
        shape.validate(h)
    rng = random.Random(seed)
    pool = [h for h in shape.all_heads() if h not in excluded]
    if match_layers is None:
        if not 0 <= k <= len(pool):
            raise InputError(f"cannot draw {k} heads from a complement of {len(pool)} heads")
        return HeadSet(sorted(rng.sample(pool, k)), grid=(shape.n_layers, shape.n_heads))
    if len(match_layers) != k:
        raise InputError(f"match_layers has {len(match_layers)} heads but k is {k}")
    if k > len(pool):
        raise InputError(f"cannot draw {k} heads from a complement of {len(pool)} heads")
    left = {layer: [h for h in pool if h.layer == layer] for layer in range(shape.n_layers)}
    for heads in left.values():
        rng.shuffle(heads)
    out: list[Head] = []
    for target in sorted(h.layer for h in match_layers):
        near = min(
            (la for la in left if left[la]),
            key=lambda la: (abs(la - target), rng.random()),
        )
        out.append(left[near].pop())
    return HeadSet(sorted(out), grid=(shape.n_layers, shape.n_heads))


#: How a random baseline set is drawn: with the top-k set's per-layer counts, or from any layer.
Draw = Literal["layer_matched", "uniform"]
DRAWS: tuple[Draw, ...] = ("layer_matched", "uniform")


def draw_baseline(
    ranked: Iterable[Head], like: Sequence[Head], shape: HeadShape, *, seed: int, draw: Draw
) -> HeadSet:
    """|like| heads outside `ranked`, layer-matched to `like` or uniform over layers."""
    if draw not in DRAWS:
        raise InputError(f"draw must be one of {DRAWS}, got {draw!r}")
    match = tuple(like) if draw == "layer_matched" else None
    return random_complement(ranked, len(like), shape, seed=seed, match_layers=match)


def random_complements(
    ranked: Iterable[Head],
    k: int,
    shape: HeadShape,
    *,
    seeds: Iterable[int] = (0, 1, 2),
    match_layers: Sequence[Head] | None = None,
) -> dict[int, HeadSet]:
    """`random_complement` once per seed: the baseline sets of a knockout sweep."""
    seeds = check_selection("seeds", seeds)
    ranked = tuple(ranked)
    return {
        s: random_complement(ranked, k, shape, seed=s, match_layers=match_layers) for s in seeds
    }
