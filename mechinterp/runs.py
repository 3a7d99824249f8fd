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

    def load(self):
        from mechinterp.models import load_model

        return load_model(
            self.name, dtype=self.dtype, device=self.device, rope_theta=self.rope_theta
        )


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

    @property
    def slug(self) -> str:
        """`niah-essays`, `mdqa-realistic-high`, `multihop-<data file stem>`, ..."""
        if self.data is not None:
            return f"{self.task}-{Path(self.data).stem}"
        return f"niah-{self.haystack}" if self.task == "niah" else f"{self.task}-{self.variant}"


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


def _load(config, model):
    """(model, start time, load seconds): the config's model unless one is passed in."""
    t0 = time.perf_counter()
    model = config.model.load() if model is None else model
    return model, t0, time.perf_counter() - t0


def _run_facts(card, config) -> dict:
    """Provenance every run records: model card, allocator tuning, task seed."""
    from mechinterp.models.load import tune_allocator

    return {
        "model_card": card.to_dict(),
        "malloc_tuned": tune_allocator(),
        "seed": config.task.seed,
    }


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


# ---------------------------------------------------------------- detection runs

#: Detection's default grid: contexts the embedded model answers (≤ 1K tokens), 4 needles.
DETECT_TASK = TaskSpec(lengths=(256, 512, 1024), depths=(0.0, 0.5, 1.0), needles=4)


@dataclass(frozen=True)
class DetectConfig:
    """A detector on a model and task grid. Settings a detector does not use are ignored (and
    recorded as given). Pattern detectors use repeated random tokens, not the task."""

    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=lambda: DETECT_TASK)
    detector: str = "retrieval"
    # retrieval
    convention: Literal["set", "per_step"] = "set"
    keys: Literal["prompt", "context"] = "prompt"
    gate: float | None = 0.5
    max_new_tokens: int = 32
    # qr
    calibrate: bool = False
    # pattern scores
    seq_len: int = 50
    n_sequences: int = 8
    batch_size: int = 4
    template: Literal["chat", "plain"] | None = None

    def __post_init__(self) -> None:
        from mechinterp.detect import DETECTORS

        if self.detector not in DETECTORS:
            raise ValueError(
                f"unknown detector {self.detector!r}; expected one of {sorted(DETECTORS)}"
            )
        if self.convention not in ("set", "per_step"):
            raise ValueError(f"convention must be 'set' or 'per_step', got {self.convention!r}")
        if self.keys not in ("prompt", "context"):
            raise ValueError(f"keys must be 'prompt' or 'context', got {self.keys!r}")
        if self.gate is not None and not 0.0 <= self.gate < 1.0:
            raise ValueError(f"gate must lie in [0, 1) (or be None), got {self.gate}")
        if min(self.max_new_tokens, self.batch_size, self.seq_len, self.n_sequences) < 1:
            raise ValueError("max_new_tokens, batch_size, seq_len and n_sequences must be >= 1")

    @property
    def uses_task(self) -> bool:
        from mechinterp.detect import NEEDS_EXAMPLES

        return self.detector in NEEDS_EXAMPLES

    def settings(self) -> dict:
        """The keyword settings this config passes to its detector."""
        if self.detector == "retrieval":
            return {
                "convention": self.convention,
                "keys": self.keys,
                "gate": self.gate,
                "max_new_tokens": self.max_new_tokens,
                "batch_size": self.batch_size,
                "template": self.template,
            }
        if self.detector == "qr":
            return {
                "calibrate": self.calibrate,
                "batch_size": self.batch_size,
                "template": self.template,
            }
        return {"seq_len": self.seq_len, "n_sequences": self.n_sequences, "seed": self.task.seed}

    @property
    def slug(self) -> str:
        what = self.task.slug if self.uses_task else "random"
        return f"detect-{self.detector}-{Path(self.model.name).name}-{what}"


