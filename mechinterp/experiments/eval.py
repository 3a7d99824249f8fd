"""`mechinterp eval`: a long-context task on a model, one row per example, and the length × depth
accuracy heatmap. Shards: chunks of `examples_per_shard` examples."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pandas as pd

from mechinterp import store
from mechinterp.errors import InputError
from mechinterp.experiments.command import Command, Plan, chunks, table_text
from mechinterp.experiments.specs import (
    DEVICE_ALIASES,
    TASK_ALIASES,
    ModelSpec,
    TaskSpec,
    build_examples,
)
from mechinterp.runner import Shard
from mechinterp.tasks.example import Example


@dataclass(frozen=True)
class EvalConfig:
    """A task's examples answered by the model (no intervention), scored per example."""

    FLAG_ALIASES: ClassVar[dict[str, str]] = {**TASK_ALIASES, **DEVICE_ALIASES}

    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=TaskSpec)
    max_new_tokens: int = 32
    """tokens to generate per answer"""
    batch_size: int = 4
    """examples per generation batch"""
    examples_per_shard: int = 8
    """examples per unit of work (finished shards are kept across kills and reruns)"""
    template: Literal["chat", "plain"] | None = None
    """prompt template (none: chat when the tokenizer has one)"""

    def __post_init__(self) -> None:
        if min(self.max_new_tokens, self.batch_size, self.examples_per_shard) < 1:
            raise InputError("max_new_tokens, batch_size and examples_per_shard must be >= 1")

    @property
    def slug(self) -> str:
        return f"eval-{Path(self.model.name).name}-{self.task.slug}"


def eval_shard(model, *, examples: list[dict], max_new_tokens: int, batch_size: int,
               template: str | None) -> pd.DataFrame:  # fmt: skip
    """Some examples answered greedily: one row per example."""
    from mechinterp.evaluate import evaluate

    exs = [Example.from_dict(d) for d in examples]
    return evaluate(model, exs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    template=template, progress=False)  # fmt: skip


def plan(config: EvalConfig, model) -> Plan:
    examples = build_examples(config.task, model.tokenizer)
    args = {"max_new_tokens": config.max_new_tokens, "batch_size": config.batch_size,
            "template": config.template}  # fmt: skip
    shards = [Shard(f"eval/{i:04d}", eval_shard, {"examples": [e.to_dict() for e in part], **args})
              for i, part in enumerate(chunks(examples, config.examples_per_shard))]  # fmt: skip
    return Plan(shards, examples)


def finish(config: EvalConfig, df: pd.DataFrame, plan: Plan, card) -> dict:
    df.insert(0, "model", card.id)
    return {"results": df.assign(config_hash=store.config_hash(config))}


def draw(out: Path, config: EvalConfig) -> dict:
    from mechinterp.plots import accuracy_heatmap

    df = pd.read_parquet(out / "results.parquet")
    t = config.task
    flavour = t.haystack if t.task == "niah" else (Path(t.data).name if t.data else t.variant)
    return {"accuracy": accuracy_heatmap(
        df, title=f"{df['model'].iloc[0]} · {t.task} ({flavour}): accuracy")}  # fmt: skip


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy and mean metrics by context length (all rows when there is no length)."""
    keys = ["length"] if df["length"].notna().any() else ["task"]
    return (
        df.groupby(keys)[["correct", "rouge1_recall", "substring", "f1", "em"]]
        .mean()
        .assign(n=df.groupby(keys).size())
        .reset_index()
    )


def summary(out: Path, top: int) -> str:
    df = pd.read_parquet(out / "results.parquet")
    return (f"{table_text(summarise(df).head(top))}\n"
            f"accuracy {df['correct'].mean():.3f} over {len(df)} examples")  # fmt: skip


HELP = "run a long-context task on a model; write a tidy table and a length x depth heatmap"
EVAL = Command("eval", EvalConfig, HELP, plan, finish, draw, summary)
