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
    """"Spearman ρ = 0.57 [-0.17, 0.94], n = 12, exact permutation p = 0.108": the interval is
    left out where it spans the whole [-1, 1] range (with a handful of points it says nothing,
    and the permutation p is what decides), the p where the correlation has none."""
    if "estimate" not in correlation:
        raise InputError("recall_scatter: correlation needs an 'estimate'")
    method = str(correlation.get("method") or "correlation")
    text = f"{_CORRELATION_SYMBOL.get(method.lower(), method)} = {correlation['estimate']:.2f}"
    low, high = correlation.get("low"), correlation.get("high")
    if low is not None and high is not None and not (math.isnan(low) or math.isnan(high)):
        if not (low <= -0.995 and high >= 0.995):
            text += f" [{low:.2f}, {high:.2f}]"
    if correlation.get("n") is not None:
        text += f", n = {int(correlation['n'])}"
    if correlation.get("p_permutation") is not None:
        exact = "exact permutation" if correlation.get("exact") else "permutation"
        text += f", {exact} p = {correlation['p_permutation']:.3f}"
    return text


_SCATTER = {"width": 720, "height": 560}


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
    # labels go where they cover no other label, marker, the correlation box or the plot's
    # edge (`place_labels`, in px of the plotting area); markers at one point are set apart
    span = (xs.max() - xs.min()) or 1.0
    x_range = [-0.05, 1.05] if unit else [xs.min() - 0.08 * span, xs.max() + 0.08 * span]
    ys = df[y].astype(float)
    y_span = (ys.max() - ys.min()) or 1.0
    y_range = ([-0.05, 1.05] if ys.between(0, 1).all()
               else [ys.min() - 0.1 * y_span, ys.max() + 0.1 * y_span])  # fmt: skip
    plot_w, plot_h = _SCATTER["width"] - 160, _SCATTER["height"] - 180  # less the margins
    sx = plot_w / (x_range[1] - x_range[0])
    sy = plot_h / (y_range[1] - y_range[0])
    styles = (
        (rest, "variants", {"size": 11, "color": "#1f77b4", "symbol": "circle"}),
        (df[is_ref], str(reference), {"size": 16, "color": "#d62728", "symbol": "star"}),
    )
    points, texts = [], []
    for part, name, marker in styles:
        for a, b, v in zip(part[x].astype(float), part[y].astype(float), part[label],
                           strict=True):  # fmt: skip
            points.append(((a - x_range[0]) * sx, (b - y_range[0]) * sy, marker["size"] / 2 + 1))
            texts.append("reference" if name != "variants" else wrap(str(v), 24))
    shift = side_by_side(points, step=18)
    points = [(px + d, py, r) for (px, py, r), d in zip(points, shift, strict=True)]
    box = ()
    if correlation is not None:  # the annotation in the top-left corner
        w = CHAR_WIDTH * 13 * len(_correlation_text(correlation)) + 8
        box = ((0.0, w + 0.01 * plot_w, plot_h - 26, plot_h),)
    if fit is not None:  # the fit line, as a chain of small boxes a label should not cover
        for t in np.linspace(0.0, 1.0, 40):
            lx = rest[x].min() + t * (rest[x].max() - rest[x].min())
            cx, cy = (lx - x_range[0]) * sx, (np.polyval(fit, lx) - y_range[0]) * sy
            box = (*box, (cx - 3, cx + 3, cy - 3, cy + 3))
    where = place_labels(points, texts, 11, plot_w, plot_h, obstacles=box)
    start = 0
    for part, name, marker in styles:
        if part.empty:
            continue
        sel = slice(start, start + len(part))
        start += len(part)
        px = part[x].astype(float).to_numpy()
        fig.add_trace(
            go.Scatter(
                x=px + np.array(shift[sel]) / sx,
                y=part[y].astype(float),
                mode="markers+text",
                text=texts[sel],
                customdata=np.stack([part[label].astype(str), px], axis=1),
                textposition=where[sel],
                textfont={"size": 11},
                cliponaxis=False,
                marker={**marker, "line": {"width": 1, "color": "white"}},
                name=name,
                hovertemplate=f"%{{customdata[0]}}<br>{x}=%{{customdata[1]:.3f}}<br>{y}="
                "%{y:.3f}<extra></extra>",
            )
        )
    if any(shift):
        fig.add_annotation(text="markers at one point are drawn side by side (hover: exact)",
                           xref="paper", yref="paper", x=1, y=1.02, xanchor="right",
                           yanchor="bottom", showarrow=False,
                           font={"size": 11, "color": "grey"})  # fmt: skip
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
    fig.update_layout(
        title=title or f"{y} vs head {x}",
        xaxis={"title": f"head {x} (vs reference heads)", "range": x_range},
        yaxis={"title": y, "range": y_range},
        legend={"orientation": "h", "yanchor": "top", "y": -0.15, "xanchor": "left", "x": 0},
        width=_SCATTER["width"],
        height=_SCATTER["height"],
        margin={"l": 80, "r": 80, "t": 100, "b": 80},
        template="plotly_white",
    )
    return fig


