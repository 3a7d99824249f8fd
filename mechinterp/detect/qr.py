"""QRHead score (Zhang et al. 2025): attention mass from the question tokens to the gold document.

Per instance and query head: the attention each question token pays to the target span's keys
(summed over keys), averaged over question tokens. One prefill forward per batch, no generation.
With `null_prompts` (the same instances with a content-free question, e.g. "N/A"), the score is
calibrated: mass(question) − mass(null question), which removes attention a head pays the
document whatever is asked (the in-context-reranking calibration QRHead uses).

Cost: only the question rows of each layer's pattern are read (`models.attention.read_rows`: on
a fused layer only those rows are computed) and reduced at once to one number per head; nothing
of size pos × pos is computed or kept.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechinterp.detect.result import Detection
from mechinterp.errors import InputError
from mechinterp.evaluate import left_pad
from mechinterp.heads import HeadShape
from mechinterp.models.attention import RowReader, read_rows
from mechinterp.tasks.prompt import Prompt


def target_span(prompt: Prompt, target: str) -> str:
    """`"auto"` → the gold document where the prompt has one, else the needle."""
    if target != "auto":
        return target
    return "gold_doc" if prompt.spans.get("gold_doc") else "needle"


def _positions(prompt: Prompt, span: str) -> list[tuple[int, int]]:
    ranges = list(prompt.spans.get(span, ()))
    if not ranges:
        raise InputError(f"prompt {prompt.example_id!r} has no {span!r} span")
    for start, end in ranges:
        if not 0 <= start < end <= prompt.n_tokens:
            raise InputError(
                f"prompt {prompt.example_id!r}: {span} span [{start}, {end}) lies outside its "
                f"{prompt.n_tokens} tokens"
            )
    return ranges


def _question_rows(rows: list[tuple[int, int]]) -> Tensor:
    """[batch, longest question]: each batch row's question positions, the last one repeated."""
    width = max(qe - qs for qs, qe in rows)
    return torch.tensor([[min(qs + j, qe - 1) for j in range(width)] for qs, qe in rows])


def _reduce(pattern: Tensor, *, out: Tensor, rows, idx, keymask: Tensor) -> None:
    """out[idx[r]] = mean over row r's question queries of the attention mass on its keymask
    (`pattern` holds the `_question_rows` of every batch row)."""
    km = keymask.to(pattern.device, pattern.dtype)
    for r, (qs, qe) in enumerate(rows):
        mass = pattern[r, :, : qe - qs, :] @ km[r]  # [head, question token]
        out[idx[r]] = mass.float().mean(-1).cpu()


@torch.no_grad()
def attention_mass(
    model,
    prompts: Sequence[Prompt],
    *,
    target: str = "auto",
    batch_size: int = 4,
    progress: bool = False,
) -> Float[Tensor, "instance layer head"]:
    """Mean over question tokens of the attention mass on the target span, per query head."""
    if batch_size < 1:
        raise InputError("batch_size must be >= 1")
    shape = HeadShape.of(model)
    spans = []
    for p in prompts:
        (q,) = _positions(p, "question")[:1]
        spans.append((q, _positions(p, target_span(p, target))))
    out = torch.zeros(len(prompts), shape.n_layers, shape.n_heads)
    order = sorted(range(len(prompts)), key=lambda i: prompts[i].n_tokens)
    bar = tqdm(total=len(prompts), desc="qr score", disable=not progress, leave=False)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        ids, mask = left_pad(model, [prompts[i].input_ids for i in idx])
        width = ids.shape[1]
        keymask = torch.zeros(len(idx), width)
        rows = []
        for r, i in enumerate(idx):
            off = width - prompts[i].n_tokens
            (qs, qe), targets = spans[i]
            rows.append((off + qs, off + qe))
            for s, e in targets:
                keymask[r, off + s : off + e] = 1.0

        question = _question_rows(rows)
        readers = {
            layer: RowReader(
                lambda n_queries, n_keys, question=question: question,
                partial(_reduce, out=out[:, layer], rows=rows, idx=idx, keymask=keymask),
            )
            for layer in range(shape.n_layers)
        }
        with read_rows(model, readers):
            model(ids, attention_mask=mask, logits_to_keep=1)
        bar.update(len(idx))
    bar.close()
    return out


def qr_scores(
    model,
    prompts: Sequence[Prompt],
    *,
    null_prompts: Sequence[Prompt] | None = None,
    target: str = "auto",
    batch_size: int = 4,
    progress: bool = False,
) -> Detection:
    """QRHead scores of every query head over `prompts` (optionally null-question calibrated)."""
    if not prompts:
        raise InputError("no detection instances")
    if null_prompts is not None and len(null_prompts) != len(prompts):
        raise InputError(f"{len(prompts)} prompts but {len(null_prompts)} null-question prompts")
    t0 = time.perf_counter()
    mass = attention_mass(model, prompts, target=target, batch_size=batch_size, progress=progress)
    values = mass
    if null_prompts is not None:
        null = attention_mass(
            model, null_prompts, target=target, batch_size=batch_size, progress=progress
        )
        values = mass - null
    instances = pd.DataFrame(
        {
            "instance_id": [p.example_id for p in prompts],
            "n_tokens": [p.n_tokens for p in prompts],
            "target": [target_span(p, target) for p in prompts],
            "counted": True,
        }
    )
    settings = {
        "target": target,
        "calibrated": null_prompts is not None,
        "batch_size": batch_size,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return Detection("qr", values, torch.ones(len(prompts), dtype=torch.bool), instances, settings)
