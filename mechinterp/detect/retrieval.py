"""Wu et al.'s retrieval score (arXiv 2404.15574), computed during batched greedy decoding.

At each decoding step with generated token w, head h **copies** when the argmax of its attention row
lands on a needle position j and token(j) == w. Score(h) = copies / |needle| per instance, averaged
over the instances the model answered (ROUGE-1 recall of the answer > `gate`).

Conventions (`convention=`):

- `"set"`: each needle position counts at most once (the paper's definition; score ≤ 1).
- `"per_step"`: every copying step counts (Wu's reference code; can exceed 1 when the answer
  repeats a needle token).

Keys (`keys=`): the argmax runs over the prompt's keys (`"prompt"`, as docs/concepts/scores.md
defines the score) or over every key the query sees, generated tokens included (`"context"`, the
reference code; an argmax on a generated token is never a copy).

Cost: each layer's last query row per step is read (`models.attention.read_rows`: on a fused
layer only that row is computed, so decoding runs at the cost of plain SDPA generation) and
reduced at once to its argmax — an int per head; no pattern is kept.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechinterp.detect.result import Detection
from mechinterp.errors import InputError
from mechinterp.evaluate import generate_batch, rouge1_recall, stop_token_ids
from mechinterp.heads import HeadShape
from mechinterp.models.attention import RowReader, read_rows
from mechinterp.tasks.prompt import Prompt

Convention = Literal["set", "per_step"]
KeyRange = Literal["prompt", "context"]
CONVENTIONS: tuple[Convention, ...] = ("set", "per_step")
KEY_RANGES: tuple[KeyRange, ...] = ("prompt", "context")


class NoInstancePassedError(InputError):
    """No detection instance passed the success gate: there is nothing to average."""


def apply_gate(instances: pd.DataFrame, gate: float | None) -> pd.DataFrame:
    """`instances` with `counted`: ROUGE-1 recall of the answer > `gate` (every one when None).
    Raises `NoInstancePassedError`, with the model's accuracy, when none passes."""
    counted = instances["rouge1_recall"] > gate if gate is not None else True
    instances = instances.assign(counted=counted)
    if not instances["counted"].any():
        acc = float((instances["rouge1_recall"] > 0.5).mean())
        raise NoInstancePassedError(
            f"no detection instance passed the success gate (ROUGE-1 recall > {gate}): the model "
            f"answered {acc:.0%} of {len(instances)} instances correctly. Use instances it can "
            "answer (shorter contexts, easier needles) or pass a lower gate."
        )
    return instances


def copy_score(
    argmax: Int[Tensor, "step layer head"],
    generated: Int[Tensor, "step"],  # noqa: F821
    prompt_ids: Int[Tensor, "pos"],  # noqa: F821
    needle: Bool[Tensor, "pos"],  # noqa: F821
    *,
    convention: Convention = "set",
) -> Float[Tensor, "layer head"]:
    """One instance's retrieval score per head.

    `argmax[s, layer, head]` is the prompt position the head attended most at step s (positions
    outside the prompt, e.g. generated tokens, never copy); `generated[s]` is the token produced at
    step s; `needle` marks the needle's prompt positions.
    """
    if convention not in CONVENTIONS:
        raise InputError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    n_pos = prompt_ids.shape[0]
    size = int(needle.sum())
    if size == 0:
        raise InputError("the needle span is empty")
    if argmax.shape[0] != generated.shape[0]:
        raise InputError(f"{argmax.shape[0]} argmax steps but {generated.shape[0]} tokens")
    inside = (argmax >= 0) & (argmax < n_pos)
    j = argmax.clamp(0, n_pos - 1)
    copies = inside & needle[j] & (prompt_ids[j] == generated[:, None, None])
    _, n_layers, n_heads = argmax.shape
    # counts[layer, head, j]: steps at which the head copied prompt position j.
    counts = torch.zeros(n_layers, n_heads, n_pos, dtype=torch.long).scatter_add_(
        -1, j.permute(1, 2, 0).long(), copies.permute(1, 2, 0).long()
    )
    hits = (counts > 0).sum(-1) if convention == "set" else counts.sum(-1)
    return hits.float() / size


def needle_mask(prompt: Prompt, span: str = "needle") -> Bool[Tensor, "pos"]:  # noqa: F821
    """The positions of every `span` range of `prompt`, checked to lie inside it."""
    ranges = prompt.spans.get(span, ())
    if not ranges:
        raise InputError(
            f"prompt {prompt.example_id!r} has no {span!r} span; the retrieval score needs the "
            "needle's token positions (NIAH and synthetic needle tasks have them; otherwise use "
            "the qr detector)"
        )
    mask = torch.zeros(prompt.n_tokens, dtype=torch.bool)
    for start, end in ranges:
        if not 0 <= start < end <= prompt.n_tokens:
            raise InputError(
                f"prompt {prompt.example_id!r}: {span} span [{start}, {end}) lies outside its "
                f"{prompt.n_tokens} tokens (was the prompt truncated after rendering?)"
            )
        mask[start:end] = True
    return mask


def _last_row(n_queries: int, n_keys: int) -> Tensor:
    return torch.tensor([n_queries - 1])


