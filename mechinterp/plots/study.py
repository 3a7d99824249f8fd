"""Figures of the necessity & sufficiency study: accuracy panels and knockout curves with CIs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mechinterp.errors import InputError


def _tick(v) -> str:
    """A grid coordinate as an axis label: numbers compactly (`0.25`, `4000`), others as is."""
    return f"{v:g}" if isinstance(v, int | float | np.integer | np.floating) else str(v)


def accuracy_panels(
    df: pd.DataFrame,
    *,
    value: str = "accuracy",
    panel: str = "panel",
    title: str | None = None,
) -> go.Figure:
    """A row of context length × needle depth heatmaps, one per `panel` value (in order of first
    appearance), e.g. "no knockout" | "top-10 zero" | "random-10 zero (3 seeds)".

    One row per example (columns `panel`, `length`, `depth`, `value`); each cell shows the mean of
    `value` and the number of examples behind it, on one shared 0–1 RdYlGn colour scale. All
    panels use the same length and depth grid, so a cell sits in the same place in every panel.
    """
    missing = {panel, "length", "depth", value} - set(df.columns)
    if missing:
        raise InputError(f"accuracy_panels needs columns {sorted(missing)}")
    if df.empty:
        raise InputError("accuracy_panels got an empty table")
    if df[panel].isna().any():
        raise InputError(f"accuracy_panels: column {panel!r} has missing values")
    panels = list(pd.unique(df[panel]))
    lengths = sorted(pd.unique(df["length"]))
    depths = sorted(pd.unique(df["depth"]))
    fig = make_subplots(
        rows=1,
        cols=len(panels),
        subplot_titles=[str(p) for p in panels],
        shared_yaxes=True,
        horizontal_spacing=min(0.04, 0.2 / len(panels)),
    )
    for i, name in enumerate(panels, start=1):
        part = df[df[panel] == name]
        grid = part.assign(_v=part[value].astype(float)).groupby(["length", "depth"])["_v"]
        mean = grid.mean().unstack("depth").reindex(index=lengths, columns=depths)
        count = grid.size().unstack("depth").reindex(index=lengths, columns=depths)
        text = [
            [f"{m:.2f}<br>n={int(c)}" if pd.notna(m) else "" for m, c in zip(mr, cr, strict=True)]
            for mr, cr in zip(mean.values, count.fillna(0).values, strict=True)
        ]
        fig.add_trace(
            go.Heatmap(
                z=mean.values,
                x=[_tick(d) for d in depths],
                y=[_tick(v) for v in lengths],
                coloraxis="coloraxis",
                text=text,
                texttemplate="%{text}",
                textfont={"size": 10},
                name=str(name),
                hovertemplate=f"{name}<br>length=%{{y}}<br>depth=%{{x}}<br>{value}=%{{z:.3f}}"
                "<extra></extra>",
            ),
            row=1,
            col=i,
        )
        fig.update_xaxes(type="category", title_text="depth (0 = start)", row=1, col=i)
    fig.update_yaxes(type="category", row=1, col=1, title_text="length (tokens)")
    fig.update_yaxes(type="category")
    per_panel = max(240, 56 * len(depths))
    fig.update_annotations(font_size=13)  # the subplot titles: long panel names stay inside
    fig.update_layout(
        title=title or f"{value} by context length and needle depth",
        coloraxis={"colorscale": "RdYlGn", "cmin": 0, "cmax": 1, "colorbar": {"title": value}},
        width=max(460, 130 + per_panel * len(panels)),
        height=max(400, 44 * len(lengths) + 200),
        template="plotly_white",
    )
    return fig


_CONDITION_STYLE = {
    "top": ("top-k ranked heads", "214,39,40"),
    "random": ("random k heads, same layers", "31,119,180"),
    "random_uniform": ("random k heads, any layer", "148,103,189"),
}


def knockout_ci_curves(
    summary: pd.DataFrame,
    *,
    value_label: str = "answer retrieved",
    title: str | None = None,
) -> go.Figure:
    """Metric vs number of heads knocked out, top-k (red) vs random-k (blue), with CI bands.

    One row per (`task`, `mode`, `k`, `condition`) with columns `value`, `lo`, `hi` (CI bounds);
    `condition` is "top" or "random". Rows with condition "none" (k = 0) are the no-knockout
    baseline of their task, drawn as a dashed line in every subplot of that task (a baseline row
    whose `mode` is one of the plotted modes applies to that mode only). One subplot per
    task (rows) × mode (columns); k on a log axis ticked at the tested values.
    """
    missing = {"task", "mode", "k", "condition", "value", "lo", "hi"} - set(summary.columns)
    if missing:
        raise InputError(f"knockout_ci_curves needs columns {sorted(missing)}")
    curves = summary[summary["condition"] != "none"]
    if curves.empty:
        raise InputError("knockout_ci_curves got no top/random rows")
    unknown = set(curves["condition"]) - set(_CONDITION_STYLE)
    if unknown:
        raise InputError(f"knockout_ci_curves: unknown conditions {sorted(map(str, unknown))}")
    if (curves["k"] < 1).any():
        raise InputError("knockout_ci_curves: top/random rows need k >= 1")
    if curves.duplicated(["task", "mode", "k", "condition"]).any():
        raise InputError("knockout_ci_curves needs one row per (task, mode, k, condition)")
    base = summary[summary["condition"] == "none"]
    tasks = list(pd.unique(curves["task"]))
    modes = list(pd.unique(curves["mode"]))
    ks = sorted(int(k) for k in pd.unique(curves["k"]))
    numbers = summary[["value", "lo", "hi"]].to_numpy(dtype=float)
    top = max(1.0, float(np.nanmax(numbers)))
    bottom = min(0.0, float(np.nanmin(numbers)))
    pad = 0.04 * (top - bottom)
    x_lo, x_hi = math.log10(ks[0]) - 0.1, math.log10(ks[-1]) + 0.1  # log-axis range, padded
    fig = make_subplots(
        rows=len(tasks),
        cols=len(modes),
        subplot_titles=[f"{t} · {m}" for t in tasks for m in modes],
        shared_xaxes=True,
        shared_yaxes=True,
        horizontal_spacing=0.06,
        vertical_spacing=min(0.12, 0.4 / len(tasks)),
    )
    shown: set[str] = set()
    for r, task in enumerate(tasks, start=1):
        for c, mode in enumerate(modes, start=1):
            cell = curves[(curves["task"] == task) & (curves["mode"] == mode)]
            for condition, (name, rgb) in _CONDITION_STYLE.items():
                part = cell[cell["condition"] == condition].sort_values("k")
                if part.empty:
                    continue
                band = part.dropna(subset=["lo", "hi"])
                if not band.empty:
                    fig.add_trace(
                        go.Scatter(
                            x=list(band["k"]) + list(band["k"])[::-1],
                            y=list(band["hi"]) + list(band["lo"])[::-1],
                            fill="toself",
                            fillcolor=f"rgba({rgb},0.18)",
                            line={"width": 0},
                            mode="lines",
                            name=f"{name} CI",
                            legendgroup=condition,
                            showlegend=False,
                            hoverinfo="skip",
                        ),
                        row=r,
                        col=c,
                    )
                fig.add_trace(
                    go.Scatter(
                        x=part["k"],
                        y=part["value"],
                        customdata=part[["lo", "hi"]].to_numpy(dtype=float),
                        mode="lines+markers",
                        name=name,
                        legendgroup=condition,
                        showlegend=condition not in shown,
                        line={"color": f"rgb({rgb})"},
                        marker={"size": 7},
                        hovertemplate=f"{task} · {mode}<br>{name}<br>k=%{{x}}<br>"
                        f"{value_label}=%{{y:.3f}} [%{{customdata[0]:.3f}}, "
                        "%{customdata[1]:.3f}]<extra></extra>",
                    ),
                    row=r,
                    col=c,
                )
                shown.add(condition)
            baseline = _baseline(base, task, mode, modes)
            if baseline is not None:  # a trace, not a shape: one legend entry, and it hovers
                fig.add_trace(
                    go.Scatter(
                        x=[10**x_lo, 10**x_hi],
                        y=[baseline, baseline],
                        mode="lines",
                        line={"color": "grey", "dash": "dash", "width": 1.5},
                        name="no knockout",
                        legendgroup="none",
                        showlegend="none" not in shown,
                        hovertemplate=f"no knockout<br>{value_label}={baseline:.3f}<extra></extra>",
                    ),
                    row=r,
                    col=c,
                )
                shown.add("none")
    fig.update_xaxes(type="log", tickvals=ks, ticktext=[str(k) for k in ks], range=[x_lo, x_hi])
    fig.update_xaxes(title_text="k (heads knocked out)", row=len(tasks))
    fig.update_yaxes(range=[bottom - pad, top + pad])
    fig.update_yaxes(title_text=value_label, col=1)
    fig.update_layout(
        title=title or f"{value_label} after knocking out k heads (shaded: CI)",
        width=330 + 340 * len(modes),
        height=170 + 270 * len(tasks),
        template="plotly_white",
    )
    return fig


def _baseline(base: pd.DataFrame, task, mode, modes: list) -> float | None:
    """The no-knockout value for one subplot: the task's "none" row for this mode if there is one,
    else the task's "none" rows that belong to no plotted mode (mean, they should agree)."""
    rows = base[base["task"] == task]
    own = rows[rows["mode"] == mode]
    rows = own if not own.empty else rows[~rows["mode"].isin(modes)]
    values = rows["value"].dropna()
    return float(values.mean()) if not values.empty else None


