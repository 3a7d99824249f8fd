"""Planted facts ("needles") along the needle-realism axis of the synthetic-context-extension paper.

Three realism levels, from most to least natural:

- `realistic`: varied, natural-sounding sentences about fictional people ("Maria Okafor, the marine
  biologist, moved to Lisbon in 2011 to study octopus behaviour.").
- `templated`: one rigid relation template ("The favorite city of Maria Okafor is Lisbon.").
- `symbolic`: key-value strings of random hex ("The value of key 7f3a-91c2 is 4d8e-2b6f.").

Each level also has a two-hop form for multi-hop QA: fact 1 links a subject to a bridge entity,
fact 2 links the bridge to the answer, and the question composes the two.

Every generator draws only from the `random.Random` it is given. Every answer occurs exactly once,
verbatim, in its fact's text and never in its question.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal

from mechinterp.errors import InputError

NeedleRealism = Literal["realistic", "templated", "symbolic"]
NEEDLE_REALISMS: tuple[NeedleRealism, ...] = ("realistic", "templated", "symbolic")

# Small pools for combinatorial facts. No item is a substring of another pool's items, so an answer
# is never hidden inside a name.
FIRST_NAMES = (
    "Maria", "Tomas", "Aiko", "Femi", "Ingrid", "Rafael", "Leila", "Dmitri",
    "Nadia", "Kwame", "Elena", "Oskar", "Priya", "Mateo", "Sofia", "Yusuf",
)  # fmt: skip
SURNAMES = (
    "Okafor", "Lindqvist", "Moreau", "Tanaka", "Novak", "Haddad", "Castillo", "Brennan",
    "Kowalski", "Abara", "Petrov", "Fernandes", "Osei", "Halvorsen", "Rahman", "Whitcombe",
)  # fmt: skip
PROFESSIONS = (
    "marine biologist", "architect", "violin maker", "pastry chef", "cartographer", "botanist",
    "translator", "glassblower", "watchmaker", "geologist", "librarian", "beekeeper",
)  # fmt: skip
CITIES = (
    "Lisbon", "Oslo", "Kyoto", "Tallinn", "Porto", "Krakow", "Hobart", "Ghent",
    "Bergen", "Cusco", "Marseille", "Tbilisi", "Zanzibar", "Nairobi", "Reykjavik", "Montevideo",
)  # fmt: skip
OBJECTS = (
    "brass telescope", "pocket watch", "chess set", "sewing machine", "oil lamp", "typewriter",
    "compass", "music box", "rocking chair", "tea kettle",
)  # fmt: skip
TOPICS = (
    "octopus behaviour", "medieval maps", "volcanic soil", "bird migration", "tidal currents",
    "ancient pottery", "cloud formation", "coral reefs",
)  # fmt: skip
BOATS = (
    "Silver Heron", "Morning Tide", "Quiet Gull", "Amber Wake", "North Lantern", "Blue Osprey",
    "Patient Otter", "Salt Sparrow",
)  # fmt: skip
YEARS = tuple(range(1952, 2020))

#: The relations of the rigid `templated` form: "The {relation} of {subject} is {value}."
TEMPLATED_RELATIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("favorite city", CITIES),
    ("favorite fruit", ("mango", "quince", "apricot", "papaya", "lychee", "persimmon", "guava")),
    ("favorite instrument", ("cello", "oboe", "harp", "bassoon", "accordion", "banjo", "sitar")),
)
#: Person-valued relations for the first hop of a templated two-hop fact.
TEMPLATED_BRIDGES: tuple[str, ...] = ("mentor", "neighbour", "business partner")


@dataclass(frozen=True)
class Fact:
    """One planted fact: its sentence, a question it answers, and the short answer.

    `subject` is the entity the fact is about (a person's name or a key); facts in one example
    must not share a subject or an answer.
    """

    text: str
    question: str
    answer: str
    subject: str = ""

    def __post_init__(self) -> None:
        if not self.answer.strip():
            raise InputError(f"fact {self.text!r} has an empty answer")
        if self.answer not in self.text:
            raise InputError(f"answer {self.answer!r} is not in fact text {self.text!r}")


@dataclass(frozen=True)
class TwoHop:
    """Two facts chained by a bridge entity (`facts[0].answer`) and the composed question."""

    facts: tuple[Fact, Fact]
    question: str
    answer: str

    def __post_init__(self) -> None:
        first, second = self.facts
        if first.answer != second.subject or first.answer not in second.text:
            raise InputError(f"fact 2 {second.text!r} does not start from bridge {first.answer!r}")
        if self.answer != second.answer:
            raise InputError(f"two-hop answer {self.answer!r} differs from fact 2's answer")

    @property
    def bridge(self) -> str:
        return self.facts[0].answer


def _article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}"


def hex_key(rng: random.Random) -> str:
    """A random key like `7f3a-91c2` (32 random bits)."""
    s = f"{rng.getrandbits(32):08x}"
    return f"{s[:4]}-{s[4:]}"


# --- one-hop facts ----------------------------------------------------------------------------


def _realistic(rng: random.Random) -> Fact:
    name, year = _person(rng), rng.choice(YEARS)
    prof, city, obj = rng.choice(PROFESSIONS), rng.choice(CITIES), rng.choice(OBJECTS)
    form = rng.randrange(6)
    if form == 0:
        text = f"{name}, the {prof}, moved to {city} in {year} to study {rng.choice(TOPICS)}."
        return Fact(text, f"Which city did {name} move to in {year}?", city, name)
    if form == 1:
        text = f"In {year}, {name} won a regional prize for restoring an old {obj}."
        return Fact(text, f"What did {name} restore to win a regional prize?", obj, name)
    if form == 2:
        years = rng.randint(3, 30)
        text = (
            f"{name} spent {years} years working as {_article(prof)} before opening a small "
            f"bakery in {city}."
        )
        return Fact(text, f"What did {name} work as before opening a bakery?", prof, name)
    if form == 3:
        boat = rng.choice(BOATS)
        text = f"Every summer, {name} sails out of {city} aboard an old boat called the {boat}."
        return Fact(text, f"What is the name of the boat that {name} sails?", boat, name)
    if form == 4:
        text = f"{name} was born in {year}, the winter the harbour of {city} froze over."
        return Fact(text, f"In which year was {name} born?", str(year), name)
    text = f"After years of searching, {name} finally found a rare {obj} at a market in {city}."
    return Fact(text, f"In which city did {name} find a rare {obj}?", city, name)


def _templated(rng: random.Random) -> Fact:
    relation, values = rng.choice(TEMPLATED_RELATIONS)
    name, value = _person(rng), rng.choice(values)
    return Fact(
        f"The {relation} of {name} is {value}.", f"What is the {relation} of {name}?", value, name
    )


def _symbolic(rng: random.Random) -> Fact:
    key, value = hex_key(rng), hex_key(rng)
    return Fact(
        f"The value of key {key} is {value}.", f"What is the value of key {key}?", value, key
    )


_MAKERS: dict[NeedleRealism, Callable[[random.Random], Fact]] = {
    "realistic": _realistic,
    "templated": _templated,
    "symbolic": _symbolic,
}


def _check_realism(realism: str) -> None:
    if realism not in NEEDLE_REALISMS:
        raise InputError(f"unknown needle realism {realism!r}; expected one of {NEEDLE_REALISMS}")


def _clean(fact: Fact) -> bool:
    return fact.text.count(fact.answer) == 1 and fact.answer not in fact.question


def make_fact(rng: random.Random, realism: NeedleRealism) -> Fact:
    """One random fact of the given realism."""
    return make_facts(rng, realism, 1)[0]


def make_facts(
    rng: random.Random, realism: NeedleRealism, n: int, *, avoid: Collection[str] = ()
) -> tuple[Fact, ...]:
    """`n` facts whose subjects and answers are all distinct and not in `avoid`.

    A fact is rejected if its subject or answer was already used as either a subject or an
    answer, so a symbolic key never reappears as another line's value.
    """
    _check_realism(realism)
    if n < 0:
        raise InputError(f"n must be >= 0, got {n}")
    make = _MAKERS[realism]
    used, out = set(avoid), []
    for _ in range(100 * n + 100):
        if len(out) == n:
            break
        fact = make(rng)
        if fact.subject in used or fact.answer in used or fact.subject == fact.answer:
            continue
        if not _clean(fact):
            continue
        used.update((fact.subject, fact.answer))
        out.append(fact)
    if len(out) < n:
        raise InputError(f"could not draw {n} distinct {realism} facts; the pools are too small")
    return tuple(out)


# --- two-hop facts ----------------------------------------------------------------------------


def _realistic_two_hop(rng: random.Random) -> TwoHop:
    a, b = _person(rng), _person(rng)
    form = rng.randrange(3)
    if form == 0:
        prof, year, city = rng.choice(PROFESSIONS), rng.choice(YEARS), rng.choice(CITIES)
        f1 = Fact(
            f"{a}, the {prof}, learned the trade from {b} in {year}.",
            f"Who taught {a} the trade?", b, a,
        )  # fmt: skip
        f2 = Fact(
            f"{b} grew up in {city} and still returns there every spring.",
            f"In which city did {b} grow up?", city, b,
        )  # fmt: skip
        question = f"In which city did the person who taught {a} the trade grow up?"
    elif form == 1:
        obj, prof, years = rng.choice(OBJECTS), rng.choice(PROFESSIONS), rng.randint(3, 30)
        f1 = Fact(
            f"{a} inherited an old {obj} from a neighbour named {b}.",
            f"Who left {a} an old {obj}?", b, a,
        )  # fmt: skip
        f2 = Fact(
            f"{b} spent {years} years working as {_article(prof)} before retiring to the coast.",
            f"What did {b} work as before retiring?", prof, b,
        )  # fmt: skip
        question = f"What did the neighbour who left {a} an old {obj} work as before retiring?"
    else:
        city, boat = rng.choice(CITIES), rng.choice(BOATS)
        f1 = Fact(
            f"{a} shares a small studio in {city} with an old friend, {b}.",
            f"Who shares a studio with {a}?", b, a,
        )  # fmt: skip
        f2 = Fact(
            f"{b} keeps a boat called the {boat} moored near the harbour.",
            f"What is the name of the boat that {b} keeps?", boat, b,
        )  # fmt: skip
        question = f"What is the name of the boat kept by the person who shares a studio with {a}?"
    return TwoHop((f1, f2), question, f2.answer)


def _templated_two_hop(rng: random.Random) -> TwoHop:
    a, b = _person(rng), _person(rng)
    bridge_rel = rng.choice(TEMPLATED_BRIDGES)
    relation, values = rng.choice(TEMPLATED_RELATIONS)
    value = rng.choice(values)
    f1 = Fact(f"The {bridge_rel} of {a} is {b}.", f"Who is the {bridge_rel} of {a}?", b, a)
    f2 = Fact(f"The {relation} of {b} is {value}.", f"What is the {relation} of {b}?", value, b)
    return TwoHop((f1, f2), f"What is the {relation} of the {bridge_rel} of {a}?", value)


def _symbolic_two_hop(rng: random.Random) -> TwoHop:
    k1, k2, value = hex_key(rng), hex_key(rng), hex_key(rng)
    f1 = Fact(f"The value of key {k1} is {k2}.", f"What is the value of key {k1}?", k2, k1)
    f2 = Fact(f"The value of key {k2} is {value}.", f"What is the value of key {k2}?", value, k2)
    question = f"What is the value of the key that is the value of key {k1}?"
    return TwoHop((f1, f2), question, value)


_TWO_HOP_MAKERS: dict[NeedleRealism, Callable[[random.Random], TwoHop]] = {
    "realistic": _realistic_two_hop,
    "templated": _templated_two_hop,
    "symbolic": _symbolic_two_hop,
}


def make_two_hop(
    rng: random.Random, realism: NeedleRealism, *, avoid: Collection[str] = ()
) -> TwoHop:
    """A two-hop fact pair: subject -> bridge (fact 1), bridge -> answer (fact 2).

    The three entities (subject, bridge, answer) are distinct and not in `avoid`; neither fact
    contains the other's answer, and the composed question names neither the bridge nor the answer.
    """
    _check_realism(realism)
    make = _TWO_HOP_MAKERS[realism]
    for _ in range(1000):
        hop = make(rng)
        f1, f2 = hop.facts
        entities = {f1.subject, f1.answer, f2.answer}
        if len(entities) < 3 or entities & set(avoid):
            continue
        if not (_clean(f1) and _clean(f2)) or f2.answer in f1.text or f1.subject in f2.text:
            continue
        if hop.bridge in hop.question or hop.answer in hop.question:
            continue
        return hop
    raise InputError(f"could not draw a clean {realism} two-hop fact")
