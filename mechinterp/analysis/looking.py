"""Where heads look: the attention mass each head pays, from a prompt's last position (where the
answer's first token is predicted), to each of the prompt's needles. Under an address corruption
(`mechinterp.tasks.address`) a retrieval head should move its mass from one needle to the other.

    table = needle_mass(model, prompts, heads)   # example_id, layer, head, needle, mass

Patching can move that mass back. `mass_restored` patches each head's own query (or its KV
group's keys) from the clean prompt into the corrupt one and reads where the head then looks;
`MassMetric` makes the heads' mass on a span a patching metric, so that path patching
(`interventions.paths`) measures which upstream heads steer where the heads look:

    metric = MassMetric(heads, span=clean.spans["needle"][0], n_tokens=clean.n_tokens)
    with metric.reading(model):
        res = path_patch(model, clean.input_ids, corrupt.input_ids, metric, receivers=heads)

Only the last query row of each head's layer is computed (`models.attention.read_rows`): no
T × T pattern, on the fused path too.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from functools import partial

import pandas as pd
import torch

from mechinterp.errors import InputError
from mechinterp.heads import Head
from mechinterp.tasks.prompt import Prompt


def _last_row(n_queries: int, n_keys: int) -> torch.Tensor:
    return torch.tensor([n_queries - 1])


def _span_mass(row: torch.Tensor, span: tuple[int, int], n_tokens: int) -> torch.Tensor:
    """Mass of `row` [..., keys] on positions [start, end) of a sequence `n_tokens` long. The
    keys are the sequence's last `keys` positions (a sliding-window cache keeps only those):
    a position outside them is hidden from the row and carries no mass."""
    keys = row.shape[-1]
    s, e = (max(0, keys - n_tokens + p) for p in span)
    return row[..., s:e].sum(-1)


@torch.no_grad()
def needle_mass(
    model,
    prompts: Sequence[Prompt],
    heads: Sequence[Head],
    *,
    batch_size: int = 4,
    span: str = "needle",
) -> pd.DataFrame:
    """One row per (prompt, head, needle): `mass`, the attention the head pays from the prompt's
    last position to the needle's tokens (`needle` numbers the prompt's needle spans from 0),
    and `n_tokens`, the needle's length. `span` names another kind of span to measure instead
    (e.g. "question"; `needle` then numbers those spans)."""
    from mechinterp.evaluate import left_pad
    from mechinterp.models.attention import RowReader, read_rows

    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if not heads:
        raise InputError("no heads given: name the heads whose attention to read")
    missing = [p.example_id for p in prompts if not p.spans.get(span)]
    if missing:
        raise InputError(f"prompts {missing[:3]} have no {span} span to measure attention to")
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
                for n, (s, e) in enumerate(p.spans[span]):
                    rows.append({"example_id": p.example_id, "layer": h.layer, "head": h.head,
                                 "head_name": str(h), "needle": n,
                                 "mass": float(row[off + s : off + e].sum()),
                                 "n_tokens": e - s})  # fmt: skip
    return pd.DataFrame(rows)


class MassMetric:
    """A patching metric read from attention instead of logits: per batch row, the mean over
    `heads` of the mass the last position pays to tokens `span` = [start, end) of a sequence
    `n_tokens` long (the clean and corrupt prompts of an aligned pair share it), minus the mass
    on `minus` when given (a question swap's two needles: where the heads look, A against B).

    The rows are read by the forward that produced the logits, so the metric is called inside
    `reading(model)`, right after that forward: path patching (`path_patch`,
    `path_patch_inputs`) and `Prepared.of` enter it themselves when given this metric. Only
    exact patching reads it; attribution patching refuses it (no gradient flows from a read
    row to the logits)."""

    def __init__(self, heads: Sequence[Head], span: tuple[int, int], n_tokens: int, *,
                 minus: tuple[int, int] | None = None) -> None:  # fmt: skip
        if not heads:
            raise InputError("no heads given: name the heads whose attention the metric reads")
        for sp in (span, minus) if minus is not None else (span,):
            if not 0 <= int(sp[0]) < int(sp[1]) <= n_tokens:
                raise InputError(f"span {sp} must lie inside the {n_tokens} tokens, start < end")
        self.heads = list(heads)
        self.span = (int(span[0]), int(span[1]))
        self.minus = None if minus is None else (int(minus[0]), int(minus[1]))
        self.n_tokens = int(n_tokens)
        self._rows: dict[int, torch.Tensor] = {}

    def _keep(self, pattern: torch.Tensor, layer: int) -> None:  # [batch, head, 1, keys]
        self._rows[layer] = pattern[:, :, 0].float()

    @contextmanager
    def reading(self, model):
        from mechinterp.models.attention import RowReader, read_rows

        layers = sorted({h.layer for h in self.heads})
        readers = {la: RowReader(_last_row, partial(self._keep, layer=la)) for la in layers}
        self._rows = {}
        with read_rows(model, readers):
            yield self
        self._rows = {}

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        missing = {h.layer for h in self.heads} - set(self._rows)
        if missing:
            raise RuntimeError(f"MassMetric read no rows of layers {sorted(missing)}: call it "
                               "inside `reading(model)`, after the forward")  # fmt: skip
        masses = [self._mass(self._rows[h.layer][:, h.head]) for h in self.heads]
        return torch.stack(masses).mean(0).to(logits.device)

    def _mass(self, row: torch.Tensor) -> torch.Tensor:
        mass = _span_mass(row, self.span, self.n_tokens)
        if self.minus is not None:
            mass = mass - _span_mass(row, self.minus, self.n_tokens)
        return mass


@torch.no_grad()
def mass_restored(
    model, clean: Prompt, corrupt: Prompt, heads: Sequence[Head], *, node: str = "q"
) -> pd.DataFrame:
    """Where each head looks when its own query (`node="q"`: at the last position) or keys
    (`node="k"`: at every position; under GQA its KV group's, shared with the group) come from
    the clean prompt while everything else runs on the corrupt one. One row per (head, needle):
    `clean`, `corrupt` and `patched` mass from the last position on that needle's span, and
    `restored` = (patched − corrupt) / (clean − corrupt) (NaN where clean = corrupt).

    Each head is patched alone (one batch row per head), and only its own row is read, so the
    value is the head's own: its query meets the corrupt keys (or its clean keys meet the
    corrupt query). The patched rows run from the lowest head's layer on the corrupt run's
    residual stream, over the positions after the prompts' shared start only."""
    from mechinterp.heads import HeadShape
    from mechinterp.interventions.nodes import check_node, node_point
    from mechinterp.interventions.resume import prefix_cache, run_from_layer, shared_start
    from mechinterp.models.attention import RowReader, read_rows

    if node not in ("q", "k"):
        raise InputError(f"node must be 'q' or 'k' (where a head's address is), got {node!r}")
    if not heads:
        raise InputError("no heads given: name the heads whose attention to restore")
    check_node(model, node)
    if clean.n_tokens != corrupt.n_tokens or not clean.spans.get("needle"):
        raise InputError("clean and corrupt must be an aligned pair (same length) with needle "
                         "spans: build them with `mechinterp.tasks.address`")  # fmt: skip
    shape = HeadShape.of(model)
    group = shape.n_heads // shape.n_kv_heads
    n_units = shape.n_heads if node == "q" else shape.n_kv_heads
    unit = {h: h.head if node == "q" else h.head // group for h in heads}
    layers = sorted({h.layer for h in heads})
    points = {la: node_point(model, la, node) for la in layers}
    n = clean.n_tokens
    start = min(shared_start(clean.input_ids, corrupt.input_ids, 0), n - 1)
    device = model.cfg.device
    saved: dict[int, torch.Tensor] = {}
    rows: dict[str, dict[int, torch.Tensor]] = {"clean": {}, "corrupt": {}}

    def save(x, hook, *, la):
        saved[la] = x[:, start:].detach().clone()

    def grab(x, hook):
        saved["resid"] = x[0, start:].detach().clone()

    def write(x, hook, *, la):  # row i + 1 takes head i's clean input; row 0 stays corrupt
        x = x.clone()
        view = x.view(*x.shape[:2], n_units, -1)
        src = saved[la].view(1, view.shape[1], n_units, -1)
        for i, h in enumerate(heads, start=1):
            if h.layer == la:
                at = slice(-1, None) if node == "q" else slice(None)
                view[i, at, unit[h]] = src[0, at, unit[h]]
        return x

    def keep(pattern, la, run):
        rows[run][la] = pattern[:, :, 0].float().cpu()

    def readers(run):
        return {la: RowReader(_last_row, partial(keep, la=la, run=run)) for la in layers}

    with read_rows(model, readers("clean")), model.hooks(
        fwd_hooks=[(p, partial(save, la=la)) for la, p in points.items()]
    ):
        model(torch.tensor([list(clean.input_ids)], device=device), logits_to_keep=1)
    with model.hooks(fwd_hooks=[(f"blocks.{layers[0]}.hook_resid_pre", grab)]):
        model(torch.tensor([list(corrupt.input_ids)], device=device), logits_to_keep=1)
    prefix = prefix_cache(model, corrupt.input_ids[:start]) if start > 0 else None
    resid = saved["resid"][None].expand(len(heads) + 1, -1, -1)
    with read_rows(model, readers("corrupt")):
        run_from_layer(model, resid, layers[0], prefix_kv=prefix,
                       hooks=[(p, partial(write, la=la)) for la, p in points.items()])
    out = []
    for i, h in enumerate(heads, start=1):
        for k, span in enumerate(clean.spans["needle"]):
            c = float(_span_mass(rows["clean"][h.layer][0, h.head], span, n))
            x, p = (float(_span_mass(rows["corrupt"][h.layer][r, h.head], span, n))
                    for r in (0, i))  # fmt: skip
            out.append({"layer": h.layer, "head": h.head, "head_name": str(h), "node": node,
                        "needle": k, "clean": c, "corrupt": x, "patched": p,
                        "restored": (p - x) / (c - x) if c != x else float("nan")})  # fmt: skip
    return pd.DataFrame(out)
