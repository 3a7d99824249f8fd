"""The one rule for selections (positions, heads, examples, layers, ks, seeds, grid values):

- an empty selection is refused where it would select nothing, since a silent "nothing" (or
  worse, "everything") changes the experiment; where an empty list has a meaning of its own
  (a config field whose default is empty: "none"), it keeps that meaning;
- a repeated value is refused and named: it would be run, and counted, twice.

`mechinterp.config` applies it to every list a config holds; API functions that take a
selection call `check_selection` at their boundary.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mechinterp.errors import InputError


def check_selection(name: str, values: Iterable, *, empty: bool = False) -> list:
    """`values` as a list, or a ValueError naming `name`: when it is empty (unless `empty`
    allows it) or repeats a value."""
    if isinstance(values, str | bytes):
        raise InputError(f"{name} must be a list of values, got the string {values!r}")
    items = list(values)
    if not items and not empty:
        raise InputError(f"{name} is empty, so it selects nothing; give at least one value")
    seen: set = set()
    repeated: list = []
    for item in items:
        key = _key(item)
        if key in seen and item not in repeated:
            repeated.append(item)
        seen.add(key)
    if repeated:
        raise InputError(f"{name} repeats {', '.join(map(str, repeated))}; give each value once "
                         "(a repeated value would be run, and counted, twice)")  # fmt: skip
    return items


def _key(item: Any):
    try:
        hash(item)
    except TypeError:
        return repr(item)
    return item