def run_detect(
    config: DetectConfig,
    root: str | Path = "runs",
    *,
    model=None,
    force: bool = False,
    png: bool = True,
    progress: bool = True,
) -> Path:
    """Run a detector and write its run directory; return the directory.

    Writes `scores.parquet` (+ `.csv`; one row per head), `instances.parquet` (one row per
    detection instance), `per_instance.parquet` (instance × head values), `scores_wu.json` (Wu
    et al.'s format), `heads.html/.png` (layer × head heatmap), config and provenance.
    """
    from mechinterp.detect import detect
    from mechinterp.models import model_card
    from mechinterp.plots import head_heatmap

    out = store.run_dir(root, config.slug, config)
    if (out / "scores.parquet").is_file() and not force:
        return out
    model, t0, t_load = _load(config, model)
    examples = build_examples(config.task, model.tokenizer) if config.uses_task else None
    settings = config.settings()
    if config.detector in ("retrieval", "qr"):
        settings["progress"] = progress
    detection = detect(model, examples, config.detector, **settings)
    card = model_card(model)
    task = config.task.task if config.uses_task else "repeated-random-tokens"
    provenance_cols = {
        "model": card.id,
        "task": task,
        "config_hash": store.config_hash(config),
    }
    scores = detection.scores_frame().assign(**provenance_cols)
    out.mkdir(parents=True, exist_ok=True)
    store.write_json(out / "config.json", dataclasses.asdict(config))
    if examples is not None:
        write_jsonl(examples, out / "examples.jsonl")
    store.write_table(detection.instances.assign(**provenance_cols), out / "instances.parquet")
    store.write_table(detection.per_instance_frame(), out / "per_instance.parquet")
    store.write_table(scores, out / "scores.csv")
    from mechinterp.analysis.wu_json import write_wu_scores

    write_wu_scores(out / "scores_wu.json", detection.wu_lists())
    fig = head_heatmap(
        scores,
        title=f"{card.id} · {config.detector} score ({task}, n={detection.n_counted})",
    )
    store.write_figure(fig, out / "heads", formats=("html", "png") if png else ("html",))
    store.write_json(
        out / "provenance.json",
        store.provenance(
            **_run_facts(card, config),
            detector=config.detector,
            settings=detection.settings,
            n_instances=len(detection.instances),
            n_counted=detection.n_counted,
            timings={
                "load_s": round(t_load, 3),
                "detect_s": detection.settings.get("seconds"),
                "total_s": round(time.perf_counter() - t0, 3),
            },
        ),
    )
    store.write_table(scores, out / "scores.parquet")  # last: marks a complete run
    return out


# ---------------------------------------------------------------- knockout sweeps

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
        from mechinterp.heads import Head, parse_heads

        if self.heads:
            return parse_heads(self.heads, shape)
        path = Path(self.scores)
        path = path / "scores.parquet" if path.is_dir() else path
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        missing = {"layer", "head", "score"} - set(table.columns)
        if missing:
            raise ValueError(f"{path} is not a head-score table (missing {sorted(missing)})")
        table = table.sort_values(["score", "layer", "head"], ascending=[False, True, True])
        return parse_heads(
            [Head(int(a), int(b)) for a, b in zip(table["layer"], table["head"], strict=True)],
            shape,
        )


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
        progress=progress,
    )
    card = model_card(model)
    df.insert(0, "model", card.id)
    df["config_hash"] = store.config_hash(config)
    summary = summarise_sweep(df)
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


# ---------------------------------------------------------------- activation patching runs

#: Patching's default: 4 NIAH instances of 256 tokens, needle mid-context.
PATCH_TASK = TaskSpec(lengths=(256,), depths=(0.5,), needles=4)