# ---------------------------------------------------------------- layout helpers

#: Average glyph width of plotly's default font, in font sizes (a label's width is estimated as
#: 0.6 × size × characters), and the line height of a label.
CHAR_WIDTH = 0.6
LINE_HEIGHT = 1.25
#: px between a marker's edge and its label.
LABEL_GAP = 3
#: How much worse a px² of label over a marker or a label is than one off the panel's edge
#: (into the margin: legible, if untidy).
COVER_WEIGHT = 10.0
#: Where a label may sit around its marker, in the order tried.
LABEL_POSITIONS = ("top center", "bottom center", "middle right", "middle left",
                   "top right", "top left", "bottom right", "bottom left")  # fmt: skip


def wrap(text: str, width: int = 18) -> str:
    """`text` broken at spaces into lines of at most `width` characters (a longer word stays
    whole), joined by `<br>`: long model names as axis ticks."""
    lines: list[str] = []
    for word in str(text).split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "<br>".join(lines)


def label_box(position: str, text: str, size: float, radius: float) -> tuple[float, ...]:
    """The box (x0, x1, y0, y1) in px, relative to its marker's centre (y up), that a text label
    of font `size` takes at plotly `textposition` `position` beside a marker of `radius` px."""
    lines = str(text).split("<br>")
    w, h = CHAR_WIDTH * size * max(map(len, lines)), LINE_HEIGHT * size * len(lines)
    vert, horiz = position.split()
    x0 = {"left": -radius - LABEL_GAP - w, "center": -w / 2, "right": radius + LABEL_GAP}[horiz]
    y0 = {"bottom": -radius - LABEL_GAP - h, "middle": -h / 2, "top": radius + LABEL_GAP}[vert]
    return x0, x0 + w, y0, y0 + h


def _overlap(a, b) -> float:
    """Area shared by two boxes (x0, x1, y0, y1)."""
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[2], b[2]))


