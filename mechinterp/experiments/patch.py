"""`mechinterp patch`: per-head activation patching between each task instance and its
corruption (one answer token of the needle replaced by another word's). Shards: one instance
pair each."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pandas as pd

from mechinterp import store
from mechinterp.errors import InputError
from mechinterp.experiments.command import Command, Plan, table_text
from mechinterp.experiments.specs import (
    DEVICE_ALIASES,
    TASK_ALIASES,
    ModelSpec,
    TaskSpec,
    build_examples,
    heads_from_scores,
    selection_aliases,
)
from mechinterp.heads import parse_heads
from mechinterp.runner import Shard
from mechinterp.tasks.example import Example

#: Patching's default: 4 NIAH instances of 256 tokens, needle mid-context.
PATCH_TASK = TaskSpec(lengths=(256,), depths=(0.5,), needles=4)

#: Wu et al.'s retrieval-head threshold: heads scoring above it form a score table's head set.
RETRIEVAL_THRESHOLD = 0.1


@dataclass(frozen=True)
class HeadSelection:
    """Which heads a run singles out: an explicit list (`heads`), or those a head-score table
    (`scores`: a detection run or its scores.parquet/csv) selects by score > `threshold` (0.1,
    Wu's rule, when neither it nor `top_k` is given) or as the `top_k` best."""

    heads: tuple[str, ...] = ()
    """heads: L17H3,L18H6,..."""
    scores: str | None = None
    """a detection run directory or its scores.parquet/csv"""
    threshold: float | None = None
    """select the table's heads scoring above this (none: 0.1, Wu's retrieval-head rule)"""
    top_k: int | None = None
    """select the table's k best heads instead"""

    def __post_init__(self) -> None:
        if self.heads and self.scores:
            raise InputError("give a head list (--heads) or a score table (--scores), not both")
        if self.threshold is not None and self.top_k is not None:
            raise InputError("select by --threshold or by --top-k, not both")
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"top_k must be >= 1, got {self.top_k}")
        if (self.threshold is not None or self.top_k is not None) and not self.scores:
            raise InputError("--threshold and --top-k select from a score table: give --scores")
        if self.scores is not None and not Path(self.scores).exists():
            raise InputError(f"scores {self.scores} does not exist")
        # syntax and repeats now (one head per item: "L1H2 L3H4" is two); the shape later
        heads = tuple(map(str, parse_heads(self.heads)))
        if self.heads and not heads:
            raise InputError(f"heads {list(self.heads)} name no head: write heads like L18H6,L3H1")
        object.__setattr__(self, "heads", heads)

    def __bool__(self) -> bool:
        return bool(self.heads or self.scores)

    def resolve(self, shape) -> tuple:
        from mechinterp.heads import parse_heads

        if self.heads:
            return parse_heads(self.heads, shape)
        if self.scores:
            threshold = self.threshold
            if threshold is None and self.top_k is None:
                threshold = RETRIEVAL_THRESHOLD
            return heads_from_scores(self.scores, shape, threshold=threshold, top_k=self.top_k)
        return ()

    def chosen(self, shape) -> tuple:
        """`resolve`, refusing a selection that picks nothing."""
        heads = self.resolve(shape)
        if self and not heads:
            raise InputError(
                f"the head selection {self} picks no heads; lower the threshold or use top_k"
            )
        return heads


@dataclass(frozen=True)
class PatchConfig:
    """Per-head patching between each instance and its corruption (the first answer token in the
    needle replaced by another word's token); metric: logit(clean token) − logit(corrupt token)
    at the last prompt position. `select` names heads: a head list is the set to patch (the
    others are skipped); a score table marks its selected heads (`in_set`) while every head is
    patched, so the set's recovery can be compared with the rest."""

    FLAG_ALIASES: ClassVar[dict[str, str]] = {**TASK_ALIASES, **DEVICE_ALIASES,
                                              **selection_aliases("select")}

    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=lambda: PATCH_TASK)
    direction: Literal["denoise", "noise"] = "denoise"
    """denoise: clean activations into the corrupted run; noise: the reverse"""
    select: HeadSelection = field(default_factory=HeadSelection)
    batch_size: int = 9
    """patched runs per forward"""
    template: Literal["chat", "plain"] | None = None
    """prompt template (none: chat when the tokenizer has one)"""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InputError("batch_size must be >= 1")

    @property
    def slug(self) -> str:
        return f"patch-{self.direction}-{Path(self.model.name).name}-{self.task.slug}"


