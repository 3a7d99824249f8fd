"""The extension pipeline's analysis, claims report and figures, from its stored tables only.

analyse(run_dir)    # detect_scores, heads.csv, recall.csv, correlation.json, cross_summary.csv,
                    # knockout_summary.csv, claims.csv, report.md, report.html, figures/*

Claims (each row: an effect, a cluster-robust t interval (`analysis.stats`), a verdict as in
`study.claims.verdict`):

1. recall_predicts — "head recall predicts task performance": Spearman ρ between each synthetic
   model's recall of the reference model's heads and its F1 on the reference task (primary;
   judged by the exact permutation p-value; the percentile bootstrap CI over variants only
   describes),
   Pearson r (secondary).
2. subset — "synthetic heads are mostly a subset of the reference heads": per synthetic model, the
   share of its heads that the reference model also has; the mean over models (primary, an
   interval over models) must exceed `min_subset`; per model (secondary, over heads).
3. inter_beats_rand — "patching Inter heads recovers more than Rand": per (synthetic model,
   example × Rand draw), F1 with Inter patched in minus F1 with that Rand set (primary;
   clustered by example, shared by every model, crossed with the draws); the
   same on the answer's log-prob (secondary). Models whose mean metric already equals the
   donor's have nothing to recover and are left out of that row.
4. necessary — "each model's own top-k heads matter more than k random heads": the study's
   necessity rows, per model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from mechinterp import store
from mechinterp.analysis.stats import cluster_mean
from mechinterp.errors import InputError
from mechinterp.experiments.extension.config import (
    LIMITED,
    REFERENCE_LABEL,
    ExtensionConfig,
    performance_metric,
)
from mechinterp.experiments.extension.heads import compare_heads, head_sets, model_scores
from mechinterp.experiments.html_report import write_html
from mechinterp.experiments.study.claims import (
    BASELINES,
    _row,
    cluster_labels,
    headline,
    necessity_rows,
    paired_draws,
    table_lines,
)
from mechinterp.experiments.study.config import ClaimSettings

CLAIMS = {
    "recall_predicts": "Head recall (vs the reference model) predicts task performance across "
    "fine-tuning variants",
    "subset": "Synthetic models' retrieval heads are mostly a subset of the reference model's",
    "inter_beats_rand": "Patching Inter heads from the reference model recovers more than Rand "
    "heads",
    "necessary": "Each model's own top-k heads matter more than k random heads (knockout)",
}
#: report.html's lead paragraph (report.md has the full text).
HTML_INTRO = ("Computed from the tables in this directory, as report.md (which has the full text "
              "and the per-model table). Hover a figure for its values.")  # fmt: skip
TABLES = ("losses", "eval", "detect_instances", "knockout", "cross", "lofit", "lofit_sweep",
          "lofit_localised")


def read_config(run_dir: str | Path):
    """The run's config, once `rundir.verify` has checked it is the one its tables came from."""
    from mechinterp.experiments.rundir import verify
    from mechinterp.experiments.study.report import read_config as read

    config = read(run_dir, ExtensionConfig, what="extension")
    verify(run_dir, what="extension run")
    return config


def read_tables(run_dir: str | Path) -> dict[str, pd.DataFrame]:
    from mechinterp.experiments.study.report import read_tables as read

    return read(run_dir, TABLES, required=("eval", "detect_instances"), what="pipeline")


def is_extension_run(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "losses.parquet").is_file()


# ---------------------------------------------------------------- derived tables


def label_of(variant: str, config) -> str:

    if variant == LIMITED:
        return f"real data (limited: {config.reference} on {config.limited} examples)"
    return REFERENCE_LABEL if variant == config.reference else variant


def metric_of(config) -> tuple[str, str]:
    """The performance metric's column and its name in tables and figures."""

    metric = performance_metric(config.task)
    return metric, "citation F1" if metric == "citation_f1" else "F1"


def cross_summary(cross: pd.DataFrame, metric: str = "f1", level: float = 0.95) -> pd.DataFrame:
    """Per (recipient variant, condition): mean `metric` and answer log-prob, the normalised
    recovery of each ((M − M_recipient) / (M_donor − M_recipient); NaN where the two tie),
    heads, n, and the mean's interval `<metric>_lo` / `<metric>_hi` (`cross_intervals`)."""
    from mechinterp.interventions.cross import summarise_cross

    frames = []
    for v, g in cross.groupby("model_variant", sort=False):
        s = summarise_cross(g, (metric, "answer_logprob"))
        s = s.assign(model_variant=v, n=g["example_id"].nunique())
        frames.append(s)
    return pd.concat(frames, ignore_index=True).merge(
        cross_intervals(cross, metric, level), on=["model_variant", "condition"], how="left",
        validate="1:1")  # fmt: skip


