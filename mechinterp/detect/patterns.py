"""Pattern scores: previous-token, duplicate-token and induction heads (TransformerLens
`head_detector` definitions, error measure "mul").

For a sequence and a 0/1 detection pattern D (query × key), a head's score is
Σ(A ⊙ D) / ΣA — the share of its attention that falls on the expected query-key pairs — after
optionally zeroing the BOS column and the diagonal of A. Sequences default to repeated random
tokens ([BOS] + r + r), where all three kinds show. Scores average over sequences.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechinterp.detect.result import Detection
from mechinterp.errors import InputError
from mechinterp.heads import HeadShape

PatternKind = Literal["previous_token", "duplicate_token", "induction"]
PATTERN_KINDS: tuple[PatternKind, ...] = ("previous_token", "duplicate_token", "induction")


def detection_pattern(tokens: Int[Tensor, "pos"], kind: PatternKind) -> Float[Tensor, "pos pos"]:  # noqa: F821
    """D[query, key] = 1 where a head of this kind should attend (lower triangular)."""
    n = tokens.shape[0]
    if kind == "previous_token":
        return torch.diag(torch.ones(n - 1), -1)
    duplicate = ((tokens[:, None] == tokens[None, :]) & torch.ones(n, n).tril(-1).bool()).float()
    if kind == "duplicate_token":
        return duplicate
    if kind == "induction":
        # attend to the token after an earlier copy of the current token: D[i, j] = dup[i, j-1]
        shifted = torch.zeros(n, n)
        shifted[:, 1:] = duplicate[:, :-1]
        return shifted.tril()
    raise InputError(f"unknown pattern kind {kind!r}; expected one of {PATTERN_KINDS}")


def repeated_random_tokens(
    tokenizer, *, seq_len: int = 50, n_sequences: int = 8, seed: int = 0
) -> list[list[int]]:
    """`n_sequences` of [BOS] + r + r with r `seq_len` random non-special tokens (seeded)."""
    if seq_len < 2 or n_sequences < 1:
        raise InputError("seq_len must be >= 2 and n_sequences >= 1")
    special = set(tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = []
    for _ in range(n_sequences):
        r = allowed[torch.randint(len(allowed), (seq_len,), generator=gen)].tolist()
        out.append(bos + r + r)
    return out


def _score(
    pattern: Tensor, hook, *, out: Tensor, idx, det: Tensor, exclude_bos, exclude_current_token
) -> None:
    """out[idx] = Σ(A ⊙ D) / ΣA per sequence and head (TransformerLens "mul")."""
    a = pattern.float()
    if exclude_bos or exclude_current_token:
        a = a.clone()
        if exclude_bos:
            a[..., 0] = 0
        if exclude_current_token:
            a.diagonal(dim1=-2, dim2=-1).zero_()
    hit = torch.einsum("bhqk,bqk->bh", a, det.to(a.device))
    out[idx] = (hit / a.sum((-2, -1))).cpu()


@torch.no_grad()
def pattern_scores(
    model,
    kind: PatternKind,
    sequences: Sequence[Sequence[int]] | None = None,
    *,
    seq_len: int = 50,
    n_sequences: int = 8,
    seed: int = 0,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    batch_size: int = 8,
) -> Detection:
    """Score every query head for `kind` on `sequences` (default: repeated random tokens)."""
    if kind not in PATTERN_KINDS:
        raise InputError(f"unknown pattern kind {kind!r}; expected one of {PATTERN_KINDS}")
    if sequences is None:
        sequences = repeated_random_tokens(
            model.tokenizer, seq_len=seq_len, n_sequences=n_sequences, seed=seed
        )
    if not sequences or any(len(s) < 2 for s in sequences):
        raise InputError("pattern scores need sequences of at least 2 tokens")
    shape = HeadShape.of(model)
    exclude = {"exclude_bos": exclude_bos, "exclude_current_token": exclude_current_token}
    t0 = time.perf_counter()
    out = torch.zeros(len(sequences), shape.n_layers, shape.n_heads)
    # Equal lengths batch without padding.
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(sequences):
        by_len.setdefault(len(s), []).append(i)
    for group in by_len.values():
        for b in range(0, len(group), batch_size):
            idx = group[b : b + batch_size]
            tokens = torch.tensor([list(sequences[i]) for i in idx])
            det = torch.stack([detection_pattern(t, kind) for t in tokens])  # [batch, q, k]

            hooks = [
                (
                    f"blocks.{layer}.attn.hook_pattern",
                    partial(_score, out=out[:, layer], idx=idx, det=det, **exclude),
                )
                for layer in range(shape.n_layers)
            ]
            with model.hooks(fwd_hooks=hooks):
                model(tokens.to(model.cfg.device), logits_to_keep=1)
    instances = pd.DataFrame(
        {
            "instance_id": [f"seq{i}" for i in range(len(sequences))],
            "n_tokens": [len(s) for s in sequences],
            "counted": True,
        }
    )
    settings = {
        "kind": kind,
        "seq_len": seq_len,
        "n_sequences": len(sequences),
        "seed": seed,
        "exclude_bos": exclude_bos,
        "exclude_current_token": exclude_current_token,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return Detection(kind, out, torch.ones(len(sequences), dtype=torch.bool), instances, settings)
