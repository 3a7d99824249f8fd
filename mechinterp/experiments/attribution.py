"""`mechinterp atp` and `mechinterp path-patch`: the single commands of attribution patching
(every head's output, query, key or value screened by AtP / AtP*, the top verified exactly, a
random sample of the rest for the false-negative diagnostic) and of exact path patching (every
upstream head into chosen receivers' queries, keys, values or residual stream), on the same
clean / corrupt NIAH pairs as `mechinterp patch`. Shards: one instance pair each."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pandas as pd

from mechinterp import store
from mechinterp.errors import InputError
from mechinterp.experiments.command import Command, Plan, table_text
from mechinterp.experiments.patch import PATCH_TASK, HeadSelection
from mechinterp.experiments.specs import (
    DEVICE_ALIASES,
    TASK_ALIASES,
    ModelSpec,
    TaskSpec,
    build_examples,
    selection_aliases,
)
from mechinterp.runner import Shard
from mechinterp.tasks.example import Example


def _pair(model, example: dict, template, seed: int):
    """(prompt, corruption, metric) of one instance: the needle's first answer token replaced."""
    from mechinterp.evaluate import render_all
    from mechinterp.interventions.patching import logit_diff_metric
    from mechinterp.tasks.corrupt import corrupt_answer

    (prompt,) = render_all(model, [Example.from_dict(example)], template=template)
    c = corrupt_answer(prompt, model.tokenizer, seed=seed)
    return prompt, c, logit_diff_metric(c.clean_token, c.corrupt_token)