def cross_intervals(cross: pd.DataFrame, metric: str, level: float) -> pd.DataFrame:
    """Each cross-patching bar's interval, as the Inter-beats-Rand claim computes its own
    (`cluster_mean` at the claims' level): for the recipient, Inter, Compl and the donor, over
    the evaluation examples; for Rand, over examples × random draws, the draws crossed with the
    examples (every `rand-s<seed>` row gets this one Rand interval). F1 scores are bounded to
    [0, 1]. One row per (model_variant, condition)."""
    bounds = None if metric == "answer_logprob" else (0.0, 1.0)
    rows = []
    for v, g in cross.groupby("model_variant", sort=False):
        rand = g[g["condition"].str.startswith("rand-")]
        wide = rand.pivot_table(index="example_id", columns="condition", values=metric,
                                aggfunc="mean").dropna()  # fmt: skip
        rand_iv = cluster_mean(wide.to_numpy(dtype=float), level=level, bounds=bounds)
        for cond, part in g.groupby("condition", sort=False):
            if cond.startswith("rand-"):
                iv = rand_iv
            else:
                iv = cluster_mean(part[metric].to_numpy(dtype=float), level=level, bounds=bounds)
            rows.append({"model_variant": v, "condition": cond, f"{metric}_lo": iv.low,
                         f"{metric}_hi": iv.high})  # fmt: skip
    return pd.DataFrame(rows)


def knockout_table(knockout: pd.DataFrame, settings) -> pd.DataFrame:
    """Per (model, mode, condition) at the judged k: answer-retrieved rate over the answered
    examples, with a cluster t interval over examples (× random draws for `random`)."""
    k = judged_k(knockout, settings)
    rows = []
    for (v, mode), g in knockout.groupby(["model_variant", "mode"], sort=False):
        if mode == "none":
            continue
        none = knockout[(knockout["model_variant"] == v) & (knockout["mode"] == "none")]
        for cond, part in (("none", none), *((c, g[(g["k"] == k) & (g["condition"] == c)])
                                             for c in ("top", "random"))):  # fmt: skip
            if not len(part):
                continue
            wide = part.pivot_table(index="example_id", columns="seed", values="retrieved",
                                    aggfunc="mean").astype(float).dropna()  # fmt: skip
            iv = cluster_mean(wide.to_numpy(), cluster_labels(part).reindex(wide.index),
                              level=settings.level, bounds=(0.0, 1.0))  # fmt: skip
            rows.append({"model_variant": v, "mode": mode, "k": 0 if cond == "none" else k,
                         "condition": cond, "value": iv.estimate, "lo": iv.low, "hi": iv.high,
                         "n": len(wide)})  # fmt: skip
    return pd.DataFrame(rows)


def judged_k(knockout: pd.DataFrame, settings) -> int:
    ks = sorted(set(knockout.loc[knockout["k"] > 0, "k"]))
    return settings.k if settings.k in ks else ks[-1]


def head_table(tables: dict[str, pd.DataFrame], config) -> tuple[pd.DataFrame, dict]:
    """Per model: head count, recall / subset share / Jaccard / Spearman vs the reference model,
    task F1 and EM on the reference task, and the knockout and patching effects; plus the
    head sets (name -> heads, best first)."""

    scores = model_scores(tables["detect_instances"], config.detect)
    sets = head_sets(scores, config.detect)
    heads = compare_heads(scores, sets, config.reference)
    ev = tables["eval"].groupby("model_variant", sort=False)
    perf = pd.DataFrame({"performance": ev[metric_of(config)[0]].mean(), "em": ev["em"].mean(),
                         "n_eval": ev.size()}).reset_index()  # fmt: skip
    heads = heads.merge(perf, on="model_variant", how="left")
    inst = tables["detect_instances"].drop_duplicates(["model_variant", "instance_id"])
    counted = inst.groupby("model_variant")["counted"].sum().rename("n_detect_counted")
    heads = heads.merge(counted.reset_index(), on="model_variant", how="left")
    heads["label"] = [label_of(v, config) for v in heads["model_variant"]]
    heads["heads"] = [" ".join(sets[v]) for v in heads["model_variant"]]
    return heads, {"scores": scores, "sets": sets}


