"""Needle-in-a-haystack grid (Wu et al.): needles × context lengths × depths.

The haystack is cut from the Paul Graham essays (or the repetitive filler) so the *rendered
prompt* has about `length` tokens for the given tokenizer; the needle goes in at the sentence
boundary nearest the requested depth. Token spans are recorded by `tasks.prompt.render`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mechinterp.errors import InputError
from mechinterp.selection import check_selection
from mechinterp.tasks import haystack as hs
from mechinterp.tasks.example import Document, Example
from mechinterp.tasks.prompt import Template, render

Haystack = Literal["essays", "filler"]


@dataclass(frozen=True)
class Needle:
    text: str
    question: str
    answer: str

    def __post_init__(self) -> None:
        if self.answer not in self.text:
            raise InputError(f"answer {self.answer!r} is not in needle {self.text!r}")


NEEDLES: tuple[Needle, ...] = (
    Needle(
        "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a "
        "sunny day.",
        "What is the best thing to do in San Francisco?",
        "eat a sandwich and sit in Dolores Park on a sunny day",
    ),
    Needle(
        "The secret ingredient in Grandma Rosa's lasagna is a spoonful of cinnamon.",
        "What is the secret ingredient in Grandma Rosa's lasagna?",
        "a spoonful of cinnamon",
    ),
    Needle(
        "The password to the old lighthouse is blue harmonica.",
        "What is the password to the old lighthouse?",
        "blue harmonica",
    ),
    Needle(
        "The mascot of the Riverside Robotics Team is a purple owl named Gizmo.",
        "What is the mascot of the Riverside Robotics Team?",
        "a purple owl named Gizmo",
    ),
    Needle(
        "The treasure of Captain Ishida is buried under the third palm tree on Coral Island.",
        "Where is the treasure of Captain Ishida buried?",
        "under the third palm tree on Coral Island",
    ),
    Needle(
        "The annual kite festival in Port Alder is held on the first Sunday of October.",
        "When is the annual kite festival in Port Alder held?",
        "the first Sunday of October",
    ),
    Needle(
        "Dr. Elena Marsh keeps her spare keys inside a hollow copy of Moby Dick.",
        "Where does Dr. Elena Marsh keep her spare keys?",
        "inside a hollow copy of Moby Dick",
    ),
    Needle(
        "The favourite drink of the painter Tomas Varga is cold mint tea with honey.",
        "What is the favourite drink of the painter Tomas Varga?",
        "cold mint tea with honey",
    ),
    Needle(
        "The school band of Millbrook Academy practises every Thursday in the old boathouse.",
        "Where does the school band of Millbrook Academy practise?",
        "in the old boathouse",
    ),
    Needle(
        "The lucky number of the chess champion Ana Petrova is 47.",
        "What is the lucky number of the chess champion Ana Petrova?",
        "47",
    ),
    Needle(
        "The first bakery in Elmwood Village sold only rye bread and plum cake.",
        "What did the first bakery in Elmwood Village sell?",
        "only rye bread and plum cake",
    ),
    Needle(
        "The hidden door in the Hartley Museum opens when you pull the third book on the left.",
        "How does the hidden door in the Hartley Museum open?",
        "when you pull the third book on the left",
    ),
    Needle(
        "The most popular ice cream flavour in Saltmarsh is roasted fig with sea salt.",
        "What is the most popular ice cream flavour in Saltmarsh?",
        "roasted fig with sea salt",
    ),
    Needle(
        "The pet tortoise of Professor Okonkwo is named Sir Reginald.",
        "What is the name of Professor Okonkwo's pet tortoise?",
        "Sir Reginald",
    ),
    Needle(
        "The lost ring of Duchess Amara was found inside a loaf of bread in the castle kitchen.",
        "Where was the lost ring of Duchess Amara found?",
        "inside a loaf of bread in the castle kitchen",
    ),
    Needle(
        "The tallest tree in Greywood Forest is a silver birch planted by the monks in 1802.",
        "What is the tallest tree in Greywood Forest?",
        "a silver birch planted by the monks in 1802",
    ),
)


def niah_grid(
    tokenizer,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    needles: Sequence[Needle] | Sequence[int] | int = 3,
    haystack: Haystack = "essays",
    seed: int = 0,
    template: Template | None = None,
) -> list[Example]:
    """One example per (needle, length, depth), in that nesting order.

    `needles` is a list of `Needle`s, a count taken from the start of `NEEDLES`, or indices into
    `NEEDLES` (ids and `needle_index` then keep those indices, so held-out needles stay
    distinguishable). For each (needle, length) the haystack starts at a seeded essay, so depths
    of one cell share their haystack exactly.
    """
    lengths = check_selection("lengths", lengths)
    depths = check_selection("depths", depths)
    if isinstance(needles, int):
        if not 1 <= needles <= len(NEEDLES):
            raise InputError(f"needles must be 1..{len(NEEDLES)}, got {needles}")
        needles = NEEDLES[:needles]
    indexed = list(enumerate(check_selection("needles", needles)))
    if needles and all(isinstance(n, int) for n in needles):
        bad = [i for i in needles if not 0 <= i < len(NEEDLES)]
        if bad:
            raise InputError(f"needle indices must lie in 0..{len(NEEDLES) - 1}, got {bad}")
        indexed = [(i, NEEDLES[i]) for i in needles]
    rng = random.Random(seed)
    corpus_starts = _essay_starts() if haystack == "essays" else None
    out = []
    for n_i, needle in indexed:
        for length in lengths:
            start = rng.choice(corpus_starts) if corpus_starts else rng.randrange(5)
            hay = _haystack(tokenizer, needle, length, haystack, start, template)
            for depth in depths:
                text, _, realised = hs.insert_at_depth(hay, needle.text, float(depth))
                out.append(
                    Example(
                        id=f"niah-n{n_i}-L{length}-d{float(depth):.2f}-s{seed}",
                        task="niah",
                        variant=f"niah-{haystack}",
                        documents=(Document(text=text, gold=True),),
                        question=needle.question,
                        answers=(needle.answer,),
                        needles=(needle.text,),
                        meta={
                            "length": int(length),
                            "depth": float(depth),
                            "realised_depth": round(realised, 4),
                            "needle_index": n_i,
                            "haystack": haystack,
                            "seed": seed,
                        },
                    )
                )
    return out


def _essay_starts() -> list[int]:
    starts, pos = [], 0
    for _, text in hs.essays():
        starts.append(pos)
        pos += len(text) + 1
    return starts


def _haystack(
    tokenizer, needle: Needle, length: int, kind: Haystack, start: int, template: Template | None
) -> str:
    """Haystack text whose prompt (with the needle) comes to about `length` tokens."""
    probe = Example(
        id="probe",
        task="niah",
        variant="probe",
        documents=(Document(text=needle.text, gold=True),),
        question=needle.question,
        answers=(needle.answer,),
        needles=(needle.text,),
    )
    overhead = render(probe, tokenizer, template=template).n_tokens
    budget = length - overhead - 1
    if budget < 16:
        raise InputError(
            f"length {length} is too short: the prompt without haystack already "
            f"takes {overhead} tokens"
        )
    if kind == "essays":
        corpus = hs.essay_corpus()
        source = corpus[start:] + " " + corpus[:start]
    elif kind == "filler":
        source = hs.filler_text(budget, offset=start)
    else:
        raise InputError(f"unknown haystack {kind!r}; expected 'essays' or 'filler'")
    window = source[: budget * 8]
    enc = tokenizer(window, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if len(offsets) < budget:
        raise InputError(f"haystack source is too short for {length} tokens")
    cut = window[: offsets[budget - 1][1]]
    bounds = [b for b in hs.sentence_boundaries(cut) if b < len(cut)]
    last = max(bounds) if len(bounds) > 1 else len(cut)
    return cut[:last].strip()
