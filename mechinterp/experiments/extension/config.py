"""The extension pipeline's config: the base model, the variants, each stage's settings, and the
claims' thresholds; `tasks` runs it over several tasks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from mechinterp.errors import InputError
from mechinterp.experiments.specs import DEVICE_ALIASES, MODEL_ALIASES, ModelSpec
from mechinterp.experiments.study.config import DetectStage, KnockoutScope
from mechinterp.finetune.lofit import LofitSpec
from mechinterp.finetune.lora import LoraSpec

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
    """numbers of each model's own top heads to knock out (and of random heads outside its top
    max(ks)), comma-separated"""
    seeds: tuple[int, ...] = tuple(range(10))
    """seeds of the random baseline: one draw per seed, k and draw kind, comma-separated (cheap
    here: only the response is recomputed)"""
    modes: tuple[Literal["zero", "uniform_attention"], ...] = ("zero",)
    """how a head is knocked out, comma-separated: zero its output, or uniform_attention (it
    attends uniformly to every key it sees)"""
    draws: tuple[Literal["layer_matched", "uniform"], ...] = ("layer_matched", "uniform")
    """random baselines, comma-separated: layer_matched (the top-k's per-layer counts, condition
    `random`, what the claim judges) and uniform over layers (`random_uniform`)"""
    scope: KnockoutScope = "response"
    """positions heads are knocked out at: response (prompt's last position on), query (also the
    question and template after the context), all (every one; slowest)"""
    target: Literal["response", "gold"] = "response"
    """what is teacher-forced: the model's own clean response, or the gold answer right after
    the prompt"""

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1 or not self.seeds or not self.modes:
            raise InputError("knockout needs ks >= 1, at least one seed and one mode")


@dataclass(frozen=True)
class LofitStage:
    """Optional learned localisation (LoFiT ranking, docs/concepts/scores.md): LoFiT from the base
    model on the reference variant's training examples. Scaling vectors on every head (L1) rank
    heads by ‖A‖₂; bias vectors are then trained on the top `top_share` of heads. The report
    compares the ranking with the reference model's retrieval scores."""

    spec: LofitSpec = field(default_factory=lambda: LofitSpec(steps=60))
    """LoFiT's training settings (`mechinterp.finetune.lofit.LofitSpec`), for both steps"""
    top_share: float = 0.05
    """share of heads, best by ‖A‖₂, that step 2 trains bias vectors on, in (0, 1]"""
    l1_sweep: tuple[float, ...] = ()
    """L1 strengths λ of step 1 to sweep (each its own run): the share of heads whose A stays
    non-zero, against the 3–10 % LoFiT's paper selects"""
    localised: bool = False
    """bias vectors (step 2) on the reference model's retrieval heads, on LoFiT's own top heads
    and on layer-matched random heads (as many of each), then task F1 of each on the evaluation
    examples, beside the base model and LoRA"""

    def __post_init__(self) -> None:
        if not 0 < self.top_share <= 1:
            raise InputError(f"top_share must lie in (0, 1], got {self.top_share}")
        if any(not lam >= 0 for lam in self.l1_sweep):
            raise InputError(f"l1_sweep values must be >= 0, got {self.l1_sweep}")


@dataclass(frozen=True)
class ExtensionClaims:
    """How the report judges the paper's claims (an interval and a minimum effect each; see
    `mechinterp.experiments.extension.report`)."""

    min_correlation: float = 0.5
    """recall predicts performance: Spearman ρ of recall with performance, at least this"""
    min_subset: float = 0.5
    """mostly a subset: the share of a synthetic model's heads among the reference model's
    (H_real), at least this"""
    min_gain: float = 0.0
    """Inter beats Rand: performance (F1, citation F1) after patching Inter minus after Rand,
    at least this"""
    k: int = 10
    """the knockout k whose rows are judged (the largest tested k when this one was not tested)"""
    min_drop: float = 0.2
    """necessary: share of answers retrieved under random-k minus under top-k, at least this"""
    n_boot: int = 2000
    """resamples of the correlations' descriptive percentile bootstrap (>= 100)"""
    level: float = 0.95
    """confidence level of every interval in the claims (0.95: 95 % intervals)"""
    seed: int = 0
    """seed of the correlations' bootstrap resamples"""

    def __post_init__(self) -> None:
        if not 0 < self.level < 1 or self.n_boot < 100:
            raise InputError("claims.level must lie in (0, 1) and claims.n_boot be >= 100")


