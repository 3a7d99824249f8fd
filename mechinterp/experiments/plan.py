"""`mechinterp plan`: the predicted peak memory and time of each stage of a run, before it starts,
from the model's shape (its config, no weights loaded) and the config's lengths and batch sizes;
and a refusal, naming the knob to turn, when a stage cannot fit.

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
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from mechinterp.errors import InputError

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
        attn = 0.0 if s.fused else c["ATTN"] * self.rows * s.n_heads * self.new * total * 4
        logits = 2 * self.rows * self.kept * s.d_vocab * 4
        return kv + act + attn + logits

    def seconds(self, s: Shape) -> float:
        c = CALIBRATION
        attn = c["FUSED"] if s.fused else c["EAGER"]
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
        return t * self.count


@dataclass
class StagePlan:
    name: str
    forwards: list[Forward] = field(default_factory=list)

    def add(self, *forwards: Forward) -> None:
        self.forwards.extend(forwards)

    def peak(self, s: Shape) -> tuple[float, Forward | None]:
        if not self.forwards:
            return 0.0, None
        top = max(self.forwards, key=lambda f: f.peak_bytes(s))
        return top.peak_bytes(s), top

    def seconds(self, s: Shape) -> float:
        return sum(f.seconds(s) for f in self.forwards)


def _niah_lengths(niah) -> list[int]:
    """One prompt length per NIAH instance (lengths × depths × needles)."""
    per_length = len(niah.depths) * len(niah.needles)
    return [n + TEMPLATE_TOKENS for n in niah.lengths for _ in range(per_length)]


def _generation(lengths: list[int], batch: int, new: int, knob: str) -> list[Forward]:
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


def study_plan(config, shape: Shape) -> list[StagePlan]:
    """The forwards of each stage of a `StudyConfig` (what `run_study` runs, stage by stage)."""
    d, k, r, p = config.detect, config.knockout, config.robustness, config.patch
    detect = StagePlan("detect")
    detect.add(*_generation(_niah_lengths(d.niah), d.batch_size, d.max_new_tokens,
                            "detect.batch_size or detect.niah.lengths"))  # fmt: skip
    niah = _niah_lengths(k.niah)
    ko_lengths = niah + ([k.mdqa.n_docs * MDQA_DOC_TOKENS + MDQA_EXTRA_TOKENS] * k.mdqa.n
                         if k.mdqa is not None else [])  # fmt: skip
    baseline = StagePlan("baseline")
    baseline.add(*_generation(ko_lengths, k.batch_size, k.max_new_tokens,
                              "knockout.batch_size or knockout.niah.lengths"))  # fmt: skip
    n_cond = 1 + len(k.ks) * len(k.modes) * (1 + len(k.seeds) * len(k.draws))
    knockout = StagePlan("knockout")
    knob = "knockout.niah.lengths"
    knockout.add(*_scoped(ko_lengths, n_cond, k.scope, knob))
    robust = StagePlan("robustness")
    n_rob = 2 + (len(r.seeds) if r.seeds is not None else min(3, len(k.seeds)))
    knob = "robustness.scopes or knockout.niah.lengths"
    for scope in r.scopes:
        robust.add(*_scoped(ko_lengths, n_rob, scope, knob))
    if r.generate:
        for n in ko_lengths:
            robust.add(Forward(rows=1, new=n - 1, knob=knob),
                       Forward(rows=n_rob, new=1, cached=n - 1, steps=k.max_new_tokens,
                               extra_kv=n - 1, knob=knob))  # fmt: skip
    patch = StagePlan("patch")
    pairs = sorted(niah)[:: max(1, len(niah) // max(1, p.n_pairs))][: p.n_pairs]
    variants = shape.n_layers * shape.n_heads + len(p.seeds) + 1
    knob = "patch.batch_size or knockout.niah.lengths"
    for n in pairs:
        patch.add(Forward(rows=2, new=n, knob=knob),  # choosing the corrupted token
                  Forward(rows=1, new=n, count=2, knob=knob),  # clean and corrupt prefixes
                  Forward(rows=p.batch_size, new=RESPONSE_TOKENS, cached=n,
                          count=math.ceil(variants / p.batch_size), shared=True,
                          knob=knob))  # fmt: skip
    stages = [detect, baseline, knockout, robust, patch]
    senders = shape.n_layers * shape.n_heads
    if config.attribution.enabled:  # AtP and AtP* (GradDrop) of every head's output
        atp = StagePlan("attribution")
        knob = "knockout.niah.lengths"
        for n in pairs:
            atp.add(Forward(rows=2, new=n, knob=knob),
                    Forward(rows=1, new=n, count=2, knob=knob),  # the source, the target prefix
                    # the graph: one forward, one backward and one per GradDrop layer (≈ 2 each)
                    Forward(rows=1, new=RESPONSE_TOKENS, cached=n, count=2 * shape.n_layers + 1,
                            knob=knob))  # fmt: skip
        stages.append(atp)
    if config.paths.inputs:  # two passes per batch of senders, per receiver input
        paths = StagePlan("paths")
        knob = "patch.batch_size or paths.inputs"
        for n in pairs:
            paths.add(Forward(rows=2, new=n, knob=knob),
                      Forward(rows=1, new=n, count=3, knob=knob),
                      Forward(rows=p.batch_size, new=RESPONSE_TOKENS, cached=n, shared=True,
                              count=2 * len(config.paths.inputs)
                              * (math.ceil(senders / p.batch_size) + 1), knob=knob))  # fmt: skip
        stages.append(paths)
    return stages


def _scoped(lengths: list[int], n_conditions: int, scope: str, knob: str) -> list[Forward]:
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


def detect_plan(config, shape: Shape) -> list[StagePlan]:
    """The `mechinterp detect` command (retrieval or QR on a NIAH grid)."""
    task = config.task
    lengths = [n + TEMPLATE_TOKENS for n in task.lengths
               for _ in range(len(task.depths) * task.needles)]  # fmt: skip
    stage = StagePlan("detect")
    knob = "batch_size or task.lengths"
    if config.detector == "retrieval":
        stage.add(*_generation(lengths, config.batch_size, config.max_new_tokens, knob))
    else:
        lengths = sorted(lengths)
        for b in range(0, len(lengths), config.batch_size):
            chunk = lengths[b : b + config.batch_size]
            stage.add(Forward(rows=len(chunk), new=max(chunk), knob=knob))
    return [stage]


def budget_bytes(device: str | None) -> tuple[float, str]:
    """The memory a run may use: the GPU's total on a CUDA device, else MemAvailable."""
    import torch

    if (device or "").startswith("cuda") or (device is None and torch.cuda.is_available()):
        index = torch.device(device or "cuda").index or 0
        return float(torch.cuda.get_device_properties(index).total_memory), f"cuda:{index} total"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024, "RAM available"
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "RAM"


