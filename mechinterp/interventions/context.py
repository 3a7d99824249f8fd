"""`single_use`: a generator context manager that refuses, by name, to be entered twice.

`contextlib.contextmanager` objects run their generator once; entering one a second time fails
inside contextlib with an AttributeError that names neither the intervention nor the fix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


def single_use(
    generator: Callable[P, Iterator[T]],
) -> Callable[P, AbstractContextManager[T]]:
    """`@contextmanager`, but a second `with` on the same object is refused by name."""
    manager = contextmanager(generator)
    name = generator.__name__

    @functools.wraps(generator)
    def make(*args: P.args, **kwargs: P.kwargs) -> AbstractContextManager[T]:
        return _SingleUse(manager(*args, **kwargs), name)

    return make


class _SingleUse(AbstractContextManager):
    def __init__(self, manager: AbstractContextManager, name: str) -> None:
        self._manager, self._name, self._entered = manager, name, False

    def __enter__(self):
        if self._entered:
            raise RuntimeError(
                f"this {self._name}(...) object was already entered once; each `with` block "
                f"needs its own: write `with {self._name}(...):` again"
            )
        self._entered = True
        return self._manager.__enter__()

    def __exit__(self, *exc):
        return self._manager.__exit__(*exc)
