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
from mechinterp.tasks.example import TASK_NAMES, Example, TaskName, write_jsonl

Haystack = Literal["essays", "filler"]


@dataclass(frozen=True)
class ModelSpec:
    name: str = "smollm2-135m"
    dtype: str = "float32"
    device: str | None = None
    rope_theta: float | None = None


@dataclass(frozen=True)
class TaskSpec:
    """Which examples to build. NIAH uses lengths × depths × needles; the QA tasks use `data`
    (a user's JSONL file) or a synthetic `variant` with `n` examples of `n_docs` documents."""

    task: TaskName = "niah"
    lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    needles: int = 4
    haystack: Haystack = "essays"
    data: str | None = None
    variant: str = "realistic-high"
    n: int = 20
    n_docs: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASK_NAMES:
            raise ValueError(f"unknown task {self.task!r}; expected one of {TASK_NAMES}")
        if any(not 16 <= n <= 1_000_000 for n in self.lengths):
            raise ValueError(f"lengths must be token counts >= 16, got {self.lengths}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must lie in [0, 1], got {self.depths}")
        if self.haystack not in ("essays", "filler"):
            raise ValueError(f"haystack must be 'essays' or 'filler', got {self.haystack!r}")
        if self.data is not None and self.task == "niah":
            raise ValueError("--data applies to mdqa and multihop; NIAH builds its own grid")
        if self.data is not None and not Path(self.data).is_file():
            raise ValueError(f"data file {self.data} does not exist")
        parse_variant(self.variant)


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
        t = self.task
        if t.data is not None:
            what = f"{t.task}-{Path(t.data).stem}"
        else:
            what = f"niah-{t.haystack}" if t.task == "niah" else f"{t.task}-{t.variant}"
        return f"eval-{Path(self.model.name).name}-{what}"


def parse_variant(variant: str) -> tuple[str, str]:
    """`"realistic-high"` → ("realistic", "high"); `"symbolic"` → ("symbolic", "high")."""
    from mechinterp.tasks.needles import NEEDLE_REALISMS

    realism, _, diversity = variant.partition("-")
    diversity = diversity or "high"
    if realism not in NEEDLE_REALISMS or diversity not in ("high", "low"):
        raise ValueError(
            f"unknown variant {variant!r}; expected realistic-high, realistic-low, "
            "templated-high, templated-low or symbolic"
        )
    return realism, diversity


def build_examples(task: TaskSpec, tokenizer) -> list[Example]:
    """The examples a `TaskSpec` describes (deterministic from its seed)."""
    if task.task == "niah":
        from mechinterp.tasks.niah import niah_grid

        return niah_grid(
            tokenizer,
            lengths=task.lengths,
            depths=task.depths,
            needles=task.needles,
            haystack=task.haystack,
            seed=task.seed,
        )
    if task.task == "mdqa":
        from mechinterp.tasks.mdqa import load_mdqa, synthetic_mdqa

        if task.data:
            return load_mdqa(task.data, limit=task.n)
        realism, diversity = parse_variant(task.variant)
        return synthetic_mdqa(
            task.n, n_docs=task.n_docs, realism=realism, diversity=diversity, seed=task.seed
        )
    from mechinterp.tasks.multihop import load_musique, synthetic_multihop

    if task.data:
        return load_musique(task.data, limit=task.n)
    realism, diversity = parse_variant(task.variant)
    return synthetic_multihop(
        task.n, n_docs=task.n_docs, realism=realism, diversity=diversity, seed=task.seed
    )


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
    from mechinterp.models import load_model, model_card
    from mechinterp.models.load import tune_allocator
    from mechinterp.plots import accuracy_heatmap

    out = store.run_dir(root, config.slug, config)
    if (out / "results.parquet").is_file() and not force:
        return out
    t0 = time.perf_counter()
    if model is None:
        m = config.model
        model = load_model(m.name, dtype=m.dtype, device=m.device, rope_theta=m.rope_theta)
    t_load = time.perf_counter() - t0
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
            model_card=card.to_dict(),
            malloc_tuned=tune_allocator(),
            seed=config.task.seed,
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
