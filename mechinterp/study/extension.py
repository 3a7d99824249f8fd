"""The synthetic-context-extension pipeline (DESIGN.md "The question", steps 1–6), as shards:

1. `finetune/<variant>`: LoRA on the variant's training examples (the reference variant too).
2. `eval/<variant>`: the fine-tuned model on the *reference* task's held-out examples.
3. `detect/<variant>`: Wu retrieval scores of the fine-tuned model, on a NIAH grid or on further
   held-out reference examples (`detect_on`).
4. `knockout/<variant>`: the model's own top-k heads vs k random complement heads.
5. `cross/<variant>`: cross-model patching from the reference model (donor) into each synthetic
   model (recipient) on Inter / Compl / Rand head sets.
6. optionally `lofit/<reference>`: LoFiT from the base on the reference data.

Then, from the tables alone (`extension_report.analyse`): head recall / subset share / Jaccard /
Spearman vs the reference model's heads, the recall–F1 correlation, the claims, report and
figures. Offline, the reference variant is `realistic-high` (realistic needles in real essay
text) and is labelled as such in every table; `reference_data` takes a user's real JSONL file.
Every stage resumes (finished shards are skipped) and runs in-process or on Ray.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from mechinterp import store
from mechinterp.finetune.lofit import LofitSpec
from mechinterp.finetune.lora import LoraSpec
from mechinterp.runner import Engine, Shard, ShardStats, run_shards
from mechinterp.runs.common import ModelSpec
from mechinterp.study.config import ClaimSettings, DetectStage, KnockoutScope

REFERENCE_LABEL = "reference (realistic needles in real essays)"
#: The model key of the "real data (limited)" baseline: the reference variant fine-tuned on only
#: the first `limited` of its training examples.
LIMITED = "limited"
#: The task metric the extension calls performance (recall is correlated with it, cross-model
#: patching recovers it): token F1 of the answer, or citation F1 on the citation task.
PERFORMANCE = {"citation": "citation_f1"}


def performance_metric(task: str) -> str:
    return PERFORMANCE.get(task, "f1")


@dataclass(frozen=True)
class ModelKnockout:
    """Step 5, per model: its own top-k heads vs k random heads from the complement of its top
    max(ks) (one draw per seed), on the reference task's held-out examples. As in the study, each
    example is answered once and the response teacher-forced under every condition; the answer
    counts as retrieved while every answer token stays the greedy choice."""

    ks: tuple[int, ...] = (5, 10)
    seeds: tuple[int, ...] = tuple(range(10))  # cheap here: only the response is recomputed
    modes: tuple[Literal["zero", "uniform_attention"], ...] = ("zero",)
    draws: tuple[Literal["layer_matched", "uniform"], ...] = ("layer_matched", "uniform")
    scope: KnockoutScope = "response"
    target: Literal["response", "gold"] = "response"  # gold: teacher-force the gold answer

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1 or not self.seeds or not self.modes:
            raise ValueError("knockout needs ks >= 1, at least one seed and one mode")


@dataclass(frozen=True)
class LofitStage:
    """Optional (DESIGN.md "Learned localisation"): LoFiT from the base model on the reference
    variant's training examples. Scaling vectors on every head (L1) rank heads by ‖A‖₂; bias
    vectors are then trained on the top `top_share` of heads. The report compares the ranking
    with the reference model's retrieval scores."""

    spec: LofitSpec = field(default_factory=lambda: LofitSpec(steps=60))
    top_share: float = 0.05
    #: L1 strengths λ of step 1 to sweep (each its own run): the share of heads whose A stays
    #: non-zero, against the 3–10 % LoFiT's paper selects.
    l1_sweep: tuple[float, ...] = ()
    #: Bias vectors (step 2) on the reference model's retrieval heads, on LoFiT's own top heads
    #: and on layer-matched random heads (as many of each), then task F1 of each on the
    #: evaluation examples, beside the base model and LoRA.
    localised: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.top_share <= 1:
            raise ValueError(f"top_share must lie in (0, 1], got {self.top_share}")
        if any(not lam >= 0 for lam in self.l1_sweep):
            raise ValueError(f"l1_sweep values must be >= 0, got {self.l1_sweep}")


