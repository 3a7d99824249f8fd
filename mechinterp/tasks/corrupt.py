"""Corruptions for activation patching: symmetric token replacement inside the prompt.

`corrupt_answer(prompt, tokenizer, seed=)` replaces the first token of the needle's answer (the
token the model must retrieve first) with the single token of another common word, so clean and
corrupt prompts have the same length and differ in one in-distribution token. The patching metric
is then logit(clean token) − logit(corrupt token) at the last prompt position.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mechinterp.errors import InputError
from mechinterp.tasks.prompt import Prompt

#: Replacement words (common nouns and names); those that are one token in context are used.
REPLACEMENTS = (
    "apple", "river", "garden", "window", "market", "silver", "candle", "forest", "pencil",
    "castle", "orange", "dragon", "bottle", "rabbit", "planet", "anchor", "violin", "button",
    "carpet", "mirror", "Paris", "London", "Berlin", "Tokyo", "Madrid", "Boston", "Denver",
    "table", "chair", "lemon", "tiger", "horse", "cloud", "stone", "bread", "music", "paper",
)  # fmt: skip


@dataclass(frozen=True)
class Corruption:
    """A clean/corrupt prompt pair differing at one position."""

    clean: tuple[int, ...]
    corrupt: tuple[int, ...]
    position: int
    clean_token: int
    corrupt_token: int


def corrupt_answer(prompt: Prompt, tokenizer, *, seed: int = 0, offset: int = 0) -> Corruption:
    """Replace an answer token inside the needle (the first, or the `offset`-th) by another
    word's single token."""
    spans = prompt.spans.get("answer", ())
    if not spans:
        raise InputError(
            f"prompt {prompt.example_id!r} has no answer span to corrupt (NIAH and the synthetic "
            "needle tasks have one)"
        )
    if not 0 <= offset < spans[0][1] - spans[0][0]:
        raise InputError(f"offset {offset} lies outside the answer span {spans[0]}")
    pos = spans[0][0] + offset
    clean_tok = prompt.input_ids[pos]
    spaced = tokenizer.convert_ids_to_tokens(clean_tok)[:1] in ("Ġ", "▁", " ")
    candidates: list[int] = []
    # words first; single letters only for tokenizers where no word is one token (character-level)
    for pool in (REPLACEMENTS, tuple("abcdefghijklmnopqrstuvwxyz")):
        for word in pool:
            ids = tokenizer.encode((" " if spaced else "") + word, add_special_tokens=False)
            if len(ids) == 1 and ids[0] != clean_tok:
                candidates.append(ids[0])
        if candidates:
            break
    if not candidates:
        raise InputError("no single-token replacement word in this tokenizer")
    bad = random.Random(f"{seed}-{prompt.example_id}").choice(sorted(set(candidates)))
    corrupt = list(prompt.input_ids)
    corrupt[pos] = bad
    return Corruption(tuple(prompt.input_ids), tuple(corrupt), pos, clean_tok, bad)