def place_labels(
    points, labels, size: float, width: float, height: float, *, obstacles=()
) -> list[str | None]:
    """A `textposition` for each labelled marker, so that no label covers another label, a
    marker or the panel's edge where some position avoids it (else the one covering least,
    covering a marker or label weighing `COVER_WEIGHT` times more than leaving the panel).

    `points` are every marker of the panel as (x, y, radius) in px (0..width, 0..height, y up);
    `labels[i]` is marker i's text, None for an unlabelled marker (it is an obstacle only);
    `obstacles` are more boxes (x0, x1, y0, y1) to keep clear of, e.g. an annotation."""
    markers = [(x - r, x + r, y - r, y + r) for x, y, r in points]
    placed: list[tuple[float, ...]] = []
    out: list[str | None] = []
    for i, ((x, y, r), text) in enumerate(zip(points, labels, strict=True)):
        if not text:
            out.append(None)
            continue
        best, cost_best = LABEL_POSITIONS[0], math.inf
        for pos in LABEL_POSITIONS:
            bx0, bx1, by0, by1 = label_box(pos, text, size, r)
            box = (x + bx0, x + bx1, y + by0, y + by1)
            inside = max(0.0, min(box[1], width) - max(box[0], 0.0)) * max(
                0.0, min(box[3], height) - max(box[2], 0.0))  # fmt: skip
            cost = (box[1] - box[0]) * (box[3] - box[2]) - inside  # area off the panel
            covered = sum(_overlap(box, m) for j, m in enumerate(markers) if j != i)
            covered += sum(_overlap(box, b) for b in (*placed, *obstacles))
            cost += COVER_WEIGHT * covered
            if cost < cost_best - 1e-9:
                best, cost_best = pos, cost
            if cost <= 0:
                break
        bx0, bx1, by0, by1 = label_box(best, text, size, r)
        placed.append((x + bx0, x + bx1, y + by0, y + by1))
        out.append(best)
    return out


def side_by_side(points, step: float) -> list[float]:
    """x offsets (px) that set markers drawn on one another beside each other: markers (x, y,
    radius) closer than their radii are one cluster, spread `step` px apart around its centre."""
    offsets = [0.0] * len(points)
    seen: list[list[int]] = []
    for i, (x, y, r) in enumerate(points):
        for group in seen:
            j = group[0]
            if math.hypot(x - points[j][0], y - points[j][1]) < r + points[j][2]:
                group.append(i)
                break
        else:
            seen.append([i])
    for group in seen:
        for k, i in enumerate(group):
            offsets[i] = (k - (len(group) - 1) / 2) * step
    return offsets


# ---------------------------------------------------------------- recall vs performance per task

_KINDS = (("synthetic variant", {"symbol": "circle", "size": 11, "color": "#1f77b4"}),
          ("real data (limited)", {"symbol": "diamond", "size": 12, "color": "#ff7f0e"}),
          ("reference", {"symbol": "star", "size": 16, "color": "#d62728"}))  # fmt: skip
