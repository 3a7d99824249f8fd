"""The forwards of every single command and of the extension study, for `mechinterp plan` (the
cost of a forward is `mechinterp.experiments.cost`'s; the study's stages are in
`mechinterp.experiments.plan`).

Prompt lengths are the real ones: the command's examples are built and rendered with the model's
tokenizer (read without the weights), so a `--task.data` file or a long MDQA variant is planned
at the lengths it will run at. Fine-tuning steps cost `TRAIN` forwards of their batch and keep
every layer's activations for the backward pass (`Forward.backward`); each stage of the
extension loads its fine-tuned checkpoints (`StagePlan.loads`).
"""

from __future__ import annotations

import math

from mechinterp.experiments.cost import (
    RESPONSE_TOKENS,
    Forward,
    Shape,
    StagePlan,
    generation,
    knockout_conditions,
    knockout_stages,
    scoped,
)


def prompt_lengths(task, spec, template, n_ctx: int | None = None, tokenizer=None) -> list[int]:
    """The token count of each prompt the `TaskSpec` `task` renders to for `spec`'s model (a
    prompt over `n_ctx`, the model's context window, is refused as the run would refuse it)."""
    from mechinterp.experiments.specs import build_examples

    tokenizer = tokenizer or _tokenizer(spec)
    return _rendered(build_examples(task, tokenizer), tokenizer, template, n_ctx)


def _tokenizer(spec):
    from mechinterp.models.load import model_tokenizer

    return model_tokenizer(spec.name)


def _rendered(examples, tokenizer, template, n_ctx: int | None) -> list[int]:
    from mechinterp.tasks.prompt import render

    return [len(render(ex, tokenizer, template=template, max_tokens=n_ctx).input_ids)
            for ex in examples]  # fmt: skip


def eval_plan(config, shape: Shape) -> list[StagePlan]:
    """`mechinterp eval`: batched greedy generation of every example."""
    lengths = prompt_lengths(config.task, config.model, config.template, shape.n_ctx)
    stage = StagePlan("eval")
    stage.add(*generation(lengths, config.batch_size, config.max_new_tokens,
                          "batch_size or task.lengths"))  # fmt: skip
    return [stage]


def detect_plan(config, shape: Shape) -> list[StagePlan]:
    """`mechinterp detect`: generation (retrieval), one prompt forward (qr), or the random
    sequences of a pattern score."""
    stage = StagePlan("detect")
    knob = "batch_size or task.lengths"
    if config.detector in ("retrieval", "qr"):
        lengths = prompt_lengths(config.task, config.model, config.template, shape.n_ctx)
        if config.detector == "retrieval":
            stage.add(*generation(lengths, config.batch_size, config.max_new_tokens, knob))
        else:
            stage.add(*generation(lengths, config.batch_size, 0, knob))
    else:  # induction repeats each random sequence once
        new = config.seq_len * (2 if config.detector == "induction" else 1)
        stage.add(Forward(rows=config.n_sequences, new=new, kept=new,
                          knob="n_sequences or seq_len"))  # fmt: skip
    return [stage]


def knockout_plan(config, shape: Shape) -> list[StagePlan]:
    """`mechinterp knockout`: the study's clean answers and knockout conditions on one task
    (every example counted as answered: the conditions run on the answered ones only)."""
    lengths = prompt_lengths(config.task, config.model, config.template, shape.n_ctx)
    return knockout_stages(lengths, config, "batch_size or task.lengths",
                           "ks, seeds or task.lengths")  # fmt: skip


def pair_forwards(t: int, variants: int, batch: int, knob: str, prefixes: int = 2) -> list:
    """One clean / corrupted pair at `t` tokens: choosing the corrupted token, the prefixes,
    then `variants` patched runs over the response, `batch` per forward, on the shared prefix."""
    return [Forward(rows=2, new=t, knob=knob),
            Forward(rows=1, new=t, count=prefixes, knob=knob),
            Forward(rows=batch, new=RESPONSE_TOKENS, cached=t, shared=True,
                    count=math.ceil(variants / batch), knob=knob)]  # fmt: skip


def patch_plan(config, shape: Shape) -> list[StagePlan]:
    """`mechinterp patch`: every head (or the listed ones) patched alone, per pair."""
    lengths = prompt_lengths(config.task, config.model, config.template, shape.n_ctx)
    heads = len(config.select.heads) or shape.n_layers * shape.n_heads
    stage = StagePlan("patch")
    for t in lengths:
        stage.add(*pair_forwards(t, heads + 1, config.batch_size, "batch_size or task.lengths"))
    return [stage]


def atp_plan(config, shape: Shape) -> list[StagePlan]:
    """`mechinterp atp`: the gradient graph (a forward, a backward, one per GradDrop layer),
    then the exact patches of the verified and the sampled units."""
    lengths = prompt_lengths(config.task, config.model, config.template, shape.n_ctx)
    stage = StagePlan("atp")
    knob = "task.lengths or verify_top"
    graphs = 2 * shape.n_layers + 1 if config.grad_drop else 2
    exact = config.verify_top + (config.fn_sample if config.verify_top else 0)
    for t in lengths:
        stage.add(Forward(rows=2, new=t, knob=knob), Forward(rows=1, new=t, count=2, knob=knob),
                  Forward(rows=1, new=RESPONSE_TOKENS, cached=t, count=graphs, knob=knob))
        if exact:
            stage.add(Forward(rows=min(config.batch_size, exact), new=RESPONSE_TOKENS, cached=t,
                              shared=True, count=math.ceil(exact / config.batch_size),
                              knob="batch_size"))  # fmt: skip
    return [stage]