def _keep_argmax(
    pattern: Tensor, *, out: list[Tensor], width: int, offsets: Tensor, keys: KeyRange
) -> None:
    """Append the argmax key of each head's last query row ([batch, head], as a padded position;
    pads excluded, −1 where no key qualifies).

    Forward s (0 = the prefill) has seen `width + s` positions; a sliding-window layer's keys are
    only the last of them, so key j sits at position `width + s − k + j`."""
    k = pattern.shape[-1]
    start = width + len(out) - k
    pos = start + torch.arange(k, device=pattern.device)
    drop = pos[None, :] < offsets[:, None].to(pattern.device)  # [batch, k]
    if keys == "prompt":
        drop = drop | (pos[None, :] >= width)
    row = pattern[:, :, -1, :].masked_fill(drop[:, None, :], -1.0)
    best = row.max(-1)
    out.append(torch.where(best.values >= 0, best.indices + start, -1).cpu())


@torch.no_grad()
def retrieval_scores(
    model,
    prompts: Sequence[Prompt],
    answers: Sequence[Sequence[str]],
    *,
    convention: Convention = "set",
    keys: KeyRange = "prompt",
    gate: float | None = 0.5,
    span: str = "needle",
    max_new_tokens: int = 32,
    batch_size: int = 4,
    stop_ids: frozenset[int] | None = None,
    progress: bool = False,
) -> Detection:
    """Wu retrieval scores of every query head over `prompts` (greedy decoding, batched).

    `answers[i]` are instance i's accepted answers; it counts when the generated text has
    ROUGE-1 recall > `gate` against them (`gate=None` counts every instance). Raises
    `NoInstancePassedError` when none does, reporting the model's accuracy.
    """
    if convention not in CONVENTIONS:
        raise InputError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if keys not in KEY_RANGES:
        raise InputError(f"keys must be one of {KEY_RANGES}, got {keys!r}")
    if len(prompts) != len(answers):
        raise InputError(f"{len(prompts)} prompts but {len(answers)} answer lists")
    if not prompts:
        raise InputError("no detection instances")
    if batch_size < 1 or max_new_tokens < 1:
        raise InputError("batch_size and max_new_tokens must be >= 1")
    masks = [needle_mask(p, span) for p in prompts]  # validates spans before any compute
    shape = HeadShape.of(model)
    stop_ids = stop_token_ids(model) if stop_ids is None else stop_ids
    order = sorted(range(len(prompts)), key=lambda i: prompts[i].n_tokens)
    per_instance = torch.zeros(len(prompts), shape.n_layers, shape.n_heads)
    rows: list[dict] = [{} for _ in prompts]
    bar = tqdm(total=len(prompts), desc="retrieval score", disable=not progress, leave=False)
    t0 = time.perf_counter()
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        batch = [prompts[i].input_ids for i in idx]
        width = max(len(p) for p in batch)
        offsets = torch.tensor([width - len(p) for p in batch])
        steps: list[list[Tensor]] = [[] for _ in range(shape.n_layers)]

        readers = {
            layer: RowReader(
                _last_row,
                partial(_keep_argmax, out=steps[layer], width=width, offsets=offsets, keys=keys),
            )
            for layer in range(shape.n_layers)
        }
        with read_rows(model, readers):
            gens = generate_batch(model, batch, max_new_tokens, stop_ids)
        n_steps = len(steps[0])
        if any(len(s) != n_steps for s in steps) or n_steps < max(len(g.tokens) for g in gens):
            raise RuntimeError(
                "the attention pattern was read an unexpected number of times during decoding; "
                "this model's attention does not expose one pattern row per step"
            )
        # argmax[row, step, layer, head], as prompt positions (pads removed).
        argmax = torch.stack([torch.stack(s, 1) for s in steps], 2) - offsets[:, None, None, None]
        for r, (i, gen) in enumerate(zip(idx, gens, strict=True)):
            prompt = prompts[i]
            n_gen = len(gen.tokens)
            if n_gen:
                per_instance[i] = copy_score(
                    argmax[r, :n_gen],
                    torch.tensor(gen.tokens),
                    torch.tensor(prompt.input_ids),
                    masks[i],
                    convention=convention,
                )
            rouge = rouge1_recall(gen.text, answers[i])
            start, end = prompt.spans[span][0]
            rows[i] = {
                "instance_id": prompt.example_id,
                "n_tokens": prompt.n_tokens,
                "needle_start": start,
                "needle_end": end,
                "needle_tokens": int(masks[i].sum()),
                "answer": answers[i][0] if answers[i] else "",
                "prediction": gen.text,
                "n_generated": n_gen,
                "generated_ids": list(gen.tokens),
                "rouge1_recall": rouge,
            }
        bar.update(len(idx))
    bar.close()
    instances = apply_gate(pd.DataFrame(rows), gate)
    counted = torch.tensor(instances["counted"].to_list(), dtype=torch.bool)
    settings = {
        "convention": convention,
        "keys": keys,
        "gate": gate,
        "span": span,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return Detection("retrieval", per_instance, counted, instances, settings, has_frequency=True)