_RANGE = (-0.08, 1.12)
_PANEL = {"width": 380, "height": 560, "margin": {"l": 70, "r": 30, "t": 140, "b": 110},
          "spacing": 0.08, "label_size": 10}  # fmt: skip


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
    carries its task's correlation (`correlations[task]`; the interval only where it is narrower
    than [-1, 1], with the permutation p), the figure's the pooled one.

    Labels go where they cover no other label, marker or panel edge (`place_labels`); markers at
    one point are set side by side (`side_by_side`), their exact values in the hover."""
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
        subtitles.append(f"{t} ({metric})" + (f"<br>{_correlation_text(r)}" if "estimate" in r
                                              else ""))  # fmt: skip
    n, m = len(tasks), _PANEL["margin"]
    width = _PANEL["width"] * n + 100
    fig = make_subplots(rows=1, cols=n, subplot_titles=subtitles,
                        horizontal_spacing=_PANEL["spacing"])  # fmt: skip
    panel_w = (width - m["l"] - m["r"]) * (1 - _PANEL["spacing"] * (n - 1)) / n
    panel_h = _PANEL["height"] - m["t"] - m["b"]
    moved = False
    for col, t in enumerate(tasks, 1):
        moved |= _task_panel(fig, df[df["task"] == t], col, panel_w, panel_h)
        fig.update_xaxes(title_text="head recall (vs the reference model's heads)",
                         range=_RANGE, row=1, col=col)  # fmt: skip
        fig.update_yaxes(range=_RANGE, row=1, col=col,
                         title_text="task performance" if col == 1 else None)  # fmt: skip
    head = title or "performance vs head recall per task"
    if pooled_correlation and "estimate" in pooled_correlation:
        head += f"<br><sup>pooled within tasks: {_correlation_text(pooled_correlation)}</sup>"
    if moved:
        fig.add_annotation(text="markers at one point are drawn side by side (hover: exact)",
                           xref="paper", yref="paper", x=1, y=-0.22, xanchor="right",
                           showarrow=False, font={"size": 11, "color": "grey"})  # fmt: skip
    fig.update_annotations(font_size=13, selector={"yref": "paper", "showarrow": False,
                                                   "yanchor": "bottom"})  # fmt: skip
    fig.update_layout(title=head, template="plotly_white", width=width,
                      height=_PANEL["height"], margin=m,
                      legend={"orientation": "h", "y": -0.2, "x": 0, "yanchor": "top"})  # fmt: skip
    return fig


def _task_panel(fig: go.Figure, part: pd.DataFrame, col: int, panel_w: float,
                panel_h: float) -> bool:  # fmt: skip
    """One task's markers and labels; True where markers at one point were set apart."""
    kind = np.where(part["synthetic"].astype(bool), _KINDS[0][0],
                    np.where(part["label"].str.startswith("real data"), _KINDS[1][0],
                             _KINDS[2][0]))  # fmt: skip
    order = np.argsort([[k for k, _ in _KINDS].index(v) for v in kind], kind="stable")
    part, kind = part.iloc[order], kind[order]
    style = dict(_KINDS)
    span = _RANGE[1] - _RANGE[0]
    sx, sy = panel_w / span, panel_h / span  # px per data unit
    x = part["recall"].to_numpy(dtype=float)
    y = part["performance"].to_numpy(dtype=float)
    radius = [style[k]["size"] / 2 + 1 for k in kind]
    points = [((a - _RANGE[0]) * sx, (b - _RANGE[0]) * sy, r)
              for a, b, r in zip(x, y, radius, strict=True)]  # fmt: skip
    shift = side_by_side(points, step=2 * max(radius) + 2)
    points = [(px + d, py, r) for (px, py, r), d in zip(points, shift, strict=True)]
    labels = [lab if k == _KINDS[0][0] else None
              for lab, k in zip(part["label"], kind, strict=True)]  # fmt: skip
    where = place_labels(points, labels, _PANEL["label_size"], panel_w, panel_h)
    shown = x + np.array(shift) / sx
    for name, marker in _KINDS:
        sel = kind == name
        if not sel.any():
            continue
        fig.add_trace(go.Scatter(
            x=shown[sel], y=y[sel], mode="markers+text",
            text=[lab or "" for lab, s in zip(labels, sel, strict=True) if s],
            textposition=[w or "top center" for w, s in zip(where, sel, strict=True) if s],
            textfont={"size": _PANEL["label_size"]}, cliponaxis=False,
            marker={**marker, "line": {"width": 1, "color": "white"}}, name=name,
            legendgroup=name, showlegend=col == 1,
            customdata=np.stack([part["label"][sel], x[sel]], axis=1),
            hovertemplate="%{customdata[0]}<br>recall=%{customdata[1]:.2f}<br>"
            "performance=%{y:.2f}<extra></extra>"), row=1, col=col)  # fmt: skip
    return bool(np.any(np.array(shift) != 0))


# ---------------------------------------------------------------- grouped bars

_BAR_GROUP = 0.8  # share of a category's width taken by its bars
_BAR_LABEL_SIZE = 10