#: What a receiver input is called in a panel title.
INPUT_NAMES = {"q": "queries", "k": "keys", "v": "values", "resid": "residual stream"}


def sender_heatmaps(
    df: pd.DataFrame, *, value: str = "recovery", top_k: int = 5, title: str | None = None
) -> go.Figure:
    """Path patching: one layer × head heatmap of `value` per receiver input (columns
    `receiver_input`, `layer`, `head`, `value`; one row per sender and input), on one shared
    diverging colour scale centred at 0, each panel's `top_k` senders labelled."""
    missing = {"receiver_input", "layer", "head", value} - set(df.columns)
    if missing:
        raise InputError(f"sender_heatmaps needs columns {sorted(missing)}")
    if df.empty:
        raise InputError("sender_heatmaps got an empty table")
    inputs = list(dict.fromkeys(df["receiver_input"]))
    n_layers = int(df["layer"].max()) + 1
    n_heads = int(df["head"].max()) + 1
    limit = float(df[value].abs().max()) or 1.0
    titles = [f"into their {INPUT_NAMES.get(i, i)}" for i in inputs]
    fig = make_subplots(rows=1, cols=len(inputs), shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=titles)  # fmt: skip
    for col, inp in enumerate(inputs, start=1):
        part = df[df["receiver_input"] == inp]
        grid = part.pivot(index="layer", columns="head", values=value).reindex(
            index=range(n_layers), columns=range(n_heads)
        )
        fig.add_trace(go.Heatmap(
            z=grid.values, x=[str(h) for h in grid.columns], y=[str(la) for la in grid.index],
            zmin=-limit, zmax=limit, colorscale="RdBu", reversescale=True,
            coloraxis=None, showscale=col == len(inputs), colorbar={"title": value},
            hovertemplate="L%{y}H%{x}<br>" + value + "=%{z:.3f}<extra></extra>",
        ), row=1, col=col)  # fmt: skip
        top = part.reindex(part[value].abs().sort_values(ascending=False).index).head(top_k)
        for i, r in enumerate(top.itertuples()):  # labels staggered so neighbours stay legible
            v = getattr(r, value)
            fig.add_annotation(
                x=str(int(r.head)), y=str(int(r.layer)), text=f"L{int(r.layer)}H{int(r.head)} "
                f"{v:+.2f}" if abs(v) >= 0.01 else f"L{int(r.layer)}H{int(r.head)} {v:+.1e}",
                showarrow=True, arrowhead=0, ax=-34 if r.head >= n_heads / 2 else 34,
                ay=(24, 48, 72, 96, 120)[i % 5] * (1 if r.layer >= n_layers / 2 else -1),
                font={"size": 10}, bgcolor="rgba(255,255,255,0.85)", row=1, col=col,
            )  # fmt: skip
        fig.update_xaxes(title_text="sender head", row=1, col=col)
    fig.update_yaxes(title_text="sender layer", row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", width=360 * len(inputs) + 200,
                      height=max(460, 18 * n_layers + 180))  # fmt: skip
    return fig


