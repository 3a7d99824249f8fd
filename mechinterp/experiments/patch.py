"""Activation patching runs: per-head patching against a corruption within one model, and
cross-model patching of head sets from a donor into a recipient."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

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

#: Patching's default: 4 NIAH instances of 256 tokens, needle mid-context.
PATCH_TASK = TaskSpec(lengths=(256,), depths=(0.5,), needles=4)

#: Wu et al.'s retrieval-head threshold: heads scoring above it form a score table's head set.
RETRIEVAL_THRESHOLD = 0.1


@dataclass(frozen=True)
class HeadSelection:
    """Which heads a run singles out: an explicit list (`heads`), or those a head-score table
    (`scores`: a detection run or its scores.parquet/csv) selects by score > `threshold` or as
    the `top_k` best."""

    heads: tuple[str, ...] = ()
    scores: str | None = None
    threshold: float | None = RETRIEVAL_THRESHOLD
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.heads and self.scores:
            raise ValueError("give a head list or a score table, not both")
        if self.top_k is not None:
            if self.top_k < 1:
                raise ValueError(f"top_k must be >= 1, got {self.top_k}")
            object.__setattr__(self, "threshold", None)
        if self.scores is not None and not Path(self.scores).exists():
            raise ValueError(f"scores {self.scores} does not exist")

    def __bool__(self) -> bool:
        return bool(self.heads or self.scores)

    def resolve(self, shape) -> tuple:
        from mechinterp.heads import parse_heads

        if self.heads:
            return parse_heads(self.heads, shape)
        if self.scores:
            return heads_from_scores(self.scores, shape, threshold=self.threshold, top_k=self.top_k)
        return ()


@dataclass(frozen=True)
class PatchConfig:
    """Per-head patching between each instance and its corruption (the first answer token in the
    needle replaced by another word's token); metric: logit(clean token) − logit(corrupt token)
    at the last prompt position. `select` names heads: a head list is the set to patch (the
    others are skipped); a score table marks its selected heads (`in_set`) while every head is
    patched, so the set's recovery can be compared with the rest."""

    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=lambda: PATCH_TASK)
    direction: Literal["denoise", "noise"] = "denoise"
    select: HeadSelection = field(default_factory=HeadSelection)
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
    """Write `patch.parquet` (+ `.csv`; one row per example and head: value, recovery, clean and
    corrupt metrics, `in_set`), `heads.parquet` (mean recovery per head over the pairs the
    corruption flips), `sets.csv` (mean recovery of the selected set vs the rest) and
    `recovery.html/.png`."""
    from tqdm.auto import tqdm

    from mechinterp.evaluate import render_all
    from mechinterp.heads import HeadShape
    from mechinterp.interventions.patching import logit_diff_metric, patch_heads
    from mechinterp.models import model_card
    from mechinterp.plots import head_heatmap
    from mechinterp.tasks.corrupt import corrupt_answer

    out = store.run_dir(root, config.slug, config)
    if (out / "patch.parquet").is_file() and not force:
        return out
    model, t0, t_load = _load(config, model)
    shape = HeadShape.of(model)
    chosen = config.select.resolve(shape)
    if config.select and not chosen:
        raise ValueError(
            f"the head selection {config.select} picks no heads; lower the threshold or use top_k"
        )
    patched = chosen if config.select.heads else None
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
            heads=patched,
            batch_size=config.batch_size,
            progress=progress,
        )
        recovery = res.recovery if res.clean != res.corrupt else res.values * float("nan")
        for h in patched or shape.all_heads():
            rows.append(
                {
                    "example_id": prompt.example_id,
                    "layer": h.layer,
                    "head": h.head,
                    "head_name": str(h),
                    "in_set": h in chosen,
                    "value": float(res.values[h.layer, h.head]),
                    "recovery": float(recovery[h.layer, h.head]),
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
    flipped = (df["clean_metric"] > 0) & (df["corrupt_metric"] < 0)
    valid = df[flipped] if flipped.any() else df
    heads = (
        valid.groupby(["layer", "head", "head_name", "in_set"])["recovery"]
        .mean()
        .reset_index()
        .assign(n_examples=valid["example_id"].nunique(), model=card.id)
    )
    sets = (
        valid.groupby(["in_set", "example_id"])["recovery"]
        .agg(mean_per_head="mean", total="sum", n_heads="size")
        .groupby("in_set")
        .mean()
        .reset_index()
    )
    sets.insert(0, "set", sets.pop("in_set").map({True: "selected", False: "rest"}))
    out.mkdir(parents=True, exist_ok=True)
    store.write_json(out / "config.json", dataclasses.asdict(config))
    write_jsonl(examples, out / "examples.jsonl")
    store.write_table(df, out / "patch.csv")
    store.write_table(heads, out / "heads.parquet")
    store.write_table(sets, out / "sets.csv")
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
            selected_heads=[str(h) for h in chosen],
            n_examples=len(prompts),
            n_flipped=int(df.loc[flipped, "example_id"].nunique()),
            timings={"load_s": round(t_load, 3), "total_s": round(time.perf_counter() - t0, 3)},
        ),
    )
    store.write_table(df, out / "patch.parquet")  # last: marks a complete run
    return out


