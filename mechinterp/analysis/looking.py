"""Where heads look: the attention mass each head pays, from a prompt's last position (where the
answer's first token is predicted), to each of the prompt's needles. Under an address corruption
(`mechinterp.tasks.address`) a retrieval head should move its mass from one needle to the other.

    table = needle_mass(model, prompts, heads)   # example_id, layer, head, needle, mass

Only the last query row of each head's layer is computed (`models.attention.read_rows`): no
T × T pattern, on the fused path too.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from mechinterp.errors import InputError
from mechinterp.heads import Head
from mechinterp.tasks.prompt import Prompt


@torch.no_grad()
def needle_mass(
    model, prompts: Sequence[Prompt], heads: Sequence[Head], *, batch_size: int = 4
) -> pd.DataFrame:
    """One row per (prompt, head, needle): `mass`, the attention the head pays from the prompt's
    last position to the needle's tokens (`needle` numbers the prompt's needle spans from 0),
    and `n_tokens`, the needle's length."""
    from mechinterp.evaluate import left_pad
    from mechinterp.models.attention import RowReader, read_rows

    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if not heads:
        raise InputError("no heads given: name the heads whose attention to read")
    missing = [p.example_id for p in prompts if not p.spans.get("needle")]
    if missing:
        raise InputError(f"prompts {missing[:3]} have no needle span to measure attention to")
    layers = sorted({h.layer for h in heads})
    rows = []
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b : b + batch_size]
        ids, mask = left_pad(model, [p.input_ids for p in batch])
        got: dict[int, torch.Tensor] = {}

        def keep(pattern, layer, got=got):  # [batch, head, 1, keys]
            got[layer] = pattern[:, :, 0].float().cpu()

        readers = {layer: RowReader(lambda n_queries, n_keys: torch.tensor([n_queries - 1]),
                                    lambda pattern, layer=layer: keep(pattern, layer))
                   for layer in layers}  # fmt: skip
        with read_rows(model, readers):
            model(ids, attention_mask=mask, logits_to_keep=1)
        width = ids.shape[1]
        for r, p in enumerate(batch):
            off = width - p.n_tokens
            for h in heads:
                row = got[h.layer][r, h.head]
                for n, (s, e) in enumerate(p.spans["needle"]):
                    rows.append({"example_id": p.example_id, "layer": h.layer, "head": h.head,
                                 "head_name": str(h), "needle": n,
                                 "mass": float(row[off + s : off + e].sum()),
                                 "n_tokens": e - s})  # fmt: skip
    return pd.DataFrame(rows)
