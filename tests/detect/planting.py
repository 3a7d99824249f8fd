"""Planted behaviour for oracle tests: force a tiny model's greedy output and a head's attention.

`forced_output(model, outputs)` makes forward i of a batch predict `outputs[r][i]` in row r (then
EOS), whatever the weights say. `planted_attention(layer, head, target)` makes one query head put
all its last-row attention on key `target(row, step)`, via `hook_attn_scores` (pre-softmax).
Both count forwards with a shared `Step` so decode steps line up with generated tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

BIG = 1e4


class Step:
    """Number of finished forwards in the current `generate_batch` call."""

    def __init__(self) -> None:
        self.value = 0


def forced_output(step: Step, outputs: Sequence[Sequence[int]], eos: int):
    def force(logits: torch.Tensor, hook):
        logits = torch.full_like(logits, -BIG)
        for r, out in enumerate(outputs):
            tok = out[step.value] if step.value < len(out) else eos
            logits[r, -1, tok] = BIG
        step.value += 1
        return logits

    return ("unembed.hook_out", force)


def planted_attention(step: Step, layer: int, head: int, target: Callable[[int, int], int]):
    """Last query row of (layer, head) attends only to padded key position target(row, step)."""

    def plant(scores: torch.Tensor, hook):
        scores = scores.clone()
        for r in range(scores.shape[0]):
            scores[r, head, -1, :] = -BIG
            scores[r, head, -1, target(r, step.value)] = BIG
        return scores

    return (f"blocks.{layer}.attn.hook_attn_scores", plant)
