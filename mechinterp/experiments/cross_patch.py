"""`mechinterp cross-patch`: a donor model's head outputs patched into the recipient while the
task runs, for each head set. Shards: chunks of `examples_per_shard` examples, every set in
each; the donor is loaded once per process (or Ray worker)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pandas as pd

from mechinterp import store
from mechinterp.config import from_dict, to_dict
from mechinterp.errors import InputError
from mechinterp.experiments.command import Command, Plan, chunks, summary_table
from mechinterp.experiments.patch import PATCH_TASK, HeadSelection
from mechinterp.experiments.specs import (
    TASK_ALIASES,
    ModelSpec,
    TaskSpec,
    build_examples,
    selection_aliases,
)
from mechinterp.runner import Shard
from mechinterp.tasks.example import Example


@dataclass(frozen=True)
class CrossPatchConfig:
    """Donor head outputs patched into the recipient (`model`) while the task runs, for each head
    set. The sets are one explicit list (`select.heads`), or the paper's Inter / Compl / Rand
    built from the donor's and the recipient's head-score tables (`select.scores` is the
    donor's, `recipient_scores` the recipient's; both selected by the same rule)."""

    FLAG_ALIASES: ClassVar[dict[str, str]] = {**TASK_ALIASES, **selection_aliases("select"),
                                              "--donor": "donor.name"}  # fmt: skip

    model: ModelSpec = field(default_factory=ModelSpec)
    donor: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=lambda: PATCH_TASK)
    select: HeadSelection = field(default_factory=HeadSelection)
    recipient_scores: str | None = None
    """with --scores (the donor's): the recipient's own scores, for Inter / Compl / Rand"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds of the Rand head sets"""
    max_new_tokens: int = 32
    """tokens to generate per answer"""
    batch_size: int = 24
    """batch rows: examples × conditions run together"""
    examples_per_shard: int = 8
    """examples per unit of work (finished shards are kept across kills and reruns)"""
    template: Literal["chat", "plain"] | None = None
    """prompt template (none: chat when the tokenizer has one)"""

    def __post_init__(self) -> None:
        if not self.select:
            raise InputError(
                "cross-model patching needs heads: a list (--heads) or the donor's and the "
                "recipient's score tables (--scores and --recipient-scores)"
            )
        if self.select.scores and not self.recipient_scores:
            raise InputError("Inter / Compl / Rand need the recipient's scores too "
                             "(--recipient-scores)")  # fmt: skip
        if self.recipient_scores and not self.select.scores:
            raise InputError("--recipient-scores goes with --scores (the donor's table)")
        if self.recipient_scores and not Path(self.recipient_scores).exists():
            raise InputError(f"recipient scores {self.recipient_scores} do not exist")
        if min(self.max_new_tokens, self.batch_size, self.examples_per_shard) < 1:
            raise InputError("max_new_tokens, batch_size and examples_per_shard must be >= 1")

    @property
    def slug(self) -> str:
        donor, recipient = Path(self.donor.name).name, Path(self.model.name).name
        return f"cross-patch-{donor}-into-{recipient}-{self.task.slug}"

    def head_sets(self, shape) -> dict[str, tuple]:
        from mechinterp.interventions.cross import patch_head_sets

        if self.select.heads:
            return {"heads": self.select.resolve(shape)}
        theirs = dataclasses.replace(self.select, scores=self.recipient_scores)
        return patch_head_sets(
            self.select.resolve(shape), theirs.resolve(shape), shape, seeds=self.seeds
        )


_DONORS: dict[str, object] = {}


def _donor(spec: dict):
    """The donor model, loaded once per process."""
    key = repr(sorted(spec.items()))
    if key not in _DONORS:
        _DONORS.clear()
        _DONORS[key] = from_dict(ModelSpec, spec).load()
    return _DONORS[key]


def cross_shard(model, *, donor: dict, examples: list[dict], sets: dict[str, list[str]],
                max_new_tokens: int, batch_size: int, template) -> pd.DataFrame:  # fmt: skip
    """Every head set patched from the donor on some examples: one row per condition and
    example."""
    from mechinterp.heads import HeadShape, parse_heads
    from mechinterp.interventions.cross import cross_model_patching

    shape = HeadShape.of(model)
    heads = {name: parse_heads(hs, shape) for name, hs in sets.items()}
    exs = [Example.from_dict(d) for d in examples]
    return cross_model_patching(_donor(donor), model, exs, heads, max_new_tokens=max_new_tokens,
                                max_rows=batch_size, template=template, progress=False)  # fmt: skip


def plan(config: CrossPatchConfig, model) -> Plan:
    from mechinterp.experiments.command import model_key
    from mechinterp.heads import HeadShape
    from mechinterp.interventions.cross import check_same_shape
    from mechinterp.models import model_card

    donor = _donor(to_dict(config.donor))
    check_same_shape(donor, model)
    sets = {k: [str(h) for h in v] for k, v in config.head_sets(HeadShape.of(model)).items()}
    examples = build_examples(config.task, model.tokenizer)
    shards = [Shard(f"cross/{i:04d}", cross_shard, {
        "donor": to_dict(config.donor), "examples": [e.to_dict() for e in part], "sets": sets,
        "max_new_tokens": config.max_new_tokens, "batch_size": config.batch_size,
        "template": config.template})
        for i, part in enumerate(chunks(examples, config.examples_per_shard))]  # fmt: skip
    card = model_card(donor)
    return Plan(shards, examples, facts={"donor_card": card.to_dict()},
                context={"sets": sets, "donor": card.id},
                key={"donor": model_key(card)})  # fmt: skip


def finish(config: CrossPatchConfig, df: pd.DataFrame, plan: Plan, card) -> dict:
    from mechinterp.interventions.cross import summarise_cross

    df = df.assign(recipient=card.id, donor=plan.context["donor"],
                   config_hash=store.config_hash(config))  # fmt: skip
    return {"cross": df, "summary": summarise_cross(df), "head_sets": plan.context["sets"]}


def draw(out: Path, config: CrossPatchConfig) -> dict:
    from mechinterp.plots import cross_patch_bars

    names = pd.read_parquet(out / "cross.parquet", columns=["donor", "recipient"]).iloc[0]
    title = f"{names['donor']} → {names['recipient']} · {config.task.slug}: cross-model patching"
    return {"cross": cross_patch_bars(pd.read_csv(out / "summary.csv"), title=title)}


HELP = ("cross-model patching: donor head sets (a list, or Inter / Compl / Rand from two score "
        "tables) patched into the model while the task runs; tidy tables and a figure")
CROSS_PATCH = Command("cross-patch", CrossPatchConfig, HELP, plan, finish, draw, summary_table)