def path_patch_plan(config, shape: Shape) -> list[StagePlan]:
    """`mechinterp path-patch`: two passes per batch of senders, per receiver input."""
    lengths = prompt_lengths(config.task, config.model, config.template, shape.n_ctx)
    senders = shape.n_layers * shape.n_heads
    batches = len(config.inputs) * 2 * (math.ceil(senders / config.batch_size) + 1)
    stage = StagePlan("paths")
    for t in lengths:
        stage.add(*pair_forwards(t, batches * config.batch_size, config.batch_size,
                                 "batch_size or task.lengths", prefixes=3))  # fmt: skip
    return [stage]


def cross_patch_plan(config, shape: Shape) -> list[StagePlan]:
    """`mechinterp cross-patch`: the donor's prompts, then every condition generated on the
    recipient; both models stay loaded."""
    lengths = prompt_lengths(config.task, config.model, config.template, shape.n_ctx)
    sets = 1 if config.select.heads else 2 + len(config.seeds)  # Inter, Compl, Rand per seed
    stage = StagePlan("cross", models=2)
    stage.add(*cross_forwards(lengths, sets + 2, config.batch_size, config.max_new_tokens,
                              "batch_size or task.lengths"))  # fmt: skip
    return [stage]


def cross_forwards(lengths, conditions: int, batch: int, max_new: int, knob: str) -> list:
    """Cross-model patching: rows of `conditions` per example, `batch` rows per forward (as many
    examples as fit), each generating `max_new` tokens; the donor's prompts once per batch."""
    per = max(1, batch // conditions)
    out = []
    lengths = sorted(lengths)
    for b in range(0, len(lengths), per):
        chunk = lengths[b : b + per]
        out.append(Forward(rows=len(chunk), new=max(chunk), knob=knob))  # the donor
        out.append(Forward(rows=len(chunk) * conditions, new=max(chunk), steps=max_new,
                           knob=knob))  # fmt: skip
    return out


def extension_plan(config, shape: Shape) -> list[StagePlan]:
    """`mechinterp study extension`: per model, the fine-tune, the evaluation, detection and
    knockout; per variant, cross-model patching; LoRA-free LoFiT stages where configured; a
    multi-task config sums its tasks stage by stage."""
    if config.tasks:
        stages: dict[str, StagePlan] = {}
        for run in config.tasks:
            for st in extension_plan(config.for_task(run), shape):
                stages.setdefault(st.name, StagePlan(st.name, models=st.models)).add(*st.forwards)
        return list(stages.values())
    from mechinterp.experiments.extension.stages import build_data, data_args

    tok = _tokenizer(config.model)
    tpl = config.template

    def lengths(variant: str, split: str) -> list[int]:
        return _rendered(build_data(**data_args(config, variant, split)), tok, tpl, shape.n_ctx)

    finetune = StagePlan("finetune")
    for v in config.models:
        finetune.load()
        finetune.add(*training(lengths(v, "train"), config.lora.steps, config.lora.batch_size,
                               "lora.batch_size or n_docs"))  # fmt: skip
    evals, detect, knockout = StagePlan("eval"), StagePlan("detect"), StagePlan("knockout")
    held_out = lengths(config.reference, "eval")
    if config.detect_on == "task":
        probes = lengths(config.reference, "detect")
    else:
        from mechinterp.tasks.niah import niah_grid

        g = config.detect.niah
        probes = _rendered(niah_grid(tok, lengths=g.lengths, depths=g.depths,
                                     needles=list(g.needles), haystack=g.haystack, seed=g.seed),
                           tok, tpl, shape.n_ctx)  # fmt: skip
    k = config.knockout
    n = knockout_conditions(k.ks, k.seeds, k.modes, k.draws)
    for _ in config.models:
        for st in (evals, detect, knockout):
            st.load()
        evals.add(*generation(held_out, 8, config.max_new_tokens, "n_eval"),
                  *(Forward(rows=1, new=t + RESPONSE_TOKENS, knob="n_eval") for t in held_out))
        detect.add(*generation(probes, config.detect.batch_size, config.detect.max_new_tokens,
                               "detect.batch_size or n_detect"))  # fmt: skip
        knockout.add(*generation(held_out, 4, config.max_new_tokens, "n_eval"),
                     *scoped(held_out, n, k.scope, "knockout.seeds or n_eval"))  # fmt: skip
    cross = StagePlan("cross", models=2)
    for _ in config.variants:
        cross.load(2)
        cross.add(*cross_forwards(held_out, 4 + len(config.cross_seeds), 24,
                                  config.max_new_tokens, "n_eval"))  # fmt: skip
    stages = [finetune, evals, detect, knockout, cross]
    if config.lofit is not None:
        spec, train = config.lofit.spec, lengths(config.reference, "train")
        lofit = StagePlan("lofit")
        runs = 2 + len(config.lofit.l1_sweep) + (3 if config.lofit.localised else 0)
        for _ in range(runs):  # two steps (select, then tune), each λ, each localised set
            lofit.load()
            lofit.add(*training(train, spec.steps, spec.batch_size, "lofit.spec.steps"))
        stages.append(lofit)
    return stages


def training(lengths: list[int], steps: int, batch: int, knob: str) -> list[Forward]:
    """`steps` optimiser steps on batches of `batch` examples, cycling through `lengths`
    (padded to the batch's longest, plus the answer)."""
    if not lengths:
        return []
    longest = max(lengths) + RESPONSE_TOKENS
    mean = sum(lengths) / len(lengths) + RESPONSE_TOKENS
    return [Forward(rows=batch, new=longest, kept=longest, backward=True, knob=knob),
            Forward(rows=batch, new=round(mean), kept=1, backward=True, count=steps - 1,
                    knob=knob)]  # fmt: skip
