"""Heads: the `Head(layer, head)` value type, `HeadSet`, head-set parsing, and the GQA query→KV
map.

A head is always a *query* head. Heads print as `L{layer}H{head}` here and nowhere else;
the Wu et al. `"layer-head"` form is accepted on input (and written by `wu_key`) only at the
import/export boundary.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import NamedTuple

from mechinterp.errors import InputError

_HEAD_PATTERNS = (
    re.compile(r"^\s*L(\d+)\s*H(\d+)\s*$", re.IGNORECASE),
    re.compile(r"^\s*(\d+)\s*[-.:/]\s*(\d+)\s*$"),
)


def _is_index(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= 0


class Head(NamedTuple):
    """One query head: `Head(18, 6)` prints as `L18H6`."""

    layer: int
    head: int

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}"

    @property
    def wu_key(self) -> str:
        """The `"layer-head"` key of the Wu et al. head-score JSON format."""
        return f"{self.layer}-{self.head}"

    @classmethod
    def parse(cls, text: str) -> Head:
        """Parse `L18H6`, `l18h6`, `18-6` (Wu), `18.6` or `18:6`."""
        for pattern in _HEAD_PATTERNS:
            m = pattern.match(text)
            if m:
                return cls(int(m.group(1)), int(m.group(2)))
        raise InputError(f"cannot parse head {text!r}; write it as L18H6 or 18-6")


NOT_LOADED = (
    "this model was not loaded by mechinterp.load_model, so it has no model card "
    "(.mechinterp_card) to read its heads from: load it with mechinterp.load_model(name or "
    "path), or wrap an in-memory Hugging Face model with "
    "mechinterp.models.load.boot_bridge(hf_model, tokenizer, directory, model_id=..., "
    "dtype=..., device=...)"
)


def check_loaded(model) -> None:
    """Refuse a model that `load_model` did not build (no `.mechinterp_card`)."""
    if getattr(model, "mechinterp_card", None) is None:
        raise InputError(NOT_LOADED)



@dataclass(frozen=True)
class HeadShape:
    """The head geometry of a model: enough to validate heads and map query → KV heads."""

    n_layers: int
    n_heads: int
    n_kv_heads: int

    def __post_init__(self) -> None:
        if min(self.n_layers, self.n_heads, self.n_kv_heads) < 1:
            raise InputError(f"head shape must be positive, got {self}")
        if self.n_heads % self.n_kv_heads:
            raise InputError(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )

    @classmethod
    def of(cls, model) -> HeadShape:
        """From a loaded model (its model card) or anything with n_layers/n_heads/n_kv_heads."""
        card = getattr(model, "mechinterp_card", model)
        if not all(hasattr(card, n) for n in ("n_layers", "n_heads", "n_kv_heads")):
            check_loaded(model)  # a bridge (or anything else) without a card
        return cls(int(card.n_layers), int(card.n_heads), int(card.n_kv_heads))

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for MHA, n_heads for MQA)."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: Head | int) -> int:
        """The KV head a query head reads (HF's repeat_kv layout: consecutive groups)."""
        h = head.head if isinstance(head, Head) else head
        return h // self.group_size

    def validate(self, head: Head) -> Head:
        if not (0 <= head.layer < self.n_layers and 0 <= head.head < self.n_heads):
            raise InputError(
                f"head {head} is outside the model: it has layers 0..{self.n_layers - 1} and "
                f"query heads 0..{self.n_heads - 1} per layer"
            )
        return head

    def all_heads(self) -> list[Head]:
        return [Head(layer, h) for layer in range(self.n_layers) for h in range(self.n_heads)]

    def kv_group(self, head: Head) -> list[Head]:
        """Every query head that reads `head`'s KV head, `head` included."""
        first = self.kv_head(head) * self.group_size
        return [Head(head.layer, first + i) for i in range(self.group_size)]

    def kv_group_heads(self, heads: Iterable[Head], *, inside: bool = False) -> list[Head]:
        """The query heads of the KV groups that `heads` touch, each group whole, layer-major;
        with `inside`, only of the groups that lie wholly inside `heads`. Under GQA a key input
        is its KV group's, so the queries and the keys of these heads patch the same heads."""
        chosen = set(heads)
        groups = {g[0]: g for g in (self.kv_group(h) for h in chosen)}
        return sorted(h for g in groups.values() if not inside or set(g) <= chosen for h in g)


class HeadSet(tuple):
    """An ordered tuple of heads that remembers the `(n_layers, n_heads)` grid it came from, so that
    comparing head sets of models of different shapes is an error instead of a silent number.
    Equal to a plain tuple of the same heads."""

    grid: tuple[int, int] | None

    def __new__(cls, heads: Iterable[Head] = (), grid: tuple[int, int] | None = None) -> HeadSet:
        obj = super().__new__(cls, tuple(heads))
        obj.grid = grid
        return obj


def parse_heads(
    spec: str | Iterable[str | Head | tuple[int, int]], shape: HeadShape | None = None
) -> tuple[Head, ...]:
    """Parse a head list: `"L18H6,L3H1"`, `"18-6 3-1"`, or an iterable of strings/pairs.

    Order is kept, duplicates are refused, and with `shape` every head is validated against
    the model.
    """
    if spec is None or not isinstance(spec, str | Iterable):
        raise TypeError(
            f"parse_heads needs heads like 'L18H6,L3H1' or [(18, 6), (3, 1)], got {spec!r}"
        )
    heads = []
    for item in [spec] if isinstance(spec, str) else list(spec):
        if isinstance(item, str):  # one string may hold several heads: "L18H6 L3H1"
            parts = [s for s in re.split(r"[,\s;]+", item.strip()) if s]
            if not parts and item.strip():
                raise InputError(f"{item!r} names no head; write heads like 'L18H6,L3H1'")
            heads += map(Head.parse, parts)
            continue
        if isinstance(item, Head):
            head = item
        elif isinstance(item, Sequence) and len(item) == 2 and all(map(_is_index, item)):
            head = Head(int(item[0]), int(item[1]))
        else:
            raise InputError(f"{item!r} is not a head; write 'L18H6' or the pair (18, 6)")
        heads.append(head)
    if shape is not None:
        for head in heads:
            shape.validate(head)
    dupes = sorted({str(h) for h in heads if heads.count(h) > 1})
    if dupes:
        raise InputError(f"head list repeats {', '.join(dupes)}")
    return tuple(heads)