@dataclass(frozen=True)
class ExtensionClaims:
    """How the report judges the paper's claims (a bootstrap CI and a minimum effect each; see
    `mechinterp.study.extension_report`)."""

    min_correlation: float = 0.5  # recall predicts performance: Spearman ρ
    min_subset: float = 0.5  # "mostly a subset": share of a synthetic model's heads in H_real
    min_gain: float = 0.0  # Inter minus Rand, F1 after patching
    k: int = 10  # the knockout k whose rows are judged (largest tested k when absent)
    min_drop: float = 0.2
    n_boot: int = 2000
    level: float = 0.95
    seed: int = 0

    __post_init__ = ClaimSettings.__post_init__  # the same checks of level and n_boot


@dataclass(frozen=True)
class TaskRun:
    """One task of a multi-task extension run: the task and what differs from the shared config
    (None keeps the shared value). `max_new_tokens` also sets detection's (a citation summary
    is longer than a short answer); `lofit` runs the config's LoFiT stages on this task."""

    task: Literal["mdqa", "multihop", "citation"]
    n_docs: int | None = None
    doc_words: int | None = None
    reference_data: str | None = None
    max_new_tokens: int | None = None
    lofit: bool = False


@dataclass(frozen=True)
class ExtensionConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    task: Literal["mdqa", "multihop", "citation"] = "mdqa"
    reference: str = "realistic-high"
    reference_data: str | None = None
    variants: tuple[str, ...] = ("realistic-low", "templated-high", "templated-low", "symbolic")
    n_train: int = 64
    #: "Real data (limited)": also fine-tune the reference variant on only its first `limited`
    #: training examples (a baseline model beside the synthetic ones; not in the correlation).
    limited: int | None = None
    n_eval: int = 16
    n_docs: int = 3
    doc_words: int = 100
    lora: LoraSpec = field(default_factory=lambda: LoraSpec(steps=100, save_every=25))
    detect: DetectStage = field(default_factory=DetectStage)
    detect_on: Literal["niah", "task"] = "niah"
    n_detect: int = 16
    knockout: ModelKnockout = field(default_factory=ModelKnockout)
    cross_seeds: tuple[int, ...] = (0, 1, 2)
    lofit: LofitStage | None = None
    claims: ExtensionClaims = field(default_factory=ExtensionClaims)
    max_new_tokens: int = 32
    template: Literal["chat", "plain"] | None = None
    #: Several tasks in one run: one extension run per task under `<run>/<task>/` (this config
    #: with the task's settings laid over it), then the recall–performance correlation pooled
    #: over every task's synthetic models with the task as a stratum (`extension_tasks`).
    tasks: tuple[TaskRun, ...] = ()

    def __post_init__(self) -> None:
        from mechinterp.runs.common import parse_variant

        names = [t.task for t in self.tasks]
        if len(set(names)) < len(names):
            raise ValueError(f"tasks repeat a task: {names}")
        if self.limited is not None and not 1 <= self.limited < self.n_train:
            raise ValueError(
                f"limited must lie in [1, n_train) = [1, {self.n_train}), got {self.limited}"
            )

        for v in (self.reference, *self.variants):
            parse_variant(v)
        if self.reference in self.variants:
            raise ValueError(f"variants repeat the reference variant {self.reference!r}")
        if not self.variants:
            raise ValueError("at least one synthetic variant is needed")
        if self.n_train < 1 or self.n_eval < 1 or self.n_detect < 1:
            raise ValueError("n_train, n_eval and n_detect must be >= 1")

    @property
    def slug(self) -> str:
        task = "+".join(t.task for t in self.tasks) if self.tasks else self.task
        return f"extension-{Path(self.model.name).name}-{task}"

    @property
    def models(self) -> tuple[str, ...]:
        """Every fine-tuned model's key: the reference, the limited baseline, the variants."""
        return (self.reference, *((LIMITED,) if self.limited else ()), *self.variants)

    def for_task(self, run: TaskRun) -> ExtensionConfig:
        """This config for one task of a multi-task run."""
        keep = {k: getattr(self, k) for k in ("n_docs", "doc_words", "max_new_tokens")}
        given = {k: getattr(run, k) for k in keep if getattr(run, k) is not None}
        detect = self.detect
        if run.max_new_tokens is not None:  # a task's answers are as long in detection
            detect = dataclasses.replace(detect, max_new_tokens=run.max_new_tokens)
        return dataclasses.replace(
            self, task=run.task, tasks=(), reference_data=run.reference_data, detect=detect,
            lofit=self.lofit if run.lofit else None, **{**keep, **given},
        )  # fmt: skip


