"""The runs a clean / corrupt pair needs, shared by every patching method: resuming a forward at a
layer from a cached residual stream (`run_from_layer`), the target's KV cache for the prefix
nobody patches (`prefix_cache`, `shared_cache`), the pair's cached activations (`Prepared`), the
metrics and the result type (`PatchResult`). `patching` (per-head patching), `attribution`
(AtP, AtP*) and `paths` (path patching) build on it; `patching` re-exports its names.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from numbers import Integral
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mechinterp.errors import InputError, UnsupportedError
from mechinterp.heads import HeadShape
from mechinterp.interventions.knockout import family_name
from mechinterp.models.kv_cache import cache_kwargs, new_cache

Direction = Literal["denoise", "noise"]
#: A metric maps last-position logits [batch, vocab] to one value per row [batch].
Metric = Callable[[Tensor], Tensor]


def logit_diff_metric(correct: int, wrong: int) -> Metric:
    """logit[correct] − logit[wrong] at the last position."""
    return lambda logits: logits[:, correct] - logits[:, wrong]


def logprob_metric(token: int) -> Metric:
    """log p(token) at the last position (the answer's log-prob)."""
    return lambda logits: logits.float().log_softmax(-1)[:, token]


def normalised_recovery(patched: Tensor, clean: float, corrupt: float) -> Tensor:
    """(M_patched − M_corrupt) / (M_clean − M_corrupt); 1 = clean behaviour restored."""
    if clean == corrupt:
        raise InputError("clean and corrupt metrics are equal: recovery is undefined")
    return (patched - corrupt) / (clean - corrupt)


@contextmanager
def _resumed_at(model, layer: int, resid: Tensor):
    """During the HF forward inside the block, blocks below `layer` pass their input through
    unrun and block `layer` receives `resid` as its input.

    The model's own forward still builds everything around the blocks (per-layer attention types
    and masks, sliding windows, position ids and per-layer rotary tables, embedding scaling,
    final norm, soft-capping), so nothing of its layer logic is re-implemented or sliced here.
    """
    blocks = list(model.blocks)
    if not 0 <= layer < len(blocks):
        raise InputError(f"layer {layer} is outside the model's {len(blocks)} layers")

    def skip(hidden_states, *args, **kwargs):
        return hidden_states

    def inject(module, args, kwargs):
        if args:
            return (resid, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": resid}

    own = [vars(b).get("forward") for b in blocks[:layer]]
    for b in blocks[:layer]:  # on the instance; bridge components forward plain setattr
        object.__setattr__(b, "forward", skip)
    handle = blocks[layer].register_forward_pre_hook(inject, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for b, f in zip(blocks[:layer], own, strict=True):
            if f is None:
                object.__delattr__(b, "forward")
            else:
                object.__setattr__(b, "forward", f)


@torch.no_grad()
def resumable(model) -> bool:
    """Whether `run_from_layer` runs `model` correctly: resuming from every layer on the residual
    stream the model itself fed that layer must reproduce its own forward (a decoder layer that
    returns something other than its hidden states, say, would fail). Probed once per model
    (`load_model` does it at load, with no hooks attached, on 8 tokens) and remembered on it."""
    known = getattr(model, "mechinterp_resumable", None)
    if known is None:
        ids = (torch.arange(1, 9, device=model.cfg.device) % model.cfg.d_vocab)[None, :]
        resid: dict[int, Tensor] = {}

        def keep(x: Tensor, hook, *, layer: int) -> None:
            resid[layer] = x.detach()

        n_layers = model.cfg.n_layers
        hooks = [(f"blocks.{la}.hook_resid_pre", partial(keep, layer=la)) for la in range(n_layers)]
        with model.hooks(fwd_hooks=hooks):
            full = model(ids, logits_to_keep=1, use_cache=False)[:, -1].float()
        known = True
        model.mechinterp_resumable = True  # so run_from_layer runs for the probe itself
        try:
            for la in range(n_layers):
                got = run_from_layer(model, resid[la], la).float()
                known = known and bool(torch.allclose(got, full, atol=1e-3, rtol=1e-3))
        except Exception as e:  # a model the resumed forward cannot run at all: say why
            known = False
            model.mechinterp_resume_error = f"{type(e).__name__}: {e}"
        model.mechinterp_resumable = known
    return known


def check_resumable(model) -> None:
    """Raise for a model `run_from_layer` would run wrongly (see `resumable`)."""
    if not resumable(model):
        why = getattr(model, "mechinterp_resume_error", None)
        raise UnsupportedError(
            f"{family_name(model)}: resuming a forward at a layer (skipping the blocks below it) "
            "does not reproduce the model's own forward, so per-head patching from cached "
            "residuals is refused for it" + (f" (the resumed forward failed: {why})" if why else "")
        )


@torch.no_grad()
def run_from_layer(
    model,
    resid: Float[Tensor, "batch pos d_model"],
    layer: int,
    *,
    hooks: Sequence = (),
    prefix_kv=None,
) -> Float[Tensor, "batch vocab"]:
    """Last-position logits of blocks `layer`.. run on `resid` (the residual entering `layer`).

    The model's own forward runs, with the blocks below `layer` skipped and `resid` fed to block
    `layer` (see `_resumed_at`): each later block gets the attention type, mask, positions and
    rotary table the model gives it. With `prefix_kv` (a `prefix_cache` of an unchanged prefix of
    p positions), `resid` holds only the positions after the prefix, which attend to the cached
    prefix instead of recomputing it.
    """
    n_layers = model.cfg.n_layers
    if not 0 <= layer < n_layers:
        raise InputError(f"layer {layer} is outside the model's {n_layers} layers")
    check_resumable(model)
    cache = None if prefix_kv is None else shared_cache(model, prefix_kv, rows=resid.shape[0])
    with _resumed_at(model, layer, resid), model.hooks(fwd_hooks=list(hooks)):
        out = model.original_model(
            inputs_embeds=torch.zeros_like(resid), logits_to_keep=1, **cache_kwargs(model, cache)
        )
    return out.logits[:, -1]


def reading(model, metric: Metric):
    """The context a metric reads its forward in: `metric.reading(model)` for a metric read
    from attention rows (`analysis.looking.MassMetric`), else nothing."""
    read = getattr(metric, "reading", None)
    return read(model) if read is not None else nullcontext()


@dataclass(frozen=True)
class PatchResult:
    """Metric after patching each head (`values[layer, head]`, or `[layer, head, pos]` per
    position), plus the unpatched clean and corrupt metrics."""

    values: Tensor
    clean: float
    corrupt: float
    direction: Direction
    per_position: bool
    settings: dict = field(default_factory=dict)
    sets: dict[str, float] = field(default_factory=dict)  # metric per jointly patched head set
    screen: PatchResult | None = None  # the attribution screen, when the heads were screened

    @property
    def recovery(self) -> Tensor:
        return normalised_recovery(self.values, self.clean, self.corrupt)

    # Typed views of `settings` (which stays a dict: run tables write it as provenance).

    @property
    def patch_from(self) -> int:
        """The first position patching was allowed to change."""
        return int(self.settings.get("patch_from", 0))

    @property
    def seconds(self) -> float | None:
        """Wall time of the patched runs."""
        return self.settings.get("seconds")

    @property
    def verify_top(self) -> int | None:
        """How many screened heads were patched exactly (None: not screened)."""
        return self.settings.get("verify_top")

    @property
    def receiver_input(self) -> str | None:
        """Path patching: the receivers' input the paths were patched into (None otherwise)."""
        return self.settings.get("receiver_input")

    @property
    def false_negatives(self) -> FalseNegatives | None:
        """A screen's false-negative diagnostic (None without a sample; `verify_screen`)."""
        found = self.settings.get("false_negatives")
        return None if found is None else FalseNegatives.of(found)

    def _recovery(self, values: Tensor) -> Tensor:
        """Normalised recovery of `values`, NaN where clean and corrupt tie."""
        if self.clean == self.corrupt:
            return torch.full_like(values, float("nan"))
        return normalised_recovery(values, self.clean, self.corrupt)

    def frame(self) -> pd.DataFrame:
        """One row per patched unit (and position, per position), in the columns of
        `mechinterp patch`'s table: layer, head, head_name, value (the metric after patching),
        recovery, clean_metric, corrupt_metric, direction; units not patched are left out.
        A screened result adds `sampled` (drawn for the false-negative diagnostic). A path
        patching result has the columns of `mechinterp path-patch`'s table instead:
        receiver_input, receiver_units, kind (`sender`, or `set` for a jointly patched sender
        set, layer and head -1), and the same values."""
        from mechinterp.results import head_rows

        df = head_rows(self.values)
        df["recovery"] = head_rows(self._recovery(self.values))["value"]
        df = df[df["value"].notna()].reset_index(drop=True)
        if self.receiver_input is not None:
            df.insert(0, "kind", "sender")
            sets = pd.DataFrame([{"kind": "set", "layer": -1, "head": -1, "head_name": name,
                                  "value": v} for name, v in self.sets.items()])  # fmt: skip
            if not sets.empty:
                sets["recovery"] = self._recovery(torch.tensor(sets["value"].to_numpy())).numpy()
                df = pd.concat([df, sets], ignore_index=True)
            df.insert(0, "receiver_units", self.settings.get("receiver_units"))
            df.insert(0, "receiver_input", self.receiver_input)
        elif "node" in self.settings:
            df.insert(0, "node", self.settings["node"])
        if self.false_negatives is not None:
            df["sampled"] = df["head_name"].isin(self.false_negatives.sampled)
        return df.assign(clean_metric=self.clean, corrupt_metric=self.corrupt,
                         direction=self.direction)  # fmt: skip

    def plot(self, top_k: int | None = None, title: str | None = None):
        """The figure the matching command draws: the layer × head recovery heatmap of
        `mechinterp patch` (`head_heatmap`), or for path patching the sender heatmap of
        `mechinterp path-patch` (`sender_heatmaps`); `top_k` heads labelled."""
        from mechinterp.plots import head_heatmap, sender_heatmaps

        if self.per_position:
            raise InputError(
                "a per-position result has one value per head and position: plot frame() "
                "grouped by position, or patch without per_position"
            )
        df = self.frame()
        value = "recovery" if df["recovery"].notna().any() else "value"
        if self.receiver_input is not None:
            title = title or f"path patching into the receivers' {self.receiver_input}"
            return sender_heatmaps(df[df["kind"] == "sender"], value=value, top_k=top_k or 5,
                                   title=title)  # fmt: skip
        title = title or f"{value} per head ({self.direction})"
        return head_heatmap(df, value=value, top_k=top_k or 10, title=title)


@dataclass(frozen=True)
class FalseNegatives:
    """The false-negative diagnostic of an attribution screen (Kramár et al. 2024;
    `verify_screen`): of `n_sampled` heads drawn from the `n_unverified` the screen did not
    verify, `found` move the metric by more than `threshold_effect` (= `threshold` × |clean −
    corrupt|); at `confidence`, at most `max_above` unverified heads do."""

    threshold: float
    threshold_effect: float
    n_unverified: int
    n_sampled: int
    sampled: tuple[str, ...]
    found: tuple[str, ...]
    largest_sampled_effect: float
    max_above: int
    confidence: float
    p_miss_one: float
    seed: int

    @classmethod
    def of(cls, settings: dict) -> FalseNegatives:
        """From `settings["false_negatives"]`."""
        return cls(**{**settings, "sampled": tuple(settings["sampled"]),
                      "found": tuple(settings["found"])})  # fmt: skip


def _cache(
    model, ids: Tensor, keep_from: int = 0
) -> tuple[dict[int, Tensor], dict[int, Tensor], Tensor]:
    """(resid_pre per layer, z per layer [pos, head, d_head], last-position logits) of one run,
    activations kept from position `keep_from` on (patching needs no more: memory ∝ what is
    patched, not the context)."""
    n_layers = model.cfg.n_layers
    resid: dict[int, Tensor] = {}
    z: dict[int, Tensor] = {}

    def keep(x, hook, *, store, layer):
        store[layer] = x[0, keep_from:].detach().clone()

    hooks = []
    for la in range(n_layers):
        hooks.append((f"blocks.{la}.hook_resid_pre", partial(keep, store=resid, layer=la)))
        hooks.append((f"blocks.{la}.attn.hook_z", partial(keep, store=z, layer=la)))
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(ids, logits_to_keep=1)[:, -1]
    shape = HeadShape.of(model)
    z = {la: v.view(v.shape[0], shape.n_heads, -1) for la, v in z.items()}
    return resid, z, logits


@torch.no_grad()
def prefix_cache(model, ids: Sequence[int]):
    """The model's own KV cache (one row) after running `ids`; `filled_cache` copies it per use.

    The cache object is kept whole, not its key/value tensors: a sliding-window layer keeps only
    its last window of keys but counts every position seen, and that count places the tokens
    that follow (their RoPE positions and masks)."""
    cache = new_cache(model)
    model(
        torch.tensor([list(ids)], device=model.cfg.device),
        logits_to_keep=1,
        **cache_kwargs(model, cache),
    )
    return cache


def filled_cache(model, prefix, *, rows: int):
    """A fresh copy of `prefix` (from `prefix_cache`) for a batch of `rows` rows (for
    generation, which extends it; one forward over a shared prefix: `shared_cache`)."""
    cache = copy.deepcopy(prefix)
    if rows > 1:
        cache.batch_repeat_interleave(rows)
    return cache


def _shared_layer(layer, rows: int):
    """A shallow copy of one layer of a one-row prefix cache, read by `rows` batch rows in a
    single forward: its update returns the prefix's keys and values broadcast over the rows,
    then the new ones, as a copied cache would, and keeps nothing. Memory: one layer's rows ×
    positions at a time instead of every layer's."""

    def update(key_states: Tensor, value_states: Tensor, *args, **kwargs):
        keys = layer.keys.expand(rows, *layer.keys.shape[1:])
        values = layer.values.expand(rows, *layer.values.shape[1:])
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    shared = copy.copy(layer)
    shared.update = update
    return shared


def shared_cache(model, prefix, *, rows: int):
    """`prefix` (a one-row `prefix_cache`) for one forward of `rows` rows after it, without a
    copy per row: each layer's keys are broadcast when the layer runs. The cache is not
    extended, so it serves a single forward (teacher forcing, patching), not generation; caches
    of other layer types (static, quantised, recording past states) are copied instead."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(prefix, "layers", None)
    plain = layers is not None and all(
        type(layer) is DynamicLayer
        or (type(layer) is DynamicSlidingWindowLayer and not layer.record_past)
        for layer in layers
    )
    if not plain or rows == 1:
        return filled_cache(model, prefix, rows=rows)
    cache = copy.copy(prefix)
    cache.layers = [_shared_layer(layer, rows) for layer in layers]
    return cache


def layer_batches(variants: list[tuple], batch_size: int, n_layers: int) -> list[list[tuple]]:
    """Variants (tuples starting with their layer, in layer order) cut into batches of at most
    `batch_size`. A batch runs from its first row's layer, so rows patched higher up recompute
    the layers in between unpatched: batches fill across layers only within a span of
    max(1, (layers left) // 8) layers, where that extra work stays small next to what a forward
    costs per call."""
    out: list[list[tuple]] = []
    for v in variants:
        last = out[-1] if out else None
        if (last is None or len(last) >= batch_size
                or v[0] - last[0][0] > max(1, (n_layers - last[0][0]) // 8)):  # fmt: skip
            out.append([v])
        else:
            last.append(v)
    return out


def check_pair(model, clean: Sequence[int], corrupt: Sequence[int], direction: str,
               batch_size: int) -> None:  # fmt: skip
    """Refuse a clean / corrupt pair (or options) that patching cannot use, naming the fix."""
    from mechinterp.models.tokens import check_token_ids

    check_token_ids(model, clean, "clean")
    check_token_ids(model, corrupt, "corrupt")
    if len(clean) != len(corrupt):
        raise InputError(
            f"clean ({len(clean)} tokens) and corrupt ({len(corrupt)}) must have the same length: "
            "corrupt by symmetric token replacement"
        )
    if direction not in ("denoise", "noise"):
        raise InputError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    if batch_size < 1:
        raise InputError("batch_size must be >= 1")


def check_positions(n_pos: int, positions: Sequence[int] | None, patch_from: int) -> list[int]:
    """The positions asked for (all by default), each and `patch_from` inside the pair's
    `n_pos` tokens, or a clear error."""
    pos_list = list(range(n_pos)) if positions is None else list(positions)
    if positions is not None and not pos_list:
        raise InputError("positions=[] selects no position, so nothing would be patched: "
                         "pass positions=None for all, or list the ones to patch")  # fmt: skip
    if any(not isinstance(p, Integral) or isinstance(p, bool) for p in pos_list):
        raise InputError(f"positions must be token indices (ints), got {pos_list[:3]}")
    repeated = sorted(p for p, n in Counter(pos_list).items() if n > 1)
    if repeated:
        raise InputError(f"positions repeat {repeated}; give each position once")
    if any(not 0 <= p < n_pos for p in pos_list):
        raise InputError(f"positions must lie in [0, {n_pos}), got {sorted(pos_list)[:3]}…")
    if not 0 <= patch_from < n_pos:
        raise InputError(f"patch_from must lie in [0, {n_pos}), got {patch_from}")
    return pos_list

def shared_start(clean: Sequence[int], corrupt: Sequence[int], patch_from: int) -> int:
    """The first position patching can change: before the first differing token both runs are
    identical (causal attention), and nothing before `patch_from` is patched. len(clean) when
    nothing differs from `patch_from` on."""
    differ = [i for i, (a, b) in enumerate(zip(clean, corrupt, strict=True)) if a != b]
    return max(differ[0], patch_from) if differ else len(clean)


@dataclass(frozen=True)
class Prepared:
    """What patching needs of a clean / corrupt pair besides the patched forwards: the first
    patched position, the metrics of both runs, the target's residual stream and the source's
    z per layer from `start` on, the target's KV cache for the prefix before it, and (path
    patching freezes every head there; `of` keeps it) the target's z per layer."""

    start: int
    m_clean: float
    m_corrupt: float
    target_resid: dict[int, Tensor]
    source_z: dict[int, Tensor]
    prefix: object | None
    target_z: dict[int, Tensor] | None = None

    @classmethod
    @torch.no_grad()
    def of(cls, model, clean, corrupt, metric, direction: str, patch_from: int) -> Prepared:
        device = model.cfg.device
        n_pos = len(clean)
        start = shared_start(clean, corrupt, patch_from)
        keep = min(start, n_pos - 1)
        with reading(model, metric):  # each run's metric right after its forward
            resid_c, z_c, logits_c = _cache(model, torch.tensor([list(clean)], device=device),
                                            keep)  # fmt: skip
            m_clean = float(metric(logits_c)[0])
            resid_x, z_x, logits_x = _cache(model, torch.tensor([list(corrupt)], device=device),
                                            keep)  # fmt: skip
            m_corrupt = float(metric(logits_x)[0])
        target, target_resid, target_z, source_z = (
            (corrupt, resid_x, z_x, z_c) if direction == "denoise" else (clean, resid_c, z_c, z_x)
        )
        prefix = prefix_cache(model, target[:start]) if 0 < start < n_pos else None
        return cls(start, m_clean, m_corrupt, target_resid, source_z, prefix, target_z)