def _flipped(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of pairs whose corruption flips the preference (all rows when none does)."""
    flipped = (df["clean_metric"] > 0) & (df["corrupt_metric"] < 0)
    return df[flipped] if flipped.any() else df


# ---------------------------------------------------------------- atp


@dataclass(frozen=True)
class AtpConfig:
    """Attribution patching of every head's `node` between each instance and its corruption (the
    needle's first answer token replaced), metric logit(clean token) − logit(corrupt token) at
    the last prompt position: AtP, and AtP* with `qk_fix` / `grad_drop`; the `verify_top` units
    AtP* ranks highest are then patched exactly (0: none), and `fn_sample` more drawn from the
    rest for the false-negative diagnostic. `select` marks a head set."""

    FLAG_ALIASES: ClassVar[dict[str, str]] = {**TASK_ALIASES, **DEVICE_ALIASES,
                                              **selection_aliases("select")}

    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=lambda: PATCH_TASK)
    node: Literal["z", "q", "k", "v"] = "z"
    """z: each head's output (as `patch`); q, k: its query, key as they enter the logits; v: its
    value (k and v: one per KV head)"""
    direction: Literal["denoise", "noise"] = "denoise"
    """denoise: clean activations into the corrupted run; noise: the reverse"""
    qk_fix: bool = True
    """AtP*, for q and k nodes: the head's own softmax recomputed exactly (v and z have none)"""
    grad_drop: bool = True
    """AtP*: rank by the mean |estimate| over per-layer gradient drops"""
    verify_top: int = 30
    """patch the AtP* top N exactly (0: estimate only)"""
    fn_sample: int = 20
    """false-negative diagnostic: patch N of the unverified units, drawn at random, exactly too"""
    fn_threshold: float = 0.05
    """false-negative diagnostic: a unit counts as missed above this share of |clean − corrupt|"""
    select: HeadSelection = field(default_factory=HeadSelection)
    batch_size: int = 32
    """patched runs per forward when verifying"""
    template: Literal["chat", "plain"] | None = None
    """prompt template (none: chat when the tokenizer has one)"""

    def __post_init__(self) -> None:
        if self.verify_top < 0 or self.batch_size < 1 or self.fn_sample < 0:
            raise InputError("verify_top and fn_sample must be >= 0 and batch_size >= 1")
        if self.fn_threshold < 0:
            raise InputError(f"fn_threshold must be >= 0, got {self.fn_threshold}")

    @property
    def slug(self) -> str:
        node = "" if self.node == "z" else f"-{self.node}"
        return f"atp{node}-{self.direction}-{Path(self.model.name).name}-{self.task.slug}"


def atp_shard(model, *, example: dict, chosen: list[str], node: str, direction: str,
              qk_fix: bool, grad_drop: bool, verify_top: int, fn_sample: int,
              fn_threshold: float, batch_size: int, template,
              seed: int) -> pd.DataFrame:  # fmt: skip
    """One row per unit of `node`: AtP and AtP* estimates, AtP*'s score and rank, and the exact
    value where the unit is among the verified top or the diagnostic's sample."""
    from mechinterp.heads import Head, HeadShape
    from mechinterp.interventions.attribution import attribution_patch
    from mechinterp.interventions.nodes import all_units
    from mechinterp.interventions.patching import verify_screen

    prompt, c, metric = _pair(model, example, template, seed)
    star = attribution_patch(model, c.clean, c.corrupt, metric, node=node, direction=direction,
                             qk_fix=qk_fix and node in ("q", "k"),
                             grad_drop=grad_drop)  # fmt: skip
    rank = {h: i for i, h in enumerate(star.ranking())}
    exact, fn = None, {}
    if verify_top:
        exact = verify_screen(model, c.clean, c.corrupt, metric, star, verify_top=verify_top,
                              sample=fn_sample, threshold=fn_threshold, seed=seed,
                              batch_size=batch_size)  # fmt: skip
        fn = exact.settings.get("false_negatives", {})
    gap = star.clean - star.corrupt
    shape = HeadShape.of(model)
    picked = {Head.parse(h) for h in chosen}
    sampled = set(fn.get("sampled", []))

    def recovery(v: float) -> float:
        return (v - star.corrupt) / gap if gap else float("nan")

    rows = []
    for h in all_units(model, node):
        in_set = (
            h in picked
            if node in ("q", "z")
            else any(p.layer == h.layer and shape.kv_head(p) == h.head for p in picked)
        )
        value = float(exact.values[h]) if exact is not None else float("nan")
        rows.append({"example_id": prompt.example_id, "node": node, "layer": h.layer,
                     "head": h.head, "head_name": str(h), "in_set": in_set,
                     "atp": float(star.atp[h]), "atp_star": float(star.values[h]),
                     "atp_star_score": float(star.score[h]), "atp_star_rank": rank[h],
                     "exact": value, "sampled": str(h) in sampled,
                     "atp_recovery": recovery(float(star.atp[h])),
                     "atp_star_recovery": recovery(float(star.values[h])),
                     "exact_recovery": recovery(value), "clean_metric": star.clean,
                     "corrupt_metric": star.corrupt, "fn_found": len(fn.get("found", [])),
                     "fn_max_above": fn.get("max_above", -1),
                     "corrupted_position": c.position})  # fmt: skip
    return pd.DataFrame(rows)


def atp_plan(config: AtpConfig, model) -> Plan:
    from mechinterp.heads import HeadShape
    from mechinterp.interventions.nodes import check_node

    check_node(model, config.node)
    chosen = [str(h) for h in config.select.chosen(HeadShape.of(model))]
    examples = build_examples(config.task, model.tokenizer)
    shards = [Shard(f"atp/{i:04d}", atp_shard, {
        "example": ex.to_dict(), "chosen": chosen, "node": config.node,
        "direction": config.direction, "qk_fix": config.qk_fix, "grad_drop": config.grad_drop,
        "verify_top": config.verify_top, "fn_sample": config.fn_sample,
        "fn_threshold": config.fn_threshold, "batch_size": config.batch_size,
        "template": config.template, "seed": config.task.seed})
        for i, ex in enumerate(examples)]  # fmt: skip
    return Plan(shards, examples, facts={"selected_heads": chosen})


def atp_finish(config: AtpConfig, df: pd.DataFrame, plan: Plan, card) -> dict:
    df = df.assign(model=card.id, direction=config.direction,
                   config_hash=store.config_hash(config))  # fmt: skip
    valid = _flipped(df)
    heads = (
        valid.groupby(["node", "layer", "head", "head_name", "in_set"])
        .agg(atp_recovery=("atp_recovery", "mean"), atp_star_recovery=("atp_star_recovery", "mean"),
             atp_star_score=("atp_star_score", "mean"), mean_rank=("atp_star_rank", "mean"),
             exact_recovery=("exact_recovery", "mean"), n_verified=("exact", "count"))
        .reset_index().assign(n_examples=valid["example_id"].nunique(), model=card.id)
    )  # fmt: skip
    pairs = []
    for ex, g in df.groupby("example_id", sort=False):
        seen = g.dropna(subset=["exact"])
        seen = seen[~seen["sampled"]]  # the verified top (the diagnostic's sample apart)
        pairs.append({"example_id": ex, "n_verified": len(seen),
                      "spearman_verified": seen["atp_star"].corr(seen["exact"], method="spearman")
                      if len(seen) > 2 else float("nan"),
                      "fn_sampled": int(g["sampled"].sum()), "fn_found": int(g["fn_found"].iloc[0]),
                      "fn_max_above": int(g["fn_max_above"].iloc[0])})  # fmt: skip
    return {"atp": df, "heads": heads, "pairs": pd.DataFrame(pairs)}


def atp_draw(out: Path, config: AtpConfig) -> dict:
    from mechinterp.plots import head_heatmap

    heads = pd.read_parquet(out / "heads.parquet")
    node = {"z": "head output", "q": "query", "k": "key", "v": "value"}[config.node]
    title = (f"{heads['model'].iloc[0]} · AtP* estimated recovery per {node} "
             f"(n={heads['n_examples'].iloc[0]})")  # fmt: skip
    return {"atp_star": head_heatmap(heads, value="atp_star_recovery", title=title)}


def atp_summary(out: Path, top: int) -> str:
    heads = pd.read_parquet(out / "heads.parquet").nsmallest(top, "mean_rank")
    pairs = pd.read_parquet(out / "pairs.parquet")
    return table_text(heads[["node", "head_name", "in_set", "mean_rank", "atp_star_recovery",
                             "exact_recovery"]]) + "\n" + table_text(
        pairs[["example_id", "n_verified", "fn_sampled", "fn_found", "fn_max_above"]])  # fmt: skip


ATP_HELP = (
    "attribution patching (AtP, AtP*) of every head's output, query, key or value between "
    "each task instance and its corruption, the top verified exactly and a random sample "
    "of the rest for the false-negative diagnostic; tidy tables and a layer x head "
    "heatmap"
)
ATP = Command("atp", AtpConfig, ATP_HELP, atp_plan, atp_finish, atp_draw, atp_summary)


# ---------------------------------------------------------------- path-patch


@dataclass(frozen=True)
class PathPatchConfig:
    """Exact path patching between each instance and its corruption: every head below the
    last receiver, alone and all together (`upstream`), into the receivers' `inputs` (q, k, v;
    under GQA a key or value input is the receiver's KV group's). Receivers: `receivers.heads`,
    or the `top_k` (default 10) best of a detection run's score table."""

    FLAG_ALIASES: ClassVar[dict[str, str]] = {**TASK_ALIASES, **DEVICE_ALIASES,
                                              **selection_aliases("receivers")}

    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=lambda: PATCH_TASK)
    receivers: HeadSelection = field(default_factory=HeadSelection)
    inputs: tuple[Literal["q", "k", "v"], ...] = ("q", "k")
    """the receivers' inputs to patch (one first pass records them all)"""
    via_mlps: bool = True
    """MLPs between sender and receiver recompute (false: the direct edge only)"""
    direction: Literal["denoise", "noise"] = "denoise"
    """denoise: clean activations into the corrupted run; noise: the reverse"""
    batch_size: int = 32
    """senders per forward"""
    template: Literal["chat", "plain"] | None = None
    """prompt template (none: chat when the tokenizer has one)"""

    def __post_init__(self) -> None:
        if not self.inputs or len(set(self.inputs)) != len(self.inputs):
            raise InputError(f"inputs must name q, k and/or v once each, got {self.inputs}")
        if self.batch_size < 1:
            raise InputError("batch_size must be >= 1")

    @property
    def slug(self) -> str:
        return f"path-patch-{self.direction}-{Path(self.model.name).name}-{self.task.slug}"