SPLITS = {"train": 0, "eval": 1, "detect": 2}  # split -> generation seed (disjoint examples)


def data_args(
    config: ExtensionConfig, variant: str, split: Literal["train", "eval", "detect"]
) -> dict:
    """What builds one split of one variant (only these go into a shard's inputs, so changing
    another part of the config does not recompute the shard). A user's `reference_data` file
    serves evaluation; detection on the task uses the held-out examples after those."""
    n = {"train": config.n_train, "eval": config.n_eval, "detect": config.n_detect}[split]
    if variant == LIMITED:  # the reference's first `limited` training examples
        variant, n = config.reference, config.limited if split == "train" else n
    user = config.reference_data if split != "train" else None
    return {
        "task": config.task,
        "variant": variant,
        "n": n,
        "seed": SPLITS[split],
        "n_docs": config.n_docs,
        "doc_words": config.doc_words,
        "data": user,
        **({"skip": config.n_eval} if user and split == "detect" else {}),
    }


def build_data(*, task, variant, n, seed, n_docs, doc_words, data, skip=0) -> list:
    """A variant's synthetic examples, or examples `skip`..`skip + n` of a user's file."""
    from mechinterp.runs.common import qa_examples

    exs = qa_examples(task, data=data, n=n, variant=variant, n_docs=n_docs, seed=seed,
                      doc_words=doc_words, skip=skip)  # fmt: skip
    if not exs and data:
        raise ValueError(
            f"{data} holds no {task} examples after the first {skip}: point reference_data "
            "at a file with more examples, or lower n_eval / n_detect"
        )
    if not exs:
        raise ValueError(f"variant {variant!r} produced no {task} examples; raise n")
    return exs


# ---------------------------------------------------------------- shard functions


def finetune_shard(
    model, *, base: dict, data: dict, lora: dict, template, directory: str,
    label: str | None = None,
) -> pd.DataFrame:  # fmt: skip
    """Train one model's LoRA adapter; one row per step (loss). `label`: the model's key where
    it is not its data's variant (the limited-real baseline)."""
    from mechinterp.finetune.lora import train_lora

    result = train_lora(base["name"], build_data(**data), LoraSpec(**lora), directory,
                        device=base["device"], template=template, progress=False)  # fmt: skip
    return pd.DataFrame({"variant": label or data["variant"],
                         "step": range(1, len(result.losses) + 1),
                         "loss": result.losses, "seconds": result.seconds})  # fmt: skip


def _load(base: dict, checkpoint: str):
    from mechinterp.models import load_model

    return load_model(checkpoint, dtype=base["dtype"], device=base["device"])


def eval_shard(
    model, *, base: dict, data: dict, variant: str, checkpoint: str, trained: str,
    max_new_tokens: int, template,
) -> pd.DataFrame:  # fmt: skip
    """The fine-tuned model on the reference task's held-out examples (`trained`: the
    checkpoint's fingerprint, part of the shard's inputs only)."""
    from mechinterp.evaluate import evaluate

    df = evaluate(_load(base, checkpoint), build_data(**data), max_new_tokens=max_new_tokens,
                  template=template, score=True, progress=False)  # fmt: skip
    return df.assign(model_variant=variant)


