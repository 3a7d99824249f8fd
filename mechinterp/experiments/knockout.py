"""`mechinterp knockout`: the study's knockout stage on one task. The top-k ranked heads vs k random
complement heads (layer-matched draws, and uniform draws beside them), scored as the study scores
them: each example is answered once without knockout (greedy), and under each condition its clean
response is teacher-forced; the answer counts as retrieved while every answer token stays the
greedy choice. `scoring: generate` instead generates freely under each condition (the study's
robustness generation). The shards are the study's own (`study.stages`): the clean answers, then
per chunk of answered examples every condition, so a row of the command is the same row of a
study with the same examples, ranking and settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar, Literal

import pandas as pd

from mechinterp import store
from mechinterp.errors import InputError
from mechinterp.experiments.command import Command, Plan, summary_table
from mechinterp.experiments.specs import (
    DEVICE_ALIASES,
    TASK_ALIASES,
    ModelSpec,
    TaskSpec,
    build_examples,
    read_head_scores,
)
from mechinterp.heads import parse_heads

#: Knockout's default grid: contexts the embedded model answers, 4 needles.
KNOCKOUT_TASK = TaskSpec(lengths=(256, 512), depths=(0.25, 0.75), needles=4)


@dataclass(frozen=True)
class KnockoutConfig:
    """Top-k ranked heads vs k random complement heads, knocked out while the task runs, with the
    study's knockout settings and defaults (`study.config.KnockoutStage`). The ranking is `heads`
    (best first) or a detection `scores` table (`scores.parquet` or a run directory holding
    one; ties in the detectors' seeded order, as the study ranks)."""

    FLAG_ALIASES: ClassVar[dict[str, str]] = {**TASK_ALIASES, **DEVICE_ALIASES}

    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=lambda: KNOCKOUT_TASK)
    heads: tuple[str, ...] = ()
    """ranked head list, best first: L17H3,L18H6,..."""
    scores: str | None = None
    """a detection run directory or its scores.parquet/csv (ranked by score)"""
    ks: tuple[int, ...] = (1, 2, 5, 10, 20)
    """numbers of heads to knock out, comma-separated (each at most the ranked heads given)"""
    seeds: tuple[int, ...] = tuple(range(10))
    """random-baseline seeds (one random draw per seed, per draw kind)"""
    modes: tuple[Literal["zero", "uniform_attention"], ...] = ("zero", "uniform_attention")
    """knockout modes, comma-separated: zero (the head's output is 0) or uniform_attention (the
    head attends uniformly). mean and resample need a reference input per head and
    edge_knockout the keys to cut, which a ranking-vs-random sweep does not define: use the
    Python API's knockout() for those"""
    draws: tuple[Literal["layer_matched", "uniform"], ...] = ("layer_matched", "uniform")
    """random baselines: layer_matched (the top-k's per-layer counts; condition random) and
    uniform over layers (condition random_uniform)"""
    scoring: Literal["teacher_forced", "generate"] = "teacher_forced"
    """teacher_forced: the clean response is scored under each condition (retrieved: every answer
    token stays the greedy choice); generate: free greedy generation under each condition
    (retrieved: the answer occurs in the generated text)"""
    scope: Literal["response", "query", "all"] = "response"
    """positions knocked out: response (the prompt's last position and every later one), query
    (from the end of the context on) or all"""
    target: Literal["response", "gold"] = "response"
    """what is teacher-forced: the model's clean response (examples it answered), or the gold
    answer right after the prompt (for models that answer tersely or not at all)"""
    max_new_tokens: int = 32
    """tokens to generate per answer"""
    batch_size: int = 4
    """examples per generation batch of the clean answers"""
    examples_per_shard: int = 6
    """examples per unit of work (finished shards are kept across kills and reruns)"""
    level: float = 0.95
    """coverage of the summary's cluster t intervals"""
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
        if not self.draws or len(set(self.draws)) < len(self.draws):
            raise InputError(f"draws must be distinct, and at least one, got {list(self.draws)}")
        if not self.ks or min(self.ks) < 1 or not self.seeds:
            raise InputError("ks must be positive and at least one seed is needed")
        if min(self.max_new_tokens, self.batch_size, self.examples_per_shard) < 1:
            raise InputError("max_new_tokens, batch_size and examples_per_shard must be >= 1")
        if not 0 < self.level < 1:
            raise InputError(f"level must lie in (0, 1), got {self.level}")

    @property
    def slug(self) -> str:
        return f"knockout-{Path(self.model.name).name}-{self.task.slug}"

    def ranking(self, shape) -> tuple:
        """The ranked heads, best first, validated against the model's shape."""
        if self.heads:
            return parse_heads(self.heads, shape)
        return ranked_table_heads(self.scores, shape)


