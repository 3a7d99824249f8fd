"""`run_study`: detect → clean answers → knockout sweep → patching → tables, figures, report.

Every stage is a list of shards in `<run>/shards/` (see `mechinterp.runner`): a rerun skips the
finished ones, so an interrupted study resumes where it stopped, in this process or on Ray.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from mechinterp import store
from mechinterp.errors import InputError
from mechinterp.experiments import rundir
from mechinterp.experiments.rundir import RunDirError  # noqa: F401  (re-exported)
from mechinterp.experiments.specs import check_inputs
from mechinterp.experiments.study.config import StudyConfig
from mechinterp.runner import Shard, ShardStats, run_shards


def run_study(config: StudyConfig, root: str | Path = "runs", *, model=None, **options) -> Path:
    """Run (or resume) the study and write its run directory; return it. `options`:
    `rundir.RunOptions` (out, engine, ray_address, png, progress, wait, force); another
    process writing the same directory is an error unless `wait`.

    Tables: `detect_scores`, `detect_instances`, `baseline`, `knockout`, `patch` (parquet, and
    CSV for the small ones), `claims.csv`, `report.md`, `figures/`, config and provenance.
    """
    from mechinterp.experiments.study.report import draw_figures, write_report
    from mechinterp.heads import HeadShape

    opts = rundir.RunOptions(**options)
    check_inputs(config)
    out = opts.directory(root, config)
    rundir.check_writable(out)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    stats = ShardStats()
    tic = time.perf_counter()
    if model is None:
        model = config.model.load()
    timings["load_s"] = time.perf_counter() - tic
    shape = HeadShape.of(model)
    check_against_model(config, shape, model.cfg.n_ctx)
    with rundir.open_run(out, config, opts, what="study"):
        _run(config, out, model, shape, stats, timings, t_start, opts)
        if opts.png is not None:
            draw_figures(out, png=opts.png)
        write_report(out, model=model)
    return out


def check_against_model(config: StudyConfig, shape, n_ctx: int) -> None:
    """What the config asks of the model, checked before any stage runs."""
    n_heads = shape.n_layers * shape.n_heads
    if max(config.knockout.ks) > n_heads:
        raise InputError(f"knockout.ks goes up to {max(config.knockout.ks)} but the model has "
                         f"{n_heads} heads")  # fmt: skip
    for where in ("detect", "knockout"):
        niah = getattr(config, where).niah
        if max(niah.lengths) > n_ctx:
            raise InputError(f"{where}.niah.lengths goes up to {max(niah.lengths)} tokens, "
                             f"longer than the model's context window of {n_ctx}")  # fmt: skip


def _run(config, out, model, shape, stats, timings, t_start, opts: rundir.RunOptions):
    from mechinterp.experiments.command import model_key
    from mechinterp.experiments.study import stages
    from mechinterp.heads import parse_heads
    from mechinterp.models import model_card
    from mechinterp.models.load import tune_allocator
    from mechinterp.tasks.mdqa import synthetic_mdqa
    from mechinterp.tasks.niah import niah_grid

    tok = model.tokenizer
    common = {
        "model": model,
        "model_spec": config.model,
        "engine": opts.engine,
        "ray_address": opts.ray_address,
        "progress": opts.progress,
        "stats": stats,
        "key": {"model": model_key(model_card(model))},
    }
    shard_dir = out / "shards"
    written = ["detect_instances.parquet", "detect_scores.parquet", "baseline.parquet",
               "knockout.parquet", "patch.parquet"]

    # 1. detection
    tic = time.perf_counter()
    d = config.detect
    det_examples = niah_grid(tok, lengths=d.niah.lengths, depths=d.niah.depths,
                             needles=list(d.niah.needles), haystack=d.niah.haystack,
                             seed=d.niah.seed)  # fmt: skip
    per_instance = run_shards(
        stages.detect_shards(det_examples, d, config.template), shard_dir, desc="1/8 detect",
        **common,
    )  # fmt: skip
    scores = stages.combine_detect(per_instance, d.threshold, d.top_k).assign(
        model=Path(config.model.name).name
    )
    store.write_table(per_instance, out / "detect_instances.parquet")
    store.write_table(scores, out / "detect_scores.parquet")
    store.write_table(scores, out / "detect_scores.csv")
    ranked = parse_heads(list(scores["head_name"]), shape)
    retrieval = parse_heads(list(scores.loc[scores["retrieval_head"], "head_name"]), shape)
    timings["detect_s"] = time.perf_counter() - tic

    # 2. clean answers on held-out examples, then the knockout sweep
    tic = time.perf_counter()
    k = config.knockout
    held = niah_grid(
        tok, lengths=k.niah.lengths, depths=k.niah.depths, needles=list(k.niah.needles),
        haystack=k.niah.haystack, seed=k.niah.seed,
    )  # fmt: skip
    if k.mdqa.n:
        from mechinterp.experiments.specs import parse_variant

        realism, diversity = parse_variant(k.mdqa.variant)
        held += synthetic_mdqa(k.mdqa.n, n_docs=k.mdqa.n_docs, realism=realism,
                               diversity=diversity, seed=k.mdqa.seed)  # fmt: skip
    baseline = run_shards(
        stages.baseline_shards(held, k, config.template), shard_dir, desc="2/8 clean answers",
        **common,
    )  # fmt: skip
    store.write_table(baseline, out / "baseline.parquet")
    store.write_table(baseline.drop(columns="target_ids"), out / "baseline.csv")
    timings["baseline_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    knock = run_shards(
        stages.knockout_shards(held, baseline, ranked, shape, k, config.template), shard_dir,
        desc="3/8 knockout", **common,
    )  # fmt: skip
    store.write_table(knock, out / "knockout.parquet")
    timings["knockout_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    shards = stages.robustness_shards(held, baseline, ranked, shape, config)
    if shards:
        robust = run_shards(shards, shard_dir, desc="4/8 robustness", **common)
        store.write_table(robust, out / "robustness.parquet")
        written.append("robustness.parquet")
        timings["robustness_s"] = time.perf_counter() - tic

    # 3. patching
    tic = time.perf_counter()
    patch = run_shards(
        stages.patch_shards(held, baseline, retrieval, shape, config.patch, k.niah.seed,
                            k.scope, config.template),
        shard_dir, desc="5/8 patch", **common,
    )  # fmt: skip
    store.write_table(patch, out / "patch.parquet")
    timings["patch_s"] = time.perf_counter() - tic

    # 3b-c. the AtP* screen and the paths into the retrieval heads, on the same pairs
    for name, shards, desc in (
        ("attribution", stages.attribution_shards(held, baseline, retrieval, shape, config,
                                                  k.scope), "6/8 AtP* screen"),
        ("paths", stages.path_shards(held, baseline, retrieval, ranked, shape, config, k.scope),
         "7/8 path patching"),
    ):  # fmt: skip
        if shards:
            tic = time.perf_counter()
            table = run_shards(shards, shard_dir, desc=desc, **common)
            store.write_table(table, out / f"{name}.parquet")
            written.append(f"{name}.parquet")
            timings[f"{name}_s"] = time.perf_counter() - tic

    # 3d. where the retrieval heads look, and which upstream heads steer them
    if config.paths.inputs or config.addressing.kinds:  # what kind of head each sender is
        patterns = run_shards([Shard("patterns/heads", stages.pattern_shard, {})], shard_dir,
                              desc="head patterns", **common)  # fmt: skip
        store.write_table(patterns, out / "head_patterns.parquet")
        written.append("head_patterns.parquet")
        shards = stages.address_shards(config, tok, retrieval, ranked, patterns)
        if shards:
            tic = time.perf_counter()
            table = run_shards(shards, shard_dir, desc="8/8 addressing", **common)
            store.write_table(table, out / "addressing.parquet")
            written.append("addressing.parquet")
            timings["addressing_s"] = time.perf_counter() - tic

    # 4. provenance, figures, report
    timings["total_s"] = time.perf_counter() - t_start
    store.write_json(
        out / "provenance.json",
        store.provenance(
            model_card=model_card(model).to_dict(),
            malloc_tuned=tune_allocator(),
            seeds={
                "detect": d.niah.seed,
                "heldout": k.niah.seed,
                "knockout": list(k.seeds),
                "patch": list(config.patch.seeds),
            },  # fmt: skip
            engine=opts.engine,
            device=str(model.cfg.device),
            shards={
                "computed": len(stats.computed),
                "skipped": len(stats.skipped),
                "repaired": stats.repaired,
            },  # fmt: skip
            shard_seconds={n: round(s, 2) for n, s in stats.seconds.items()},
            timings={n: round(s, 1) for n, s in timings.items()},
            seal=rundir.seal(out, written),
        ),
    )


def shard_overview(run_dir: str | Path) -> pd.DataFrame:
    """One row per finished shard (name, rows, seconds, peak RSS) from the shard records."""
    rows = []
    for rec in sorted(Path(run_dir, "shards").rglob("*.json")):
        meta = json.loads(rec.read_text())
        keys = ("name", "rows", "seconds", "peak_rss_mib", "finished")
        rows.append({k: meta.get(k) for k in keys})
    return pd.DataFrame(rows)