def detect_model_shard(
    model, *, base: dict, detect: dict, data: dict | None, variant: str, checkpoint: str,
    trained: str, template,
) -> pd.DataFrame:  # fmt: skip
    """Retrieval scores of the fine-tuned model (instance × head rows): on the NIAH grid
    (needle span), or with `data` on the reference task's own examples, where the needle is the
    gold answer's span in the gold document (models fine-tuned on short answers copy just that)."""
    from mechinterp.config import from_dict
    from mechinterp.study.stages import detect_shard
    from mechinterp.tasks.niah import niah_grid

    d, fine = from_dict(DetectStage, detect), _load(base, checkpoint)
    if data is None:
        g = d.niah
        exs = niah_grid(fine.tokenizer, lengths=g.lengths, depths=g.depths,
                        needles=list(g.needles), haystack=g.haystack, seed=g.seed)  # fmt: skip
    else:
        exs = build_data(**data)
    # the citation task's model copies its insights (planted verbatim: the needles)
    span = "answer" if data is not None and data["task"] != "citation" else "needle"
    return detect_shard(fine, examples=[e.to_dict() for e in exs], convention=d.convention,
                        gate=d.gate, max_new_tokens=d.max_new_tokens, batch_size=d.batch_size,
                        template=template, span=span).assign(model_variant=variant)  # fmt: skip


def knockout_model_shard(
    model, *, base: dict, data: dict, variant: str, checkpoint: str, trained: str,
    ranked: list[str], shape: list[int], knockout: dict, max_new_tokens: int, template,
) -> pd.DataFrame:  # fmt: skip
    """A model's own top-k heads vs random complement heads on the reference task (the study's
    knockout: answered once, then every condition teacher-forced in one batch per example)."""
    from mechinterp.config import from_dict
    from mechinterp.heads import HeadShape, parse_heads
    from mechinterp.study.stages import baseline_shard, knockout_conditions, knockout_shard

    ko, fine = from_dict(ModelKnockout, knockout), _load(base, checkpoint)
    exs = [e.to_dict() for e in build_data(**data)]
    clean = baseline_shard(fine, examples=exs, max_new_tokens=max_new_tokens, batch_size=4,
                           target=ko.target, template=template)  # fmt: skip
    keep = clean["scorable"].to_numpy()
    grid = HeadShape(shape[0], shape[1], shape[1])
    conds = knockout_conditions(parse_heads(ranked, grid), grid, ks=ko.ks, seeds=ko.seeds,
                                modes=ko.modes, draws=ko.draws)  # fmt: skip
    responses = [{"response_ids": list(r.target_ids), "answer_start": int(r.answer_start),
                  "answer_end": int(r.answer_end)} for r in clean[keep].itertuples()]  # fmt: skip
    if not responses:  # the model never wrote the answer: nothing to knock out
        return pd.DataFrame()
    kept = [e for e, k in zip(exs, keep, strict=True) if k]
    df = knockout_shard(fine, examples=kept, responses=responses, conditions=conds,
                        scope=ko.scope, template=template)  # fmt: skip
    return df.assign(model_variant=variant, n_answered=len(kept), n_examples=len(exs))