def synthetic(heads: pd.DataFrame, config) -> pd.DataFrame:
    """The synthetic variants' rows (not the reference, not the limited-real baseline)."""
    return heads[heads["model_variant"].isin(config.variants)]


def correlation(heads: pd.DataFrame, config, method: str = "spearman") -> dict:
    """Recall vs performance across the synthetic variants, with a bootstrap CI ({} if
    undefined)."""
    from mechinterp.analysis.stats import correlate

    syn = synthetic(heads, config).dropna(subset=["recall", "performance"])
    if len(syn) < 3 or syn["recall"].nunique() < 2 or syn["performance"].nunique() < 2:
        return {}
    c = config.claims
    r = correlate(syn["recall"], syn["performance"], method=method, n_boot=c.n_boot,
                  level=c.level, seed=c.seed)  # fmt: skip
    return {"method": r.method, "estimate": r.estimate, "low": r.low, "high": r.high,
            "p_value": r.p_value, "p_permutation": r.p_permutation,
            "n_permutations": r.n_permutations, "exact": r.exact, "n": r.n}  # fmt: skip


def lofit_localised_summary(
    localised: pd.DataFrame, evals: pd.DataFrame, reference: str, metric: str = "f1"
) -> pd.DataFrame:
    """Task metrics per LoFiT head set (base model + bias vectors), with LoRA on the reference
    data beside them: mean `metric` (as column `performance`), EM and answer log-prob over the
    evaluation examples."""
    localised = localised.assign(performance=localised[metric])
    evals = evals.assign(performance=evals[metric])
    metrics = [m for m in ("performance", "em", "answer_logprob") if m in localised]
    rows = localised.groupby("head_set", sort=False).agg(
        n_heads=("n_heads", "first"), n=("example_id", "nunique"),
        **{m: (m, "mean") for m in metrics})  # fmt: skip
    rows = rows.reset_index().rename(columns={"head_set": "method"})
    names = {"base": "base model (no tuning)",
             "retrieval": "LoFiT biases on the reference model's retrieval heads",
             "lofit": "LoFiT biases on LoFiT's own top heads (by ‖A‖₂)",
             "random": "LoFiT biases on layer-matched random heads"}  # fmt: skip
    rows["method"] = rows["method"].map(lambda m: names.get(m, f"LoFiT biases on {m} heads"))
    lora = evals[evals["model_variant"] == reference]
    if len(lora):
        rows.loc[len(rows)] = {"method": f"LoRA on {reference}", "n_heads": None,
                               "n": lora["example_id"].nunique(),
                               **{m: lora[m].mean() for m in metrics if m in lora}}  # fmt: skip
    return rows