def patch_shard(model, *, example: dict, patched: list[str] | None, chosen: list[str],
                direction: str, batch_size: int, template, seed: int) -> pd.DataFrame:  # fmt: skip
    """Per-head patching on one clean / corrupted pair: one row per patched head."""
    from mechinterp.evaluate import render_all
    from mechinterp.heads import HeadShape, parse_heads
    from mechinterp.interventions.patching import logit_diff_metric, patch_heads
    from mechinterp.tasks.corrupt import corrupt_answer

    shape = HeadShape.of(model)
    (prompt,) = render_all(model, [Example.from_dict(example)], template=template)
    heads = parse_heads(patched, shape) if patched is not None else None
    c = corrupt_answer(prompt, model.tokenizer, seed=seed)
    metric = logit_diff_metric(c.clean_token, c.corrupt_token)
    res = patch_heads(model, c.clean, c.corrupt, metric, direction=direction, heads=heads,
                      batch_size=batch_size, progress=False)  # fmt: skip
    recovery = res.recovery if res.clean != res.corrupt else res.values * float("nan")
    return pd.DataFrame([{
        "example_id": prompt.example_id, "layer": h.layer, "head": h.head, "head_name": str(h),
        "in_set": str(h) in chosen, "value": float(res.values[h.layer, h.head]),
        "recovery": float(recovery[h.layer, h.head]), "clean_metric": res.clean,
        "corrupt_metric": res.corrupt, "corrupted_position": c.position,
    } for h in heads or shape.all_heads()])  # fmt: skip


def plan(config: PatchConfig, model) -> Plan:
    from mechinterp.heads import HeadShape

    chosen = [str(h) for h in config.select.chosen(HeadShape.of(model))]
    patched = chosen if config.select.heads else None
    examples = build_examples(config.task, model.tokenizer)
    shards = [Shard(f"patch/{i:04d}", patch_shard, {
        "example": ex.to_dict(), "patched": patched, "chosen": chosen,
        "direction": config.direction, "batch_size": config.batch_size,
        "template": config.template, "seed": config.task.seed})
        for i, ex in enumerate(examples)]  # fmt: skip
    return Plan(shards, examples, facts={"selected_heads": chosen})


def finish(config: PatchConfig, df: pd.DataFrame, plan: Plan, card) -> dict:
    df = df.assign(model=card.id, direction=config.direction,
                   config_hash=store.config_hash(config))  # fmt: skip
    # Only pairs where the corruption flips the preference say anything about recovery.
    flipped = (df["clean_metric"] > 0) & (df["corrupt_metric"] < 0)
    valid = df[flipped] if flipped.any() else df
    heads = (
        valid.groupby(["layer", "head", "head_name", "in_set"])["recovery"].mean().reset_index()
        .assign(n_examples=valid["example_id"].nunique(), model=card.id)
    )  # fmt: skip
    sets = (
        valid.groupby(["in_set", "example_id"])["recovery"]
        .agg(mean_per_head="mean", total="sum", n_heads="size")
        .groupby("in_set").mean().reset_index()
    )  # fmt: skip
    sets.insert(0, "set", sets.pop("in_set").map({True: "selected", False: "rest"}))
    plan.facts["n_flipped"] = int(df.loc[flipped, "example_id"].nunique())
    return {"patch": df, "heads": heads, "sets": sets}


def draw(out: Path, config: PatchConfig) -> dict:
    from mechinterp.plots import head_heatmap

    heads = pd.read_parquet(out / "heads.parquet")
    title = (f"{heads['model'].iloc[0]} · {config.direction}: mean recovery per head "
             f"(n={heads['n_examples'].iloc[0]})")  # fmt: skip
    return {"recovery": head_heatmap(heads, value="recovery", title=title)}


def summary(out: Path, top: int) -> str:
    heads = pd.read_parquet(out / "heads.parquet").nlargest(top, "recovery")
    text = table_text(heads[["head_name", "in_set", "recovery"]])
    sets = pd.read_csv(out / "sets.csv")
    return text + ("\n" + table_text(sets) if sets["set"].eq("selected").any() else "")


HELP = ("per-head activation patching between each task instance and its corruption; tidy "
        "tables and a layer x head recovery heatmap")
PATCH = Command("patch", PatchConfig, HELP, plan, finish, draw, summary)