def lofit_shard(model, *, base: dict, data: dict, lofit: dict, directory: str) -> pd.DataFrame:
    """LoFiT step 1 (scales, every head) then step 2 (biases, top heads), from the base model;
    both saved under `directory`. One row per head: its ‖A‖₂, rank and whether step 2 tuned it."""
    import math

    from mechinterp.config import from_dict
    from mechinterp.finetune.lofit import train_lofit_biases, train_lofit_scales

    stage, exs = from_dict(LofitStage, lofit), build_data(**data)
    device = base["device"] or "cpu"
    scales = train_lofit_scales(base["name"], exs, stage.spec, progress=False, device=device)
    scales.save(directory)
    norms = scales.norms()
    top = scales.ranking()[: max(1, math.ceil(stage.top_share * len(norms)))]
    biases = train_lofit_biases(base["name"], exs, top, stage.spec, progress=False, device=device)
    biases.save(directory)
    chosen = {str(h) for h in top}
    return norms.assign(model_variant=data["variant"], bias_tuned=norms["head_name"].isin(chosen),
                        scale_loss=scales.losses[-1], bias_loss=biases.losses[-1],
                        seconds=scales.seconds + biases.seconds)  # fmt: skip


def lofit_sweep_shard(model, *, base: dict, data: dict, spec: dict, l1: float) -> pd.DataFrame:
    """LoFiT step 1 at one L1 strength, from the base model on the reference data: how many
    heads keep a non-zero scaling vector A (LoFiT's selection)."""
    from mechinterp.config import from_dict
    from mechinterp.finetune.lofit import train_lofit_scales

    lofit_spec = dataclasses.replace(from_dict(LofitSpec, spec), l1=l1)
    scales = train_lofit_scales(base["name"], build_data(**data), lofit_spec, progress=False,
                                device=base["device"] or "cpu")  # fmt: skip
    norms = scales.norms()["norm"]
    return pd.DataFrame([{
        "l1": l1, "n_heads": len(norms), "n_selected": int((norms > 0).sum()),
        "share_selected": float((norms > 0).mean()), "loss": scales.losses[-1],
        "seconds": scales.seconds,
    }])  # fmt: skip


def lofit_localised_shard(
    model, *, base: dict, data: dict, eval_data: dict, spec: dict, head_set: str,
    heads: list[str], max_new_tokens: int, template,
) -> pd.DataFrame:  # fmt: skip
    """LoFiT bias vectors (step 2) on `heads` from the base model on the reference data, then the
    base model with them on the evaluation examples (no heads: the base model alone)."""
    from mechinterp.config import from_dict
    from mechinterp.evaluate import evaluate
    from mechinterp.finetune.lofit import apply_lofit, train_lofit_biases

    bridge, exs = _load(base, base["name"]), build_data(**eval_data)
    kw = {"max_new_tokens": max_new_tokens, "template": template, "score": True,
          "progress": False}  # fmt: skip
    if not heads:
        return evaluate(bridge, exs, **kw).assign(head_set=head_set, n_heads=0)
    biases = train_lofit_biases(base["name"], build_data(**data), heads, from_dict(LofitSpec, spec),
                                progress=False, device=base["device"] or "cpu")  # fmt: skip
    with apply_lofit(bridge, biases):
        df = evaluate(bridge, exs, **kw)
    return df.assign(head_set=head_set, n_heads=len(heads), bias_loss=biases.losses[-1])


def cross_shard(
    model, *, base: dict, data: dict, variant: str, donor: str, recipient: str,
    sets: dict[str, list[str]], max_new_tokens: int, trained: list[str], template,
) -> pd.DataFrame:  # fmt: skip
    """Reference model's head outputs patched into a synthetic model on each head set."""
    from mechinterp.interventions.cross import cross_model_patching

    df = cross_model_patching(_load(base, donor), _load(base, recipient), build_data(**data),
                              sets, max_new_tokens=max_new_tokens, template=template,
                              progress=False)  # fmt: skip
    sizes = {name: len(hs) for name, hs in sets.items()}
    return df.assign(model_variant=variant, set_size=df["condition"].map(sizes).fillna(0))


