"""`mechinterp knockout`: the top-k ranked heads vs k random complement heads, knocked out while
the task runs. Shards: chunks of `examples_per_shard` examples, each under every condition (the
random draws depend on the seeds only, so every chunk knocks out the same heads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from mechinterp import store
from mechinterp.errors import InputError
from mechinterp.experiments.command import Command, Plan, chunks, summary_table
from mechinterp.experiments.specs import ModelSpec, TaskSpec, build_examples, heads_from_scores
from mechinterp.heads import parse_heads
from mechinterp.runner import Shard
from mechinterp.tasks.example import Example

#: Knockout's default grid: contexts the embedded model answers, 4 needles.
KNOCKOUT_TASK = TaskSpec(lengths=(256, 512), depths=(0.25, 0.75), needles=4)


@dataclass(frozen=True)
class KnockoutConfig:
    """Top-k ranked heads vs k random complement heads, knocked out while the task runs. The
    ranking is `heads` (best first) or a detection `scores` table (`scores.parquet` or a run
    directory holding one)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=lambda: KNOCKOUT_TASK)
    heads: tuple[str, ...] = ()
    """ranked head list, best first: L17H3,L18H6,..."""
    scores: str | None = None
    """a detection run directory or its scores.parquet/csv (ranked by score)"""
    ks: tuple[int, ...] = (1, 2, 5, 10)
    """numbers of heads to knock out, comma-separated"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """random-baseline seeds"""
    modes: tuple[Literal["zero", "uniform_attention"], ...] = ("zero",)
    """knockout modes, comma-separated"""
    match_layers: bool = False
    """random heads matched per layer to the top-k"""
    max_new_tokens: int = 32
    """tokens to generate per answer"""
    batch_size: int = 4
    """examples per generation batch"""
    score: bool = False
    """also score the answer's teacher-forced log-prob"""
    examples_per_shard: int = 8
    """examples per unit of work (finished shards are kept across kills and reruns)"""
    template: Literal["chat", "plain"] | None = None
    """prompt template (none: chat when the tokenizer has one)"""

    def __post_init__(self) -> None:
        if bool(self.heads) == bool(self.scores):
            raise InputError("give exactly one of --heads (a ranked list) or --scores (a table)")
        if self.scores is not None and not Path(self.scores).exists():
            raise InputError(f"scores {self.scores} does not exist")
        # syntax and repeats now (one head per item: "L1H2 L3H4" is two); the shape later
        heads = tuple(map(str, parse_heads(self.heads)))
        if self.heads and not heads:
            raise InputError(f"heads {list(self.heads)} name no head: write heads like L18H6,L3H1")
        object.__setattr__(self, "heads", heads)
        if not self.modes or len(set(self.modes)) < len(self.modes):
            raise InputError(f"modes must be distinct, and at least one, got {list(self.modes)}")
        if not self.ks or min(self.ks) < 1 or not self.seeds:
            raise InputError("ks must be positive and at least one seed is needed")
        if min(self.max_new_tokens, self.batch_size, self.examples_per_shard) < 1:
            raise InputError("max_new_tokens, batch_size and examples_per_shard must be >= 1")

    @property
    def slug(self) -> str:
        return f"knockout-{Path(self.model.name).name}-{self.task.slug}"

    def ranking(self, shape) -> tuple:
        """The ranked heads, best first, validated against the model's shape."""
        from mechinterp.heads import parse_heads

        if self.heads:
            return parse_heads(self.heads, shape)
        return heads_from_scores(self.scores, shape, threshold=float("-inf"))


def knockout_shard(model, *, examples: list[dict], ranked: list[str], sweep: dict):
    """The whole sweep on some examples: one row per (mode, k, condition, seed, example)."""
    from mechinterp.interventions.sweep import knockout_sweep

    exs = [Example.from_dict(d) for d in examples]
    return knockout_sweep(model, exs, ranked, **sweep, progress=False)


def plan(config: KnockoutConfig, model) -> Plan:
    from mechinterp.heads import HeadShape

    ranked = config.ranking(HeadShape.of(model))
    if max(config.ks) > len(ranked):
        raise InputError(f"k={max(config.ks)} exceeds the {len(ranked)} ranked heads given")
    examples = build_examples(config.task, model.tokenizer)
    sweep = {"ks": list(config.ks), "seeds": list(config.seeds), "modes": list(config.modes),
             "match_layers": config.match_layers, "max_new_tokens": config.max_new_tokens,
             "batch_size": config.batch_size, "score": config.score}  # fmt: skip
    names = [str(h) for h in ranked]
    shards = [Shard(f"knockout/{i:04d}", knockout_shard, {
        "examples": [e.to_dict() for e in part], "ranked": names, "sweep": sweep})
        for i, part in enumerate(chunks(examples, config.examples_per_shard))]  # fmt: skip
    return Plan(shards, examples, facts={"ranked_heads": names[: max(config.ks)]})


def finish(config: KnockoutConfig, df: pd.DataFrame, plan: Plan, card) -> dict:
    from mechinterp.interventions.sweep import summarise_sweep

    df.insert(0, "model", card.id)
    df["config_hash"] = store.config_hash(config)
    summary = summarise_sweep(df)
    if config.score:
        lp = summarise_sweep(df, "answer_logprob")
        summary["answer_logprob"] = lp["answer_logprob"]
        summary["answer_logprob_seed_sd"] = lp["seed_sd"]
    return {"sweep": df, "summary": summary}


def draw(out: Path, config: KnockoutConfig) -> dict:
    from mechinterp.plots import knockout_curve

    model = pd.read_parquet(out / "sweep.parquet", columns=["model"])["model"].iloc[0]
    title = f"{model} · {config.task.slug}: accuracy after knockout"
    return {"knockout": knockout_curve(pd.read_csv(out / "summary.csv"), title=title)}


HELP = ("knock out the top-k ranked heads vs k random complement heads while a task runs; write "
        "a tidy table and an accuracy-vs-k figure")
KNOCKOUT = Command("knockout", KnockoutConfig, HELP, plan, finish, draw, summary_table)