_INPUT_COLOURS = {"q": "#1f77b4", "k": "#d95f02", "v": "#1b9e77"}


def address_circuit(senders: pd.DataFrame, receivers: list[str], *, top_k: int = 5,
                    title: str | None = None) -> go.Figure:  # fmt: skip
    """Who steers where the retrieval heads look, one panel per corruption: on the left each
    input's `top_k` senders by mean recovery (columns `corruption`, `receiver_input`, `layer`,
    `head`, `head_name`, `recovery`), one row each, highest layer first; on the right the
    receivers; between them their attention (a hub). Each sender's edge into the hub is
    coloured by input (queries, keys), its width growing with the recovery, which labels it."""
    missing = {"corruption", "receiver_input", "layer", "head", "head_name", "recovery"} - set(
        senders.columns
    )
    if missing:
        raise InputError(f"address_circuit needs columns {sorted(missing)}")
    if senders.empty or not receivers:
        raise InputError("address_circuit got no senders or no receivers")
    corruptions = list(dict.fromkeys(senders["corruption"]))
    limit = float(senders["recovery"].clip(lower=0).max()) or 1.0
    fig = make_subplots(rows=1, cols=len(corruptions), horizontal_spacing=0.08,
                        subplot_titles=[c.replace("_", " ") for c in corruptions])  # fmt: skip
    hub = (1.0, 0.5)
    for col, corruption in enumerate(corruptions, start=1):
        part = senders[senders["corruption"] == corruption]
        top = pd.concat([g.nlargest(top_k, "recovery")
                         for _, g in part.groupby("receiver_input", sort=False)])  # fmt: skip
        names = (top.drop_duplicates("head_name").sort_values(["layer", "head"],
                                                              ascending=False)["head_name"])
        y = {n: 1 - i / max(len(names) - 1, 1) for i, n in enumerate(names)}
        ry = {r: 1 - i / max(len(receivers) - 1, 1) for i, r in enumerate(receivers)}
        for yr in ry.values():
            fig.add_trace(go.Scatter(x=[hub[0], 2], y=[hub[1], yr], mode="lines",
                                     line={"color": "#aaaaaa", "width": 0.8}, hoverinfo="skip",
                                     showlegend=False), row=1, col=col)  # fmt: skip
        inputs = list(dict.fromkeys(top["receiver_input"]))
        for k, inp in enumerate(inputs):
            colour = _INPUT_COLOURS.get(inp, "#555555")
            shift = 0.012 * (k - (len(inputs) - 1) / 2)
            for n, r in enumerate(top[top["receiver_input"] == inp].itertuples()):
                width = 0.6 + 9 * max(r.recovery, 0) / limit
                yy = y[r.head_name] + shift
                fig.add_trace(go.Scatter(
                    x=[0, hub[0]], y=[yy, hub[1]], mode="lines",
                    line={"color": colour, "width": width}, opacity=0.65,
                    name=f"into their {INPUT_NAMES.get(inp, inp)}", legendgroup=inp,
                    showlegend=col == 1 and n == 0,
                    hovertemplate=f"{r.head_name} → {INPUT_NAMES.get(inp, inp)}: recovery "
                    f"{r.recovery:.3f}<extra></extra>",
                ), row=1, col=col)  # fmt: skip
        for n, yy in y.items():
            rows = top[top["head_name"] == n]
            label = "  ".join(f"{r.receiver_input} {r.recovery:+.2f}" for r in rows.itertuples())
            fig.add_trace(go.Scatter(x=[0], y=[yy], mode="markers+text", text=[f"{n}  {label}"],
                                     textposition="middle left", hoverinfo="skip",
                                     marker={"size": 9, "color": "#333333"}, showlegend=False,
                                     textfont={"size": 11}), row=1, col=col)  # fmt: skip
        fig.add_trace(go.Scatter(x=[2] * len(ry), y=list(ry.values()), mode="markers+text",
                                 text=list(ry), textposition="middle right",
                                 marker={"symbol": "star", "size": 11, "color": "black"},
                                 name="retrieval heads (receivers)", showlegend=col == 1,
                                 hoverinfo="skip", textfont={"size": 10}),
                      row=1, col=col)  # fmt: skip
        fig.add_trace(go.Scatter(x=[hub[0]], y=[hub[1]], mode="markers+text",
                                 marker={"symbol": "diamond", "size": 15, "color": "black"},
                                 text=["their attention"], textposition="bottom center",
                                 textfont={"size": 10}, hoverinfo="skip",
                                 showlegend=False), row=1, col=col)  # fmt: skip
        fig.update_xaxes(range=[-1.3, 2.6], visible=False, row=1, col=col)
        fig.update_yaxes(range=[-0.08, 1.08], visible=False, row=1, col=col)
    fig.update_layout(title=title, template="plotly_white", width=560 * len(corruptions) + 80,
                      height=480, legend={"orientation": "h", "y": -0.05},
                      margin={"l": 20, "r": 20})  # fmt: skip
    return fig
