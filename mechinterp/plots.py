"""DataFrame → plotly Figure. Pure: no model, no I/O, no `fig.show()`."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go


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
        raise ValueError(f"accuracy_heatmap needs columns {sorted(missing)}")
    if df.empty:
        raise ValueError("accuracy_heatmap got an empty table")
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