@dataclass(frozen=True)
class PlanRow:
    """One stage of a plan: its largest forward, predicted peak and time, and whether it fits."""

    stage: str
    forwards: int
    largest: str
    peak_gib: float
    minutes: float
    fits: bool
    knob: str


def plan(config, *, budget_gib: float | None = None) -> tuple[list[PlanRow], Shape, str]:
    """The plan of `config` (a `StudyConfig`, or a `DetectConfig`): one row per stage, the model's
    shape, and what the budget is (a stage fits when `SAFETY` × its peak is within it)."""
    from mechinterp.experiments.detect import DetectConfig

    if budget_gib is not None and not (math.isfinite(budget_gib) and budget_gib > 0):
        raise InputError(f"the memory budget must be a positive number of GiB, got {budget_gib}")
    shape = model_shape(config.model)
    if budget_gib is None:
        budget, where = budget_bytes(config.model.device)
    else:
        budget, where = budget_gib * 2**30, "the given budget"
    stages = detect_plan(config, shape) if isinstance(config, DetectConfig) else study_plan(
        config, shape)  # fmt: skip
    base = CALIBRATION["BASE_MIB"] * 2**20 + shape.n_params * shape.dtype_bytes
    rows = []
    for st in stages:
        peak, top = st.peak(shape)
        if top is None:
            continue
        total = base + peak
        largest = (f"{top.rows} × {top.new}" + (f" on {top.cached} cached" if top.cached else "")
                   + (f", {top.steps} steps" if top.steps else ""))  # fmt: skip
        rows.append(PlanRow(st.name, sum(f.count for f in st.forwards), largest,
                            round(total / 2**30, 2), round(st.seconds(shape) / 60, 1),
                            SAFETY * total <= budget, top.knob))  # fmt: skip
    return rows, shape, f"{where}: {budget / 2**30:.1f} GiB"