def _grouped_bars(
    fig: go.Figure, categories: list[str], bars: list[dict], *, fmt: str = "{:.2f}"
) -> float:
    """Grouped bars on a numeric axis (category i centred at x = i), with each bar's value
    printed just above its upper whisker (or its top where it has none), where neither the bar
    nor its whisker can reach the label. `bars` are dicts of name, colour, value, lo, hi
    (Series indexed like `categories`; lo/hi may be None). Returns the highest label anchor."""
    width = _BAR_GROUP / len(bars)
    lx, ly, lt = [], [], []
    for j, bar in enumerate(bars):
        x = np.arange(len(categories)) + (j - (len(bars) - 1) / 2) * width
        value = bar["value"].to_numpy(dtype=float)
        err, top = None, value
        if bar.get("lo") is not None and bar.get("hi") is not None:
            lo = bar["lo"].to_numpy(dtype=float)
            hi = bar["hi"].to_numpy(dtype=float)
            err = {"type": "data", "symmetric": False, "array": np.nan_to_num(hi - value),
                   "arrayminus": np.nan_to_num(value - lo), "thickness": 1.2,
                   "width": 3}  # fmt: skip
            top = np.fmax(hi, value)
        fig.add_trace(go.Bar(
            x=x, y=value, width=width * 0.92, name=bar["name"], marker_color=bar["colour"],
            error_y=err, customdata=np.array(categories, dtype=object),
            hovertemplate="%{customdata}<br>" + bar["name"] + ": %{y:.3f}<extra></extra>",
        ))  # fmt: skip
        keep = ~np.isnan(value)
        lx += list(x[keep])
        ly += list(top[keep])
        lt += [fmt.format(v) for v in value[keep]]
    pad = 0.012 * max(1.0, max(ly, default=1.0))
    for x, y, text in zip(lx, ly, lt, strict=True):  # annotations: the traces stay the bars
        fig.add_annotation(x=x, y=y + pad, text=text, showarrow=False, yanchor="bottom",
                           xanchor="center", font={"size": _BAR_LABEL_SIZE},
                           name="value label")  # fmt: skip
    fig.update_xaxes(tickvals=list(range(len(categories))), ticktext=categories,
                     range=[-0.5, len(categories) - 0.5], tickangle=0)  # fmt: skip
    fig.update_layout(legend={"orientation": "h", "x": 0, "y": 1.0, "yanchor": "bottom"})
    return max(ly, default=1.0) + pad


def cross_patch_by_variant(
    summary: pd.DataFrame, *, metric: str = "f1", title: str | None = None
) -> go.Figure:
    """Cross-model patching, one bar group per recipient variant: the task metric on the
    recipient alone, with Inter / Compl / Rand heads patched in from the donor, and on the donor
    (columns `model_variant`, `condition`, `metric`; Rand is the mean over its seeds; `n_heads`
    goes into the category labels).

    Optional columns `<metric>_lo` / `<metric>_hi` are each bar's interval, drawn as error bars
    (for `rand-s<seed>` rows, the Rand condition's interval over examples × draws, the same on
    every seed's row); each value is printed above its whisker."""
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
    lo, hi = f"{metric}_lo", f"{metric}_hi"
    bounds = {lo, hi} <= set(summary.columns)
    df = summary.assign(condition=summary["condition"].str.replace(r"^rand-s\d+$", "rand",
                                                                   regex=True))  # fmt: skip
    agg = {metric: "mean"} | ({"n_heads": "first"} if "n_heads" in df else {})
    agg |= {lo: "first", hi: "first"} if bounds else {}
    df = df.groupby(["model_variant", "condition"], sort=False).agg(agg).reset_index()
    variants = list(dict.fromkeys(df["model_variant"]))
    bars = []
    for cond in order:
        part = df[df["condition"] == cond].set_index("model_variant").reindex(variants)
        if part[metric].isna().all():
            continue
        bars.append({"name": names[cond], "colour": colours[cond], "value": part[metric],
                     "lo": part[lo] if bounds else None, "hi": part[hi] if bounds else None})
    ticks = [wrap(v, 16) + _head_counts(df[df["model_variant"] == v]) for v in variants]
    fig = go.Figure()
    top = _grouped_bars(fig, ticks, bars)
    head = title or f"cross-model patching: {metric} before and after patching"
    if bounds:
        head += "<br><sup>whiskers: the interval of each mean over examples (Rand: × draws)</sup>"
    fig.update_layout(
        title=head,
        xaxis_title="recipient (fine-tuned on variant); heads patched in from the donor",
        yaxis_title=f"{metric.replace('_', ' ')} on the reference task",
        yaxis_range=[0, max(1.0, top) * 1.08],
        width=980,
        height=560,
        margin={"t": 130},
        template="plotly_white",
    )
    return fig