# ---------------------------------------------------------------- cross-model patching runs


@dataclass(frozen=True)
class CrossPatchConfig:
    """Donor head outputs patched into the recipient (`model`) while the task runs, for each head
    set. The sets are one explicit list (`select.heads`), or the paper's Inter / Compl / Rand
    built from the donor's and the recipient's head-score tables (`select.scores` is the
    donor's, `recipient_scores` the recipient's; both selected by the same rule)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    donor: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=lambda: PATCH_TASK)
    select: HeadSelection = field(default_factory=HeadSelection)
    recipient_scores: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    max_new_tokens: int = 32
    batch_size: int = 24  # batch rows: examples × conditions run together
    template: Literal["chat", "plain"] | None = None

    def __post_init__(self) -> None:
        if not self.select:
            raise ValueError(
                "cross-model patching needs heads: a list (--heads) or the donor's and the "
                "recipient's score tables (--scores and --recipient-scores)"
            )
        if self.select.scores and not self.recipient_scores:
            raise ValueError("Inter / Compl / Rand need the recipient's scores too")
        if self.recipient_scores and not Path(self.recipient_scores).exists():
            raise ValueError(f"recipient scores {self.recipient_scores} do not exist")
        if min(self.max_new_tokens, self.batch_size) < 1:
            raise ValueError("max_new_tokens and batch_size must be >= 1")

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


def run_cross_patch(
    config: CrossPatchConfig,
    root: str | Path = "runs",
    *,
    model=None,
    donor=None,
    force: bool = False,
    png: bool = True,
    progress: bool = True,
) -> Path:
    """Write `cross.parquet` (+ `.csv`; one row per condition and example), `summary.csv` (mean
    metric and normalised recovery per condition), `head_sets.json` and `cross.html/.png`."""
    from mechinterp.heads import HeadShape
    from mechinterp.interventions.cross import cross_model_patching, summarise_cross
    from mechinterp.models import model_card
    from mechinterp.plots import cross_patch_bars

    out = store.run_dir(root, config.slug, config)
    if (out / "cross.parquet").is_file() and not force:
        return out
    model, t0, t_load = _load(config, model)
    donor = config.donor.load() if donor is None else donor
    sets = config.head_sets(HeadShape.of(model))
    examples = build_examples(config.task, model.tokenizer)
    df = cross_model_patching(
        donor,
        model,
        examples,
        sets,
        max_new_tokens=config.max_new_tokens,
        max_rows=config.batch_size,
        template=config.template,
        progress=progress,
    )
    card, donor_card = model_card(model), model_card(donor)
    df = df.assign(recipient=card.id, donor=donor_card.id, config_hash=store.config_hash(config))
    summary = summarise_cross(df)
    out.mkdir(parents=True, exist_ok=True)
    store.write_json(out / "config.json", dataclasses.asdict(config))
    store.write_json(out / "head_sets.json", {k: [str(h) for h in v] for k, v in sets.items()})
    write_jsonl(examples, out / "examples.jsonl")
    store.write_table(df, out / "cross.csv")
    store.write_table(summary, out / "summary.csv")
    fig = cross_patch_bars(
        summary, title=f"{donor_card.id} → {card.id} · {config.task.slug}: cross-model patching"
    )
    store.write_figure(fig, out / "cross", formats=("html", "png") if png else ("html",))
    store.write_json(
        out / "provenance.json",
        store.provenance(
            **_run_facts(card, config),
            donor_card=donor_card.to_dict(),
            n_examples=len(examples),
            timings={"load_s": round(t_load, 3), "total_s": round(time.perf_counter() - t0, 3)},
        ),
    )
    store.write_table(df, out / "cross.parquet")  # last: marks a complete run
    return out
