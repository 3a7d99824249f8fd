"""The `mechinterp` command."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _model_args(p, m) -> None:
    p.add_argument(
        "--model",
        default=m.name,
        help="embedded name (smollm2-135m), a .gguf file, a local HF model or LoRA directory, "
        "or a model id in the local HF cache",
    )
    p.add_argument("--dtype", default=m.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    p.add_argument("--rope-theta", type=float, default=None)


def _task_args(p, d) -> None:
    p.add_argument("--task", default=d.task, choices=["niah", "mdqa", "multihop", "citation"])
    p.add_argument(
        "--lengths",
        type=_ints,
        default=d.lengths,
        help="NIAH context lengths in tokens, comma-separated",
    )
    p.add_argument(
        "--depths",
        type=_floats,
        default=d.depths,
        help="NIAH needle depths in [0, 1], comma-separated",
    )
    p.add_argument("--needles", type=int, default=d.needles, help="number of NIAH needles (1-8)")
    p.add_argument("--haystack", default=d.haystack, choices=["essays", "filler"])
    p.add_argument(
        "--data",
        default=None,
        help="your data: JSONL (lost-in-the-middle format for mdqa, MuSiQue for multihop) or a "
        "Summary-of-a-Haystack JSON haystack for citation",
    )
    p.add_argument(
        "--variant",
        default=d.variant,
        help="synthetic QA variant: realistic-high|realistic-low|templated-high|"
        "templated-low|symbolic",
    )
    p.add_argument("--n", type=int, default=d.n, help="QA examples (synthetic count or file limit)")
    p.add_argument("--n-docs", type=int, default=d.n_docs)
    p.add_argument("--seed", type=int, default=d.seed)


def _run_args(p) -> None:
    p.add_argument("--template", default=None, choices=["chat", "plain"])
    p.add_argument("--out", default="runs", help="root folder for run directories")
    p.add_argument("--force", action="store_true", help="recompute an existing run")
    p.add_argument("--no-png", action="store_true", help="skip the static PNG (needs Chromium)")


def _model_spec(args):
    from mechinterp.experiments import ModelSpec

    return ModelSpec(args.model, args.dtype, args.device, args.rope_theta)


def _task_spec(args):
    from mechinterp.experiments import TaskSpec

    return TaskSpec(
        task=args.task,
        lengths=args.lengths,
        depths=args.depths,
        needles=args.needles,
        haystack=args.haystack,
        data=args.data,
        variant=args.variant,
        n=args.n,
        n_docs=args.n_docs,
        seed=args.seed,
    )


def _eval_parser(sub) -> None:
    from mechinterp.experiments import EvalConfig, ModelSpec, TaskSpec

    e = EvalConfig()
    p = sub.add_parser(
        "eval",
        help="run a long-context task on a model; write a tidy table "
        "and a length x depth accuracy heatmap",
    )
    _model_args(p, ModelSpec())
    _task_args(p, TaskSpec())
    p.add_argument("--max-new-tokens", type=int, default=e.max_new_tokens)
    p.add_argument("--batch-size", type=int, default=e.batch_size)
    _run_args(p)


def cmd_eval(args) -> int:
    import pandas as pd

    from mechinterp.experiments import EvalConfig, run_eval, summarise

    config = EvalConfig(
        model=_model_spec(args),
        task=_task_spec(args),
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        template=args.template,
    )
    out = run_eval(config, args.out, force=args.force, png=not args.no_png)
    df = pd.read_parquet(out / "results.parquet")
    print(summarise(df).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"accuracy {df['correct'].mean():.3f} over {len(df)} examples")
    print(f"wrote {out}")
    return 0


def _gate(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _detect_parser(sub) -> None:
    from mechinterp.detect import DETECTORS
    from mechinterp.experiments import DetectConfig, ModelSpec

    c = DetectConfig()
    p = sub.add_parser(
        "detect",
        help="score every attention head (retrieval, qr, previous_token, duplicate_token, "
        "induction); write tidy tables and a layer x head heatmap",
    )
    p.add_argument("--detector", default=c.detector, choices=sorted(DETECTORS))
    _model_args(p, ModelSpec())
    _task_args(p, c.task)
    p.add_argument(
        "--convention",
        default=c.convention,
        choices=["set", "per_step"],
        help="retrieval: count each needle token once (set, the paper) or every copying step "
        "(per_step, Wu's reference code)",
    )
    p.add_argument(
        "--keys",
        default=c.keys,
        choices=["prompt", "context"],
        help="retrieval: argmax over the prompt's keys, or over every visible key",
    )
    p.add_argument(
        "--gate",
        type=_gate,
        default=c.gate,
        help="retrieval: count instances whose answer has ROUGE-1 recall above this ('none': all)",
    )
    p.add_argument("--max-new-tokens", type=int, default=c.max_new_tokens)
    p.add_argument(
        "--calibrate", action="store_true", help="qr: subtract a null question's attention mass"
    )
    p.add_argument("--seq-len", type=int, default=c.seq_len, help="pattern scores: random length")
    p.add_argument("--n-sequences", type=int, default=c.n_sequences)
    p.add_argument("--batch-size", type=int, default=c.batch_size)
    p.add_argument("--top", type=int, default=10, help="heads to print")
    _run_args(p)


def cmd_detect(args) -> int:
    import pandas as pd

    from mechinterp.experiments import DetectConfig, run_detect

    config = DetectConfig(
        model=_model_spec(args),
        task=_task_spec(args),
        detector=args.detector,
        convention=args.convention,
        keys=args.keys,
        gate=args.gate,
        max_new_tokens=args.max_new_tokens,
        calibrate=args.calibrate,
        seq_len=args.seq_len,
        n_sequences=args.n_sequences,
        batch_size=args.batch_size,
        template=args.template,
    )
    out = run_detect(config, args.out, force=args.force, png=not args.no_png)
    scores = pd.read_parquet(out / "scores.parquet")
    top = scores.nsmallest(args.top, "rank")
    cols = ["rank", "head_name", "score"] + (
        ["frequency"] if scores["frequency"].notna().any() else []
    )
    print(top[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    n = scores["n_instances"].iloc[0]
    instances = pd.read_parquet(out / "instances.parquet")
    print(
        f"{args.detector}: {(scores['score'] > 0.1).mean():.1%} of {len(scores)} heads score "
        f"> 0.1, {(scores['score'] > 0).mean():.1%} > 0; {n} of {len(instances)} instances counted"
    )
    print(f"wrote {out}")
    return 0


def _knockout_parser(sub) -> None:
    from mechinterp.experiments import KnockoutConfig, ModelSpec

    c = KnockoutConfig(heads=("L0H0",))
    p = sub.add_parser(
        "knockout",
        help="knock out the top-k ranked heads vs k random complement heads while a task runs; "
        "write a tidy table and an accuracy-vs-k figure",
    )
    _model_args(p, ModelSpec())
    _task_args(p, c.task)
    p.add_argument("--heads", default=None, help="ranked head list, best first: 'L17H3,L18H6,…'")
    p.add_argument(
        "--scores",
        default=None,
        help="a detection run directory or its scores.parquet/csv (ranked by score)",
    )
    p.add_argument("--ks", type=_ints, default=c.ks, help="numbers of heads, comma-separated")
    p.add_argument("--seeds", type=_ints, default=c.seeds, help="random-baseline seeds")
    p.add_argument(
        "--modes",
        type=lambda t: tuple(x for x in t.split(",") if x),
        default=c.modes,
        help="knockout modes, comma-separated: zero, uniform_attention",
    )
    p.add_argument(
        "--match-layers", action="store_true", help="random heads matched per layer to the top-k"
    )
    p.add_argument("--max-new-tokens", type=int, default=c.max_new_tokens)
    p.add_argument("--batch-size", type=int, default=c.batch_size)
    p.add_argument(
        "--score", action="store_true", help="also score the answer's teacher-forced log-prob"
    )
    _run_args(p)


def cmd_knockout(args) -> int:
    import pandas as pd

    from mechinterp.experiments import KnockoutConfig, run_knockout

    config = KnockoutConfig(
        model=_model_spec(args),
        task=_task_spec(args),
        heads=tuple(h for h in (args.heads or "").replace(" ", ",").split(",") if h),
        scores=args.scores,
        ks=args.ks,
        seeds=args.seeds,
        modes=args.modes,
        match_layers=args.match_layers,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        score=args.score,
        template=args.template,
    )
    out = run_knockout(config, args.out, force=args.force, png=not args.no_png)
    summary = pd.read_csv(out / "summary.csv")
    print(summary.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"wrote {out}")
    return 0


def _patch_parser(sub) -> None:
    from mechinterp.experiments import CrossPatchConfig, HeadSelection, ModelSpec, PatchConfig

    c, x, sel = (
        PatchConfig(),
        CrossPatchConfig(select=HeadSelection(heads=("L0H0",))),
        HeadSelection(),
    )
    p = sub.add_parser(
        "patch",
        help="per-head activation patching between each task instance and its corruption, or "
        "(--donor) donor head sets patched into the model while the task runs; tidy tables and "
        "a figure",
    )
    _model_args(p, ModelSpec())
    _task_args(p, c.task)
    p.add_argument("--direction", default=c.direction, choices=["denoise", "noise"])
    p.add_argument(
        "--heads",
        default=None,
        help="heads to patch: 'L17H3,L18H6,…' (within a model: only these; with --donor: the set)",
    )
    p.add_argument(
        "--scores",
        default=None,
        help="a detection run or its scores table: within a model, marks the selected heads "
        "(every head is still patched); with --donor, the donor's scores",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=sel.threshold,
        help="select heads scoring above this (Wu's retrieval-head rule)",
    )
    p.add_argument("--top-k", type=int, default=None, help="select the k best heads instead")
    p.add_argument("--donor", default=None, help="cross-model patching: the donor model")
    p.add_argument(
        "--recipient-scores",
        default=None,
        help="with --donor and --scores: the model's own scores (for Inter / Compl / Rand)",
    )
    p.add_argument("--seeds", type=_ints, default=x.seeds, help="seeds of the Rand head sets")
    p.add_argument("--max-new-tokens", type=int, default=x.max_new_tokens)
    p.add_argument("--batch-size", type=int, default=None)
    _run_args(p)


def cmd_patch(args) -> int:
    import pandas as pd

    from mechinterp.experiments import (
        CrossPatchConfig,
        HeadSelection,
        ModelSpec,
        PatchConfig,
        run_cross_patch,
        run_patch,
    )

    select = HeadSelection(
        heads=tuple(h for h in (args.heads or "").replace(" ", ",").split(",") if h),
        scores=args.scores,
        threshold=args.threshold,
        top_k=args.top_k,
    )
    fmt = {"float_format": lambda x: f"{x:.3f}", "index": False}
    if args.donor:
        config = CrossPatchConfig(
            model=_model_spec(args),
            donor=ModelSpec(args.donor, args.dtype, args.device, args.rope_theta),
            task=_task_spec(args),
            select=select,
            recipient_scores=args.recipient_scores,
            seeds=args.seeds,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size or CrossPatchConfig.batch_size,
            template=args.template,
        )
        out = run_cross_patch(config, args.out, force=args.force, png=not args.no_png)
        print(pd.read_csv(out / "summary.csv").to_string(**fmt))
    else:
        if args.recipient_scores:
            raise ValueError("--recipient-scores applies to cross-model patching (--donor)")
        config = PatchConfig(
            model=_model_spec(args),
            task=_task_spec(args),
            direction=args.direction,
            select=select,
            batch_size=args.batch_size or PatchConfig.batch_size,
            template=args.template,
        )
        out = run_patch(config, args.out, force=args.force, png=not args.no_png)
        heads = pd.read_parquet(out / "heads.parquet").nlargest(10, "recovery")
        print(heads[["head_name", "in_set", "recovery"]].to_string(**fmt))
        if select:
            print(pd.read_csv(out / "sets.csv").to_string(**fmt))
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------- studies and stored results


def _study_parser(sub) -> None:
    p = sub.add_parser(
        "study",
        help="the main job: detect retrieval heads, knock them out vs random heads, patch them, "
        "and write a claims report with figures",
    )
    p.add_argument(
        "kind",
        nargs="?",
        default="retrieval",
        choices=["retrieval", "extension"],
        help="retrieval: the necessity & sufficiency study (default); extension: fine-tune on "
        "task variants and compare their heads (experiments/extension-mini.yaml)",
    )
    p.add_argument("--config", default=None, help="a YAML config (e.g. experiments/study.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set knockout.ks=[1,5] --set model.name=/path",
    )
    p.add_argument("--out", default=None, help="run directory (default: ROOT/study-<model>-<hash>)")
    p.add_argument("--root", default="runs", help="root folder for run directories")
    p.add_argument("--engine", default="local", choices=["local", "ray"])
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: local)")
    p.add_argument("--no-png", action="store_true", help="skip static PNGs (needs Chromium)")
    p.add_argument("--print-config", action="store_true", help="print the resolved YAML and exit")


def cmd_study(args) -> int:
    from mechinterp.config import dump_yaml, load_config
    from mechinterp.experiments.extension import ExtensionConfig, run_extension
    from mechinterp.experiments.study import StudyConfig, run_study

    kind = ExtensionConfig if args.kind == "extension" else StudyConfig
    config = load_config(kind, args.config, args.overrides)
    if args.print_config:
        print(dump_yaml(config), end="")
        return 0
    run = run_extension if args.kind == "extension" else run_study
    try:
        out = run(
            config,
            args.root,
            out=args.out,
            engine=args.engine,
            ray_address=args.ray_address,
            png=not args.no_png,
        )
    except KeyboardInterrupt:
        print(
            "mechinterp study: interrupted. Finished shards are kept; rerun the same command to "
            "resume.",
            file=sys.stderr,
        )
        return 130
    _print_headline(out)
    print(f"wrote {out}/report.md")
    return 0


def _print_headline(out) -> None:
    import pandas as pd

    heads = pd.read_csv(out / "claims_headline.csv")
    for r in heads.itertuples():
        print(f"{r.verdict:>14}  {r.statement}")


def _results_parser(sub) -> None:
    p = sub.add_parser(
        "figures", help="redraw a run directory's figures from its stored tables (no model)"
    )
    p.add_argument("run", help="a run directory (study, eval or detect)")
    p.add_argument("--no-png", action="store_true")
    p = sub.add_parser(
        "report", help="recompute a study's claims and report.md from its stored tables (no model)"
    )
    p.add_argument("run", help="a study run directory")


def cmd_figures(args) -> int:
    from pathlib import Path

    import pandas as pd

    from mechinterp import plots, store

    run = Path(args.run)
    formats = ("html",) if args.no_png else ("html", "png")
    from mechinterp.experiments.extension.report import is_extension_run
    from mechinterp.experiments.extension.tasks import is_tasks_run

    if is_tasks_run(run):
        from mechinterp.experiments.extension.tasks import draw_figures as draw_tasks

        written = draw_tasks(run, png=not args.no_png)
    elif is_extension_run(run):
        from mechinterp.experiments.extension.report import draw_figures as draw_extension

        written = draw_extension(run, png=not args.no_png)
    elif (run / "detect_instances.parquet").is_file():
        from mechinterp.experiments.study import draw_figures

        written = draw_figures(run, png=not args.no_png)
    elif (run / "results.parquet").is_file():
        fig = plots.accuracy_heatmap(pd.read_parquet(run / "results.parquet"))
        written = store.write_figure(fig, run / "accuracy", formats=formats)
    elif (run / "scores.parquet").is_file():
        fig = plots.head_heatmap(pd.read_parquet(run / "scores.parquet"))
        written = store.write_figure(fig, run / "heads", formats=formats)
    else:
        raise ValueError(
            f"{run} holds no table to draw from (a study, eval or detect run directory)"
        )
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_report(args) -> int:
    from pathlib import Path

    from mechinterp.experiments.extension.report import analyse, is_extension_run
    from mechinterp.experiments.extension.tasks import analyse_tasks, is_tasks_run
    from mechinterp.experiments.study import write_report

    if is_tasks_run(args.run):
        path = analyse_tasks(Path(args.run), png=None)  # every task's report, then the pooled one
    elif is_extension_run(args.run):
        path = analyse(Path(args.run), png=None)  # claims and report; `figures` redraws figures
    else:
        path = write_report(Path(args.run))
    _print_headline(Path(args.run))
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mechinterp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _eval_parser(sub)
    _detect_parser(sub)
    _knockout_parser(sub)
    _patch_parser(sub)
    _study_parser(sub)
    _results_parser(sub)
    args = parser.parse_args(argv)
    try:
        return {
            "eval": cmd_eval,
            "detect": cmd_detect,
            "knockout": cmd_knockout,
            "patch": cmd_patch,
            "study": cmd_study,
            "figures": cmd_figures,
            "report": cmd_report,
        }[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"mechinterp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
