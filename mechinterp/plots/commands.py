"""Figures of the single commands: accuracy and head heatmaps, a knockout curve, cross-model
patching bars (also drawn by the studies)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from mechinterp.errors import InputError


def accuracy_heatmap(
    df: pd.DataFrame,
    *,
    value: str = "correct",
    title: str | None = None,
) -> go.Figure:
    """Context length × needle depth heatmap of the mean of `value` (one cell per grid point).

    Cells are annotated with the mean and the number of examples behind it.
    """
    missing = {"length", "depth", value} - set(df.columns)
    if missing:
        raise InputError(f"accuracy_heatmap needs columns {sorted(missing)}")
    if df.empty:
        raise InputError("accuracy_heatmap got an empty table")
    grid = df.assign(_v=df[value].astype(float)).groupby(["length", "depth"])["_v"]
    mean = grid.mean().unstack("depth").sort_index()
    count = grid.size().unstack("depth").reindex_like(mean)
    text = [
        [f"{m:.2f}<br>n={int(c)}" if pd.notna(m) else "" for m, c in zip(mr, cr, strict=True)]
        for mr, cr in zip(mean.values, count.fillna(0).values, strict=True)
    ]
    fig = go.Figure(
        go.Heatmap(
            z=mean.values,
            x=[f"{d:g}" for d in mean.columns],
            y=[str(v) for v in mean.index],
            zmin=0,
            zmax=1,
            colorscale="RdYlGn",
            text=text,
            texttemplate="%{text}",
            colorbar={"title": value},
            hovertemplate="length=%{y}<br>depth=%{x}<br>" + value + "=%{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or f"{value} by context length and needle depth",
        xaxis_title="depth (0 = start of context)",
        yaxis_title="length (tokens)",
        width=720,
        height=480,
        template="plotly_white",
    )
    return fig


def head_heatmap(
    df: pd.DataFrame,
    *,
    value: str = "score",
    top_k: int = 10,
    title: str | None = None,
) -> go.Figure:
    """Layer × head heatmap of a per-head score table (columns layer, head, `value`), with the
    `top_k` heads labelled `L{layer}H{head}` and their score."""
    missing = {"layer", "head", value} - set(df.columns)
    if missing:
        raise InputError(f"head_heatmap needs columns {sorted(missing)}")
    if df.empty:
        raise InputError("head_heatmap got an empty table")
    if df.duplicated(["layer", "head"]).any():
        raise InputError("head_heatmap needs one row per (layer, head); aggregate first")
    grid = df.pivot(index="layer", columns="head", values=value).sort_index()
    top = df.sort_values([value, "layer", "head"], ascending=[False, True, True]).head(top_k)
    fig = go.Figure(
        go.Heatmap(
            z=grid.values,
            x=[str(h) for h in grid.columns],
            y=[str(layer) for layer in grid.index],
            colorscale="Viridis",
            colorbar={"title": value},
            hovertemplate="L%{y}H%{x}<br>" + value + "=%{z:.3f}<extra></extra>",
        )
    )
    n_layers, n_heads = grid.shape
    for _, row in top.iterrows():
        right_half = int(row["head"]) >= n_heads / 2  # label points inwards, away from the edge
        fig.add_annotation(
            x=str(int(row["head"])),
            y=str(int(row["layer"])),
            text=f"L{int(row['layer'])}H{int(row['head'])} {row[value]:.2f}",
            showarrow=True,
            arrowhead=0,
            ax=-28 if right_half else 28,
            ay=-14,
            font={"size": 10, "color": "black"},
            bgcolor="rgba(255,255,255,0.8)",
        )
    fig.update_layout(
        title=title or f"{value} per head (top {min(top_k, len(df))} labelled)",
        xaxis_title="head",
        yaxis_title="layer",
        width=max(520, 60 * n_heads + 260),
        height=max(420, 20 * n_layers + 160),
        template="plotly_white",
    )
    return fig


def knockout_curve(summary: pd.DataFrame, *, value: str = "correct", title: str | None = None):
    """Task metric vs number of heads knocked out: top-k ranked heads vs random complement heads
    (mean over seeds, error bars = SD across seeds), one colour per mode; the no-knockout
    baseline as a dashed line. Takes `summarise_sweep`'s table."""
    missing = {"mode", "k", "condition", value} - set(summary.columns)
    if missing:
        raise InputError(f"knockout_curve needs columns {sorted(missing)}")
    fig = go.Figure()
    base = summary[summary["condition"] == "none"]
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    modes = [m for m in summary["mode"].unique() if m != "none"]
    for i, mode in enumerate(modes):
        for condition, dash in (("top", "solid"), ("random", "dot")):
            part = summary[(summary["mode"] == mode) & (summary["condition"] == condition)]
            part = part.sort_values("k")
            fig.add_trace(
                go.Scatter(
                    x=part["k"],
                    y=part[value],
                    error_y={"type": "data", "array": part.get("seed_sd", None), "visible": True}
                    if condition == "random"
                    else None,
                    mode="lines+markers",
                    name=f"{mode}: {'top-k ranked' if condition == 'top' else 'random complement'}",
                    line={"color": colours[i % len(colours)], "dash": dash},
                )
            )
    if not base.empty:
        fig.add_hline(
            y=float(base[value].iloc[0]),
            line_dash="dash",
            line_color="grey",
            annotation_text="no knockout",
        )
    fig.update_layout(
        title=title or f"{value} after knocking out k heads",
        xaxis_title="k (heads knocked out)",
        yaxis_title=value,
        yaxis_range=[0, 1.05] if value == "correct" else None,
        xaxis_type="log",
        width=760,
        height=480,
        template="plotly_white",
    )
    return fig


def cross_patch_bars(
    summary: pd.DataFrame,
    *,
    metrics: tuple[str, ...] = ("f1", "answer_logprob"),
    title: str | None = None,
) -> go.Figure:
    """Normalised recovery per patched head set (recipient = 0, donor = 1), one bar group per
    metric (metrics where donor and recipient tie are left out). Takes `summarise_cross`'s
    table."""
    if "condition" not in summary or not any(f"{m}_recovery" in summary for m in metrics):
        raise InputError("cross_patch_bars needs `condition` and <metric>_recovery columns")
    # a metric on which donor and recipient tie has no recovery (NaN): leave it out
    metrics = tuple(
        m for m in metrics if f"{m}_recovery" in summary and summary[f"{m}_recovery"].notna().any()
    )
    sets = summary[~summary["condition"].isin(["recipient", "donor"])]
    labels = [
        f"{c}<br>({int(n)} heads)" for c, n in zip(sets["condition"], sets["n_heads"], strict=True)
    ]
    fig = go.Figure()
    for m in metrics:
        fig.add_trace(
            go.Bar(
                x=labels,
                y=sets[f"{m}_recovery"],
                name=m,
                text=[f"{v:.2f}" for v in sets[f"{m}_recovery"]],
                textposition="outside",
            )
        )
    for y, label in ((0, "recipient"), (1, "donor")):
        fig.add_hline(y=y, line_dash="dash", line_color="grey", annotation_text=label)
    fig.update_layout(
        title=title or "cross-model patching: normalised recovery per head set",
        xaxis_title="head set patched from the donor",
        yaxis_title="normalised recovery",
        barmode="group",
        showlegend=True,
        legend_title_text="metric",
        width=max(560, 110 * len(sets) + 240),
        height=460,
        template="plotly_white",
    )
    return fig