def lofit_head_sets(lofit: pd.DataFrame, retrieval, shape) -> dict[str, list[str]]:
    """The localised LoFiT runs: no heads (the base model), the reference model's retrieval heads,
    LoFiT's own top heads by ‖A‖₂ and layer-matched random heads (neither set), as many of each."""
    from mechinterp.analysis.headsets import draw_baseline
    from mechinterp.heads import parse_heads

    retrieval = list(parse_heads([str(h) for h in retrieval], shape))
    sets: dict[str, list[str]] = {"base": []}
    if not retrieval:
        return sets
    top = list(parse_heads(lofit.sort_values("rank")["head_name"].head(len(retrieval)), shape))
    rand = draw_baseline(retrieval + top, retrieval, shape, seed=0, draw="layer_matched")
    sets.update({"retrieval": [str(h) for h in retrieval], "lofit": [str(h) for h in top],
                 "random": [str(h) for h in rand]})  # fmt: skip
    return sets


# ---------------------------------------------------------------- analysis (tables only)


def model_scores(per_instance: pd.DataFrame, detect: DetectStage) -> pd.DataFrame:
    """Per model and head: score, frequency, rank (`combine_detect` per model); a model none of
    whose instances passed the gate gets NaN scores and no heads, with a warning."""
    from mechinterp.study.stages import combine_detect

    frames = []
    for v, g in per_instance.groupby("model_variant", sort=False):
        try:
            frames.append(combine_detect(g, detect.threshold, detect.top_k))
        except ValueError as e:  # no instance passed the gate: this model gets no heads
            warnings.warn(f"{v}: {e}; its head set is empty", stacklevel=2)
            frames.append(_no_heads(g))
        frames[-1] = frames[-1].assign(model_variant=v)
    return pd.concat(frames, ignore_index=True)


def head_sets(scores: pd.DataFrame, detect: DetectStage) -> dict[str, list[str]]:
    """Each model's retrieval heads (score > threshold, or its top_k), best first."""
    out = {}
    for variant, g in scores.groupby("model_variant", sort=False):
        g = g[g["score"].notna()]  # a model with no gated instance has no scores, no heads
        g = g.sort_values(["score", "layer", "head"], ascending=[False, True, True])
        chosen = g.head(detect.top_k) if detect.top_k else g[g["score"] > detect.threshold]
        out[variant] = list(chosen["head_name"])
    return out


def compare_heads(scores: pd.DataFrame, sets: dict[str, list[str]], reference: str) -> pd.DataFrame:
    """Per model: recall of the reference model's heads, the share of its own heads that are
    reference heads (`subset_share`; "mostly a subset"), Jaccard, Spearman of the score vectors
    (NaN where a set is empty)."""
    from scipy import stats

    from mechinterp.analysis.headsets import jaccard, precision, recall
    from mechinterp.heads import parse_heads

    def defined(fn, a, b) -> float:
        try:
            return fn(a, b)
        except ValueError:  # an empty set: the metric is undefined
            return float("nan")

    parsed = {v: list(parse_heads(hs)) for v, hs in sets.items()}
    ref = parsed[reference]
    ref_scores = scores[scores["model_variant"] == reference].set_index("head_name")["score"]
    rows = []
    for variant, heads in parsed.items():
        mine = scores[scores["model_variant"] == variant].set_index("head_name")["score"]
        mine = mine.reindex(ref_scores.index)
        varied = mine.nunique() > 1 and ref_scores.nunique() > 1
        rows.append({
            "model_variant": variant,
            "n_heads": len(heads),
            "recall": defined(recall, heads, ref),
            "subset_share": defined(precision, heads, ref),
            "jaccard": defined(jaccard, heads, ref),
            "spearman": (
                float(stats.spearmanr(mine, ref_scores).statistic) if varied else float("nan")
            ),
            "synthetic_subset_of_reference": set(heads) <= set(ref),
        })  # fmt: skip
    return pd.DataFrame(rows)


def _no_heads(per_instance: pd.DataFrame) -> pd.DataFrame:
    """The score table of a model none of whose detection instances passed the gate."""
    from mechinterp.heads import Head

    heads = per_instance.drop_duplicates(["layer", "head"])[["layer", "head"]]
    names = [str(Head(a, b)) for a, b in zip(heads["layer"], heads["head"], strict=True)]
    return heads.assign(head_name=names, score=float("nan"), frequency=float("nan"),
                        rank=range(1, len(heads) + 1), retrieval_head=False,
                        n_instances=0).reset_index(drop=True)  # fmt: skip