def plan_text(rows: list[PlanRow], shape: Shape, budget: str) -> str:
    """The plan as the CLI prints it."""
    lines = [
        f"model: {shape.n_layers} layers × {shape.n_heads} heads ({shape.n_kv_heads} kv), "
        f"d_model {shape.d_model}, {shape.n_params / 1e6:.0f}M parameters, "
        f"{'fused' if shape.fused else 'explicit (T × T)'} attention; budget: {budget}",
        f"{'stage':<11} {'forwards':>8}  {'largest (rows × positions)':<34} {'peak GiB':>8} "
        f"{'minutes*':>8}  fits",
    ]
    for r in rows:
        lines.append(f"{r.stage:<11} {r.forwards:>8}  {r.largest:<34} {r.peak_gib:>8.2f} "
                     f"{r.minutes:>8.1f}  {'yes' if r.fits else 'NO'}")  # fmt: skip
    lines.append("* minutes on the 2-core CPU the formula was fitted on; memory holds anywhere")
    return "\n".join(lines)


def plan_arguments(p) -> None:
    """The `mechinterp plan` command's arguments, on the argparse parser `p`."""
    p.add_argument("--config", default=None, help="the YAML config to plan (default: defaults)")
    p.add_argument("--model", default=None, help="plan for this model instead of model.name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--kind", choices=["study", "detect"], default="study",
                   help="what the config configures")  # fmt: skip
    p.add_argument("--budget-gib", type=float, default=None,
                   help="memory to plan for (default: RAM available, or the GPU's)")  # fmt: skip
    p.set_defaults(handler=lambda a: cli_plan(a.config, a.model, a.overrides, a.kind,
                                              a.budget_gib))  # fmt: skip


def cli_plan(path, model, overrides, kind: str, budget_gib: float | None) -> int:
    """`mechinterp plan`: print the plan; exit 2, naming the knob, when a stage cannot fit."""
    import sys

    from mechinterp.config import config_from_flags
    from mechinterp.experiments.detect import DetectConfig
    from mechinterp.experiments.study import StudyConfig

    cls = DetectConfig if kind == "detect" else StudyConfig
    overrides = list(overrides) + ([f"model.name={model}"] if model else [])
    config = config_from_flags(cls, path, overrides, {})
    rows, shape, budget = plan(config, budget_gib=budget_gib)
    print(plan_text(rows, shape, budget))
    over = [r for r in rows if not r.fits]
    if not over:
        return 0
    worst = max(over, key=lambda r: r.peak_gib)
    fused = "" if shape.fused else ", or run fused attention (model.attention: sdpa)"
    print(f"mechinterp plan: error: stage {worst.stage} needs about {worst.peak_gib:.1f} GiB "
          f"({worst.largest}) and cannot fit in {budget}; lower {worst.knob}{fused}",
          file=sys.stderr)  # fmt: skip
    return 2
