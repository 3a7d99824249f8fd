"""The cost model of `mechinterp plan`: what one forward (or a stage's forwards) costs in peak
memory and time, from the model's shape (its config, no weights loaded).

The memory of one forward of B rows × T new positions on C cached ones (d: the weights' bytes):

- KV cache, kept:     2 · n_layers · n_kv_heads · d_head · B · (C + T) · d
- activations:        ACT · B · T · (d_model + d_mlp) · d          (one layer's transients)
- attention, eager:   ATTN · B · n_heads · T · (C + T) · 4         (the T × T pattern)
  attention, fused:   nothing of size T × T (rows read or edited: R × (C + T) per head, blocks)
- logits:             2 · B · kept · d_vocab · 4
A stage's peak is the process with its weights loaded (BASE + n_params · d) plus its largest
forward. Time per forward is LINEAR · B · T · n_params + (FUSED or EAGER) · B · n_heads · d_head
· n_layers · T · (C + T) + STEP · n_layers, summed over the stage's forwards. The constants were
fitted on the 2-core CPU machine (benchmarks/results/long_context.json; `plan_check.py` compares
predictions with measured peaks); times on other hardware scale, memory does not.

A training step (`Forward.backward`) keeps every layer's activations (SAVED, per layer) and,
as training runs the explicit attention, every layer's T × T pattern until its backward, and
takes TRAIN eager forwards' time; a stage that loads fine-tuned checkpoints adds LOAD seconds
each. TRAIN and LOAD were fitted to the 3-task extension run's shard records (per stage within
0.57-1.71 ×, the whole run 150.5 predicted against 148.2 measured minutes:
benchmarks/results/plan_check_extension.json); SAVED = ACT matched one measured step of the
embedded model at 590 tokens (2.55 GiB predicted above the weights, 2.70 GiB measured).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Fitted constants (see the module docstring): `benchmarks/plan_check.py --fit` on the 2-core
#: CPU machine; BASE_MIB is the loaded embedded model's resident memory minus its weights.
CALIBRATION = {
    "BASE_MIB": 565.0,  # the process (python, torch, transformers, TransformerLens) without weights
    "ACT": 5.76,
    "ATTN": 4.15,
    "LINEAR": 9.17e-12,
    "FUSED": 1.27e-11,
    "EAGER": 1.16e-10,
    "STEP": 2.94e-4,
    "SAVED": 5.76,  # per layer, the activations a training step keeps for its backward
    "TRAIN": 2.4,  # a training step's time in eager forwards of its batch
    "LOAD": 13.0,  # seconds to load a fine-tuned checkpoint (the extension's stages)
}
#: A stage fits when SAFETY × its predicted peak is within the budget. The formula predicts live
#: memory; the process's RSS also holds heap the allocator kept after freeing it (glibc, tuned
#: not to trim below 2 GiB) and the kernel's buffers: measured peaks were 1% (eager) to 38%
#: (fused, late stages of a long study) above their predictions
#: (benchmarks/results/plan_check.json).
SAFETY = 1.4
#: Prompt tokens a chat template and question add around a NIAH context of `length` tokens.
TEMPLATE_TOKENS = 0
#: Tokens of one synthetic MDQA document (templated variants, ~60 words), and of the rest.
MDQA_DOC_TOKENS, MDQA_EXTRA_TOKENS = 90, 120
#: The most condition rows one batched knockout forward holds (`score_conditions`' max_rows).
CONDITION_ROWS = 16
#: Tokens after the shared prefix in teacher-forced knockout (the response, ~ the answer).
RESPONSE_TOKENS = 32
QUESTION_TOKENS = 48  # question + template tokens after the context end (scope query)


@dataclass(frozen=True)
class Shape:
    """What the cost formulas need of a model, read from its config without its weights."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_params: int
    dtype_bytes: int
    fused: bool  # whether attention runs fused (SDPA) where no hook needs the pattern
    n_ctx: int | None = None  # the context window (max_position_embeddings)

    @property
    def kv_bytes_per_position(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.d_head * self.dtype_bytes


#: Model types whose layers take the fused path (`models.attention.use_sdpa`; the tiny-model
#: matrix checks each).
FUSED_TYPES = ("llama", "mistral", "qwen2", "gemma3", "gemma3_text", "olmo2")


def model_shape(spec) -> Shape:
    """The `Shape` of a `ModelSpec`'s model, from its config (a meta-device copy counts the
    parameters; no weights are read)."""
    import torch
    from transformers import AutoModelForCausalLM

    from mechinterp.models.load import model_config

    config = model_config(spec.name, rope_theta=spec.rope_theta)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in meta.parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_heads = text.num_attention_heads
    d_head = getattr(text, "head_dim", None) or text.hidden_size // n_heads
    fused = (
        spec.attention == "sdpa"
        and text.model_type in FUSED_TYPES
        and getattr(text, "attn_logit_softcapping", None) is None
    )
    return Shape(
        n_layers=text.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(text, "num_key_value_heads", None) or n_heads,
        d_model=text.hidden_size,
        d_head=d_head,
        d_mlp=getattr(text, "intermediate_size", 4 * text.hidden_size),
        d_vocab=text.vocab_size,
        n_params=n_params,
        dtype_bytes={"float32": 4, "bfloat16": 2, "float16": 2}[spec.dtype],
        fused=fused,
        n_ctx=getattr(text, "max_position_embeddings", None),
    )


@dataclass(frozen=True)
class Forward:
    """`count` forwards of `rows` × `new` positions on `cached` cached ones; `kv_rows`: rows of
    KV cache alive beside it (a shared prefix copied per condition row); `kept`: logit positions
    kept; `steps`: greedy steps after it (each one row-batch × 1 position)."""

    rows: int
    new: int
    cached: int = 0
    steps: int = 0
    count: int = 1
    kept: int = 1
    extra_kv: int = 0  # positions of KV cache kept beside this forward's own (other caches)
    shared: bool = False  # the cached prefix is one row read by every row (`shared_cache`)
    knob: str = ""  # the config key that shrinks it
    backward: bool = False  # a training step: every layer's activations kept, then a backward

    def kv_bytes(self, s: Shape) -> float:
        """The KV cache alive at the last step: this forward's rows over every position they
        have seen (a shared prefix once, plus one layer's broadcast copy while it runs), plus
        other caches kept beside it."""
        total = self.cached + self.new + self.steps
        if self.shared:
            rows = self.cached + self.rows * (self.new + self.steps)
            rows += self.rows * total / s.n_layers  # the running layer's keys, broadcast
        else:
            rows = self.rows * total
        return s.kv_bytes_per_position * (rows + self.extra_kv)

    def peak_bytes(self, s: Shape) -> float:
        c = CALIBRATION
        total = self.cached + self.new + self.steps
        kv = self.kv_bytes(s)
        act = c["ACT"] * self.rows * self.new * (s.d_model + s.d_mlp) * s.dtype_bytes
        eager = c["ATTN"] * self.rows * s.n_heads * self.new * total * 4
        attn = 0.0 if s.fused else eager
        logits = 2 * self.rows * self.kept * s.d_vocab * 4
        if self.backward:  # autograd keeps every layer's activations and (eager) patterns
            act *= c["SAVED"] * s.n_layers / c["ACT"]
            attn = eager * s.n_layers
        return kv + act + attn + logits

    def seconds(self, s: Shape) -> float:
        c = CALIBRATION
        attn = c["FUSED"] if s.fused and not self.backward else c["EAGER"]  # training: eager
        per_head = s.n_heads * s.d_head * s.n_layers

        def one(new: int, seen: int) -> float:
            return (c["LINEAR"] * self.rows * new * s.n_params
                    + attn * self.rows * per_head * new * seen
                    + c["STEP"] * s.n_layers)  # fmt: skip

        t = one(self.new, self.cached + self.new)
        # decode steps: the sum over i of one(1, T + i), in closed form
        if self.steps:
            t0 = self.cached + self.new
            mean_seen = t0 + (self.steps + 1) / 2
            t += self.steps * one(1, round(mean_seen))
        return t * self.count * (c["TRAIN"] if self.backward else 1.0)


@dataclass
class StagePlan:
    name: str
    forwards: list[Forward] = field(default_factory=list)
    models: int = 1  # copies of the weights loaded at once (cross-model patching: 2)
    loads: int = 0  # models (fine-tuned checkpoints) loaded from disk in the stage

    def load(self, n: int = 1) -> None:
        self.loads += n

    def add(self, *forwards: Forward) -> None:
        self.forwards.extend(forwards)

    def peak(self, s: Shape) -> tuple[float, Forward | None]:
        if not self.forwards:
            return 0.0, None
        top = max(self.forwards, key=lambda f: f.peak_bytes(s))
        return top.peak_bytes(s), top

    def seconds(self, s: Shape) -> float:
        return sum(f.seconds(s) for f in self.forwards) + self.loads * CALIBRATION["LOAD"]


def generation(lengths: list[int], batch: int, new: int, knob: str) -> list[Forward]:
    """Batched greedy generation of `lengths` (sorted and batched as `generate` does)."""
    out = []
    lengths = sorted(lengths)
    for b in range(0, len(lengths), batch):
        chunk = lengths[b : b + batch]
        out.append(Forward(rows=len(chunk), new=max(chunk), steps=new, knob=knob))
    return out


def _conditions(lengths: list[int], n_conditions: int, tail: int, knob: str) -> list[Forward]:
    """`score_conditions` per example: the shared prefix once, then the conditions' rows over
    the tail, each row holding a copy of the prefix's KV cache."""
    out = []
    for n in lengths:
        prefix = max(1, n - 1 if tail <= RESPONSE_TOKENS else n - QUESTION_TOKENS)
        out.append(Forward(rows=1, new=prefix, knob=knob))
        for start in range(0, n_conditions, CONDITION_ROWS):
            rows = min(CONDITION_ROWS, n_conditions - start)
            out.append(Forward(rows=rows, new=tail, cached=prefix, kept=tail, shared=True,
                               knob=knob))  # fmt: skip
    return out


def knockout_conditions(ks, seeds, modes, draws) -> int:
    """Conditions scored per example: the clean run, and per k and mode the top-k and one
    random draw per seed and draw kind (`study.stages.knockout_conditions`)."""
    return 1 + len(ks) * len(modes) * (1 + len(seeds) * len(draws))


def scoped(lengths: list[int], n_conditions: int, scope: str, knob: str) -> list[Forward]:
    """Teacher-forced conditions under `scope`: from the shared prefix on (`score_conditions`);
    scope `all` shares nothing, so every row runs the whole sequence."""
    if scope != "all":
        tail = RESPONSE_TOKENS + (QUESTION_TOKENS if scope == "query" else 0)
        return _conditions(lengths, n_conditions, tail, knob)
    out = []
    for n in lengths:
        for start in range(0, n_conditions, CONDITION_ROWS):
            rows = min(CONDITION_ROWS, n_conditions - start)
            out.append(Forward(rows=rows, new=n + RESPONSE_TOKENS, kept=RESPONSE_TOKENS,
                               knob=knob))  # fmt: skip
    return out


def conditioned_generation(lengths: list[int], n: int, max_new: int, knob: str) -> list[Forward]:
    """Free generation of each example under `n` conditions: its prompt once, then the
    conditions' rows decoding from a copy of that prompt's cache."""
    out = []
    for t in lengths:
        out.append(Forward(rows=1, new=t - 1, knob=knob))
        for start in range(0, n, CONDITION_ROWS):
            rows = min(CONDITION_ROWS, n - start)
            out.append(Forward(rows=rows, new=1, cached=t - 1, steps=max_new, extra_kv=t - 1,
                               knob=knob))  # fmt: skip
    return out


def knockout_stages(lengths: list[int], k, base_knob: str, knob: str) -> list[StagePlan]:
    """The clean answers and the knockout conditions of `k` (a `KnockoutStage` or the knockout
    command's config: ks, seeds, modes, draws, scope, scoring, batch_size, max_new_tokens) on
    prompts of `lengths` (every one counted as answered)."""
    baseline = StagePlan("baseline")
    baseline.add(*generation(lengths, k.batch_size, k.max_new_tokens, base_knob))
    n = knockout_conditions(k.ks, k.seeds, k.modes, k.draws)
    stage = StagePlan("knockout")
    if getattr(k, "scoring", "teacher_forced") == "teacher_forced":
        stage.add(*scoped(lengths, n, k.scope, knob))
    else:
        stage.add(*conditioned_generation(lengths, n, k.max_new_tokens, knob))
    return [baseline, stage]
