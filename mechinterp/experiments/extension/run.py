"""The synthetic-context-extension pipeline (the paper's steps, docs/experiments/extension.md),
as shards:

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

import sys
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from mechinterp import store
from mechinterp.config import to_dict
from mechinterp.errors import InputError
from mechinterp.experiments import rundir
from mechinterp.experiments.extension.config import ExtensionConfig
from mechinterp.experiments.extension.heads import head_sets, model_scores
from mechinterp.experiments.extension.report import analyse
from mechinterp.experiments.extension.stages import (
    cross_shard,
    data_args,
    detect_model_shard,
    eval_shard,
    finetune_shards,
    knockout_model_shard,
    lofit_head_sets,
    lofit_localised_shard,
    lofit_shard,
    lofit_sweep_shard,
)
from mechinterp.experiments.extension.tasks import analyse_tasks
from mechinterp.experiments.specs import check_inputs
from mechinterp.heads import HeadShape
from mechinterp.interventions.cross import patch_head_sets
from mechinterp.runner import Shard, ShardStats, run_shards


def run_extension(config: ExtensionConfig, root: str | Path = "runs", **options) -> Path:
    """Run (or resume) the pipeline; write its tables (`losses`, `eval`, `detect_instances`,
    `knockout`, `cross`), then the analysis from those tables alone (`extension_report.analyse`:
    head sets and recall, the correlation, claims, report.md and figures; `png=False`: HTML
    figures only, `png=None`: none). `options`: `rundir.RunOptions`."""
    check_inputs(config)
    if config.tasks:
        return run_tasks(config, root, **options)
    opts = rundir.RunOptions(**options)
    out = opts.directory(root, config)
    rundir.check_writable(out)
    # a changed config reuses the shards whose own inputs did not change
    with rundir.open_run(out, config, opts, what="extension run", replace=True):
        _run(config, out, opts)
        analyse(out, png=opts.png)
    return out


def _run(config: ExtensionConfig, out: Path, opts: rundir.RunOptions) -> None:
    t0, stats, timings = time.perf_counter(), ShardStats(), {}
    shard_dir, ckpt = out / "shards", out / "checkpoints"
    everyone = config.models
    common = {"model": None, "engine": opts.engine, "ray_address": opts.ray_address,
              "progress": opts.progress, "stats": stats, "load": False,
              "key": {"base": rundir.model_fingerprint(config.model.name)}}  # fmt: skip
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
    written = []
    for name, df in (("losses", losses), ("eval", evals), ("detect_instances", per),
                     ("knockout", knockout), ("cross", cross), ("lofit", lofit),
                     ("lofit_sweep", sweep), ("lofit_localised", localised)):  # fmt: skip
        if len(df):
            store.write_table(df, out / f"{name}.parquet")
            written.append(f"{name}.parquet")
        else:
            (out / f"{name}.parquet").unlink(missing_ok=True)
    timings["total_s"] = round(time.perf_counter() - t0, 1)  # the shards; analysis follows
    store.write_json(out / "provenance.json", store.provenance(
        engine=opts.engine, spec=asdict(config.lora),
        shards={"computed": len(stats.computed), "skipped": len(stats.skipped)},
        timings=timings, seal=rundir.seal(out, written)))  # fmt: skip


def run_tasks(config: ExtensionConfig, root: str | Path = "runs", **options) -> Path:
    """One extension run per task under `<out>/<task>/` (each resumes on its own), then the
    pooled analysis. `options`: `rundir.RunOptions`."""
    if not config.tasks:
        raise InputError("run_tasks needs config.tasks; run_extension runs a single task")
    opts = rundir.RunOptions(**options)
    out = opts.directory(root, config)
    rundir.check_writable(out)
    with rundir.open_run(out, config, opts, what="multi-task extension run"):
        t0, timings = time.perf_counter(), {}
        for i, run in enumerate(config.tasks, 1):
            if opts.progress:
                print(f"task {i}/{len(config.tasks)}: {run.task}", file=sys.stderr, flush=True)
            t = time.perf_counter()
            run_extension(config.for_task(run), **{**options, "out": out / run.task})
            timings[f"{run.task}_s"] = round(time.perf_counter() - t, 1)
        timings["total_s"] = round(time.perf_counter() - t0, 1)
        store.write_json(out / "provenance.json", store.provenance(
            engine=opts.engine, timings=timings, seal=rundir.seal(out, [])))  # fmt: skip
        analyse_tasks(out, png=opts.png, each_task=False)  # run_extension analysed each task
    return out
