"""Figures of the extension experiment: recall against performance, cross-model patching by
variant, head-set overlaps, knockout by model."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mechinterp.errors import InputError

_CORRELATION_SYMBOL = {"spearman": "Spearman ρ", "pearson": "Pearson r", "kendall": "Kendall τ"}


def _correlation_text(correlation: dict) -> str:
    if "estimate" not in correlation:
        raise InputError("recall_scatter: correlation needs an 'estimate'")
    method = str(correlation.get("method") or "correlation")
    text = f"{_CORRELATION_SYMBOL.get(method.lower(), method)} = {correlation['estimate']:.2f}"
    low, high = correlation.get("low"), correlation.get("high")
    if low is not None and high is not None and not (math.isnan(low) or math.isnan(high)):
        text += f" [{low:.2f}, {high:.2f}]"
    if correlation.get("n") is not None:
        text += f", n = {int(correlation['n'])}"
    return text


def recall_scatter(
    df: pd.DataFrame,
    *,
    x: str = "recall",
    y: str = "performance",
    label: str = "variant",
    reference: str | None = None,
    correlation: dict | None = None,
    title: str | None = None,
) -> go.Figure:
    """Task performance vs head recall (against the reference model's heads), one labelled marker
    per variant (columns `label`, `x`, `y`).

    The `reference` variant (its `label` value) is drawn as a star, with that label as its
    legend entry (say what the reference is, e.g. "reference (realistic needles in real
    essays)"). `correlation` (keys method, estimate, and optionally low, high, n) is shown as an
    annotation, e.g. "Spearman ρ = 0.90 [0.40, 1.00], n = 5". A least-squares line is fitted to
    the non-reference points when they have at least 2 distinct x values.
    """
    missing = {label, x, y} - set(df.columns)
    if missing:
        raise InputError(f"recall_scatter needs columns {sorted(missing)}")
    if df.empty:
        raise InputError("recall_scatter got an empty table")
    blank = df[df[[x, y]].isna().any(axis=1)]
    if not blank.empty:
        raise InputError(f"recall_scatter: missing {x}/{y} for {list(blank[label])}")
    if reference is not None and not (df[label] == reference).any():
        raise InputError(f"recall_scatter: reference {reference!r} is not a {label} in the table")
    is_ref = df[label] == reference
    rest = df[~is_ref]
    xs = df[x].astype(float)
    unit = bool(xs.between(0, 1).all())  # x on 0..1: fixed axis
    fig = go.Figure()
    fit = None
    if rest[x].nunique() >= 2:  # drawn first, so that it runs under the markers and labels
        fit = np.polyfit(rest[x].astype(float), rest[y].astype(float), 1)
        line_x = np.array([rest[x].min(), rest[x].max()], dtype=float)
        fig.add_trace(
            go.Scatter(
                x=line_x,
                y=np.polyval(fit, line_x),
                mode="lines",
                line={"color": "grey", "dash": "dash", "width": 1.5},
                name="least-squares fit (variants)",
                hoverinfo="skip",
            )
        )
    # labels sit above/below a point on the side away from the fit line, else centred, else on
    # the other side: the first that stays on the plot (~6.5 px per character on a ~560 px plot;
    # up to ~50 px may spill into the right margin, none into the y tick labels on the left)
    span = (xs.max() - xs.min()) or 1.0
    x_range = [-0.05, 1.05] if unit else [xs.min() - 0.08 * span, xs.max() + 0.08 * span]
    per_px = (x_range[1] - x_range[0]) / 560
    slope = 0.0 if fit is None else float(fit[0])
    placed: list[tuple[float, float, float, str]] = []  # label boxes: x0, x1, y, side
    for part, name, marker in (
        (rest, "variants", {"size": 11, "color": "#1f77b4", "symbol": "circle"}),
        (df[is_ref], str(reference), {"size": 16, "color": "#d62728", "symbol": "star"}),
    ):
        if part.empty:
            continue
        px, py = part[x].astype(float), part[y].astype(float)
        positions = []
        shown = ["reference"] * len(part) if name != "variants" else list(part[label].astype(str))
        for a, b, text in zip(px, py, shown, strict=True):
            width = 6.5 * len(text) * per_px
            extent = {"left": (a - width, a), "center": (a - width / 2, a + width / 2)}
            extent["right"] = (a, a + width)
            if fit is None or name != "variants":
                side, anchor = "top", "center"
            else:
                above = b >= np.polyval(fit, a)
                away = "center" if slope == 0 else "left" if (slope > 0) == above else "right"
                order = [away, "center", "right" if away == "left" else "left"]
                fits = [
                    o for o in order
                    if extent[o][0] >= x_range[0] and extent[o][1] <= x_range[1] + 50 * per_px
                ]  # fmt: skip
                side, anchor = "top" if above else "bottom", (fits or order)[0]
            box = (*extent[anchor], b)
            if any(  # a label already there: put this one on the other side of its point
                s_ == side and box[0] < x1 and x0 < box[1] and abs(box[2] - y_) < 0.06
                for x0, x1, y_, s_ in placed
            ):
                side = "bottom" if side == "top" else "top"
            placed.append((*box, side))
            positions.append(f"{side} {anchor}")
        fig.add_trace(
            go.Scatter(
                x=px,
                y=py,
                mode="markers+text",
                text=shown,
                customdata=[str(v) for v in part[label]],
                textposition=positions,
                textfont={"size": 11},
                cliponaxis=False,
                marker={**marker, "line": {"width": 1, "color": "white"}},
                name=name,
                hovertemplate=f"%{{customdata}}<br>{x}=%{{x:.3f}}<br>{y}=%{{y:.3f}}<extra></extra>",
            )
        )
    if correlation is not None:
        fig.add_annotation(
            text=_correlation_text(correlation),
            xref="paper",
            yref="paper",
            x=0.01,
            y=0.99,
            xanchor="left",
            yanchor="top",
            showarrow=False,
            font={"size": 13},
            bgcolor="rgba(255,255,255,0.85)",
            bordercolor="lightgrey",
            borderwidth=1,
        )
    ys = df[y].astype(float)
    fig.update_layout(
        title=title or f"{y} vs head {x}",
        xaxis={"title": f"head {x} (vs reference heads)", "range": x_range},
        yaxis={"title": y, "range": [-0.05, 1.05] if ys.between(0, 1).all() else None},
        legend={"orientation": "h", "yanchor": "top", "y": -0.15, "xanchor": "left", "x": 0},
        width=720,
        height=560,
        template="plotly_white",
    )
    return fig


def recall_by_task(
    pooled: pd.DataFrame,
    *,
    correlations: dict[str, dict] | None = None,
    pooled_correlation: dict | None = None,
    title: str | None = None,
) -> go.Figure:
    """Performance vs head recall, one panel per task (columns `task`, `label`, `recall`,
    `performance`, `metric`, `synthetic`): synthetic variants as labelled circles, the other
    models (the reference, the limited-real baseline) as stars and diamonds. Each panel's title
    carries its task's correlation (`correlations[task]`), the figure's the pooled one."""
    missing = {"task", "label", "recall", "performance", "metric", "synthetic"} - set(pooled)
    if missing:
        raise InputError(f"recall_by_task needs columns {sorted(missing)}")
    df = pooled.dropna(subset=["recall", "performance"])
    if df.empty:
        raise InputError("recall_by_task: no model has both recall and performance")
    tasks = list(dict.fromkeys(df["task"]))
    subtitles = []
    for t in tasks:
        r = (correlations or {}).get(t, {})
        metric = df.loc[df["task"] == t, "metric"].iloc[0]
        subtitles.append(f"{t} ({metric})" + (f"<br>{_correlation_text(r)}, p = "
                                              f"{r['p_permutation']:.3f}" if "estimate" in r
                                              else ""))  # fmt: skip
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=subtitles, shared_yaxes=False,
                        horizontal_spacing=0.08)  # fmt: skip
    kinds = (("synthetic variant", {"symbol": "circle", "size": 11, "color": "#1f77b4"}),
             ("reference", {"symbol": "star", "size": 16, "color": "#d62728"}),
             ("real data (limited)", {"symbol": "diamond", "size": 12, "color": "#ff7f0e"}))
    for col, t in enumerate(tasks, 1):
        part = df[df["task"] == t]
        kind = np.where(part["synthetic"].astype(bool), kinds[0][0],
                        np.where(part["label"].str.startswith("real data"), kinds[2][0],
                                 kinds[1][0]))  # fmt: skip
        for name, marker in kinds:
            sel = part[kind == name]
            if sel.empty:
                continue
            fig.add_trace(go.Scatter(
                x=sel["recall"], y=sel["performance"], mode="markers+text",
                text=[v if name == kinds[0][0] else "" for v in sel["label"]],
                textposition="top center", textfont={"size": 10}, cliponaxis=False,
                marker={**marker, "line": {"width": 1, "color": "white"}}, name=name,
                legendgroup=name, showlegend=col == 1, customdata=sel["label"],
                hovertemplate="%{customdata}<br>recall=%{x:.2f}<br>performance=%{y:.2f}"
                "<extra></extra>"), row=1, col=col)  # fmt: skip
        fig.update_xaxes(title_text="head recall", range=[-0.05, 1.1], row=1, col=col)
        fig.update_yaxes(range=[-0.05, 1.1], row=1, col=col,
                         title_text="performance" if col == 1 else None)  # fmt: skip
    head = title or "performance vs head recall per task"
    if pooled_correlation and "estimate" in pooled_correlation:
        r = pooled_correlation
        head += (f"<br><sup>pooled within tasks: ρ = {r['estimate']:.2f} [{r['low']:.2f}, "
                 f"{r['high']:.2f}], n = {r['n']}, permutation p = {r['p_permutation']:.4f}</sup>")
    fig.update_layout(title=head, template="plotly_white", width=380 * len(tasks) + 80,
                      height=520, margin={"t": 130},
                      legend={"orientation": "h", "y": -0.18, "x": 0})  # fmt: skip
    return fig


def cross_patch_by_variant(
    summary: pd.DataFrame, *, metric: str = "f1", title: str | None = None
) -> go.Figure:
    """Cross-model patching, one bar group per recipient variant: the task metric on the
    recipient alone, with Inter / Compl / Rand heads patched in from the donor, and on the donor
    (columns `model_variant`, `condition`, `metric`; Rand is the mean over its seeds, `n` and
    `n_heads` go into the hover and the bar labels)."""
    missing = {"model_variant", "condition", metric} - set(summary.columns)
    if missing:
        raise InputError(f"cross_patch_by_variant needs columns {sorted(missing)}")
    if summary.empty:
        raise InputError("cross_patch_by_variant got an empty table")
    order = ["recipient", "inter", "compl", "rand", "donor"]
    colours = {"recipient": "#7f7f7f", "inter": "#2ca02c", "compl": "#ff7f0e",
               "rand": "#9467bd", "donor": "#d62728"}  # fmt: skip
    names = {"recipient": "recipient (synthetic model)", "inter": "Inter = H_real ∩ H_syn",
             "compl": "Compl = H_real \\ H_syn", "rand": "Rand (|Inter| heads, mean of seeds)",
             "donor": "donor (reference model)"}  # fmt: skip
    df = summary.assign(condition=summary["condition"].str.replace(r"^rand-s\d+$", "rand",
                                                                   regex=True))  # fmt: skip
    agg = {metric: "mean"} | ({"n_heads": "first"} if "n_heads" in df else {})
    df = df.groupby(["model_variant", "condition"], sort=False).agg(agg).reset_index()
    variants = list(dict.fromkeys(df["model_variant"]))
    fig = go.Figure()
    for cond in order:
        part = df[df["condition"] == cond].set_index("model_variant").reindex(variants)
        if part[metric].isna().all():
            continue
        heads = part["n_heads"] if "n_heads" in part else pd.Series(np.nan, index=part.index)
        labels = [
            "" if pd.isna(v) else f"{v:.2f}" + (f"<br>{int(h)}h" if h and pd.notna(h) else "")
            for v, h in zip(part[metric], heads, strict=True)
        ]
        fig.add_trace(go.Bar(x=variants, y=part[metric], name=names[cond], text=labels,
                             textposition="outside", marker_color=colours[cond]))  # fmt: skip
    top = float(df[metric].max()) if len(df) else 1.0
    fig.update_layout(
        barmode="group",
        title=title or f"cross-model patching: {metric} before and after patching",
        xaxis_title="recipient (fine-tuned on variant)",
        yaxis_title=f"{metric.replace('_', ' ')} on the reference task",
        yaxis_range=[0, max(1.0, top) * 1.18],
        legend={"orientation": "h", "y": -0.25},
        width=820,
        height=480,
        margin={"b": 140},
    )
    return fig


def overlap_heatmap(sets: dict[str, list[str]], *, title: str | None = None) -> go.Figure:
    """Head-set overlap between models: cell (row A, column B) = |A ∩ B| / |A|, the share of A's
    heads that B also has (row = a synthetic model, column = the reference: its subset share;
    row = the reference: the recall of each column). Cells show the share and the count."""
    from mechinterp.analysis.headsets import precision
    from mechinterp.heads import parse_heads

    if not sets:
        raise InputError("overlap_heatmap got no head sets")
    heads = {name: list(parse_heads(hs)) for name, hs in sets.items()}
    names = list(sets)
    z, text = [], []
    for a in names:
        zr, tr = [], []
        for b in names:
            both = len(set(sets[a]) & set(sets[b]))
            share = precision(heads[a], heads[b]) if sets[a] else float("nan")
            zr.append(share)
            tr.append("" if math.isnan(share) else f"{share:.2f}<br>{both}/{len(sets[a])}")
        z.append(zr)
        text.append(tr)
    ticks = [f"{n} ({len(sets[n])})" for n in names]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=ticks,
            y=ticks,
            zmin=0,
            zmax=1,
            colorscale="Blues",
            text=text,
            texttemplate="%{text}",
            colorbar={"title": "|A∩B|/|A|"},
        )  # fmt: skip
    )
    fig.update_layout(
        title=title or "retrieval-head overlap between models",
        xaxis_title="B (heads in brackets)",
        yaxis_title="A",
        yaxis_autorange="reversed",
        width=760,
        height=620,
    )
    return fig


def knockout_by_model(summary: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Per model: answer-retrieved rate with no knockout, its top-k heads and k random heads
    knocked out (columns `model_variant`, `condition` in none/top/random, `value`, optional `lo`,
    `hi` for error bars, `k`)."""
    missing = {"model_variant", "condition", "value"} - set(summary.columns)
    if missing:
        raise InputError(f"knockout_by_model needs columns {sorted(missing)}")
    if summary.empty:
        raise InputError("knockout_by_model got an empty table")
    fig = go.Figure()
    k = int(summary.loc[summary["condition"] == "top", "k"].max()) if "k" in summary else None
    names = {"none": "no knockout", "top": f"own top-{k}", "random": f"random-{k}, same layers"}
    colours = {"none": "#7f7f7f", "top": "#d62728", "random": "#1f77b4"}
    for cond in ("none", "top", "random"):
        part = summary[summary["condition"] == cond]
        if part.empty:
            continue
        err = None
        if {"lo", "hi"} <= set(part.columns):
            err = {"type": "data", "symmetric": False, "array": part["hi"] - part["value"],
                   "arrayminus": part["value"] - part["lo"]}  # fmt: skip
        fig.add_trace(go.Bar(x=part["model_variant"], y=part["value"], name=names[cond],
                             error_y=err, marker_color=colours[cond],
                             text=[f"{v:.2f}" for v in part["value"]],
                             textposition="inside", insidetextanchor="start"))  # fmt: skip
    fig.update_layout(
        barmode="group",
        title=title or "knockout per model: answer retrieved",
        xaxis_title="model (fine-tuned on variant)",
        yaxis_title="answer retrieved (share)",
        yaxis_range=[0, 1.05],
        width=820,
        height=460,
    )
    return fig
