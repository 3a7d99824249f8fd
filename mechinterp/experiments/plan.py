"""`mechinterp plan KIND`: the predicted peak memory and time of each stage of a run, before it
starts, from the model's shape (its config and tokenizer, no weights loaded) and the config's
lengths and batch sizes; and a refusal, naming the knob to turn, when a stage cannot fit. The
cost of a forward is `mechinterp.experiments.cost`'s; the study's stages are planned here, every
other command's and the extension's in `mechinterp.experiments.plan_commands`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mechinterp.errors import InputError
from mechinterp.experiments.addressing import HYPOTHESES
from mechinterp.experiments.cost import (  # noqa: F401  (Forward, model_shape: the plan's API)
    CALIBRATION,
    MDQA_DOC_TOKENS,
    MDQA_EXTRA_TOKENS,
    QUESTION_TOKENS,
    RESPONSE_TOKENS,
    SAFETY,
    TEMPLATE_TOKENS,
    Forward,
    Shape,
    StagePlan,
    conditioned_generation,
    generation,
    knockout_stages,
    model_shape,
    scoped,
)


def _niah_lengths(niah) -> list[int]:
    """One prompt length per NIAH instance (lengths × depths × needles)."""
    per_length = len(niah.depths) * len(niah.needles)
    return [n + TEMPLATE_TOKENS for n in niah.lengths for _ in range(per_length)]


def study_plan(config, shape: Shape) -> list[StagePlan]:
    """The forwards of each stage of a `StudyConfig` (what `run_study` runs, stage by stage)."""
    d, k, r, p = config.detect, config.knockout, config.robustness, config.patch
    detect = StagePlan("detect")
    detect.add(*generation(_niah_lengths(d.niah), d.batch_size, d.max_new_tokens,
                            "detect.batch_size or detect.niah.lengths"))  # fmt: skip
    niah = _niah_lengths(k.niah)
    ko_lengths = niah + ([k.mdqa.n_docs * MDQA_DOC_TOKENS + MDQA_EXTRA_TOKENS] * k.mdqa.n
                         if k.mdqa is not None else [])  # fmt: skip
    baseline, knockout = knockout_stages(ko_lengths, k, "knockout.batch_size or "
                                         "knockout.niah.lengths", "knockout.niah.lengths")
    robust = StagePlan("robustness")
    n_rob = 2 + (len(r.seeds) if r.seeds is not None else min(3, len(k.seeds)))
    knob = "robustness.scopes or knockout.niah.lengths"
    for scope in r.scopes:
        robust.add(*scoped(ko_lengths, n_rob, scope, knob))
    if r.generate:
        robust.add(*conditioned_generation(ko_lengths, n_rob, k.max_new_tokens, knob))
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
    if config.addressing.kinds:
        stages.append(addressing_plan(config, shape))
    return stages


def addressing_plan(config, shape: Shape) -> StagePlan:
    """Per address pair (every pair counted as answered apart: an upper bound): both prompts
    generated, the receivers' own queries and keys patched back (one batch row per receiver),
    then path patching from the first changed token on: the question for a question swap, the
    needle for a key swap (at its depth). A path-patching pass runs from its first layer on:
    pass 1 from the senders' (about half the layers on average), pass 2 from the receivers'
    (the upper half), so a batch's three passes cost about 1.5 whole forwards."""
    a, batch = config.addressing, config.patch.batch_size
    stage = StagePlan("addressing")
    knob = "addressing.niah.lengths or addressing.kinds"
    senders = shape.n_layers * shape.n_heads
    sets = 1 + len(HYPOTHESES) * (1 + a.draws)
    passes = 1.5  # pass 1 + 2 × pass 2, in whole-model forwards
    for kind in a.kinds:
        for length in a.niah.lengths:
            n = length + TEMPLATE_TOKENS + QUESTION_TOKENS
            for depth in a.niah.depths:
                tail = QUESTION_TOKENS  # the question and the answers' common start
                if kind == "key_swap":
                    tail += round((1 - depth) * length)
                prefix = n - tail
                for _ in a.niah.needles:
                    stage.add(*generation([n, n], 2, a.max_new_tokens, knob))
                    stage.add(Forward(rows=1, new=n, count=7, knob=knob),  # reads, caches
                              Forward(rows=a.receivers + 1, new=tail, cached=prefix,
                                      shared=True, count=2, knob=knob),  # own q, own k
                              Forward(rows=batch, new=tail, cached=prefix, shared=True,
                                      count=math.ceil(passes * math.ceil(senders / batch)),
                                      knob=knob),
                              Forward(rows=1, new=tail, cached=prefix, shared=True,
                                      count=math.ceil(passes * sets), knob=knob))  # fmt: skip
    return stage


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