def lofit_lines(tables: dict, config) -> list[str]:
    """The report's LoFiT sections: localised bias tuning and the λ sweep (when they ran)."""
    lines: list[str] = []
    localised, sweep = tables.get("lofit_localised"), tables.get("lofit_sweep")
    if localised is not None and len(localised):
        metric, name = metric_of(config)
        summary = lofit_localised_summary(localised, tables["eval"], config.reference, metric)
        lines += ["", "## LoFiT localised to retrieval heads (from the base model, reference data)",
                  "", f"| method | heads | {name} | EM | answer log-prob | n |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in summary.itertuples():
            heads = "—" if pd.isna(r.n_heads) else int(r.n_heads)
            lines.append(f"| {r.method} | {heads} | {_fmt(r.performance)} | {_fmt(r.em)} | "
                         f"{_fmt(getattr(r, 'answer_logprob', None))} | {r.n} |")  # fmt: skip
    if sweep is not None and len(sweep):
        lines += ["", "## LoFiT head selection by L1 strength (step 1, every head)", "",
                  "| λ (L1) | heads with A ≠ 0 | share | final loss |", "| --- | --- | --- | --- |"]
        for r in sweep.sort_values("l1").itertuples():
            lines.append(f"| {r.l1:g} | {r.n_selected} of {r.n_heads} | "
                         f"{r.share_selected:.1%} | {r.loss:.3f} |")  # fmt: skip
        lines += ["", "LoFiT's paper selects 3–10 % of heads. The localised runs above take "
                  f"LoFiT's top heads from step 1 at λ = {config.lofit.spec.l1:g}."]
    return lines


def citation_baseline(tables: dict[str, pd.DataFrame], config) -> pd.DataFrame:
    """The citation task's scores per model beside the cite-every-document baseline: each
    model's stored responses and the baseline's (`tasks.citation.cite_all_baseline`) scored by
    the current scorer on the evaluation examples the config builds, mean per model; one row
    per model, then `model_variant` "cite-all"."""
    from mechinterp.experiments.extension.stages import build_data, data_args
    from mechinterp.tasks.citation import citation_correct, citation_scores, cite_all_baseline

    cols = ["citation_precision", "citation_recall", "citation_f1", "coverage", "correct"]
    examples = {ex.id: ex for ex in build_data(**data_args(config, config.reference, "eval"))}
    ev = tables["eval"]
    unknown = sorted(set(ev["example_id"]) - set(examples))
    if unknown:
        raise InputError(f"the eval table holds examples the config does not build "
                         f"({unknown[:3]}); rerun the evaluation with this config")  # fmt: skip
    scored = []
    for r in ev.itertuples():
        s = citation_scores(r.prediction, examples[r.example_id].meta["insights"])
        scored.append({"model_variant": r.model_variant, **s, "correct": citation_correct(s)})
    models = pd.DataFrame(scored).groupby("model_variant", sort=False)
    rows = models[cols].mean().assign(n=models.size()).reset_index()
    base = cite_all_baseline(list(examples.values()))
    rows.loc[len(rows)] = {"model_variant": "cite-all", "n": len(base),
                           **base[cols].mean()}  # fmt: skip
    return rows


def citation_lines(tables: dict, config) -> list[str]:
    """The report's cite-every-document section (the citation task only)."""
    from mechinterp.tasks.citation import MIN_PRECISION, MIN_RECALL

    if config.task != "citation":
        return []
    try:
        rows = citation_baseline(tables, config)
    except (ValueError, OSError) as e:  # e.g. a user's haystack file no longer where it was
        return ["", "## Citations beside citing every document", "", f"Not computed: {e}"]
    lines = ["", "## Citations beside citing every document", "",
             "| model | citation precision | citation recall | citation F1 | coverage | correct "
             "| n |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows.itertuples():
        label = ("cite every document (baseline)" if r.model_variant == "cite-all"
                 else label_of(r.model_variant, config))  # fmt: skip
        lines.append(f"| {label} | {_fmt(r.citation_precision)} | {_fmt(r.citation_recall)} | "
                     f"{_fmt(r.citation_f1)} | {_fmt(r.coverage)} | {_fmt(r.correct)} | "
                     f"{r.n} |")  # fmt: skip
    return lines + ["", "Every row is scored now from the stored responses. The baseline states "
                    "each insight and cites every document for it. correct: every insight "
                    f"covered, citation precision ≥ {MIN_PRECISION:g} and recall ≥ "
                    f"{MIN_RECALL:g}."]  # fmt: skip


def lofit_vs_retrieval(lofit: pd.DataFrame, scores: pd.DataFrame, sets: dict, config) -> dict:
    """LoFiT's learned importance (‖A‖₂, reference data) against the reference model's retrieval
    scores: Spearman over all heads, and the share of the reference retrieval heads among
    LoFiT's top |H_ref| heads and among the heads step 2 tuned."""
    from scipy import stats

    ref = scores[scores["model_variant"] == config.reference].set_index("head_name")["score"]
    norm = lofit.set_index("head_name")["norm"].reindex(ref.index)
    heads = set(sets[config.reference])
    top = set(lofit.sort_values("rank")["head_name"].head(len(heads)))
    tuned = set(lofit.loc[lofit["bias_tuned"], "head_name"])
    varied = ref.notna().all() and ref.nunique() > 1 and norm.nunique() > 1
    return {
        "spearman_norm_vs_score": float(stats.spearmanr(norm, ref).statistic) if varied else None,
        "n_heads": int(len(ref)),
        "n_reference_heads": len(heads),
        "reference_heads_in_lofit_top": len(heads & top) / len(heads) if heads else None,
        "n_bias_tuned": len(tuned),
        "reference_heads_among_tuned": len(heads & tuned) / len(tuned) if tuned else None,
        "lofit_zero_heads": int((lofit["norm"] == 0).sum()),
    }


# ---------------------------------------------------------------- claims


def _nan_row(claim, label, metric, n, unit, *, minimum, why):
    nan = float("nan")
    return _row(claim, f"{label} ({why})", metric, nan, nan, nan, n, unit, primary=True,
                null=0.0, minimum=minimum, rule="above")  # fmt: skip


def compute_claims(tables, heads: pd.DataFrame, config) -> pd.DataFrame:
    c = config.claims
    boot = {"level": c.level}
    syn = synthetic(heads, config)
    metric, name = metric_of(config)
    rows = []
    for method, primary in (("spearman", True), ("pearson", False)):
        r = correlation(heads, config, method)
        label = f"{method} correlation of recall with {name} across synthetic variants"
        if not r:
            if primary:
                rows.append(_nan_row("recall_predicts", label, "correlation", len(syn), "ρ",
                                     minimum=c.min_correlation,
                                     why="undefined: < 3 variants or no variation"))  # fmt: skip
            continue
        rows.append(_row("recall_predicts", label, "correlation", r["estimate"], r["low"],
                         r["high"], r["n"], "ρ" if method == "spearman" else "r",
                         primary=primary, null=0.0, minimum=c.min_correlation if primary else 0.0,
                         rule="correlation", p_value=r["p_value"],
                         resampled=f"{r['n']} variants (the CI describes; p decides)",
                         p_permutation=r["p_permutation"], alpha=1 - c.level))  # fmt: skip
    shares = syn.dropna(subset=["subset_share"])
    if len(shares):
        label = ("share of a synthetic model's heads that the reference model also has, mean "
                 "over models")
        rows.append(_subset_row(shares["subset_share"].to_numpy(dtype=float), label, "models", c,
                                primary=True))  # fmt: skip
        ref = set(heads.loc[heads["model_variant"] == config.reference, "heads"].iloc[0].split())
        for r in shares.itertuples():
            inside = np.array([h in ref for h in r.heads.split()], dtype=float)
            rows.append(_subset_row(inside, f"{r.model_variant}: share of its {len(inside)} heads",
                                    "heads", c, primary=False,
                                    model_variant=r.model_variant))  # fmt: skip
    else:
        rows.append(_nan_row("subset", "share of synthetic heads in the reference set",
                             "subset_share", 0, "share", minimum=c.min_subset,
                             why="no synthetic model has heads"))  # fmt: skip
    rows += _inter_rows(tables.get("cross"), c, boot, (metric, name))
    if len(tables.get("knockout", ())):
        ko = tables["knockout"]
        settings = ClaimSettings(k=judged_k(ko, c), min_drop=c.min_drop, level=c.level)
        for v, g in ko.groupby("model_variant", sort=False):
            for r in necessity_rows(g, settings):
                rows.append({**r, "label": f"{label_of(v, config)} · {r['label']}",
                             "model_variant": v})  # fmt: skip
    return pd.DataFrame(rows)


def _subset_row(inside: np.ndarray, label: str, item: str, c, *, primary: bool, **extra):
    """A subset-claim row: the mean of `inside` with its interval over the items (models or
    heads), or no estimate where there is only one item."""
    if len(inside) < 2:
        nan = float("nan")
        return _row("subset", f"{label} (one {item[:-1]}: no interval)", "subset_share",
                    float(inside.mean()) if len(inside) else nan, nan, nan, len(inside), "share",
                    primary=primary, null=c.min_subset, minimum=c.min_subset, rule="above",
                    trusted=False, **extra)  # fmt: skip
    iv = cluster_mean(inside, level=c.level, bounds=(0.0, 1.0))
    return _row("subset", label, "subset_share", iv.estimate, iv.low, iv.high, iv.n_items,
                "share", primary=primary, null=c.min_subset, minimum=c.min_subset, rule="above",
                trusted=iv.trusted, resampled=iv.unit(item=item), **extra)  # fmt: skip


def _inter_rows(cross: pd.DataFrame | None, c, boot, performance=("f1", "F1")) -> list[dict]:
    label = (
        "Inter minus Rand, per synthetic model × example × Rand draw, models whose recipient "
        "differs from the donor"
    )
    if cross is None or not len(cross):
        return [_nan_row("inter_beats_rand", label, performance[0], 0, performance[1],
                         minimum=c.min_gain, why="no cross-model patching ran")]  # fmt: skip
    out = []
    for metric, primary, unit in ((performance[0], True, performance[1]),
                                  ("answer_logprob", False, "nats/token")):
        # only recipients that differ from the donor on the metric have anything to recover
        means = cross.groupby(["model_variant", "condition"])[metric].mean().unstack()
        open_ = means.index[(means["donor"] - means["recipient"]).abs() > 1e-9]
        part = cross[cross["model_variant"].isin(open_)]
        key = ["model_variant", "example_id"]
        inter = part[part["condition"] == "inter"].set_index(key)[metric].astype(float)
        rand = part[part["condition"].str.startswith("rand-")].pivot_table(
            index=key, columns="condition", values=metric, aggfunc="mean"
        )  # [(model, example), draw]: draw d of every model is resampled together
        ids, d = paired_draws(inter, rand)
        if not ids:
            if primary:
                out.append(_nan_row("inter_beats_rand", label, metric, 0, unit,
                                    minimum=c.min_gain, why="no model had both sets"))  # fmt: skip
            continue
        # every model sees the same examples: an example is one cluster with all its models' rows
        bounds = None if metric == "answer_logprob" else (-1.0, 1.0)  # F1 or EM: in [0, 1]
        iv = cluster_mean(-d, [e for _, e in ids], **boot, bounds=bounds)
        out.append(_row("inter_beats_rand", f"{label} ({metric})", metric, iv.estimate, iv.low,
                        iv.high, len(ids), unit, primary=primary, null=0.0,
                        minimum=c.min_gain if primary else 0.0, rule="above", trusted=iv.trusted,
                        resampled=iv.unit("examples", "model × example pairs"),
                        baseline=BASELINES["random"],
                        n_models=len({m for m, _ in ids})))  # fmt: skip
    return out


# ---------------------------------------------------------------- figures


def draw_figures(run_dir: str | Path, *, png: bool = True) -> list[Path]:
    """recall_vs_performance, cross_patching, head_overlap and knockout_by_model under
    `figures/`, from the tables and `heads.csv` / `correlation.json` / the summaries."""
    run_dir = Path(run_dir)
    formats = ("html", "png") if png else ("html",)
    written = []
    for name, fig in build_figures(run_dir).items():
        written += store.write_figure(fig, run_dir / "figures" / name, formats=formats)
    return written


def build_figures(run_dir: str | Path) -> dict:
    """The figures `draw_figures` writes, by name (plotly figures; nothing written)."""
    from mechinterp import plots

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    model = Path(config.model.name).name
    heads = pd.read_csv(run_dir / "heads.csv", keep_default_na=False, na_values=[""])
    corr = json.loads((run_dir / "correlation.json").read_text()) or None
    figs = {}
    drawable = heads.dropna(subset=["recall", "performance"])
    if len(drawable):  # no recall when the reference model has no heads
        f1 = f"{metric_of(config)[1]} on the reference task"
        figs["recall_vs_performance"] = plots.recall_scatter(
            drawable.rename(columns={"label": "variant", "performance": f1}), y=f1,
            reference=label_of(config.reference, config), correlation=corr,
            title=f"{model} · {config.task}: head recall vs {metric_of(config)[1]} per "
            "fine-tuning variant",
        )  # fmt: skip
    sets = {label_of(v, config): ("" if pd.isna(h) else h).split()
            for v, h in zip(heads["model_variant"], heads["heads"], strict=True)}  # fmt: skip
    figs["head_overlap"] = plots.overlap_heatmap(
        sets, title=f"{model} · {config.task}: retrieval-head overlap (|A∩B| / |A|)"
    )
    if (run_dir / "cross_summary.csv").is_file():
        summary = pd.read_csv(run_dir / "cross_summary.csv")
        metric, name = metric_of(config)
        figs["cross_patching"] = plots.cross_patch_by_variant(
            summary, metric=metric, title=f"{model} · {config.task}: reference heads patched "
            f"into each synthetic model ({name})",
        )  # fmt: skip
    if (run_dir / "knockout_summary.csv").is_file():
        ko = pd.read_csv(run_dir / "knockout_summary.csv")
        ko = ko[ko["mode"] == ko["mode"].iloc[0]]
        ko = ko.assign(model_variant=[label_of(v, config) for v in ko["model_variant"]])
        figs["knockout_by_model"] = plots.knockout_by_model(
            ko, title=f"{model} · {config.task}: knockout of each model's own heads "
            f"({ko['mode'].iloc[0]}, {int(config.claims.level * 100)}% CI)",
        )  # fmt: skip
    return figs


# ---------------------------------------------------------------- the whole analysis


def analyse(run_dir: str | Path, *, png: bool | None = True) -> Path:
    """Everything after the shards, from the tables alone (`mechinterp report` reruns it)."""
    run_dir = Path(run_dir)
    config, tables = read_config(run_dir), read_tables(run_dir)
    heads, parts = head_table(tables, config)
    store.write_table(parts["scores"], run_dir / "detect_scores.parquet")
    c = config.claims
    if len(tables.get("cross", ())):
        metric = metric_of(config)[0]
        cs = cross_summary(tables["cross"], metric, c.level)
        store.write_table(cs, run_dir / "cross_summary.csv")
        inter = cs[cs["condition"] == "inter"].set_index("model_variant")
        heads["inter_f1_recovery"] = heads["model_variant"].map(inter[f"{metric}_recovery"])
    if len(tables.get("knockout", ())):
        ks = knockout_table(tables["knockout"], c)
        store.write_table(ks, run_dir / "knockout_summary.csv")
        first = ks[ks["mode"] == ks["mode"].iloc[0]].pivot(
            index="model_variant", columns="condition", values="value"
        )
        heads["knockout_drop"] = heads["model_variant"].map(first["random"] - first["top"])
    store.write_table(heads, run_dir / "heads.csv")
    store.write_table(heads.rename(columns={"label": "variant"}), run_dir / "recall.csv")
    store.write_json(run_dir / "correlation.json", correlation(heads, config))
    if len(tables.get("lofit", ())):
        cmp = lofit_vs_retrieval(tables["lofit"], parts["scores"], parts["sets"], config)
        store.write_json(run_dir / "lofit_vs_retrieval.json", cmp)
    claims = compute_claims(tables, heads, config)
    store.write_table(claims, run_dir / "claims.csv")
    store.write_table(headline(claims, CLAIMS), run_dir / "claims_headline.csv")
    if png is not None:
        draw_figures(run_dir, png=png)
    return write_report(run_dir, tables, heads, claims, config)


def shard_seconds(run_dir: Path) -> dict[str, float]:
    """Seconds each stage's finished shards took to compute (their records), in stage order."""
    out: dict[str, float] = {}
    for stage in ("finetune", "eval", "detect", "knockout", "cross", "lofit"):
        records = sorted((run_dir / "shards" / stage).glob("*.json"))
        if records:
            out[stage] = sum(json.loads(r.read_text()).get("seconds", 0.0) for r in records)
    return out


def _fmt(x, unit: str = "") -> str:
    if x is None or pd.isna(x):
        return "n/a"
    return f"{x:+.2f}" if "nats" in unit else f"{x:.2f}"


def write_report(run_dir: Path, tables, heads, claims, config) -> Path:
    prov_path = run_dir / "provenance.json"
    prov = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    c = config.claims
    verdicts = headline(claims, CLAIMS)
    model = Path(config.model.name).name
    where = ("the reference task's own examples (needle = the gold answer in the gold document)"
             if config.detect_on == "task" else "a NIAH grid")  # fmt: skip
    lines = [
        f"# Synthetic context extension on {model} ({config.task}): what the retrieval heads say",
        "",
        "Every number is computed by `mechinterp.experiments.extension.report` from the tables in "
        "this directory (`mechinterp report <dir>` recomputes it). CIs are "
        f"{int(c.level * 100)}% cluster-robust t intervals over what each row's `resampled` "
        "names: examples (every model's row of an example in one cluster) crossed with the "
        "random baseline's draws; a row resting on fewer than 5 clusters is not trusted and "
        "is inconclusive.",
        "",
        f"- reference: `{config.reference}` = {label_of(config.reference, config)}"
        + (f" (evaluation data: `{config.reference_data}`)" if config.reference_data else ""),
        f"- variants: {', '.join(config.variants)}; LoRA r={config.lora.r} on "
        f"{'/'.join(config.lora.targets)}, {config.lora.steps} steps at lr {config.lora.lr:g}, "
        f"{config.n_train} training examples per variant",
        *([f"- real data (limited): `{config.reference}` fine-tuned on only its first "
           f"{config.limited} training examples (a baseline; not in the correlation)"]
          if config.limited else []),
        f"- evaluation: {config.n_eval} held-out `{config.reference}` examples "
        f"({config.n_docs} documents); detection on {where}; heads: score > "
        f"{config.detect.threshold:g}" + (f" (top {config.detect.top_k})" if config.detect.top_k
                                          else "") + f", gate ROUGE-1 > {config.detect.gate}",
        f"- commit `{prov.get('git_commit')}`; config hash `{store.config_hash(config)}`",
    ]  # fmt: skip
    if "timings" in prov:
        t, sh = prov["timings"], prov.get("shards", {})
        lines.append(f"- last invocation: {t.get('total_s', 0):.0f} s wall time, "
                     f"{sh.get('computed', '?')} shards computed, {sh.get('skipped', '?')} "
                     "reused")  # fmt: skip
    spent = shard_seconds(run_dir)
    if spent:
        lines.append("- compute time per stage (its shards, summed over invocations): " + ", ".join(
            f"{k} {v / 60:.1f} min" for k, v in spent.items()) + f"; total "
            f"{sum(spent.values()) / 60:.1f} min")  # fmt: skip
    name = metric_of(config)[1]
    lines += ["", "## Verdicts", "", "| claim | verdict |", "| --- | --- |"]
    lines += [f"| {h.statement} | **{h.verdict}** |" for h in verdicts.itertuples()]
    lines += ["", "## Per model", "",
              f"| model | heads | recall | subset share | Jaccard | Spearman | {name} | EM | "
              f"knockout drop | Inter {name} recovery |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in heads.itertuples():
        lines.append(
            f"| {r.label} | {r.n_heads} | {_fmt(r.recall)} | {_fmt(r.subset_share)} | "
            f"{_fmt(r.jaccard)} | {_fmt(r.spearman)} | {_fmt(r.performance)} | {_fmt(r.em)} | "
            f"{_fmt(getattr(r, 'knockout_drop', None))} | "
            f"{_fmt(getattr(r, 'inter_f1_recovery', None))} |"
        )
    lines += ["", "knockout drop: answer-retrieved rate under k random heads minus under the "
              f"model's own top-k; Inter {name} recovery: ({name} with Inter patched − {name} "
              f"of the recipient) / ({name} of the donor − {name} of the recipient).", "",
              "## Claims", "", *table_lines(claims, _fmt, with_claim=True)]  # fmt: skip
    lofit_path = run_dir / "lofit_vs_retrieval.json"
    if len(tables.get("lofit", ())) and lofit_path.is_file():
        m = json.loads(lofit_path.read_text())
        lines += ["", "## LoFiT vs retrieval heads (reference data, from the base model)", "",
                  f"- Spearman of ‖A‖₂ with the reference model's retrieval score over "
                  f"{m['n_heads']} heads: {_fmt(m['spearman_norm_vs_score'])}",
                  f"- {m['lofit_zero_heads']} heads have A = 0 exactly (L1 "
                  f"{config.lofit.spec.l1:g}); the reference model's {m['n_reference_heads']} "
                  f"retrieval heads make up {_fmt(m['reference_heads_in_lofit_top'])} of LoFiT's "
                  f"top {m['n_reference_heads']}, and {_fmt(m['reference_heads_among_tuned'])} of "
                  f"the {m['n_bias_tuned']} heads whose bias vectors step 2 tuned"]  # fmt: skip
    lines += lofit_lines(tables, config)
    lines += citation_lines(tables, config)
    for name in ("recall_vs_performance", "cross_patching", "head_overlap", "knockout_by_model"):
        if (run_dir / "figures" / f"{name}.png").is_file():
            lines += ["", f"![{name}](figures/{name}.png)"]
    lines += ["", "## How the verdicts are decided", "",
              "- supported: the interval's lower end reaches the minimum effect and lies above "
              "the null (the subset claim's null is the minimum share itself); not supported: "
              "its upper end lies below the minimum effect; inconclusive: anything else, and "
              "always when the interval rests on fewer than 5 clusters. A claim's verdict "
              "combines its primary rows.",
              "- A correlation is judged by its exact two-sided permutation p-value (every "
              "pairing of the N synthetic variants): supported when p ≤ "
              f"{1 - config.claims.level:.2f} and the estimate reaches the minimum. Its bootstrap "
              "CI (resampling variants) is shown, but it is not a verdict at this N and it "
              "collapses to a point at ρ = 1."]  # fmt: skip
    path = store.write_text(run_dir / "report.md", "\n".join(lines) + "\n")
    write_html(run_dir, title=lines[0].removeprefix("# "), headline=verdicts, claims=claims,
               figures=build_figures(run_dir), fmt=_fmt, intro=HTML_INTRO,
               extra_provenance={"config hash": store.config_hash(config)})  # fmt: skip
    return path
