"""Checks of token ids against a loaded model (no imports from the rest of the package)."""

from __future__ import annotations


def check_token_ids(model, ids, what: str = "token ids") -> None:
    """Refuse token ids outside the model's vocabulary (an embedding lookup would fail deep in
    the forward, or on GPU assert asynchronously)."""
    vocab = int(model.cfg.d_vocab)
    flat = [int(i) for i in ids]
    bad = [i for i in flat if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"{what} hold ids outside the model's vocabulary [0, {vocab}): "
                         f"{bad[:5]}; tokenize with the model's own tokenizer")  # fmt: skip