def planners() -> dict[str, tuple[type, Callable]]:
    """What `mechinterp plan KIND` plans: each command's config class and its stages."""
    from mechinterp.experiments import COMMANDS
    from mechinterp.experiments import plan_commands as pc
    from mechinterp.experiments.extension import ExtensionConfig
    from mechinterp.experiments.study import StudyConfig

    stages = {"eval": pc.eval_plan, "detect": pc.detect_plan, "knockout": pc.knockout_plan,
              "patch": pc.patch_plan, "atp": pc.atp_plan, "path-patch": pc.path_patch_plan,
              "cross-patch": pc.cross_patch_plan}  # fmt: skip
    table = {name: (COMMANDS[name].config, fn) for name, fn in stages.items()}
    assert set(table) == set(COMMANDS), "every command has a plan"
    return {**table, "study": (StudyConfig, study_plan), "extension": (ExtensionConfig,
                                                                       pc.extension_plan)}


def plan(config, *, budget_gib: float | None = None) -> tuple[list[PlanRow], Shape, str]:
    """The plan of `config` (the config of any command, of the study or of the extension): one
    row per stage, the model's shape, and what the budget is (a stage fits when `SAFETY` × its
    peak is within it)."""
    if budget_gib is not None and not (math.isfinite(budget_gib) and budget_gib > 0):
        raise InputError(f"the memory budget must be a positive number of GiB, got {budget_gib}")
    kinds = [fn for cls, fn in planners().values() if isinstance(config, cls)]
    if not kinds:
        raise TypeError(f"no plan for a {type(config).__name__}")
    shape = model_shape(config.model)
    if budget_gib is None:
        budget, where = budget_bytes(config.model.device)
    else:
        budget, where = budget_gib * 2**30, "the given budget"
    weights = shape.n_params * shape.dtype_bytes
    rows = []
    for st in kinds[0](config, shape):
        peak, top = st.peak(shape)
        if top is None:
            continue
        total = CALIBRATION["BASE_MIB"] * 2**20 + st.models * weights + peak
        largest = (f"{top.rows} × {top.new}" + (f" on {top.cached} cached" if top.cached else "")
                   + (f", {top.steps} steps" if top.steps else "")
                   + (" + backward" if top.backward else ""))  # fmt: skip
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
    """The `mechinterp plan KIND` subcommands on the argparse parser `p`: each takes the flags,
    `--config` and `--set` of the command it plans, and `--budget-gib`."""
    import argparse

    from mechinterp.config import add_config_flags

    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, (cls, _) in planners().items():
        what = "study extension" if kind == "extension" else kind
        sub = kinds.add_parser(kind, allow_abbrev=False, help=f"plan `mechinterp {what}`",
                               description=f"the predicted peak memory and time of each stage of "
                               f"`mechinterp {what}` with these flags")  # fmt: skip
        add_config_flags(sub.add_argument_group(f"{cls.__name__} (also as --config / --set "
                                                "keys)"), cls)  # fmt: skip
        sub.add_argument("--config", default=None, help="a YAML config (default: the defaults)")
        sub.add_argument("--set", dest="overrides", action="append", default=[],
                         metavar="KEY=VALUE", help="override a config key (repeatable)")
        sub.add_argument("--budget-gib", type=float, default=None,
                         help="memory to plan for (default: RAM available, or the GPU's)")
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the traceback of every error")
        sub.set_defaults(config_cls=cls, handler=cli_plan)


def cli_plan(args) -> int:
    """`mechinterp plan KIND`: print the plan; exit 2, naming the knob, when a stage cannot
    fit."""
    import sys

    from mechinterp.config import config_from_flags

    config = config_from_flags(args.config_cls, args.config, args.overrides, vars(args))
    rows, shape, budget = plan(config, budget_gib=args.budget_gib)
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