@dataclass(frozen=True)
class TaskRun:
    """One task of a multi-task extension run: the task and what differs from the shared config
    (None keeps the shared value). `max_new_tokens` also sets detection's (a citation summary
    is longer than a short answer); `lofit` runs the config's LoFiT stages on this task."""

    task: Literal["mdqa", "multihop", "citation"]
    """the task"""
    n_docs: int | None = None
    """documents per synthetic example (none: the shared n_docs)"""
    doc_words: int | None = None
    """about how many words each synthetic document has (none: the shared doc_words)"""
    reference_data: str | None = None
    """this task's real data file for evaluation and task detection (none: synthetic only)"""
    max_new_tokens: int | None = None
    """tokens to generate per answer, detection's too (none: the shared settings)"""
    lofit: bool = False
    """run the config's LoFiT stages on this task"""


@dataclass(frozen=True)
class ExtensionConfig:
    FLAG_ALIASES: ClassVar[dict[str, str]] = {**MODEL_ALIASES, **DEVICE_ALIASES}

    model: ModelSpec = field(default_factory=ModelSpec)
    task: Literal["mdqa", "multihop", "citation"] = "mdqa"
    """the task every model is fine-tuned and evaluated on"""
    reference: str = "realistic-high"
    """the reference variant (realistic-high: realistic needles in real essays): its model's
    heads are the ones the others are compared with, and it is the patching donor"""
    reference_data: str | None = None
    """your real data for evaluation and task detection instead of the reference variant's
    synthetic examples (training stays synthetic): JSONL (mdqa, multihop), SummHay (citation)"""
    variants: tuple[str, ...] = ("realistic-low", "templated-high", "templated-low", "symbolic")
    """synthetic variants (realism-diversity), each fine-tuned and compared with the reference,
    comma-separated: realistic-high|realistic-low|templated-high|templated-low|symbolic"""
    n_train: int = 64
    """training examples per variant"""
    limited: int | None = None
    """"real data (limited)": also fine-tune the reference variant on only its first N training
    examples (a baseline beside the synthetic models, not in the correlation; none: no)"""
    n_eval: int = 16
    """held-out reference examples every model is evaluated, knocked out and patched on"""
    n_docs: int = 3
    """documents per synthetic example"""
    doc_words: int = 100
    """about how many words each synthetic document has"""
    lora: LoraSpec = field(default_factory=lambda: LoraSpec(steps=100, save_every=25))
    detect: DetectStage = field(default_factory=DetectStage)
    detect_on: Literal["niah", "task"] = "niah"
    """where each model's retrieval heads are detected: the NIAH grid detect.niah, or n_detect
    further reference examples (the gold answer in the gold document as the needle)"""
    n_detect: int = 16
    """reference examples to detect on with detect_on: task"""
    knockout: ModelKnockout = field(default_factory=ModelKnockout)
    cross_seeds: tuple[int, ...] = (0, 1, 2)
    """seeds of cross-model patching's Rand sets (|Inter| heads from neither model's set, in
    Inter's layers), one set per seed, comma-separated"""
    lofit: LofitStage | None = None
    """LoFiT from the base model on the reference data, a mapping of spec, top_share, l1_sweep
    and localised (none: no LoFiT)"""
    claims: ExtensionClaims = field(default_factory=ExtensionClaims)
    max_new_tokens: int = 32
    """tokens to generate per answer (evaluation, knockout, cross-model patching)"""
    template: Literal["chat", "plain"] | None = None
    """prompt template, in training and evaluation (none: chat when the tokenizer has one)"""
    tasks: tuple[TaskRun, ...] = ()
    """several tasks in one run (`TaskRun`s laid over this config): a run per task under
    `<run>/<task>/`, then recall vs performance over all synthetic models, task as stratum"""

    def __post_init__(self) -> None:
        from mechinterp.experiments.specs import parse_variant

        names = [t.task for t in self.tasks]
        if len(set(names)) < len(names):
            raise InputError(f"tasks repeat a task: {names}")
        if self.limited is not None and not 1 <= self.limited < self.n_train:
            raise InputError(
                f"limited must lie in [1, n_train) = [1, {self.n_train}), got {self.limited}"
            )

        for v in (self.reference, *self.variants):
            parse_variant(v)
        if self.reference in self.variants:
            raise InputError(f"variants repeat the reference variant {self.reference!r}")
        if not self.variants:
            raise InputError("at least one synthetic variant is needed")
        if self.n_train < 1 or self.n_eval < 1 or self.n_detect < 1:
            raise InputError("n_train, n_eval and n_detect must be >= 1")

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