def _head_counts(rows: pd.DataFrame) -> str:
    """"<br>Inter 8 · Compl 4 heads" for a recipient's category label (Rand has |Inter|)."""
    if "n_heads" not in rows:
        return ""
    count = rows.set_index("condition")["n_heads"]
    parts = [f"{c.capitalize()} {int(count[c])}" for c in ("inter", "compl")
             if c in count and pd.notna(count[c])]  # fmt: skip
    return "<br>" + " · ".join(parts) + " heads" if parts else ""


def overlap_heatmap(sets: dict[str, list[str]], *, title: str | None = None) -> go.Figure:
    """Head-set overlap between models: cell (row A, column B) = |A ∩ B| / |A|, the share of A's
    heads that B also has (row = a synthetic model, column = the reference: its subset share;
    row = the reference: the recall of each column). Cells show the share and the count; long
    model names are wrapped."""
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
    rows = [f"{wrap(n, 20)}<br>{len(sets[n])} heads" for n in names]
    cols = [f"{wrap(n, 12)}<br>{len(sets[n])} heads" for n in names]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=cols,
            y=rows,
            zmin=0,
            zmax=1,
            colorscale="Blues",
            text=text,
            texttemplate="%{text}",
            colorbar={"title": "share of A's<br>heads in B"},
            hovertemplate="A = %{y}<br>B = %{x}<br>|A∩B|/|A| = %{z:.2f}<extra></extra>",
        )  # fmt: skip
    )
    fig.update_layout(
        title=title or "retrieval-head overlap between models",
        xaxis={"title": "model B (column)", "tickangle": 0, "side": "bottom"},
        yaxis={"title": "model A (row)", "autorange": "reversed"},
        width=820,
        height=680,
        template="plotly_white",
    )
    return fig


def knockout_by_model(summary: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Per model: answer-retrieved rate with no knockout, its top-k heads and k random heads
    knocked out (columns `model_variant`, `condition` in none/top/random, `value`, optional `lo`,
    `hi` for error bars, `k`; one row per model and condition), each value printed above its
    whisker."""
    missing = {"model_variant", "condition", "value"} - set(summary.columns)
    if missing:
        raise InputError(f"knockout_by_model needs columns {sorted(missing)}")
    if summary.empty:
        raise InputError("knockout_by_model got an empty table")
    if summary.duplicated(["model_variant", "condition"]).any():
        raise InputError("knockout_by_model needs one row per (model_variant, condition): "
                         "select one mode and one k first")  # fmt: skip
    k = int(summary.loc[summary["condition"] == "top", "k"].max()) if "k" in summary else None
    names = {"none": "no knockout", "top": f"own top-{k}", "random": f"random-{k}, same layers"}
    colours = {"none": "#7f7f7f", "top": "#d62728", "random": "#1f77b4"}
    variants = list(dict.fromkeys(summary["model_variant"]))
    bounds = {"lo", "hi"} <= set(summary.columns)
    bars = []
    for cond in ("none", "top", "random"):
        part = summary[summary["condition"] == cond].set_index("model_variant").reindex(variants)
        if part["value"].isna().all():
            continue
        bars.append({"name": names[cond], "colour": colours[cond], "value": part["value"],
                     "lo": part["lo"] if bounds else None, "hi": part["hi"] if bounds else None})
    fig = go.Figure()
    top = _grouped_bars(fig, [wrap(v, 16) for v in variants], bars)
    fig.update_layout(
        title=title or "knockout per model: answer retrieved",
        xaxis_title="model (fine-tuned on variant)",
        yaxis_title="answer retrieved (share)",
        yaxis_range=[0, max(1.0, top) * 1.08],
        width=820,
        height=520,
        margin={"t": 110},
        template="plotly_white",
    )
    return fig
