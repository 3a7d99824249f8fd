"""The reference for batched cross-model patching: one `cross_patch` block and one `evaluate` per
condition, as `cross_model_patching` ran before its conditions became batch rows."""

from __future__ import annotations

from contextlib import nullcontext

import pandas as pd

from mechinterp.evaluate import evaluate
from mechinterp.interventions import cross_patch


def per_condition_table(donor, recipient, examples, sets, *, patched, max_new_tokens):
    """The table, one `cross_patch` block and one `evaluate` per condition."""
    runs = [("recipient", recipient, ()), ("donor", donor, ())]
    runs += [(name, recipient, hs) for name, hs in sets.items()]
    frames = []
    for condition, model, hs in runs:
        with cross_patch(recipient, donor, hs, patched=patched) if hs else nullcontext():
            df = evaluate(model, examples, max_new_tokens=max_new_tokens, batch_size=2,
                          score=True, progress=False)  # fmt: skip
        frames.append(df.assign(condition=condition))
    return pd.concat(frames, ignore_index=True)