#: Same-heads comparisons of queries and keys (`path_table(same_heads=True)`): the query heads
#: of the KV groups that lie wholly inside the receivers, and of every KV group they touch.
SAME_HEADS = ("receiver_groups", "whole_groups")


def path_table(model, clean, corrupt, metric, receivers: list[str], inputs: list[str], *,
               via_mlps: bool, batch_size: int, facts: dict, direction: str = "denoise",
               patch_from: int = 0, name: str = "head_name", same_heads: bool = False,
               sets: dict[str, list] | None = None) -> pd.DataFrame:  # fmt: skip
    """Path patching of every head below the last receiver, alone (`kind = sender`) and all
    together (`kind = set`, `upstream`), into the receivers' `inputs`, one row each with
    `facts`, the metrics and the recovery; the sender's name goes in column `name`. `sets`:
    more named sender sets patched jointly (`kind = set`, the set's name in `name`).

    Under GQA a key input is its KV group's, so the keys reach more query heads than the
    queries do. `same_heads` adds rows (`kind = same_heads`) that patch `upstream` into the
    queries and into the keys of the same query heads, per comparison of `SAME_HEADS`
    (`comparison`; the heads in `compared_heads`, `n_compared_heads`, `n_kv_groups`; none for
    `receiver_groups` when no KV group lies wholly inside the receivers). Each costs one
    first pass and two second passes, batch 1, over the patched positions only."""
    from mechinterp.heads import HeadShape, parse_heads
    from mechinterp.interventions.paths import path_patch_inputs
    from mechinterp.interventions.resume import Prepared

    shape = HeadShape.of(model)
    heads = parse_heads(receivers, shape)
    upstream = [h for h in shape.all_heads() if h.layer < max(h.layer for h in heads)]
    prep = Prepared.of(model, clean, corrupt, metric, direction, patch_from)
    run = dict(direction=direction, patch_from=patch_from, via_mlps=via_mlps,
               batch_size=batch_size, prepared=prep)  # fmt: skip
    results = path_patch_inputs(model, clean, corrupt, metric, receivers=heads,
                                receiver_inputs=inputs, senders=upstream,
                                sets={"upstream": upstream, **(sets or {})},
                                **run)  # fmt: skip
    base = {**facts, "receivers": ",".join(receivers), "via_mlps": via_mlps,
            "clean_metric": prep.m_clean, "corrupt_metric": prep.m_corrupt,
            "flipped": prep.m_clean > 0 > prep.m_corrupt}  # fmt: skip
    rows = []
    for inp, res in results.items():
        row = {**base, "receiver_input": inp, "receiver_units": res.settings["receiver_units"]}
        rows += [{**row, "kind": "sender", name: str(h), "layer": h.layer, "head": h.head,
                  "value": float(res.values[h])} for h in upstream]  # fmt: skip
        rows += [{**row, "kind": "set", name: set_name, "layer": -1, "head": -1,
                  "value": value} for set_name, value in res.sets.items()]  # fmt: skip
    if same_heads:
        done: dict[tuple, dict] = {}
        for comparison in SAME_HEADS:
            compared = shape.kv_group_heads(heads, inside=comparison == "receiver_groups")
            if not compared:
                continue
            if tuple(compared) not in done:  # MHA: both comparisons are the receivers
                done[tuple(compared)] = path_patch_inputs(
                    model, clean, corrupt, metric, receivers=compared, receiver_inputs=("q", "k"),
                    senders=[], sets={"upstream": upstream}, **run)  # fmt: skip
            for inp, res in done[tuple(compared)].items():
                rows.append({**base, "receiver_input": inp,
                             "receiver_units": res.settings["receiver_units"],
                             "kind": "same_heads", name: "upstream", "layer": -1, "head": -1,
                             "value": res.sets["upstream"], "comparison": comparison,
                             "compared_heads": ",".join(map(str, compared)),
                             "n_compared_heads": len(compared),
                             "n_kv_groups": len(compared) // shape.group_size})  # fmt: skip
    df = pd.DataFrame(rows)
    gap = df["clean_metric"] - df["corrupt_metric"]
    df["recovery"] = ((df["value"] - df["corrupt_metric"]) / gap).where(gap != 0)
    return df


def path_patch_shard(model, *, example: dict, receivers: list[str], inputs: list[str],
                     via_mlps: bool, direction: str, batch_size: int, template,
                     seed: int) -> pd.DataFrame:  # fmt: skip
    """One row per (input, sender), and one per input for all upstream heads together."""
    prompt, c, metric = _pair(model, example, template, seed)
    facts = {"example_id": prompt.example_id, "corrupted_position": c.position}
    return path_table(model, c.clean, c.corrupt, metric, receivers, inputs, via_mlps=via_mlps,
                      batch_size=batch_size, facts=facts, direction=direction)  # fmt: skip


def path_plan(config: PathPatchConfig, model) -> Plan:
    from mechinterp.heads import HeadShape

    shape = HeadShape.of(model)
    sel = config.receivers
    if sel.scores and sel.threshold is None and sel.top_k is None:
        sel = HeadSelection(scores=sel.scores, top_k=10)
    heads = sel.chosen(shape)
    if not heads:
        raise InputError("name the receiver heads: --heads L18H6,... or --scores RUN [--top-k N]")
    if max(h.layer for h in heads) == 0:
        raise InputError("every receiver is in layer 0: no head sits below them to send")
    receivers = [str(h) for h in heads]
    examples = build_examples(config.task, model.tokenizer)
    shards = [Shard(f"path-patch/{i:04d}", path_patch_shard, {
        "example": ex.to_dict(), "receivers": receivers, "inputs": list(config.inputs),
        "via_mlps": config.via_mlps, "direction": config.direction,
        "batch_size": config.batch_size, "template": config.template,
        "seed": config.task.seed}) for i, ex in enumerate(examples)]  # fmt: skip
    return Plan(shards, examples, facts={"receivers": receivers})


def path_finish(config: PathPatchConfig, df: pd.DataFrame, plan: Plan, card) -> dict:
    df = df.assign(model=card.id, direction=config.direction,
                   config_hash=store.config_hash(config))  # fmt: skip
    valid = _flipped(df)
    keys = ["receiver_input", "layer", "head", "head_name"]
    senders = valid[valid["kind"] == "sender"].groupby(keys, sort=False)["recovery"].mean()
    senders = senders.reset_index().assign(n_examples=valid["example_id"].nunique(),
                                           model=card.id)  # fmt: skip
    sets = valid[valid["kind"] == "set"].groupby("receiver_input", sort=False)["recovery"]
    sets = sets.agg(["mean", "std", "count"]).reset_index()
    return {"paths": df, "senders": senders, "sets": sets}


def path_draw(out: Path, config: PathPatchConfig) -> dict:
    from mechinterp.plots import sender_heatmaps

    senders = pd.read_parquet(out / "senders.parquet")
    receivers = pd.read_parquet(out / "paths.parquet")["receivers"].iloc[0]
    title = (f"{senders['model'].iloc[0]} · path patching into {receivers}: mean recovery per "
             f"sender (n={senders['n_examples'].iloc[0]})")  # fmt: skip
    return {"senders": sender_heatmaps(senders, title=title)}


def path_summary(out: Path, top: int) -> str:
    senders = pd.read_parquet(out / "senders.parquet")
    parts = []
    for _, g in senders.groupby("receiver_input", sort=False):
        g = g.reindex(g["recovery"].abs().sort_values(ascending=False).index).head(top)
        parts.append(table_text(g[["receiver_input", "head_name", "recovery"]]))
    return "\n".join(parts) + "\n" + table_text(pd.read_csv(out / "sets.csv"))


PATH_HELP = (
    "exact path patching of every upstream head into chosen receiver heads' queries, "
    "keys or values; tidy tables and sender heatmaps per receiver input"
)
PATH_PATCH = Command("path-patch", PathPatchConfig, PATH_HELP, path_plan, path_finish,
                     path_draw, path_summary)  # fmt: skip