def ranked_table_heads(path: str | Path, shape) -> tuple:
    """Every head of a head-score table, best first; equal scores in `rank_order`'s seeded order
    over the table in layer-major order, as the detectors and the study rank (so a full table
    ranks exactly as its `rank` column, and an edited score is never hidden by a stale rank)."""
    from mechinterp.analysis.headsets import rank_order
    from mechinterp.heads import Head

    table = read_head_scores(path).sort_values(["layer", "head"])
    table = table.iloc[rank_order(table["score"])]
    return parse_heads([Head(int(a), int(b)) for a, b in zip(table["layer"], table["head"],
                                                              strict=True)], shape)  # fmt: skip


def plan(config: KnockoutConfig, model) -> Plan:
    """The study's clean-answer shards; then (`Plan.then`) its knockout shards, or with
    `scoring: generate` its generation shards, on the examples answered."""
    from mechinterp.experiments.study import stages
    from mechinterp.heads import HeadShape

    shape = HeadShape.of(model)
    ranked = config.ranking(shape)
    if max(config.ks) > len(ranked):
        raise InputError(f"k={max(config.ks)} exceeds the {len(ranked)} ranked heads given: "
                         "rank more heads (a --scores table ranks every head) or set smaller ks, "
                         "e.g. --set ks=[1,2]")  # fmt: skip
    examples = build_examples(config.task, model.tokenizer)
    names = [str(h) for h in ranked]
    facts = {"ranked_heads": names[: max(config.ks)], "scoring": config.scoring}

    def conditions(baseline: pd.DataFrame) -> list:
        answered = int(baseline["scorable"].sum())
        facts.update(n_answered=answered)
        if not answered:
            raise InputError(
                f"the model answered none of the {len(baseline)} examples (no clean response "
                "holds the answer), so no knockout can be scored: teacher-force the gold "
                "answer (--set target=gold) or use a task the model answers"
            )
        if config.scoring == "teacher_forced":
            return stages.knockout_shards(examples, baseline, ranked, shape, config,
                                          config.template)  # fmt: skip
        conds = stages.knockout_conditions(ranked, shape, ks=config.ks, seeds=config.seeds,
                                           modes=config.modes, draws=config.draws)  # fmt: skip
        return stages.answered_shards(
            "generate", stages.robustness_shard, examples, baseline.set_index("example_id"),
            config.examples_per_shard, conditions=conds, scopes=[], generate_scope=config.scope,
            max_new_tokens=config.max_new_tokens, template=config.template,
        )  # fmt: skip

    shards = stages.baseline_shards(examples, config, config.template)
    return Plan(shards, examples, facts=facts, then=conditions)


def finish(config: KnockoutConfig, df: pd.DataFrame, plan: Plan, card) -> dict:
    """The study's tables: `baseline` (clean answers), `knockout` (one row per answered example
    and condition) and `summary` (`study.report.knockout_summary`: retrieved rate per task,
    mode, k and condition over every example, unanswered ones counting as not retrieved)."""
    from mechinterp.experiments.study.report import knockout_summary

    baseline = plan.context["first"]
    for table in (baseline, df):
        table.insert(0, "model", card.id)
        table["config_hash"] = store.config_hash(config)
    # knockout_summary reads the intervals' level where the study keeps it, claims.level
    view = SimpleNamespace(claims=SimpleNamespace(level=config.level))
    summary = knockout_summary({"knockout": df, "baseline": baseline}, view)
    return {"baseline": baseline, "knockout": df, "summary": summary}


def draw(out: Path, config: KnockoutConfig) -> dict:
    from mechinterp.plots import knockout_ci_curves

    model = pd.read_parquet(out / "knockout.parquet", columns=["model"])["model"].iloc[0]
    how = "teacher-forced" if config.scoring == "teacher_forced" else "generated"
    title = (f"{model} · {config.task.slug}: answer retrieved ({how}) vs heads knocked out "
             f"({config.level:.0%} cluster t interval)")  # fmt: skip
    summary = pd.read_csv(out / "summary.csv")
    return {"knockout_vs_k": knockout_ci_curves(summary, title=title)}


HELP = ("knock out the top-k ranked heads vs k random complement heads as the study does (clean "
        "response teacher-forced, layer-matched and uniform draws); write tidy tables and an "
        "answer-retrieved-vs-k figure")  # fmt: skip
KNOCKOUT = Command("knockout", KnockoutConfig, HELP, plan, finish, draw, summary_table)
