"""The claims report and the study's figures, from the stored tables only (never a model).

write_report(run_dir)    # claims.csv, claims_headline.csv, report.md
draw_figures(run_dir)    # figures/*.html + .png
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mechinterp import store
from mechinterp.analysis.stats import cluster_mean
from mechinterp.errors import InputError
from mechinterp.experiments.study.claims import (
    cluster_labels,
    compute_claims,
    headline,
    table_lines,
)

TABLES = ("detect_scores", "detect_instances", "baseline", "knockout", "robustness", "patch",
          "attribution", "paths", "head_patterns", "addressing")  # fmt: skip


def read_config(run_dir: str | Path, kind=None, what: str = "study"):
    """The run's config as `kind` (default `StudyConfig`), from its config.json."""
    from mechinterp.config import from_dict
    from mechinterp.experiments.rundir import read_json
    from mechinterp.experiments.study.config import StudyConfig

    data = read_json(Path(run_dir) / "config.json", what=f"{what} run directory")
    return from_dict(kind or StudyConfig, data)


def read_tables(
    run_dir: str | Path, names=TABLES, required=("detect_instances",), what: str = "study"
) -> dict[str, pd.DataFrame]:
    """The run's `names` tables that exist; a missing `required` one is an error, and so is a
    directory whose config or tables are not the ones its run wrote (`rundir.verify`)."""
    from mechinterp.experiments.rundir import verify

    run_dir = Path(run_dir)
    verify(run_dir, what=what)
    out = {}
    for name in names:
        path = run_dir / f"{name}.parquet"
        if path.is_file():
            out[name] = pd.read_parquet(path)
    for name in required:
        if name not in out:
            raise InputError(f"{run_dir} has no {name}.parquet: the {what} has not finished")
    return out


# ---------------------------------------------------------------- derived tables


def _per_example(knockout: pd.DataFrame, baseline: pd.DataFrame, task: str, value: str):
    """(ids, {(mode, k, condition): [example, draw] values}): one column per random draw (one
    for `none` and `top`); examples the model did not answer (absent from the knockout table)
    count as not retrieved (0)."""
    ids = list(baseline.loc[baseline["task"] == task, "example_id"])
    g = knockout[knockout["task"] == task]
    out = {}
    for key, part in g.groupby(["mode", "k", "condition"]):
        wide = part.pivot_table(index="example_id", columns="seed", values=value, aggfunc="mean")
        out[key] = wide.astype(float).reindex(ids).fillna(0.0)
    return ids, out


def knockout_summary(tables: dict[str, pd.DataFrame], config) -> pd.DataFrame:
    """Answer-retrieved rate per (task, mode, k, condition) over every held-out example, with a
    cluster t interval (needles × random draws, as the claims) (the `none` rows are the
    no-knockout baseline, k = 0)."""
    s = config.claims
    ko, base = tables["knockout"], tables["baseline"]
    clusters = cluster_labels(base)
    rows = []
    for task in sorted(ko["task"].unique()):
        ids, per = _per_example(ko, base, task, "retrieved")
        for (mode, k, cond), wide in per.items():
            iv = cluster_mean(wide.to_numpy(), clusters.reindex(ids).to_numpy(), level=s.level,
                              bounds=(0.0, 1.0))  # fmt: skip
            rows.append({"task": task, "mode": mode, "k": int(k), "condition": cond,
                         "value": iv.estimate, "lo": iv.low, "hi": iv.high,
                         "n": len(ids)})  # fmt: skip
    return pd.DataFrame(rows)


