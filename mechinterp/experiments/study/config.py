"""The necessity & sufficiency study's config: one frozen dataclass, nested per stage.

Defaults are the embedded-model study that `make demo` runs on 2 CPU cores (`experiments/
study.yaml` spells them out); larger grids, other models and longer contexts are a YAML file or
a `--set key=value` away.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from mechinterp.config import EMPTY_SKIPS
from mechinterp.errors import InputError
from mechinterp.experiments.specs import DEVICE_ALIASES, MODEL_ALIASES, ModelSpec

#: Bump when the study's tables change meaning; a run directory written by another version is
#: refused rather than mixed with new shards.
STUDY_VERSION = 2

KnockoutScope = Literal["response", "query", "all"]  # interventions.knockout.Scope


@dataclass(frozen=True)
class NiahSpec:
    """A NIAH grid: needle indices (into `mechinterp.tasks.niah.NEEDLES`) × lengths × depths."""

    needles: tuple[int, ...] = (0, 1, 3, 11, 15)
    """NIAH needles, indices into `mechinterp.tasks.niah.NEEDLES` (0-15), comma-separated; the
    intervals resample needles (examples sharing one form a cluster)"""
    lengths: tuple[int, ...] = (256, 512, 1024)
    """NIAH context lengths in tokens (>= 64, within the model's context window), comma-separated"""
    depths: tuple[float, ...] = (0.2, 0.8)
    """NIAH needle depths in [0, 1] (0: the context's start, 1: its end), comma-separated"""
    haystack: Literal["essays", "filler"] = "essays"
    """NIAH haystack: Paul Graham essays, or repetitive filler"""
    seed: int = 0
    """seed of the haystacks (each (needle, length) starts at a seeded essay)"""

    def __post_init__(self) -> None:
        from mechinterp.tasks.niah import NEEDLES

        if not self.needles or any(not 0 <= i < len(NEEDLES) for i in self.needles):
            raise InputError(f"needles are indices in 0..{len(NEEDLES) - 1}, got {self.needles}")
        if not self.lengths or any(n < 64 for n in self.lengths):
            raise InputError(f"lengths must be token counts >= 64, got {self.lengths}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise InputError(f"depths must lie in [0, 1], got {self.depths}")


@dataclass(frozen=True)
class MdqaSpec:
    """Synthetic multi-document QA (one gold document among `n_docs`); `n = 0` leaves it out."""

    n: int = 12
    """synthetic MDQA examples (0: NIAH only)"""
    n_docs: int = 3
    """documents per MDQA example, one of them gold"""
    variant: str = "templated-high"
    """synthetic MDQA variant (needle realism-haystack diversity): realistic-high|realistic-low|
    templated-high|templated-low|symbolic"""
    seed: int = 1
    """seed of the MDQA examples"""

    def __post_init__(self) -> None:
        from mechinterp.experiments.specs import parse_variant

        if self.n < 0 or self.n_docs < 1:
            raise InputError("n must be >= 0 and n_docs >= 1")
        parse_variant(self.variant)


@dataclass(frozen=True)
class DetectStage:
    """Step 1: Wu retrieval scores on a NIAH grid; retrieval heads score > `threshold` (Wu's
    rule), or are the `top_k` best when it is set. The sparsity claim always uses `threshold`."""

    niah: NiahSpec = field(default_factory=NiahSpec)
    threshold: float = 0.1
    """retrieval heads score above this, in [0, 1) (Wu's rule); the sparsity claim always uses
    it, even when top_k picks the heads"""
    top_k: int | None = None
    """take the k best-scoring heads as the retrieval heads instead (none: score > threshold)"""
    convention: Literal["set", "per_step"] = "set"
    """retrieval score: count each needle token once (set, the paper) or every copying step
    (per_step, Wu's reference code)"""
    gate: float | None = 0.5
    """ROUGE-1 recall of the answer an instance needs (above this) to count (none: every one)"""
    max_new_tokens: int = 24
    """tokens to generate greedily per detection instance"""
    batch_size: int = 4
    """detection instances per forward"""

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold < 1.0:
            raise InputError(f"threshold must lie in [0, 1) (a retrieval score), "
                             f"got {self.threshold}")
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"top_k must be >= 1 (or null), got {self.top_k}")
        if self.gate is not None and not 0.0 <= self.gate < 1.0:
            raise InputError(f"gate must lie in [0, 1) (or null), got {self.gate}")
        if min(self.max_new_tokens, self.batch_size) < 1:
            raise InputError("max_new_tokens and batch_size must be >= 1")


@dataclass(frozen=True)
class KnockoutStage:
    """Step 2: top-k vs k random complement heads on held-out NIAH and synthetic MDQA.

    Each example is answered once without knockout (greedy). Under each condition the clean
    response is then teacher-forced and the answer counts as retrieved while every answer token
    stays the greedy choice. Scope `response` knocks the heads out where the response is written
    (the prompt's last position and every later one: the rows Wu et al.'s retrieval score reads)
    and shares the prompt's KV cache
    across conditions; `query` also covers the question and template after the context; `all`
    covers every position (no sharing: slowest). Patching uses the same positions.
    `target = "gold"` teacher-forces the gold answer right after the prompt instead of the
    model's response (for models that answer tersely, and for random test models that never
    answer)."""

    niah: NiahSpec = field(
        default_factory=lambda: NiahSpec(needles=(2, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14),
                                         lengths=(256, 1024), depths=(0.0, 0.5, 1.0), seed=1)
    )
    mdqa: MdqaSpec = field(default_factory=MdqaSpec)
    ks: tuple[int, ...] = (1, 2, 5, 10, 20)
    """numbers of heads to knock out (the top k, and k random heads outside the top max(ks)),
    comma-separated"""
    seeds: tuple[int, ...] = tuple(range(10))
    """seeds of the random baseline: one draw per seed, k and draw kind, comma-separated (the
    intervals resample the draws)"""
    modes: tuple[Literal["zero", "uniform_attention"], ...] = ("zero", "uniform_attention")
    """how a head is knocked out, comma-separated: zero its output, or uniform_attention (it
    attends uniformly to every key it sees)"""
    draws: tuple[Literal["layer_matched", "uniform"], ...] = ("layer_matched", "uniform")
    """random baselines, comma-separated, layer_matched first: the top-k's per-layer counts
    (condition `random`, what the verdict rests on), then uniform over layers (`random_uniform`)"""
    scope: KnockoutScope = "response"
    """positions heads are knocked out and patched at: response (prompt's last position on),
    query (also the question and template after the context), all (every one; slowest)"""
    target: Literal["response", "gold"] = "response"
    """what is teacher-forced: the model's own clean response, or the gold answer right after
    the prompt (for models that answer tersely or never answer)"""
    max_new_tokens: int = 32
    """tokens of each greedy clean response (and of the robustness stage's free generation)"""
    batch_size: int = 4
    """examples per forward while generating the clean responses"""
    examples_per_shard: int = 6
    """examples per unit of work (finished shards are kept across kills and reruns)"""

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise InputError(f"ks must be positive head counts, got {self.ks}")
        if not self.seeds:
            raise InputError("at least one seed is needed for the random baseline")
        if not self.modes:
            raise InputError("at least one knockout mode is needed")
        if (
            not self.draws
            or self.draws[0] != "layer_matched"
            or len(set(self.draws)) != len(self.draws)
        ):
            raise InputError(
                "draws must start with layer_matched (the verdict's baseline), optionally "
                f"followed by uniform; got {self.draws}"
            )
        if self.examples_per_shard < 1:
            raise InputError("examples_per_shard must be >= 1")


@dataclass(frozen=True)
class RobustnessStage:
    """Step 2c: where the necessity claim holds and where it does not. At the claim's k, on the
    knockout stage's answered examples, top-k against the same random draws (`seeds`, default
    the first 3 of `knockout.seeds`, in every draw of `knockout.draws`; `modes`, default the
    first of `knockout.modes`) under each of `scopes`, teacher-forced as in step 2
    (`knockout.scope`'s rows come from step 2 itself), and, with `generate`, by free greedy
    generation under `knockout.scope` (retrieved: the answer occurs in the generated text,
    normalised). The verdict stays on step 2's row. Empty `scopes` and `generate: false` skip it.
    Scope `all` shares no prefix: each condition costs a whole forward."""

    scopes: tuple[KnockoutScope, ...] = field(default=("response", "query", "all"),
                                              metadata=EMPTY_SKIPS)  # fmt: skip
    """knockout scopes to teacher-force the claim's conditions under, comma-separated
    (knockout.scope's rows are step 2's own; empty: none)"""
    generate: bool = True
    """also judge by free greedy generation under knockout.scope (retrieved: the answer occurs
    in the generated text)"""
    modes: tuple[Literal["zero", "uniform_attention"], ...] | None = None
    """knockout modes, comma-separated, among knockout.modes (none: the first of knockout.modes)"""
    seeds: tuple[int, ...] | None = None
    """random draws' seeds, comma-separated, among knockout.seeds (none: its first 3)"""
    examples_per_shard: int = 6
    """examples per unit of work (finished shards are kept across kills and reruns)"""

    def __post_init__(self) -> None:
        if self.seeds == () or self.modes == ():
            raise InputError("robustness needs at least one seed and one mode (or skip it with "
                             "scopes: [] and generate: false)")  # fmt: skip
        if self.examples_per_shard < 1:
            raise InputError("examples_per_shard must be >= 1")


@dataclass(frozen=True)
class PatchStage:
    """Step 3: per-head denoising patching, clean needle → corrupted needle, on held-out NIAH
    examples the model answered. One answer token of the needle is replaced (the first of up to
    `max_tries` whose replacement flips the model's preference); the metric is logit(clean token)
    − logit(corrupt token) where the clean response writes it. Heads are patched at the
    positions of the knockout scope (`knockout.scope`); the retrieval set and `seeds` random sets
    of the same size are also patched jointly."""

    n_pairs: int = 12
    """clean/corrupt pairs: held-out NIAH examples the model answered, spread over lengths ×
    depths and needles (the attribution and path stages reuse them)"""
    seeds: tuple[int, ...] = tuple(range(10))
    """seeds of the layer-matched random head sets (the retrieval set's size, one per seed,
    patched jointly beside it), comma-separated"""
    max_tries: int = 4
    """answer tokens of the needle tried in turn until replacing one flips the model's
    preference"""
    batch_size: int = 32
    """patched runs per forward (path patching's too)"""

    def __post_init__(self) -> None:
        if self.n_pairs < 0:
            raise InputError("n_pairs must be >= 0")


@dataclass(frozen=True)
class AttributionStage:
    """Step 3b: AtP and AtP* (GradDrop: a head's output has no QK fix) of every head's output on
    the patch stage's pairs, set beside that stage's exact per-head values (how well the cheap
    screen ranks the heads)."""

    enabled: bool = True
    """run AtP and AtP* of every head's output on the patch stage's pairs"""


@dataclass(frozen=True)
class PathsStage:
    """Step 3c: path patching of every head below the receivers, alone and all together, into
    the `receivers` best retrieval heads' `inputs` (q: queries, k: keys, v: values; under GQA
    a key or value input is the receiver's KV group's), on the patch stage's pairs. With q and
    k, all of them together also go into the queries and into the keys of the same query heads
    (the KV groups wholly inside the receivers, and their whole KV groups): the claims compare
    these. `via_mlps`: the MLPs in between recompute (the senders' effect through them counts).
    `scope`: the positions the senders are patched at (default `knockout.scope`, as patching;
    `all` patches them from the first corrupted token on, where the receivers' keys at the
    needle are written). Empty `inputs` skips it."""

    inputs: tuple[Literal["q", "k", "v"], ...] = field(default=("q", "k"), metadata=EMPTY_SKIPS)
    """receiver inputs the senders are patched into, comma-separated: q (queries), k (keys),
    v (values); empty: skip the stage"""
    receivers: int = 10
    """number of best-scoring retrieval heads that receive the paths"""
    via_mlps: bool = True
    """the MLPs in between recompute (the senders' effect through them counts)"""
    scope: KnockoutScope | None = None
    """positions the senders are patched at (none: knockout.scope; all: from the first corrupted
    token on)"""

    def __post_init__(self) -> None:
        if self.receivers < 1:
            raise InputError("paths.receivers must be >= 1")
        if len(set(self.inputs)) != len(self.inputs):
            raise InputError(f"paths.inputs repeats an input: {self.inputs}")


@dataclass(frozen=True)
class AddressingStage:
    """Step 3d: where the retrieval heads look and which upstream heads steer them, on address
    pairs of a NIAH grid (`mechinterp.tasks.address`): a question swap (the question asks for
    another needle in the same context) and a key swap (the needle's key phrase replaced, its
    answer kept). Pairs the model answers alike are left out. Per pair, the `receivers` best
    retrieval heads' attention mass on the asked needle, with their own queries or keys patched
    back, and every upstream head path-patched into their queries and keys with that mass as
    the metric, beside two hypotheses (previous-token heads into the keys, heads that read the
    question into the queries) and `draws` layer-matched random sets of the same `size` each.
    Empty `kinds` skips it."""

    kinds: tuple[Literal["question_swap", "key_swap"], ...] = field(default=(),
                                                                    metadata=EMPTY_SKIPS)
    """address corruptions, comma-separated: question_swap, key_swap; empty: skip the stage"""
    niah: NiahSpec = field(default_factory=lambda: NiahSpec(
        needles=tuple(range(16)), lengths=(300, 500), depths=(0.75,), seed=2))  # fmt: skip
    receivers: int = 10
    """number of best-scoring retrieval heads whose attention is read"""
    at: Literal["divergence", "prompt_end"] = "divergence"
    """where the heads are read: the first response token where the clean and corrupt answers
    part (their common start teacher-forced), or the prompt's last position"""
    size: int = 5
    """heads per hypothesis set (and per random set)"""
    draws: int = 5
    """layer-matched random sender sets per hypothesis"""
    via_mlps: bool = True
    """the MLPs in between recompute (the senders' effect through them counts)"""
    max_new_tokens: int = 24
    """tokens generated per prompt to check that the pair is answered apart"""

    def __post_init__(self) -> None:
        if self.receivers < 1 or self.size < 1 or self.draws < 1:
            raise InputError("addressing.receivers, size and draws must be >= 1")
        if len(set(self.kinds)) != len(self.kinds):
            raise InputError(f"addressing.kinds repeats a corruption: {self.kinds}")


@dataclass(frozen=True)
class ClaimSettings:
    """How the report judges each claim: an effect, a cluster-robust t interval at `level`, and
    a verdict (`mechinterp.experiments.study.claims.verdict`).

    supported: the interval's lower end reaches the claim's minimum effect (and lies above the
    null); not supported: its upper end lies below the minimum effect; inconclusive: anything
    else, and always when the interval rests on fewer than 5 clusters."""

    k: int = 10
    """the knockout k the necessity claim judges (one of knockout.ks)"""
    max_share: float = 0.10
    """sparse: the share of heads scoring above detect.threshold stays below this"""
    min_drop: float = 0.20
    """necessary: share of answers retrieved under random-k minus under top-k, at least this"""
    min_recovery: float = 0.50
    """sufficient: the retrieval heads' joint recovery, Σ recovered / Σ gap, at least this"""
    min_steer: float = 0.20
    """steer: a sender set's recovery of the retrieval heads' attention above layer-matched
    random sets of its size, at least this"""
    level: float = 0.95
    """confidence level of every interval in the claims (0.95: 95 % intervals)"""

    def __post_init__(self) -> None:
        if not 0 < self.level < 1:
            raise InputError(f"claims.level must lie in (0, 1), got {self.level}")
        if not 0 < self.max_share < 1:
            raise InputError(f"claims.max_share must lie in (0, 1), got {self.max_share}")
        if not 0 < self.min_drop <= 1:
            raise InputError(f"claims.min_drop must lie in (0, 1], got {self.min_drop}")
        if not self.min_recovery > 0:
            raise InputError(f"claims.min_recovery must be > 0, got {self.min_recovery}")
        if not self.min_steer > 0:
            raise InputError(f"claims.min_steer must be > 0, got {self.min_steer}")


@dataclass(frozen=True)
class StudyConfig:
    """Detect → knock out (and check where it holds) → patch (screen with AtP*, trace the paths
    into the retrieval heads) → judge the claims."""

    FLAG_ALIASES: ClassVar[dict[str, str]] = {**MODEL_ALIASES, **DEVICE_ALIASES}

    model: ModelSpec = field(default_factory=ModelSpec)
    detect: DetectStage = field(default_factory=DetectStage)
    knockout: KnockoutStage = field(default_factory=KnockoutStage)
    robustness: RobustnessStage = field(default_factory=RobustnessStage)
    patch: PatchStage = field(default_factory=PatchStage)
    attribution: AttributionStage = field(default_factory=AttributionStage)
    paths: PathsStage = field(default_factory=PathsStage)
    addressing: AddressingStage = field(default_factory=AddressingStage)
    claims: ClaimSettings = field(default_factory=ClaimSettings)
    template: Literal["chat", "plain"] | None = None
    """prompt template (none: chat when the tokenizer has one)"""
    version: int = field(default=STUDY_VERSION, metadata={"flag": False})
    """the study version this config is for (a config of another version is refused)"""

    def __post_init__(self) -> None:
        if self.version != STUDY_VERSION:
            raise InputError(
                f"this config is for study version {self.version}; this mechinterp writes "
                f"version {STUDY_VERSION}. Remove `version:` or update the config."
            )
        shared = set(self.detect.niah.needles) & set(self.knockout.niah.needles)
        if shared and self.detect.niah.seed == self.knockout.niah.seed:
            raise InputError(
                f"knockout.niah shares needles {sorted(shared)} and the seed with detect.niah: "
                "the held-out set would repeat detection instances. Use other needles or seed."
            )
        if not set(self.robustness_modes) <= set(self.knockout.modes):
            raise InputError(
                f"robustness.modes {self.robustness.modes} must be among knockout.modes "
                f"{self.knockout.modes}"
            )
        if not set(self.robustness_seeds) <= set(self.knockout.seeds):
            raise InputError(
                f"robustness.seeds {self.robustness.seeds} must be among knockout.seeds "
                f"{self.knockout.seeds} (the same draws as the primary rows)"
            )
        if self.claims.k not in self.knockout.ks:
            raise InputError(
                f"claims.k={self.claims.k} must be one of knockout.ks {self.knockout.ks}"
            )

    @property
    def robustness_seeds(self) -> tuple[int, ...]:
        r = self.robustness.seeds
        return r if r is not None else self.knockout.seeds[:3]

    @property
    def robustness_modes(self) -> tuple[str, ...]:
        r = self.robustness.modes
        return r if r is not None else self.knockout.modes[:1]

    @property
    def slug(self) -> str:
        return f"study-{Path(self.model.name).name}"
