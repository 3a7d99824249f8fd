"""Checks of token ids against a loaded model (no imports from the rest of the package but
`mechinterp.heads`)."""

from __future__ import annotations

from numbers import Integral

from mechinterp.errors import InputError
from mechinterp.heads import check_loaded


def check_token_ids(model, ids, what: str = "token ids") -> None:
    """Refuse anything but one prompt's token ids (a flat list of ints or a 1-D tensor) and ids
    outside the model's vocabulary (an embedding lookup would fail deep in the forward, or on
    GPU assert asynchronously)."""
    check_loaded(model)
    if isinstance(ids, str | bytes) or not hasattr(ids, "__len__"):
        raise InputError(f"{what} must be one prompt's token ids (a list of ints or a 1-D "
                         f"tensor), got {type(ids).__name__}")  # fmt: skip
    if getattr(ids, "ndim", 1) != 1:
        raise InputError(f"{what} must be one prompt's token ids, a 1-D tensor; got shape "
                         f"{tuple(ids.shape)}: pass one prompt per call (e.g. ids[0])")  # fmt: skip
    nested = [i for i in ids if not _is_int(i)]
    if nested:
        raise InputError(f"{what} must be one prompt's token ids, a flat list of ints; got "
                         f"{type(nested[0]).__name__} items (a batch?): pass one prompt per "
                         "call")  # fmt: skip
    if not len(ids):
        raise InputError(f"{what} is empty: give at least one token")
    vocab = int(model.cfg.d_vocab)
    flat = [int(i) for i in ids]
    bad = [i for i in flat if not 0 <= i < vocab]
    if bad:
        raise InputError(f"{what} hold ids outside the model's vocabulary [0, {vocab}): "
                         f"{bad[:5]}; tokenize with the model's own tokenizer")  # fmt: skip


def _is_int(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, Integral):
        return True
    return getattr(value, "ndim", None) == 0 and not getattr(value, "is_floating_point", bool)()