def niah_panels(tables: dict[str, pd.DataFrame], config) -> pd.DataFrame:
    """One row per (panel, NIAH example): answer retrieved with no knockout, with the top-k and
    with k random heads (mean over seeds), at the report's k, per mode."""
    k = config.claims.k
    ids, per = _per_example(tables["knockout"], tables["baseline"], "niah", "retrieved")
    coords = tables["baseline"].set_index("example_id").loc[ids, ["length", "depth"]]
    frames = []
    panels = [(("none", 0, "none"), "no knockout")]
    for mode in config.knockout.modes:
        panels.append(((mode, k, "top"), f"top-{k} · {mode}"))
        panels.append(((mode, k, "random"), f"random-{k} (same layers) · {mode}"))
    for key, label in panels:
        if key in per:
            accuracy = per[key].mean(axis=1).to_numpy()  # random: mean over draws
            frames.append(coords.assign(panel=label, accuracy=accuracy).reset_index())
    return pd.concat(frames, ignore_index=True)


def head_recovery(patch: pd.DataFrame) -> pd.DataFrame:
    """Mean normalised recovery per head over the pairs the corruption flips."""
    heads = patch[(patch["kind"] == "head")]
    valid = heads[heads["flipped"]] if heads["flipped"].any() else heads
    out = (
        valid.groupby(["layer", "head", "name", "in_set"])["recovery"].mean().reset_index()
    ).rename(columns={"name": "head_name"})
    out["n_pairs"] = valid["example_id"].nunique()
    return out


# ---------------------------------------------------------------- figures


def _retrieval_scores(tables, config, model: str):
    from mechinterp.plots import head_heatmap

    scores = tables["detect_scores"]
    n_inst = int(scores["n_instances"].iloc[0])
    return head_heatmap(scores, title=f"{model} · Wu retrieval score (NIAH, n={n_inst} instances)")


def _niah_knockout(tables, config, model: str):
    from mechinterp.plots import accuracy_panels

    if not len(tables.get("knockout", ())) or not (tables["baseline"]["task"] == "niah").any():
        return None
    return accuracy_panels(
        niah_panels(tables, config),
        title=f"{model} · held-out NIAH: answer retrieved, with and without knockout",
    )


def _knockout_vs_k(tables, config, model: str):
    from mechinterp.plots import knockout_ci_curves

    if not len(tables.get("knockout", ())):
        return None
    return knockout_ci_curves(
        knockout_summary(tables, config),
        title=f"{model} · answer retrieved vs heads knocked out "
        f"({int(config.claims.level * 100)}% cluster t interval)",
    )


def _patch_recovery(tables, config, model: str):
    from mechinterp.plots import head_heatmap

    if not len(tables.get("patch", ())):
        return None
    rec = head_recovery(tables["patch"])
    return head_heatmap(
        rec,
        value="recovery",
        title=f"{model} · denoising patching: mean recovery per head "
        f"(n={int(rec['n_pairs'].iloc[0])} pairs)",
    )


def sender_recovery(paths: pd.DataFrame) -> pd.DataFrame:
    """Mean recovery per (receiver input, sender) over the pairs the corruption flips (all
    pairs when none does), with the sender's name and the number of pairs."""
    senders = paths[paths["kind"] == "sender"]
    valid = senders[senders["flipped"]] if senders["flipped"].any() else senders
    out = valid.groupby(["receiver_input", "layer", "head", "name"], sort=False)["recovery"]
    out = out.mean().reset_index()
    out["n_pairs"] = valid["example_id"].nunique()
    return out


def _path_patching(tables, config, model: str):
    from mechinterp.plots import sender_heatmaps

    if not len(tables.get("paths", ())):
        return None
    rec = sender_recovery(tables["paths"])
    receivers = tables["paths"]["receivers"].iloc[0].split(",")
    return sender_heatmaps(
        rec, title=f"{model} · path patching into {len(receivers)} retrieval heads: mean "
        f"recovery per sender (n={int(rec['n_pairs'].iloc[0])} pairs)",
    )  # fmt: skip


def address_senders(addressing: pd.DataFrame) -> pd.DataFrame:
    """Mean recovery per (corruption, receiver input, sender) over the address pairs whose
    corruption moved the receivers' attention, with the number of those pairs."""
    senders = addressing[(addressing["kind"] == "sender")
                         & (addressing["clean_metric"] > addressing["corrupt_metric"])]  # fmt: skip
    keys = ["corruption", "receiver_input", "layer", "head", "head_name"]
    out = senders.groupby(keys, sort=False)["recovery"].mean().reset_index()
    n = senders.groupby("corruption")["example_id"].nunique()
    return out.assign(n_pairs=out["corruption"].map(n))