def finetune_shards(config: ExtensionConfig, checkpoints: Path) -> list[Shard]:
    """Stage 1: one LoRA fine-tune per variant, the reference first."""
    from mechinterp.config import to_dict

    return [Shard(f"finetune/{v}", finetune_shard, {
        "base": to_dict(config.model), "data": data_args(config, v, "train"),
        "lora": to_dict(config.lora), "template": config.template,
        "directory": str(checkpoints / v), **({"label": v} if v == LIMITED else {})})
        for v in config.models]  # fmt: skip


def run_extension(
    config: ExtensionConfig,
    root: str | Path = "runs",
    *,
    out: str | Path | None = None,
    engine: Engine = "local",
    ray_address: str | None = None,
    png: bool | None = True,
    progress: bool = True,
) -> Path:
    """Run (or resume) the pipeline; write its tables (`losses`, `eval`, `detect_instances`,
    `knockout`, `cross`), then the analysis from those tables alone (`extension_report.analyse`:
    head sets and recall, the correlation, claims, report.md and figures; `png=False`: HTML
    figures only, `png=None`: none)."""
    from mechinterp.config import to_dict
    from mechinterp.heads import HeadShape
    from mechinterp.interventions.cross import patch_head_sets
    from mechinterp.study.extension_report import analyse

    if config.tasks:
        from mechinterp.study.extension_tasks import run_tasks

        return run_tasks(config, root, out=out, engine=engine, ray_address=ray_address, png=png,
                         progress=progress)  # fmt: skip
    out = Path(out) if out is not None else store.run_dir(root, config.slug, config)
    out.mkdir(parents=True, exist_ok=True)
    store.write_json(out / "config.json", to_dict(config))
    t0, stats, timings = time.perf_counter(), ShardStats(), {}
    shard_dir, ckpt = out / "shards", out / "checkpoints"
    everyone = config.models
    common = {"model": None, "engine": engine, "ray_address": ray_address, "progress": progress,
              "stats": stats, "load": False}  # fmt: skip
    for v in everyone:  # a finished fine-tune shard needs its checkpoint too
        if not (ckpt / v / "adapter_config.json").is_file():
            for suffix in (".json", ".parquet"):
                (shard_dir / "finetune" / f"{v}{suffix}").unlink(missing_ok=True)
    base, ev, tpl = (
        to_dict(config.model),
        data_args(config, config.reference, "eval"),
        config.template,
    )

    def stage(name, shards, desc):
        t = time.perf_counter()
        df = run_shards(shards, shard_dir, desc=desc, **common)
        timings[f"{name}_s"] = round(time.perf_counter() - t, 1)
        return df

    finetune = finetune_shards(config, ckpt)
    losses = stage("finetune", finetune, "1/5 fine-tune")
    point = {v: str(ckpt / v) for v in everyone}
    # a checkpoint's fingerprint: later shards that read it recompute when it is retrained
    trained = {v: s.args_hash for v, s in zip(everyone, finetune, strict=True)}
    evals = stage("eval", [Shard(f"eval/{v}", eval_shard, {
        "base": base, "data": ev, "variant": v, "checkpoint": point[v], "trained": trained[v],
        "max_new_tokens": config.max_new_tokens, "template": tpl}) for v in everyone],
        "2/5 evaluate")  # fmt: skip
    on_task = data_args(config, config.reference, "detect") if config.detect_on == "task" else None
    per = stage("detect", [Shard(f"detect/{v}", detect_model_shard, {
        "base": base, "detect": to_dict(config.detect), "data": on_task, "variant": v,
        "checkpoint": point[v], "trained": trained[v], "template": tpl}) for v in everyone],
        "3/5 detect")  # fmt: skip
    scores = model_scores(per, config.detect)
    sets = head_sets(scores, config.detect)
    # the head grid, read from the score table (random heads only need layers × heads)
    n_layers, n_heads = int(scores["layer"].max()) + 1, int(scores["head"].max()) + 1
    shape = HeadShape(n_layers, n_heads, n_heads)
    ko_shards = []
    for v, g in scores.groupby("model_variant", sort=False):
        if g["score"].notna().any():  # a model with no scores has no ranking to knock out
            ranked = g.sort_values("rank")["head_name"].tolist()
            ko_shards.append(Shard(f"knockout/{v}", knockout_model_shard, {
                "base": base, "data": ev, "variant": v, "checkpoint": point[v],
                "trained": trained[v], "ranked": ranked, "shape": [n_layers, n_heads],
                "knockout": to_dict(config.knockout), "max_new_tokens": config.max_new_tokens,
                "template": tpl}))  # fmt: skip
    knockout = stage("knockout", ko_shards, "4/5 knockout")
    cross_shards = []
    for v in config.variants if sets[config.reference] else ():
        built = patch_head_sets(sets[config.reference], sets[v], shape, seeds=config.cross_seeds)
        named = {k: [str(h) for h in hs] for k, hs in built.items()}
        cross_shards.append(Shard(f"cross/{v}", cross_shard, {
            "base": base, "data": ev, "variant": v, "donor": point[config.reference],
            "recipient": point[v], "sets": named, "max_new_tokens": config.max_new_tokens,
            "trained": [trained[config.reference], trained[v]], "template": tpl}))  # fmt: skip
    cross = stage("cross", cross_shards, "5/5 cross-model patching")
    lofit = pd.DataFrame()
    if config.lofit is not None:
        lofit = stage("lofit", [Shard(f"lofit/{config.reference}", lofit_shard, {
            "base": base, "data": data_args(config, config.reference, "train"),
            "lofit": to_dict(config.lofit), "directory": str(ckpt / f"lofit-{config.reference}")})],
            "LoFiT (reference data)")  # fmt: skip
    sweep, localised = pd.DataFrame(), pd.DataFrame()
    if config.lofit is not None and config.lofit.l1_sweep:
        sweep = stage("lofit_sweep", [Shard(f"lofit_sweep/l1-{lam:g}", lofit_sweep_shard, {
            "base": base, "data": data_args(config, config.reference, "train"),
            "spec": to_dict(config.lofit.spec), "l1": float(lam)})
            for lam in config.lofit.l1_sweep], "LoFiT λ sweep")  # fmt: skip
    if config.lofit is not None and config.lofit.localised and len(lofit):
        localised = stage("lofit_localised", [
            Shard(f"lofit_localised/{name}", lofit_localised_shard, {
                "base": base, "data": data_args(config, config.reference, "train"),
                "eval_data": ev, "spec": to_dict(config.lofit.spec), "head_set": name,
                "heads": heads, "max_new_tokens": config.max_new_tokens, "template": tpl})
            for name, heads in lofit_head_sets(lofit, sets[config.reference], shape).items()],
            "LoFiT on retrieval, LoFiT-selected and random heads")  # fmt: skip
    for name, df in (("losses", losses), ("eval", evals), ("detect_instances", per),
                     ("knockout", knockout), ("cross", cross), ("lofit", lofit),
                     ("lofit_sweep", sweep), ("lofit_localised", localised)):  # fmt: skip
        if len(df):
            store.write_table(df, out / f"{name}.parquet")
        else:
            (out / f"{name}.parquet").unlink(missing_ok=True)
    timings["total_s"] = round(time.perf_counter() - t0, 1)  # the shards; analysis follows
    store.write_json(out / "provenance.json", store.provenance(
        engine=engine, spec=asdict(config.lora),
        shards={"computed": len(stats.computed), "skipped": len(stats.skipped)},
        timings=timings))  # fmt: skip
    analyse(out, png=png)
    return out