@dataclass(frozen=True)
class PatchConfig:
    """Per-head patching between each instance and its corruption (the first answer token in the
    needle replaced by another word's token); metric: logit(clean token) − logit(corrupt token)
    at the last prompt position."""

    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=lambda: PATCH_TASK)
    direction: Literal["denoise", "noise"] = "denoise"
    batch_size: int = 9
    template: Literal["chat", "plain"] | None = None

    def __post_init__(self) -> None:
        if self.direction not in ("denoise", "noise"):
            raise ValueError(f"direction must be 'denoise' or 'noise', got {self.direction!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")

    @property
    def slug(self) -> str:
        return f"patch-{self.direction}-{Path(self.model.name).name}-{self.task.slug}"


def run_patch(
    config: PatchConfig,
    root: str | Path = "runs",
    *,
    model=None,
    force: bool = False,
    png: bool = True,
    progress: bool = True,
) -> Path:
    """Write `patch.parquet` (one row per example and head: value, recovery, clean and corrupt
    metrics), `heads.parquet` (mean recovery per head over examples) and `recovery.html/.png`."""
    from tqdm.auto import tqdm

    from mechinterp.evaluate import render_all
    from mechinterp.interventions.patching import logit_diff_metric, patch_heads
    from mechinterp.models import model_card
    from mechinterp.plots import head_heatmap
    from mechinterp.tasks.corrupt import corrupt_answer

    out = store.run_dir(root, config.slug, config)
    if (out / "patch.parquet").is_file() and not force:
        return out
    model, t0, t_load = _load(config, model)
    examples = build_examples(config.task, model.tokenizer)
    prompts = render_all(model, examples, template=config.template)
    rows = []
    for prompt in tqdm(prompts, desc="patch examples", disable=not progress):
        c = corrupt_answer(prompt, model.tokenizer, seed=config.task.seed)
        res = patch_heads(
            model,
            c.clean,
            c.corrupt,
            logit_diff_metric(c.clean_token, c.corrupt_token),
            direction=config.direction,
            batch_size=config.batch_size,
        )
        n_layers, n_heads = res.values.shape
        recovery = res.recovery if res.clean != res.corrupt else res.values * float("nan")
        for la in range(n_layers):
            for h in range(n_heads):
                rows.append(
                    {
                        "example_id": prompt.example_id,
                        "layer": la,
                        "head": h,
                        "head_name": f"L{la}H{h}",
                        "value": float(res.values[la, h]),
                        "recovery": float(recovery[la, h]),
                        "clean_metric": res.clean,
                        "corrupt_metric": res.corrupt,
                        "corrupted_position": c.position,
                    }
                )
    card = model_card(model)
    df = pd.DataFrame(rows).assign(
        model=card.id, direction=config.direction, config_hash=store.config_hash(config)
    )
    # Only pairs where the corruption flips the preference say anything about recovery.
    valid = df[(df["clean_metric"] > 0) & (df["corrupt_metric"] < 0)]
    heads = (
        (valid if not valid.empty else df)
        .groupby(["layer", "head", "head_name"])["recovery"]
        .mean()
        .reset_index()
        .assign(n_examples=valid["example_id"].nunique(), model=card.id)
    )
    out.mkdir(parents=True, exist_ok=True)
    store.write_json(out / "config.json", dataclasses.asdict(config))
    write_jsonl(examples, out / "examples.jsonl")
    store.write_table(df, out / "patch.csv")
    store.write_table(heads, out / "heads.parquet")
    fig = head_heatmap(
        heads,
        value="recovery",
        title=f"{card.id} · {config.direction} patching: mean normalised recovery per head "
        f"(n={heads['n_examples'].iloc[0]})",
    )
    store.write_figure(fig, out / "recovery", formats=("html", "png") if png else ("html",))
    store.write_json(
        out / "provenance.json",
        store.provenance(
            **_run_facts(card, config),
            n_examples=len(prompts),
            n_flipped=int(valid["example_id"].nunique()),
            timings={"load_s": round(t_load, 3), "total_s": round(time.perf_counter() - t0, 3)},
        ),
    )
    store.write_table(df, out / "patch.parquet")  # last: marks a complete run
    return out