def _address_circuit(tables, config, model: str):
    from mechinterp.plots.study import address_circuit

    a = tables.get("addressing")
    if a is None or not len(a) or not (a["kind"] == "sender").any():
        return None
    rec = address_senders(a)
    if rec.empty:
        return None
    receivers = a.loc[a["kind"] == "sender", "receivers"].iloc[0].split(",")
    n = ", ".join(f"{c.replace('_', ' ')} n={k}" for c, k in
                  rec.drop_duplicates("corruption")[["corruption", "n_pairs"]].values)  # fmt: skip
    return address_circuit(rec, receivers, title=f"{model} · who steers where {len(receivers)} "
                           f"retrieval heads look: mean path-patching recovery ({n} pairs)")


def screen_quality(attribution: pd.DataFrame, patch: pd.DataFrame) -> pd.DataFrame:
    """Per pair: Spearman against the exact per-head patching of the same pair of AtP's signed
    estimate (vs the exact metric), of its magnitude and of AtP*'s ranking score (GradDrop) (vs
    |exact effect|), and how many of the exact top-10 heads (by |effect|) fall outside AtP*'s
    top-30."""
    exact = patch[patch["kind"] == "head"][["example_id", "name", "value"]]
    both = attribution.merge(exact, on=["example_id", "name"])
    rows = []
    for ex, g in both.groupby("example_id", sort=False):
        eff = g["value"] - g["corrupt_metric"]
        top10 = set(g.loc[eff.abs().nlargest(10).index, "name"])
        top30 = set(g.nsmallest(30, "atp_star_rank")["name"])
        atp_size = (g["atp"] - g["corrupt_metric"]).abs()
        rows.append({
            "example_id": ex, "length": g["length"].iloc[0] if "length" in g else None,
            "flipped": bool(g["flipped"].iloc[0]),
            "spearman_atp": g["atp"].corr(g["value"], method="spearman"),
            "spearman_atp_magnitude": atp_size.corr(eff.abs(), method="spearman"),
            "spearman_atp_star_score": g["atp_star_score"].corr(eff.abs(), method="spearman"),
            "exact_top10_outside_top30": len(top10 - top30),
        })  # fmt: skip
    return pd.DataFrame(rows)


#: The study's figures: name -> fn(tables, config, model) -> Figure (None: its stage did not run).
FIGURES = {
    "retrieval_scores": _retrieval_scores,
    "niah_knockout": _niah_knockout,
    "knockout_vs_k": _knockout_vs_k,
    "patch_recovery": _patch_recovery,
    "path_patching": _path_patching,
    "address_circuit": _address_circuit,
}


def draw_figures(
    run_dir: str | Path, *, png: bool = True, only: tuple[str, ...] | None = None
) -> list[Path]:
    """The study's figures (all, or `only` these names), from its tables, as HTML (+ PNG) under
    `figures/`: retrieval-score heatmap, NIAH accuracy with and without knockout, retrieved
    rate vs k (top vs random, CI bands), per-head recovery heatmap."""
    unknown = sorted(set(only or ()) - set(FIGURES))
    if unknown:
        raise InputError(f"unknown figures {unknown}; the study draws {sorted(FIGURES)}")
    run_dir = Path(run_dir)
    config, tables = read_config(run_dir), read_tables(run_dir)
    model = Path(config.model.name).name
    formats = ("html", "png") if png else ("html",)
    written = []
    for name, draw in FIGURES.items():
        if only is None or name in only:
            fig = draw(tables, config, model)
            if fig is not None:
                written += store.write_figure(fig, run_dir / "figures" / name, formats=formats)
    return written


