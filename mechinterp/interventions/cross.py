"""Cross-model activation patching: the donor's per-head outputs written into the recipient, on
the same input (DESIGN.md step 6). A head's output is its contribution to the residual stream,
z_h · W_O[h] with the donor's own W_O (`patched="output"`, the default); `patched="z"` moves z only.

    with cross_patch(recipient, donor, heads=inter):
        evaluate(recipient, examples)          # generation, teacher-forced scoring, any forward

Inside the block, every forward of the recipient first runs the donor on the same tokens and
attention mask and keeps the donor's z (`hook_z`). In each patched layer, the recipient's
attention output is then rebuilt from its own heads and the donor's patched heads, each through
its own model's output projection (GQA siblings untouched). The donor keeps its own KV cache in
step with the recipient's, so the patch holds at every decode step of cached generation: each
decode step sees the donor's z for exactly the new positions.

`cross_model_patching(donor, recipient, examples, head_sets)` runs a task under each named head set
and returns one tidy row per (condition, example): the recipient alone, the donor alone, and the
recipient with each head set patched in. `patch_head_sets` builds the paper's sets: Inter =
H_donor ∩ H_recipient, Compl = H_donor \\ H_recipient, Rand = |Inter| heads from neither set.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Literal

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechinterp.analysis.headsets import Draw
from mechinterp.heads import Head, HeadShape, parse_heads
from mechinterp.interventions.knockout import _by_layer
from mechinterp.models.kv_cache import NEW_NAME, OLD_NAME, cache_kwargs, new_cache, passed_cache
from mechinterp.tasks.example import Example


def check_same_shape(donor, recipient) -> None:
    """Refuse cross-model patching between models of different shapes or tokenizers, or between
    a LoRA fine-tune and a model of another base (their base weights' hashes differ)."""
    a, b = HeadShape.of(donor), HeadShape.of(recipient)
    if (
        a != b
        or donor.cfg.d_head != recipient.cfg.d_head
        or donor.cfg.d_model != recipient.cfg.d_model
    ):
        raise ValueError(
            f"donor and recipient differ in shape ({a}, d_head {donor.cfg.d_head} vs {b}, "
            f"d_head {recipient.cfg.d_head}); cross-model patching needs one architecture"
        )
    ca, cb = (getattr(m, "mechinterp_card", None) for m in (donor, recipient))
    if ca is not None and cb is not None and (ca.lora or cb.lora):
        sa, sb = ca.source_sha256, cb.source_sha256  # a LoRA model's card holds its base's hash
        if sa and sb and sa != sb:
            raise ValueError(
                f"donor ({ca.id}) and recipient ({cb.id}) come from different base models "
                f"(weights sha256 {sa[:12]} vs {sb[:12]}); cross-model patching compares "
                "fine-tunes of one base"
            )
    if donor.tokenizer.get_vocab() != recipient.tokenizer.get_vocab():
        raise ValueError(
            "donor and recipient tokenizers differ; patch between models that "
            "share a tokenizer (e.g. fine-tunes of one base)"
        )


def _cache_length(cache) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


#: What cross-model patching moves: `output`, each head's contribution to the residual stream
#: (z_h · W_O[h] with the donor's own W_O, plus its share of the output bias), or `z`, the head's
#: value-weighted sum before the output projection (then read through the recipient's W_O).
Patched = Literal["output", "z"]
PATCHED: tuple[Patched, ...] = ("output", "z")


def _o_proj(model, layer: int) -> tuple[Tensor, Tensor | None]:
    """(weight `[d_model, head · d_head]`, bias) of `layer`'s attention output projection: an
    `nn.Linear`, or GPT-2's `Conv1D` (weight stored transposed)."""
    from transformers.pytorch_utils import Conv1D

    o = model.blocks[layer].attn.o
    proj = getattr(o, "original_component", o)
    if isinstance(proj, torch.nn.Linear):
        return proj.weight, proj.bias
    if isinstance(proj, Conv1D):
        return proj.weight.T, proj.bias
    raise NotImplementedError(
        f"{model.original_model.config.model_type}, layer {layer}: the attention output "
        f"projection is a {type(proj).__name__}, neither a Linear nor a Conv1D; use "
        "patched='z' instead"
    )


def _head_mask(n_heads: int, d_head: int, heads: list[int], device) -> Tensor:
    """1 on the d_head columns of `heads` in a flattened `head · d_head` z, 0 elsewhere."""
    mask = torch.zeros(n_heads, d_head, device=device)
    mask[heads] = 1.0
    return mask.flatten()


@contextmanager
def cross_patch(
    recipient, donor, heads: Sequence[Head] | str, *, patched: Patched = "output"
) -> Iterator[dict]:
    """Patch the donor's `heads` into the recipient on every recipient forward in the block.

    `patched="output"` (the default, and what the studies use) replaces each head's contribution
    to the residual stream: the recipient's attention output becomes
    Σ_{h ∉ S} z_h^rec W_O^rec[h] + Σ_{h ∈ S} z_h^don W_O^don[h], with the output bias shared per
    head ((1 − |S|/n) b_O^rec + |S|/n b_O^don). Patching every head therefore gives the donor's
    attention output exactly, even where fine-tuning changed W_O. `patched="z"` writes the
    donor's z into the recipient's z, which then goes through the recipient's W_O.

    Yields counters (`forwards`: donor runs, `patched`: recipient layers written). Raises when
    the recipient's hooks fire without a donor run (a forward that bypassed the bridge, such as
    `run_from_layer`), or when the recipient continues a KV cache this block did not start.
    """
    if patched not in PATCHED:
        raise ValueError(f"patched must be one of {PATCHED}, got {patched!r}")
    check_same_shape(donor, recipient)
    shape = HeadShape.of(recipient)
    heads = parse_heads(heads, shape)
    if not heads:
        raise ValueError("cross-model patching needs a non-empty head set")
    by_layer = _by_layer(heads)
    state: dict = {"cache": None, "z": {}, "z_rec": {}}
    stats = {"forwards": 0, "patched": 0}

    def grab(z: Tensor, hook, *, layer: int) -> None:
        state["z"][layer] = z.detach() if patched == "output" else z[:, :, by_layer[layer]].detach()

    donor_hooks = [(f"blocks.{la}.attn.hook_z", partial(grab, layer=la)) for la in by_layer]

    def run_donor(module, args, kwargs):
        past = passed_cache(kwargs)
        if past is None or _cache_length(past) == 0:
            # An uncached forward, or the first of a cached run: the donor starts afresh.
            cached = past is not None or bool(kwargs.get("use_cache"))
            state["cache"] = new_cache(donor) if cached else None
        elif state["cache"] is None or _cache_length(past) != _cache_length(state["cache"]):
            raise RuntimeError(
                f"the recipient continues a KV cache of {_cache_length(past)} positions that "
                "this cross_patch block did not start; begin generation inside the block"
            )
        kw = {k: v for k, v in kwargs.items() if k not in (OLD_NAME, NEW_NAME, "return_type")}
        if state["cache"] is not None:
            kw.update(cache_kwargs(donor, state["cache"]))
        kw["logits_to_keep"] = 1
        state["z"] = {}
        with torch.no_grad(), donor.hooks(fwd_hooks=donor_hooks):
            donor(*args[:1], **kw)  # extends the donor's own cache in place
        stats["forwards"] += 1

    def donor_z(layer: int, like: Tensor) -> Tensor:
        src = state["z"].pop(layer, None)
        if src is None:
            raise RuntimeError(
                f"layer {layer}: the recipient ran without a donor run on the same input (a "
                "forward that bypassed the bridge's __call__?); cross_patch cannot patch it"
            )
        if src.shape[:2] != like.shape[:2]:
            raise RuntimeError(
                f"donor z {tuple(src.shape[:2])} and recipient z {tuple(like.shape[:2])} differ "
                "in batch or positions"
            )
        return src.to(like.device, like.dtype)

    def write_z(z: Tensor, hook, *, layer: int) -> Tensor:
        src = donor_z(layer, z)
        z = z.clone()
        z[:, :, by_layer[layer]] = src
        stats["patched"] += 1
        return z

    def keep_z(z: Tensor, hook, *, layer: int) -> None:
        state["z_rec"][layer] = z.reshape(*z.shape[:2], -1)  # the o_proj input, heads flattened

    def write_output(out: Tensor, hook, *, layer: int) -> Tensor:
        z_rec = state["z_rec"].pop(layer)
        z_don = donor_z(layer, z_rec).reshape(z_rec.shape)
        (w_rec, bias_rec), (w_don, bias_don) = _o_proj(recipient, layer), _o_proj(donor, layer)
        share = len(by_layer[layer]) / shape.n_heads
        mask = _head_mask(shape.n_heads, z_rec.shape[-1] // shape.n_heads, by_layer[layer],
                          z_rec.device).to(z_rec.dtype)
        b_rec = None if bias_rec is None else (1.0 - share) * bias_rec
        b_don = None if bias_don is None else share * bias_don.to(out.device)
        mixed = torch.nn.functional.linear(z_rec * (1 - mask), w_rec, b_rec)
        mixed = mixed + torch.nn.functional.linear(z_don * mask, w_don.to(out.device), b_don)
        stats["patched"] += 1
        return mixed.to(out.dtype)

    if patched == "z":
        recipient_hooks = [
            (f"blocks.{la}.attn.hook_z", partial(write_z, layer=la)) for la in by_layer
        ]
    else:
        recipient_hooks = [
            hook for la in by_layer for hook in (
                (f"blocks.{la}.attn.o.hook_in", partial(keep_z, layer=la)),
                (f"blocks.{la}.attn.o.hook_out", partial(write_output, layer=la)),
            )
        ]
    handle = recipient.register_forward_pre_hook(run_donor, with_kwargs=True)
    try:
        with recipient.hooks(fwd_hooks=recipient_hooks):
            yield stats
    finally:
        handle.remove()
        state.clear()


def patch_head_sets(
    donor_heads: Sequence[Head],
    recipient_heads: Sequence[Head],
    shape: HeadShape,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    draw: Draw = "layer_matched",
) -> dict[str, tuple[Head, ...]]:
    """The paper's head sets, in donor rank order: `inter` = H_donor ∩ H_recipient, `compl` =
    H_donor \\ H_recipient, and `rand-s{seed}` = |inter| heads drawn from neither set, in the
    same layers as `inter` (`draw="layer_matched"`, the default) or from any layer
    (`"uniform"`). Empty sets are left out (there is nothing to patch)."""
    from mechinterp.analysis.headsets import draw_baseline

    donor_heads = parse_heads(donor_heads, shape)
    recipient_heads = parse_heads(recipient_heads, shape)
    if not donor_heads:
        raise ValueError("the donor's head set is empty: select its retrieval heads first")
    theirs = set(recipient_heads)
    inter = tuple(h for h in donor_heads if h in theirs)
    sets = {"inter": inter, "compl": tuple(h for h in donor_heads if h not in theirs)}
    for s in seeds if inter else ():
        drawn = draw_baseline(donor_heads + recipient_heads, inter, shape, seed=s, draw=draw)
        sets[f"rand-s{s}"] = tuple(drawn)
    return {name: hs for name, hs in sets.items() if hs}


def cross_model_patching(
    donor,
    recipient,
    examples: Sequence[Example],
    head_sets: Mapping[str, Sequence[Head]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 4,
    template=None,
    score: bool = True,
    patched: Patched = "output",
    progress: bool = True,
) -> pd.DataFrame:
    """The task on the recipient, on the donor, and on the recipient with each head set patched in
    from the donor (`patched`: head outputs or z, see `cross_patch`). One row per (condition,
    example): `condition` is `recipient`, `donor`, or a head-set name; generation metrics as
    `evaluate` gives them, plus `answer_logprob` (mean teacher-forced log-prob of the gold answer)
    when `score`, and `patched`."""
    from mechinterp.evaluate import evaluate

    check_same_shape(donor, recipient)
    shape = HeadShape.of(recipient)
    empty = [name for name, hs in head_sets.items() if not hs]
    if empty or not head_sets:
        raise ValueError(f"head sets {empty or '(none)'} are empty: nothing to patch")
    parsed = {name: parse_heads(hs, shape) for name, hs in head_sets.items()}
    reserved = {"recipient", "donor"} & set(parsed)
    if reserved:
        raise ValueError(f"head-set names {sorted(reserved)} are reserved for the baselines")
    runs = [("recipient", recipient, ()), ("donor", donor, ())]
    runs += [(name, recipient, hs) for name, hs in parsed.items()]
    frames = []
    for condition, model, hs in tqdm(runs, desc="cross-model patching", disable=not progress):
        with cross_patch(recipient, donor, hs, patched=patched) if hs else nullcontext():
            df = evaluate(
                model,
                examples,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                template=template,
                score=score,
                progress=False,
            )
        frames.append(
            df.assign(
                condition=condition,
                n_heads=len(hs),
                heads=" ".join(str(h) for h in hs),
                patched=patched,
            )
        )
    return pd.concat(frames, ignore_index=True)


def summarise_cross(df: pd.DataFrame, metrics: Sequence[str] = ("f1", "answer_logprob")):
    """Mean of each metric per condition, and its normalised recovery (M − M_recipient) /
    (M_donor − M_recipient), NaN where donor and recipient tie."""
    metrics = [m for m in metrics if m in df]
    means = df.groupby("condition", sort=False)[metrics].mean()
    out = means.reset_index()
    for m in metrics:
        lo, hi = means.loc["recipient", m], means.loc["donor", m]
        out[f"{m}_recovery"] = (means[m].values - lo) / (hi - lo) if hi != lo else float("nan")
    out["n_heads"] = df.groupby("condition", sort=False)["n_heads"].first().values
    return out
