"""The evaluation run: one frozen config → one run directory of tidy tables and figures.

`run_eval(EvalConfig(...), root)` builds the task examples, generates answers, and writes
`config.json`, `provenance.json`, `examples.jsonl`, `results.parquet` (+ `.csv`), and the
length × depth accuracy heatmap (`accuracy.html`, `accuracy.png`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from mechinterp import store
from mechinterp.experiments.specs import ModelSpec, TaskSpec, _load, _run_facts, build_examples
from mechinterp.tasks.example import write_jsonl


@dataclass(frozen=True)
class EvalConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=TaskSpec)
    max_new_tokens: int = 32
    batch_size: int = 4
    template: Literal["chat", "plain"] | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be >= 1")

    @property
    def slug(self) -> str:
        return f"eval-{Path(self.model.name).name}-{self.task.slug}"


def run_eval(
    config: EvalConfig,
    root: str | Path = "runs",
    *,
    model=None,
    force: bool = False,
    png: bool = True,
    progress: bool = True,
) -> Path:
    """Run `config` and write its run directory; return the directory.

    A directory that already holds this config's results is reused unless `force`.
    """
    from mechinterp.evaluate import evaluate
    from mechinterp.models import model_card
    from mechinterp.plots import accuracy_heatmap

    out = store.run_dir(root, config.slug, config)
    if (out / "results.parquet").is_file() and not force:
        return out
    model, t0, t_load = _load(config, model)
    examples = build_examples(config.task, model.tokenizer)
    df = evaluate(
        model,
        examples,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        template=config.template,
        progress=progress,
    )
    card = model_card(model)
    df.insert(0, "model", card.id)
    out.mkdir(parents=True, exist_ok=True)
    store.write_json(out / "config.json", dataclasses.asdict(config))
    write_jsonl(examples, out / "examples.jsonl")
    store.write_table(df, out / "results.csv")
    t = config.task
    flavour = t.haystack if t.task == "niah" else (Path(t.data).name if t.data else t.variant)
    fig = accuracy_heatmap(df, title=f"{card.id} · {t.task} ({flavour}): accuracy")
    store.write_figure(fig, out / "accuracy", formats=("html", "png") if png else ("html",))
    store.write_json(
        out / "provenance.json",
        store.provenance(
            **_run_facts(card, config),
            n_examples=len(df),
            timings={
                "load_s": round(t_load, 3),
                "generate_s": round(df.attrs["generate_seconds"], 3),
                "total_s": round(time.perf_counter() - t0, 3),
            },
        ),
    )
    # results.parquet last: its presence marks a complete run.
    store.write_table(df, out / "results.parquet")
    return out


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy and mean metrics by context length (all rows when there is no length)."""
    keys = ["length"] if df["length"].notna().any() else ["task"]
    return (
        df.groupby(keys)[["correct", "rouge1_recall", "substring", "f1", "em"]]
        .mean()
        .assign(n=df.groupby(keys).size())
        .reset_index()
    )
