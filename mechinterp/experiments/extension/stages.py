"""The extension pipeline's units of work: what builds each split's data, and one shard function
per stage (each takes JSON-able arguments and returns a tidy table, in-process or on Ray)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pandas as pd

from mechinterp.errors import InputError
from mechinterp.experiments.extension.config import (
    LIMITED,
    ExtensionConfig,
    LofitStage,
    ModelKnockout,
)
from mechinterp.experiments.study.config import DetectStage
from mechinterp.finetune.lofit import LofitSpec
from mechinterp.finetune.lora import LoraSpec
from mechinterp.runner import Shard

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
    from mechinterp.experiments.specs import qa_examples

    exs = qa_examples(task, data=data, n=n, variant=variant, n_docs=n_docs, seed=seed,
                      doc_words=doc_words, skip=skip)  # fmt: skip
    if not exs and data:
        raise InputError(
            f"{data} holds no {task} examples after the first {skip}: point reference_data "
            "at a file with more examples, or lower n_eval / n_detect"
        )
    if not exs:
        raise InputError(f"variant {variant!r} produced no {task} examples; raise n")
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

    return load_model(checkpoint, dtype=base["dtype"], device=base["device"],
                      attention=base.get("attention", "sdpa"))  # fmt: skip


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
    from mechinterp.experiments.study.stages import detect_shard
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
    from mechinterp.experiments.study.stages import (
        baseline_shard,
        knockout_conditions,
        knockout_shard,
    )
    from mechinterp.heads import HeadShape, parse_heads

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



def finetune_shards(config: ExtensionConfig, checkpoints: Path) -> list[Shard]:
    """Stage 1: one LoRA fine-tune per variant, the reference first."""
    from mechinterp.config import to_dict

    return [Shard(f"finetune/{v}", finetune_shard, {
        "base": to_dict(config.model), "data": data_args(config, v, "train"),
        "lora": to_dict(config.lora), "template": config.template,
        "directory": str(checkpoints / v), **({"label": v} if v == LIMITED else {})})
        for v in config.models]  # fmt: skip