def figure_main(name: str, argv: list[str] | None = None) -> int:
    """The command line of a `figures/study_<name>.py` script: one figure from a study run."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=f"redraw the study figure {name!r} from its tables")
    ap.add_argument("run", type=Path, help="a study run directory (runs/study-...)")
    ap.add_argument("--no-png", action="store_true", help="HTML only (PNG needs Chromium)")
    args = ap.parse_args(argv)
    try:
        paths = draw_figures(args.run, png=not args.no_png, only=(name,))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------- the report


def _fmt(x: float, unit: str) -> str:
    if pd.isna(x):
        return "n/a"
    return (
        f"{x:.1%}" if unit == "fraction of heads" else f"{x:+.2f}" if "nats" in unit else f"{x:.2f}"
    )


def write_report(run_dir: str | Path, *, model=None) -> Path:
    """Compute the claims from the stored tables; write `claims.csv`, `claims_headline.csv`,
    `report.md` (which embeds the figures under `figures/`) and `report.html` (one offline page:
    verdicts, interactive figures, the attention example, provenance). With `model` (the
    study's own, at its end) the attention example is computed first and stored as
    `attention_example.csv`; without one the page draws the stored table, if any."""
    run_dir = Path(run_dir)
    config, tables = read_config(run_dir), read_tables(run_dir)
    claims = compute_claims(tables, config)
    heads = headline(claims)
    store.write_table(claims, run_dir / "claims.csv")
    store.write_table(heads, run_dir / "claims_headline.csv")
    prov_path = run_dir / "provenance.json"
    prov = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    level = int(config.claims.level * 100)
    lines = [
        f"# Retrieval heads in {Path(config.model.name).name}: necessity and sufficiency",
        "",
        "Every number below is computed by `mechinterp.experiments.study.claims` from the "
        "tables in this directory (`mechinterp report <dir>` recomputes it); nothing is typed "
        "by hand. "
        f"Intervals are {level}% cluster-robust t intervals: examples that share a needle form "
        "one cluster, crossed with the random baseline's draws (each row's `resampled` says "
        "what it rests on). A row resting on fewer than 5 clusters is not trusted and its "
        "verdict is inconclusive. Supported needs the interval's lower end at the minimum "
        "effect.",
        "",
        f"- model: `{prov.get('model_card', {}).get('id', config.model.name)}` "
        f"({config.model.dtype}); commit `{prov.get('git_commit')}`; config hash "
        f"`{store.config_hash(config)}`",
    ]
    if "timings" in prov:
        t = prov["timings"]
        parts = ", ".join(
            f"{k.removesuffix('_s')} {v:.0f} s" for k, v in t.items() if k != "total_s"
        )
        lines.append(f"- wall time: {t.get('total_s', float('nan')):.0f} s ({parts})")
    lines += [
        "",
        "## Verdicts",
        "",
        "| claim | verdict | primary effect (CI) |",
        "| --- | --- | --- |",
    ]
    for h in heads.itertuples():
        prim = claims[(claims["claim"] == h.claim) & claims["primary"]]
        eff = "; ".join(
            f"{r.label}: {_fmt(r.estimate, r.unit)} "
            f"[{_fmt(r.ci_low, r.unit)}, {_fmt(r.ci_high, r.unit)}]"
            for r in prim.itertuples()
        )
        lines.append(f"| {h.statement} | **{h.verdict}** | {eff or 'n/a'} |")
    sections = {
        "sparse": ("retrieval_scores.png", _sparse_text(tables, config)),
        "necessary": ("knockout_vs_k.png", _necessary_text(tables, config)),
        "sufficient": ("patch_recovery.png", _sufficient_text(tables, config)),
        "steered": ("address_circuit.png", _addressing_text(tables)),
    }
    for i, (claim, statement) in enumerate(
        [(h.claim, h.statement) for h in heads.itertuples()], start=1
    ):
        figure, text = sections[claim]
        rows = claims[claims["claim"] == claim]
        robust = rows["robustness"].eq(True) if "robustness" in rows else rows["claim"].isna()
        lines += ["", f"## {i}. {statement}", "", *text, "", *table_lines(rows[~robust], _fmt)]
        if robust.any():
            lines += ["", *_robustness_text(rows[robust], config)]
        if (run_dir / "figures" / figure).is_file():
            lines += ["", f"![{claim}](figures/{figure})"]
        if claim == "necessary" and (run_dir / "figures" / "niah_knockout.png").is_file():
            lines += ["", "![NIAH with and without knockout](figures/niah_knockout.png)"]
    lines += _screen_text(tables)
    lines += _paths_text(tables, run_dir)
    lines += ["", "## How the verdicts are decided", "",
              "- supported: the interval lies above the null (0) and its lower end reaches the "
              "minimum effect; not supported: its upper end lies below the minimum effect; "
              "inconclusive: anything else, and always when the interval rests on fewer than 5 "
              "clusters. Sparsity instead asks the interval of the share to lie inside "
              f"(0, {config.claims.max_share:.0%}).",
              "- A claim's verdict combines its primary rows: supported if all are, not "
              "supported if all are, else inconclusive. The steering claim says that some "
              "upstream heads steer, through the queries or the keys: its primary rows are the "
              "input each corruption addresses (a question swap's queries, a key swap's keys), "
              "it is supported when either is, and their intervals are widened (Bonferroni) over "
              "those rows so that the claim's error rate stays at the level."]  # fmt: skip
    path = store.write_text(run_dir / "report.md", "\n".join(lines) + "\n")
    _write_html(run_dir, config, tables, claims, heads, model)
    return path


def _write_html(run_dir: Path, config, tables, claims, heads, model) -> Path:
    """report.html: the verdicts, the figures of `FIGURES` (drawn again from the tables), the
    attention example (computed first when `model` is given) and the provenance."""
    from mechinterp.experiments import html_report

    if model is not None:
        html_report.write_attention_example(run_dir, model, config, tables)
    name = Path(config.model.name).name
    figures = {key: draw(tables, config, name) for key, draw in FIGURES.items()}
    return html_report.write_html(
        run_dir, title=f"Retrieval heads in {name}: necessity and sufficiency", headline=heads,
        claims=claims, figures=figures, fmt=_fmt,
        intro="Computed from the tables in this directory, as report.md (which has the full "
        f"text); intervals are {int(config.claims.level * 100)}% cluster-robust t intervals. "
        "Hover a figure for its values.",
        extra_provenance={"config hash": store.config_hash(config)},
    )  # fmt: skip


def _sparse_text(tables, config) -> list[str]:
    scores = tables["detect_scores"]
    top = scores.head(10)
    inst = tables["detect_instances"].drop_duplicates("instance_id")
    return [
        f"Detection: {len(inst)} NIAH instances (needles {list(config.detect.niah.needles)} × "
        f"lengths {list(config.detect.niah.lengths)} × depths {list(config.detect.niah.depths)}); "
        f"{int(inst['counted'].sum())} passed the gate (ROUGE-1 recall > {config.detect.gate}). "
        f"Top 10: " + ", ".join(f"{r.head_name} ({r.score:.2f})" for r in top.itertuples()) + "."
    ]


def _necessary_text(tables, config) -> list[str]:
    if "baseline" not in tables:
        return ["Not run."]
    base = tables["baseline"]
    parts = []
    for task, g in base.groupby("task"):
        parts.append(f"{task}: {len(g)} held-out examples, {int(g['correct'].sum())} correct by "
                     f"the task's rule, {int(g['scorable'].sum())} with the exact answer in the "
                     "response (the knockout set)")  # fmt: skip
    ks = config.knockout
    ranked = tables["detect_scores"].sort_values("rank")
    above = [
        f"k={k}: {int((ranked['score'].head(k) > config.detect.threshold).sum())}" for k in ks.ks
    ]
    return [
        "; ".join(parts) + ".",
        f"Conditions: top-k vs k random heads from the complement of the top {max(ks.ks)} "
        f"(seeds {list(ks.seeds)}), drawn {' and '.join(ks.draws)} (layer-matched: the top-k's "
        "per-layer counts, the verdict's baseline; uniform: any layer, reported beside it), "
        f"k ∈ {list(ks.ks)}, modes {list(ks.modes)}, scope "
        f"`{ks.scope}`. Metric: the clean response is teacher-forced and the answer counts as "
        "retrieved while every answer token stays the greedy choice.",
        f"Top-k heads that pass the retrieval threshold (score > {config.detect.threshold}): "
        + ", ".join(above)
        + ". Heads tied in score are ranked in a seeded random order, not by "
        "layer.",
    ]


def _robustness_text(rows: pd.DataFrame, config) -> list[str]:
    """Where the necessity claim holds: one line per (task, mode, scope, method), with both
    random draws side by side. The verdict stays on the primary row above."""
    k, pct = config.claims.k, (lambda x: f"{x:.2f}")
    out = [
        "### Where it holds: other scopes, uniform draws, free generation",
        "",
        f"At k = {k}, over random draws (seeds {list(config.robustness_seeds)}): the answer-"
        "retrieved rate with no knockout, under the top-k and under k random heads, and random "
        "minus top [CI]. Scope `response`: the prompt's last position and the response; "
        "`query`: also the question and template after the context; `all`: every position. "
        "Teacher-forced rows score the clean response; generation rows regenerate freely under "
        f"scope `{config.knockout.scope}` and count the answer as retrieved when it occurs in the "
        "generated text (normalised substring). The claim's "
        "verdict stays on its primary row above.",
        "",
        "| task · mode | scope | method | none | top | random, layer-matched | random − top "
        "(layer-matched) | random, uniform | random − top (uniform) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {"response": 0, "query": 1, "all": 2}
    rows = rows.sort_values(
        ["task", "mode", "method", "scope"],
        key=lambda c: (
            c.map(order)
            if c.name == "scope"
            else c.map({"teacher-forced": "0"}).fillna(c)
            if c.name == "method"
            else c
        ),
    )
    for (task, mode, scope, method), g in rows.groupby(
        ["task", "mode", "scope", "method"], sort=False
    ):
        by = g.set_index("baseline")
        cells = []
        for draw in ("layer-matched", "uniform over layers"):
            if draw in by.index:
                r = by.loc[draw]
                cells += [pct(r["random"]), f"{r['estimate']:+.2f} [{r['ci_low']:+.2f}, "
                          f"{r['ci_high']:+.2f}] ({r['verdict']})"]  # fmt: skip
            else:
                cells += ["—", "—"]
        first = g.iloc[0]
        out.append(f"| {task} · {mode} | {scope} | {method} | {pct(first['none'])} | "
                   f"{pct(first['top'])} | " + " | ".join(cells) + " |")  # fmt: skip
    return out


def _sufficient_text(tables, config) -> list[str]:
    if "patch" not in tables:
        return ["Not run."]
    p = tables["patch"]
    pairs = p.drop_duplicates("example_id")
    return [
        f"{len(pairs)} clean/corrupt NIAH pairs: one answer token of the needle is replaced (the "
        "first of the first few whose replacement flips the model's preference); the corruption "
        f"flips it in {int(pairs['flipped'].sum())}. Heads are patched at the positions of scope "
        f"`{config.knockout.scope}` (from position {int(pairs['patch_from'].min())} on in the "
        "shortest pair); metric: logit(clean token) − logit(corrupt token) where the clean "
        "response writes it."
    ]


def _screen_text(tables) -> list[str]:
    if "attribution" not in tables or "patch" not in tables:
        return []
    q = screen_quality(tables["attribution"], tables["patch"])
    lines = ["", "## Screening every head with AtP\\*", "",
             "Attribution patching estimates every head's patching effect from two forwards and "
             "one backward (AtP). AtP\\* (Kramár et al. 2024) adds GradDrop, ranking by the mean "
             "|estimate| over the backward passes with one layer's gradient dropped; its QK fix "
             "is for a head's queries and keys, not its output, so the signed estimate is "
             "AtP's. On the patch stage's pairs, against its exact per-head values:", "",
             "| pair | flipped | Spearman AtP | Spearman \\|AtP\\| vs \\|exact\\| | Spearman "
             "AtP\\* score vs \\|exact\\| | exact top-10 outside AtP\\* top-30 |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in q.itertuples():
        lines.append(f"| {r.example_id} | {'yes' if r.flipped else 'no'} | {r.spearman_atp:.3f} "
                     f"| {r.spearman_atp_magnitude:.3f} | {r.spearman_atp_star_score:.3f} | "
                     f"{r.exact_top10_outside_top30} |")  # fmt: skip
    return lines


def _same_heads_lines(paths: pd.DataFrame) -> list[str]:
    """The queries and the keys of the same query heads, all upstream heads together: mean
    recovery per comparison (the claims table has their intervals and the query share)."""
    same = paths[paths["kind"] == "same_heads"]
    same = same[same["flipped"]] if same["flipped"].any() else same
    if same.empty:
        return []
    lines = ["", "The same, into the queries and into the keys of the *same* query heads (the "
             "claims rows compare these):"]  # fmt: skip
    for comparison, g in same.groupby("comparison", sort=False):
        mean = g.groupby("receiver_input")["recovery"].mean()
        where = ("the KV groups wholly inside the receivers" if comparison == "receiver_groups"
                 else "the receivers' whole KV groups")  # fmt: skip
        lines.append(f"- {where} ({int(g['n_compared_heads'].iloc[0])} query heads: "
                     f"{g['compared_heads'].iloc[0]}): queries {mean['q']:.2f}, keys "
                     f"{mean['k']:.2f}")  # fmt: skip
    if "receiver_groups" not in set(same["comparison"]):
        lines.append("- no KV group lies wholly inside the receivers")
    return lines


def _paths_text(tables, run_dir: Path) -> list[str]:
    if "paths" not in tables:
        return []
    from mechinterp.plots.study import INPUT_NAMES

    paths = tables["paths"]
    receivers = paths["receivers"].iloc[0].split(",")
    rec = sender_recovery(paths)
    joint = paths[(paths["kind"] == "set")]
    joint = joint[joint["flipped"]] if joint["flipped"].any() else joint
    lines = ["", "## What feeds the retrieval heads: path patching", "",
             f"Receivers: the {len(receivers)} best retrieval heads ({', '.join(receivers)}). "
             "Each head below the last receiver is patched (clean into corrupt) with every other "
             "head frozen, and only the receivers' inputs take the result (exact two-pass path "
             f"patching; MLPs in between {'recompute' if paths['via_mlps'].iloc[0] else 'frozen'}"
             "). Under GQA a key input is the receiver's KV group's, so their keys reach query "
             "heads their queries do not. Mean recovery over "
             f"{int(rec['n_pairs'].iloc[0])} pairs; all upstream heads together:"]  # fmt: skip
    for inp, g in joint.groupby("receiver_input", sort=False):
        lines.append(f"- into their {INPUT_NAMES.get(inp, inp)}: recovery "
                     f"{g['recovery'].mean():.2f}")  # fmt: skip
    lines += _same_heads_lines(paths)
    patterns = tables.get("head_patterns")
    lines += ["", "Top senders per input (by |mean recovery|), with their pattern scores on "
              "repeated random tokens (previous-token, induction):", "",
              "| input | sender | recovery | previous-token | induction |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for inp, g in rec.groupby("receiver_input", sort=False):
        order = g["recovery"].abs().sort_values(ascending=False).index
        for r in g.reindex(order).head(5).itertuples():
            p = (patterns.set_index("name").loc[r.name] if patterns is not None else None)
            prev = f"{p['previous_token']:.2f}" if p is not None else "—"
            ind = f"{p['induction']:.2f}" if p is not None else "—"
            lines.append(f"| {inp} | {r.name} | {r.recovery:+.2f} | {prev} | {ind} |")
    if (run_dir / "figures" / "path_patching.png").is_file():
        lines += ["", "![path patching](figures/path_patching.png)"]
    return lines


def _addressing_text(tables) -> list[str]:
    a = tables.get("addressing")
    if a is None or not len(a):
        return ["Not run."]
    from mechinterp.experiments.study.claims import CORRUPTION_WORDS

    pairs = a[a["kind"] == "pair"]
    lines = ["A question swap asks for another needle in the same context; a key swap replaces "
             "the needle's key phrase (the words it shares with the question) and keeps its "
             "answer. Pairs the model answers alike are left out. The receivers' attention is "
             "read from the last position: the first response token where the clean and "
             "corrupt answers part (their common start teacher-forced on both), or the prompt's "
             "end; the metric is the receivers' mean attention mass on the asked needle (minus "
             "the other needle's, for a question swap).", "",
             "| corruption | pairs | answered apart | attention moved | mass on asked needle, "
             "clean → corrupt |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    nan = float("nan")
    absent = {"clean_metric": nan, "corrupt_metric": nan, "needle": -1, "node": "",
              "hypothesis": None, "head_name": "", "recovery": nan, "members": None,
              "clean_mass": nan, "corrupt_mass": nan}  # no pair answered apart: no analysis
    a = a.assign(**{c: v for c, v in absent.items() if c not in a})
    senders = a[a["kind"] == "sender"]
    for corruption, g in pairs.groupby("corruption", sort=False):
        s = senders[senders["corruption"] == corruption].drop_duplicates("example_id")
        moved = int((s["clean_metric"] > s["corrupt_metric"]).sum())
        mass = a[(a["kind"] == "mass") & (a["corruption"] == corruption) & (a["needle"] == 0)
                 & (a["node"] == "q")]  # fmt: skip
        shift = (f"{mass['clean_mass'].mean():.3f} → {mass['corrupt_mass'].mean():.3f}"
                 if len(mass) else "—")  # fmt: skip
        lines.append(f"| {CORRUPTION_WORDS.get(corruption, corruption)} | {len(g)} | "
                     f"{int(g['apart'].sum())} | {moved} | {shift} |")
    rec = address_senders(a) if len(senders) else pd.DataFrame()
    patterns = tables.get("head_patterns")
    if len(rec):
        lines += ["", "Top senders per corruption and input (mean path-patching recovery of the "
                  "receivers' attention over the pairs it moved), with their pattern scores on "
                  "repeated random tokens:", "",
                  "| corruption | input | sender | recovery | previous-token | induction | "
                  "duplicate-token |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for (corruption, inp), g in rec.groupby(["corruption", "receiver_input"], sort=False):
            for r in g.nlargest(5, "recovery").itertuples():
                p = patterns.set_index("name").loc[r.head_name] if patterns is not None else None
                scores = [f"{p[c]:.2f}" if p is not None else "—"
                          for c in ("previous_token", "induction", "duplicate_token")]  # fmt: skip
                lines.append(f"| {CORRUPTION_WORDS.get(corruption, corruption)} | {inp} | "
                             f"{r.head_name} | {r.recovery:+.2f} | " + " | ".join(scores) + " |")
    sets = a[(a["kind"] == "set") & a["hypothesis"].notna()
             & ~a["head_name"].astype(str).str.contains("~")]  # fmt: skip
    prev = sets[sets["head_name"] == "previous_token"]["members"]
    if len(prev):
        lines += ["", f"Hypothesis sets: previous-token heads {prev.iloc[0]} (the same on every "
                  "pair); heads that read the question: the heads below the receivers paying "
                  "the most attention from the last position to the question, per pair. Each is "
                  "compared with layer-matched random sets of its size."]
    return lines
