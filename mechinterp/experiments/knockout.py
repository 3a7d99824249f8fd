"""Knockout sweep runs: top-k ranked heads vs k random complement heads while a task runs."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mechinterp import store
from mechinterp.experiments.specs import (
    ModelSpec,
    TaskSpec,
    _load,
    _run_facts,
    build_examples,
    heads_from_scores,
)
from mechinterp.tasks.example import write_jsonl

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
    scores: str | None = None
    ks: tuple[int, ...] = (1, 2, 5, 10)
    seeds: tuple[int, ...] = (0, 1, 2)
    modes: tuple[str, ...] = ("zero",)
    match_layers: bool = False
    max_new_tokens: int = 32
    batch_size: int = 4
    score: bool = False
    template: Literal["chat", "plain"] | None = None

    def __post_init__(self) -> None:
        from mechinterp.interventions.sweep import SWEEP_MODES

        if bool(self.heads) == bool(self.scores):
            raise ValueError("give exactly one of --heads (a ranked list) or --scores (a table)")
        if self.scores is not None and not Path(self.scores).exists():
            raise ValueError(f"scores {self.scores} does not exist")
        bad = [m for m in self.modes if m not in SWEEP_MODES]
        if not self.modes or bad:
            raise ValueError(f"modes must be among {SWEEP_MODES}, got {list(self.modes)}")
        if not self.ks or min(self.ks) < 1 or not self.seeds:
            raise ValueError("ks must be positive and at least one seed is needed")

    @property
    def slug(self) -> str:
        return f"knockout-{Path(self.model.name).name}-{self.task.slug}"

    def ranking(self, shape) -> tuple:
        """The ranked heads, best first, validated against the model's shape."""
        from mechinterp.heads import parse_heads

        if self.heads:
            return parse_heads(self.heads, shape)
        return heads_from_scores(self.scores, shape, threshold=float("-inf"))


def run_knockout(
    config: KnockoutConfig,
    root: str | Path = "runs",
    *,
    model=None,
    force: bool = False,
    png: bool = True,
    progress: bool = True,
) -> Path:
    """Run a knockout sweep and write `sweep.parquet` (+ `.csv`; one row per mode, k, condition,
    seed and example), `summary.csv`, and `knockout.html/.png` (metric vs k)."""
    from mechinterp.heads import HeadShape
    from mechinterp.interventions.sweep import knockout_sweep, summarise_sweep
    from mechinterp.models import model_card
    from mechinterp.plots import knockout_curve

    out = store.run_dir(root, config.slug, config)
    if (out / "sweep.parquet").is_file() and not force:
        return out
    model, t0, t_load = _load(config, model)
    ranked = config.ranking(HeadShape.of(model))
    examples = build_examples(config.task, model.tokenizer)
    df = knockout_sweep(
        model,
        examples,
        ranked,
        ks=config.ks,
        seeds=config.seeds,
        modes=config.modes,
        match_layers=config.match_layers,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        score=config.score,
        progress=progress,
    )
    card = model_card(model)
    df.insert(0, "model", card.id)
    df["config_hash"] = store.config_hash(config)
    summary = summarise_sweep(df)
    if config.score:
        lp = summarise_sweep(df, "answer_logprob")
        summary["answer_logprob"] = lp["answer_logprob"]
        summary["answer_logprob_seed_sd"] = lp["seed_sd"]
    out.mkdir(parents=True, exist_ok=True)
    store.write_json(out / "config.json", dataclasses.asdict(config))
    write_jsonl(examples, out / "examples.jsonl")
    store.write_table(df, out / "sweep.csv")
    store.write_table(summary, out / "summary.csv")
    fig = knockout_curve(summary, title=f"{card.id} · {config.task.slug}: accuracy after knockout")
    store.write_figure(fig, out / "knockout", formats=("html", "png") if png else ("html",))
    store.write_json(
        out / "provenance.json",
        store.provenance(
            **_run_facts(card, config),
            ranked_heads=[str(h) for h in ranked[: max(config.ks)]],
            n_examples=len(examples),
            timings={"load_s": round(t_load, 3), "total_s": round(time.perf_counter() - t0, 3)},
        ),
    )
    store.write_table(df, out / "sweep.parquet")  # last: marks a complete run
    return out
