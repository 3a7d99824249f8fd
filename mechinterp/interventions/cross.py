"""Cross-model activation patching: the donor's per-head outputs written into the recipient, on
the same input (the extension pipeline's last step, docs/experiments/extension.md; defined in
docs/concepts/patching.md). A head's output is its contribution to the residual stream,
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

import copy
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Literal

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechinterp.analysis.headsets import Draw
from mechinterp.errors import InputError
from mechinterp.heads import Head, HeadShape, parse_heads
from mechinterp.interventions.context import single_use
from mechinterp.interventions.knockout import _by_layer
from mechinterp.models.attention import output_projection as _o_proj
from mechinterp.models.kv_cache import NEW_NAME, OLD_NAME, cache_kwargs, new_cache, passed_cache
from mechinterp.results import ResultFrame
from mechinterp.selection import check_selection
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
        raise InputError(
            f"donor and recipient differ in shape ({a}, d_head {donor.cfg.d_head} vs {b}, "
            f"d_head {recipient.cfg.d_head}); cross-model patching needs one architecture"
        )
    ca, cb = (getattr(m, "mechinterp_card", None) for m in (donor, recipient))
    if ca is not None and cb is not None and (ca.lora or cb.lora):
        sa, sb = ca.source_sha256, cb.source_sha256  # a LoRA model's card holds its base's hash
        if sa and sb and sa != sb:
            raise InputError(
                f"donor ({ca.id}) and recipient ({cb.id}) come from different base models "
                f"(weights sha256 {sa[:12]} vs {sb[:12]}); cross-model patching compares "
                "fine-tunes of one base"
            )
    if donor.tokenizer.get_vocab() != recipient.tokenizer.get_vocab():
        raise InputError(
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


def _mixed_output(recipient, donor, layer: int, z_rec: Tensor, z_don: Tensor, heads: Tensor,
                  dtype) -> Tensor:  # fmt: skip
    """The attention output of `layer` with, in batch row r, the heads marked in `heads[r]`
    (bool `[rows or 1, head]`) taken from the donor: each head's z (`[rows, pos, head · d_head]`)
    through its own model's W_O, and the output bias shared per head (a row patching a share s
    of the heads gets (1 − s) b_rec + s b_don)."""
    (w_rec, b_rec), (w_don, b_don) = _o_proj(recipient, layer), _o_proj(donor, layer)
    d_head = z_rec.shape[-1] // heads.shape[-1]
    m = heads.to(z_rec.device, z_rec.dtype).repeat_interleave(d_head, dim=-1)[:, None, :]
    share = m.mean(-1, keepdim=True)  # [rows, 1, 1]
    mixed = torch.nn.functional.linear(z_rec * (1 - m), w_rec)
    mixed = mixed + torch.nn.functional.linear(z_don.to(z_rec.device) * m, w_don.to(z_rec.device))
    if b_rec is not None:
        mixed = mixed + (1 - share) * b_rec
    if b_don is not None:
        mixed = mixed + share * b_don.to(z_rec.device)
    return mixed.to(dtype)


@single_use
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
        raise InputError(f"patched must be one of {PATCHED}, got {patched!r}")
    check_same_shape(donor, recipient)
    shape = HeadShape.of(recipient)
    heads = parse_heads(heads, shape)
    if not heads:
        raise InputError("cross-model patching needs a non-empty head set")
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
        heads = torch.zeros(1, shape.n_heads, dtype=torch.bool)
        heads[0, by_layer[layer]] = True
        stats["patched"] += 1
        return _mixed_output(recipient, donor, layer, z_rec, z_don, heads, out.dtype)

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


class CrossPatching(ResultFrame):
    """`cross_model_patching`'s rows (a DataFrame: one row per condition and example, the
    columns of `mechinterp cross-patch`'s table), with the command's summary and figure."""

    def summary(self, metrics: Sequence[str] = ("f1", "answer_logprob")) -> pd.DataFrame:
        """Mean of each metric per condition and its normalised recovery (`summarise_cross`:
        the command's summary table)."""
        return summarise_cross(self.frame(), metrics)

    def plot(self, metrics: tuple[str, ...] = ("f1", "answer_logprob"), title: str | None = None):
        """Normalised recovery per patched head set, one bar trace per metric where donor and
        recipient differ (`cross_patch_bars`)."""
        from mechinterp.plots import cross_patch_bars

        return cross_patch_bars(self.summary(metrics), metrics=metrics, title=title)


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

    check_selection("seeds", seeds)
    donor_heads = parse_heads(donor_heads, shape)
    recipient_heads = parse_heads(recipient_heads, shape)
    if not donor_heads:
        raise InputError("the donor's head set is empty: select its retrieval heads first")
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
    max_rows: int = 24,
    template=None,
    score: bool = True,
    patched: Patched = "output",
    progress: bool = True,
) -> pd.DataFrame:
    """The task on the recipient, on the donor, and on the recipient with each head set patched in
    from the donor (`patched`: head outputs or z, see `cross_patch`). One row per (condition,
    example): `condition` is `recipient`, `donor`, or a head-set name; generation metrics as
    `evaluate` gives them, plus `answer_logprob` (mean teacher-forced log-prob of the gold answer)
    when `score`, and `patched`.

    Conditions run as rows of one batch (`cross_rows`, at most `max_rows` recipient rows: as many
    examples as fit, each with every condition): the donor's prompts run once per batch, and one
    prompt forward serves both the teacher-forced score and generation. The table equals one
    `cross_patch` + `evaluate` per condition (tested)."""
    from mechinterp.evaluate import answer_ids, example_row, render_all, stop_token_ids

    check_same_shape(donor, recipient)
    shape = HeadShape.of(recipient)
    empty = [name for name, hs in head_sets.items() if not hs]
    if empty or not head_sets:
        raise InputError(f"head sets {empty or '(none)'} are empty: nothing to patch")
    if patched not in PATCHED:
        raise InputError(f"patched must be one of {PATCHED}, got {patched!r}")
    if max_rows < 1:
        raise InputError(f"max_rows must be >= 1, got {max_rows}")
    parsed = {name: parse_heads(hs, shape) for name, hs in head_sets.items()}
    reserved = {"recipient", "donor"} & set(parsed)
    if reserved:
        raise InputError(f"head-set names {sorted(reserved)} are reserved for the baselines")
    conditions = {"recipient": (), **parsed}  # the recipient's rows; "donor" comes with them
    names = list(conditions)
    prompts = render_all(recipient, examples, template=template)
    answers = [answer_ids(recipient, ex.answers[0]) for ex in examples] if score else None
    stop_ids = stop_token_ids(recipient)
    per_batch = max(1, max_rows // len(names))  # examples per batch, all conditions as rows
    order = sorted(range(len(examples)), key=lambda i: prompts[i].n_tokens)  # as `generate`
    found: dict[tuple[str, int], dict] = {}  # (condition, example index) -> row
    bar = tqdm(total=len(examples), desc="cross-model patching", disable=not progress)
    for b in range(0, len(order), per_batch):
        idx = order[b : b + per_batch]
        for c in range(0, len(names), max_rows):  # more conditions than max_rows: in chunks
            chunk = names[c : c + max_rows]
            gens, logprobs = cross_rows(
                donor, recipient, [prompts[i].input_ids for i in idx],
                [conditions[n] for n in chunk], max_new_tokens=max_new_tokens,
                stop_ids=stop_ids, patched=patched,
                answers=None if answers is None else [answers[i] for i in idx],
            )  # fmt: skip
            labels = chunk + (["donor"] if c == 0 else [])
            for e, i in enumerate(idx):
                for name, gen, lp in zip(labels, gens[e], logprobs[e], strict=False):
                    row = example_row(examples[i], prompts[i], gen)
                    if score:
                        row["answer_logprob"] = lp
                    found[name, i] = row
        bar.update(len(idx))
    bar.close()
    frames = []
    for name in ["recipient", "donor", *parsed]:
        hs = conditions.get(name, ())
        frames.append(
            pd.DataFrame([found[name, i] for i in range(len(examples))]).assign(
                condition=name, n_heads=len(hs), heads=" ".join(str(h) for h in hs),
                patched=patched,
            )  # fmt: skip
        )
    return CrossPatching(pd.concat(frames, ignore_index=True))


@torch.no_grad()
def cross_rows(
    donor,
    recipient,
    prompts: Sequence[Sequence[int]],
    sets: Sequence[Sequence[Head]],
    *,
    max_new_tokens: int,
    stop_ids: frozenset[int],
    answers: Sequence[Sequence[int]] | None = None,
    patched: Patched = "output",
):
    """Several prompts under several cross-model patches at once.

    The recipient's batch holds, for each prompt e (left-padded) and each set r, a row with
    `sets[r]` patched in from the donor (an empty set: the recipient alone); a donor-alone row per
    prompt follows them. The donor's prompts run once (their z repeated for every set's row);
    the prompt's KV caches then serve the teacher-forced score of `answers[e]` (on copies) and
    greedy generation, where the donor runs each step on every row's new token.

    Returns (generations, mean answer log-probs or None), each indexed [e][r] with r = len(sets)
    for the donor alone.
    """
    from mechinterp.evaluate import greedy_decode, left_pad, pad_id
    from mechinterp.interventions.resume import filled_cache

    shape = HeadShape.of(recipient)
    parsed = [parse_heads(hs, shape) for hs in sets]
    n_sets, n_ex = len(parsed), len(prompts)
    rec_rows = n_ex * n_sets  # recipient row e * n_sets + r
    per_set = torch.zeros(shape.n_layers, n_sets, shape.n_heads, dtype=torch.bool)
    for r, hs in enumerate(parsed):
        for h in hs:
            per_set[h.layer, r, h.head] = True
    masks = per_set.repeat(1, n_ex, 1)  # [layer, recipient row, head]
    layers = [la for la in range(shape.n_layers) if bool(masks[la].any())]
    z_don: dict[int, Tensor] = {}
    z_rec: dict[int, Tensor] = {}

    def grab(z: Tensor, hook, *, layer: int) -> None:
        z_don[layer] = z.detach()

    def donor_rows(layer: int, like: Tensor) -> Tensor:
        """The donor's z for each recipient row: its prompt's row (prefill and scoring: one
        donor row per prompt), or its shadow row (decoding: n_sets + 1 rows per prompt)."""
        src = z_don[layer]
        if src.shape[0] == n_ex:
            src = src.repeat_interleave(n_sets, dim=0)
        else:
            src = src.view(n_ex, n_sets + 1, *src.shape[1:])[:, :n_sets].flatten(0, 1)
        return src.reshape(like.shape)

    def keep(z: Tensor, hook, *, layer: int) -> None:
        z_rec[layer] = z.reshape(*z.shape[:2], -1)

    def write_output(out: Tensor, hook, *, layer: int) -> Tensor:
        z = z_rec.pop(layer)
        mixed = _mixed_output(recipient, donor, layer, z, donor_rows(layer, z), masks[layer],
                              out.dtype)  # fmt: skip
        return torch.where(masks[layer].any(-1).to(out.device)[:, None, None], mixed, out)

    def write_z(z: Tensor, hook, *, layer: int) -> Tensor:
        heads = masks[layer].to(z.device)[:, None, :, None]  # [rows, 1, head, 1]
        return torch.where(heads, donor_rows(layer, z), z)

    donor_hooks = [(f"blocks.{la}.attn.hook_z", partial(grab, layer=la)) for la in layers]
    if patched == "z":
        hooks = [(f"blocks.{la}.attn.hook_z", partial(write_z, layer=la)) for la in layers]
    else:
        hooks = [hook for la in layers for hook in (
            (f"blocks.{la}.attn.o.hook_in", partial(keep, layer=la)),
            (f"blocks.{la}.attn.o.hook_out", partial(write_output, layer=la)),
        )]  # fmt: skip

    def both(tok_d, mask_d, cache_d, tok_r, mask_r, cache_r, keep: int = 0):
        """Logits (last `keep` positions; 0: all) of the donor and of the patched recipient."""
        with donor.hooks(fwd_hooks=donor_hooks):
            out_d = donor(tok_d, attention_mask=mask_d, logits_to_keep=keep,
                          **cache_kwargs(donor, cache_d))  # fmt: skip
        with recipient.hooks(fwd_hooks=hooks):
            out_r = recipient(tok_r, attention_mask=mask_r, logits_to_keep=keep,
                              **cache_kwargs(recipient, cache_r))  # fmt: skip
        return out_d, out_r

    def per_recipient_row(x: Tensor) -> Tensor:
        return x.repeat_interleave(n_sets, dim=0)

    ids, mask = left_pad(recipient, prompts)  # [n_ex, width]
    cache_d, cache_r = new_cache(donor), new_cache(recipient)
    logits_d, logits_r = both(ids, mask, cache_d, per_recipient_row(ids), per_recipient_row(mask),
                              cache_r, keep=1)  # fmt: skip
    first = torch.cat([logits_r[:, -1], logits_d[:, -1]])  # recipient rows, then donor rows
    logprobs = [[None] * (n_sets + 1) for _ in range(n_ex)]
    if answers is not None:
        copies = filled_cache(donor, cache_d, rows=1), copy.deepcopy(cache_r)
        logprobs = _answer_logprobs(answers, first, mask, both, per_recipient_row, n_sets, *copies)
    cache_d = filled_cache(donor, cache_d, rows=n_sets + 1)  # prompt e: n_sets shadows + itself
    state = {"mask": mask}

    def step(nxt: Tensor) -> Tensor:
        state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
        rec = nxt[:rec_rows]
        tok_d = torch.cat([rec.view(n_ex, n_sets), nxt[rec_rows:, None]], dim=1).reshape(-1, 1)
        mask_d = state["mask"].repeat_interleave(n_sets + 1, dim=0)
        out_d, out_r = both(tok_d, mask_d, cache_d, rec[:, None], per_recipient_row(state["mask"]),
                            cache_r, keep=1)  # fmt: skip
        own = out_d[:, -1].view(n_ex, n_sets + 1, -1)[:, n_sets]
        return torch.cat([out_r[:, -1], own])

    gens = greedy_decode(recipient.tokenizer, first, step, max_new_tokens, stop_ids,
                         pad_id(recipient))  # fmt: skip
    by_prompt = [[gens[e * n_sets + r] for r in range(n_sets)] + [gens[rec_rows + e]]
                 for e in range(n_ex)]  # fmt: skip
    return by_prompt, logprobs


def _answer_logprobs(answers, first, mask, both, per_recipient_row, n_sets, cache_d, cache_r):
    """Mean teacher-forced log-prob of each prompt's answer, [prompt][set row, then donor]: the
    first answer token from the prompt's last logits, the rest from one forward of the answers
    (right-padded to the longest; later positions never affect earlier ones) on the caches."""
    n_ex = len(answers)
    device = first.device
    longest = max(len(a) for a in answers)
    if min(len(a) for a in answers) < 1:
        raise InputError("an answer has no tokens")
    padded = torch.zeros(n_ex, longest, dtype=torch.long, device=device)
    for e, a in enumerate(answers):
        padded[e, : len(a)] = torch.tensor(list(a), device=device)
    rec_rows = n_ex * n_sets
    preds = first[:, None, :]  # [rec_rows + n_ex, 1, vocab]
    if longest > 1:
        ext = torch.cat([mask, torch.ones_like(padded[:, :-1])], dim=1)
        tf_d, tf_r = both(padded[:, :-1], ext, cache_d, per_recipient_row(padded[:, :-1]),
                          per_recipient_row(ext), cache_r)  # fmt: skip
        preds = torch.cat([preds, torch.cat([tf_r, tf_d])], dim=1)
    targets = torch.cat([per_recipient_row(padded), padded])  # rows as in `first`
    logp = preds.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    out = []
    for e, a in enumerate(answers):
        rows = [e * n_sets + r for r in range(n_sets)] + [rec_rows + e]
        out.append([float(logp[row, : len(a)].mean()) for row in rows])
    return out


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
