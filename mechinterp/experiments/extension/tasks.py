"""The extension pipeline over several tasks, and the recall–performance correlation pooled
over them (the paper studies MDQA, multi-hop QA and citation together).

    config.tasks = (TaskRun("mdqa", lofit=True), TaskRun("multihop", n_docs=4), ...)
    run_tasks(config)        # <run>/<task>/ is a whole extension run per task (its own report)
    analyse_tasks(run_dir)   # pooled.csv, correlation.json, claims.csv, report.md, report.html,
                             # figures/*

The pooled correlation is computed *within* tasks: recall and performance are ranked and centred
per task, then correlated (`analysis.stats.stratified_correlation`), and its permutation test
permutes performance only among a task's own models. So a task that is easier and whose models
also recall more cannot make the correlation, and one whose performance metric lives on another
scale (citation F1 vs answer F1) cannot hide it. The naive Spearman over all points, ignoring
the task, is shown beside it as a secondary row. Only synthetic variants enter the correlation;
the reference and the limited-real baseline are listed beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mechinterp import store
from mechinterp.errors import InputError
from mechinterp.experiments.extension.report import (
    HTML_INTRO,
    analyse,
    lofit_lines,
    metric_of,
    read_tables,
)
from mechinterp.experiments.extension.report import read_config as read
from mechinterp.experiments.html_report import write_html
from mechinterp.experiments.study.claims import _row, headline, table_lines

CLAIMS = {
    "recall_predicts": "Head recall (vs each task's reference model) predicts task performance "
    "across fine-tuning variants, within tasks, pooled over tasks",
}


def is_tasks_run(run_dir: str | Path) -> bool:
    path = Path(run_dir) / "config.json"
    return path.is_file() and bool(json.loads(path.read_text()).get("tasks"))


def read_config(run_dir: str | Path):
    config = read(run_dir)
    if not config.tasks:
        raise InputError(f"{run_dir} is a single-task extension run (its config has no tasks)")
    return config


def task_dirs(run_dir: Path, config) -> dict[str, Path]:
    """Each task's run directory, checked to hold that task's finished analysis."""
    out = {}
    for run in config.tasks:
        sub = run_dir / run.task
        if not (sub / "heads.csv").is_file():
            raise InputError(f"{sub} has no heads.csv: task {run.task!r} has not finished; "
                             "rerun the same command to resume it")  # fmt: skip
        if read(sub) != config.for_task(run):
            raise InputError(f"{sub}/config.json is not task {run.task!r} of {run_dir}'s config: "
                             "the directory was moved or edited; rerun the command")  # fmt: skip
        out[run.task] = sub
    return out


def pooled_table(run_dir: Path, config) -> pd.DataFrame:
    """One row per (task, model): recall, performance (the task's metric), heads and the
    knockout / patching effects from each task's `heads.csv`; `synthetic` marks the rows that
    enter the correlation."""
    frames = []
    for run in config.tasks:
        sub = config.for_task(run)
        heads = pd.read_csv(run_dir / run.task / "heads.csv", keep_default_na=False,
                            na_values=[""])  # fmt: skip
        frames.append(heads.assign(task=run.task, metric=metric_of(sub)[1],
                                   synthetic=heads["model_variant"].isin(sub.variants)))
    cols = ["task", "model_variant", "label", "synthetic", "n_heads", "recall", "subset_share",
            "jaccard", "performance", "metric", "em", "knockout_drop", "inter_f1_recovery"]
    df = pd.concat(frames, ignore_index=True)
    return df[[c for c in cols if c in df]]


def correlations(pooled: pd.DataFrame, config) -> dict:
    """Spearman of recall with performance: within tasks pooled (stratified, the primary), per
    task, and naive over every point; each {} where undefined."""
    from mechinterp.analysis.stats import correlate, stratified_correlation

    c = config.claims
    kw = {"n_boot": c.n_boot, "level": c.level, "seed": c.seed}
    syn = pooled[pooled["synthetic"]].dropna(subset=["recall", "performance"])

    def record(fn, *args) -> dict:
        try:
            r = fn(*args, **kw)
        except ValueError as e:  # too few points or no variation: undefined, said why
            return {"undefined": str(e), "n": len(args[0])}
        return {"method": r.method, "estimate": r.estimate, "low": r.low, "high": r.high,
                "p_value": r.p_value, "p_permutation": r.p_permutation,
                "n_permutations": r.n_permutations, "exact": r.exact, "n": r.n}  # fmt: skip

    per_task = {t: record(correlate, g["recall"], g["performance"])
                for t, g in syn.groupby("task", sort=False)}  # fmt: skip
    return {
        "pooled_within_task": record(stratified_correlation, syn["recall"], syn["performance"],
                                     syn["task"]),
        "per_task": per_task,
        "pooled_naive": record(correlate, syn["recall"], syn["performance"]),
    }  # fmt: skip


def compute_claims(corr: dict, config) -> pd.DataFrame:
    c = config.claims
    rows = [("pooled over tasks, within-task ranks (permuted within task)",
             corr["pooled_within_task"], True, "variants in tasks")]  # fmt: skip
    rows += [(f"{task} alone", r, False, "variants") for task, r in corr["per_task"].items()]
    rows.append(("pooled, ignoring the task", corr["pooled_naive"], False, "variants"))
    out = []
    for label, r, primary, unit in rows:
        full = f"Spearman of recall with performance: {label}"
        if "estimate" not in r:
            nan = float("nan")
            out.append(_row("recall_predicts", f"{full} ({r.get('undefined', 'undefined')})",
                            "correlation", nan, nan, nan, r.get("n", 0), "ρ", primary=primary,
                            null=0.0, minimum=c.min_correlation, rule="above"))  # fmt: skip
            continue
        out.append(_row("recall_predicts", full, "correlation", r["estimate"], r["low"],
                        r["high"], r["n"], "ρ", primary=primary, null=0.0,
                        minimum=c.min_correlation, rule="correlation", p_value=r["p_value"],
                        resampled=f"{r['n']} {unit} (the CI describes; p decides)",
                        p_permutation=r["p_permutation"], alpha=1 - c.level))  # fmt: skip
    return pd.DataFrame(out)


def draw_figures(run_dir: str | Path, *, png: bool = True) -> list[Path]:
    """`recall_by_task`: recall vs performance per task (one panel each), from `pooled.csv`."""
    formats = ("html", "png") if png else ("html",)
    (fig,) = build_figures(run_dir).values()
    return store.write_figure(fig, Path(run_dir) / "figures" / "recall_by_task", formats=formats)


def build_figures(run_dir: str | Path) -> dict:
    """The figure `draw_figures` writes, by name (a plotly figure; nothing written)."""
    from mechinterp import plots

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    pooled = pd.read_csv(run_dir / "pooled.csv", keep_default_na=False, na_values=[""])
    corr = json.loads((run_dir / "correlation.json").read_text())
    fig = plots.recall_by_task(
        pooled, correlations=corr["per_task"], pooled_correlation=corr["pooled_within_task"],
        title=f"{Path(config.model.name).name}: head recall vs performance per task",
    )  # fmt: skip
    return {"recall_by_task": fig}


def analyse_tasks(
    run_dir: str | Path, *, png: bool | None = True, each_task: bool = True
) -> Path:
    """The pooled analysis from each task's tables (`mechinterp report` reruns it); with
    `each_task`, every task's own analysis and report first."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    for sub in task_dirs(run_dir, config).values():
        if each_task:
            analyse(sub, png=png)
    pooled = pooled_table(run_dir, config)
    corr = correlations(pooled, config)
    claims = compute_claims(corr, config)
    store.write_table(pooled, run_dir / "pooled.csv")
    store.write_json(run_dir / "correlation.json", corr)
    store.write_table(claims, run_dir / "claims.csv")
    store.write_table(headline(claims, CLAIMS), run_dir / "claims_headline.csv")
    if png is not None:
        draw_figures(run_dir, png=png)
    return write_report(run_dir, pooled, corr, claims, config)


def _fmt(x, unit: str = "") -> str:
    return "n/a" if x is None or pd.isna(x) else f"{x:.2f}"


def write_report(run_dir: Path, pooled, corr, claims, config) -> Path:
    prov_path = run_dir / "provenance.json"
    prov = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    c, model = config.claims, Path(config.model.name).name
    pw = corr["pooled_within_task"]
    lines = [
        f"# Synthetic context extension on {model}, {len(config.tasks)} tasks: does head recall "
        "predict performance?",
        "",
        "Computed by `mechinterp.experiments.extension.tasks` from each task's run directory "
        "(its own report: "
        + ", ".join(f"[{t.task}]({t.task}/report.md)" for t in config.tasks)
        + "). "
        "`mechinterp report <dir>` recomputes it.",
        "",
        "- tasks: " + "; ".join(
            f"{t.task} ({config.for_task(t).n_docs} documents, performance = "
            f"{pooled.loc[pooled['task'] == t.task, 'metric'].iloc[0]})" for t in config.tasks),
        f"- per task: the reference `{config.reference}`"
        + (f", real data (limited: {config.limited} examples)" if config.limited else "")
        + f" and {len(config.variants)} synthetic variants ({', '.join(config.variants)}); "
        f"LoRA r={config.lora.r}, {config.lora.steps} steps, {config.n_train} training examples; "
        f"{config.n_eval} evaluation examples",
        f"- commit `{prov.get('git_commit')}`; config hash `{store.config_hash(config)}`",
    ]  # fmt: skip
    if "timings" in prov:
        t = prov["timings"]
        lines.append("- last invocation: " + ", ".join(
            f"{k[:-2]} {v / 60:.1f} min" for k, v in t.items()) + " wall time")  # fmt: skip
    verdict = headline(claims, CLAIMS)["verdict"].iloc[0]
    lines += ["", "## Verdict", "", f"{CLAIMS['recall_predicts']}: **{verdict}**"]
    if "estimate" in pw:
        how = "within-task pairings, exact" if pw["exact"] else "random within-task pairings"
        lines += ["", f"Within-task Spearman ρ = {pw['estimate']:.2f} "
                  f"[{pw['low']:.2f}, {pw['high']:.2f}] over N = {pw['n']} synthetic models; "
                  f"permutation p = {pw['p_permutation']:.4f} ({pw['n_permutations']:,} {how})."]
    lines += ["", "## Claims", "", *table_lines(claims, _fmt)]
    lines += ["", "## Per task and model", "",
              "| task | model | heads | recall | subset share | performance | knockout drop | "
              "Inter recovery |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in pooled.itertuples():
        lines.append(
            f"| {r.task} | {r.label} | {r.n_heads} | {_fmt(r.recall)} | "
            f"{_fmt(r.subset_share)} | {_fmt(r.performance)} ({r.metric}) | "
            f"{_fmt(getattr(r, 'knockout_drop', None))} | "
            f"{_fmt(getattr(r, 'inter_f1_recovery', None))} |"
        )
    lines += ["", "## Each task's verdicts (from its own report)", "",
              "| task | claim | verdict |", "| --- | --- | --- |"]  # fmt: skip
    for run in config.tasks:
        for h in pd.read_csv(run_dir / run.task / "claims_headline.csv").itertuples():
            lines.append(f"| {run.task} | {h.statement} | {h.verdict} |")
    for run in config.tasks:
        if run.lofit and config.lofit is not None:
            sub = run_dir / run.task
            lofit = lofit_lines(read_tables(sub), config.for_task(run))
            lines += [line.replace("## ", f"## {run.task}: ", 1) for line in lofit]
    if (run_dir / "figures" / "recall_by_task.png").is_file():
        lines += ["", "![recall_by_task](figures/recall_by_task.png)"]
    lines += ["", "## How the verdict is decided", "",
              "- The primary row ranks recall and performance within each task and correlates "
              "them; its p-value permutes performance among a task's own synthetic models, every "
              "pairing when there are few enough. Supported when p ≤ "
              f"{1 - c.level:.2f} and ρ ≥ {c.min_correlation:g}; not supported when the "
              "bootstrap CI (variants resampled within tasks) lies below the minimum; else "
              "inconclusive.",
              "- Per-task and naive pooled rows are secondary: at 4 variants a task alone cannot "
              "reach p ≤ 0.05 (its smallest exact p is 2/24 = 0.083)."]  # fmt: skip
    path = store.write_text(run_dir / "report.md", "\n".join(lines) + "\n")
    write_html(run_dir, title=lines[0].removeprefix("# "), headline=headline(claims, CLAIMS),
               claims=claims, figures=build_figures(run_dir), fmt=_fmt, attention=False,
               intro="Pooled over the tasks; each task's directory has its own report.html. "
               + HTML_INTRO,
               extra_provenance={"config hash": store.config_hash(config)})  # fmt: skip
    return path
