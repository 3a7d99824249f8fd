"""Layout of the committed figures, read off the plotly figure objects (no model, no PNG): value
labels above the whiskers, no label over another label or a marker, markers at one point set
apart, uninformative intervals replaced by the permutation p; and the two figure scripts that
redraw the committed directories."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mechinterp.plots import cross_patch_by_variant, knockout_by_model, recall_by_task
from mechinterp.plots.extension import (
    CHAR_WIDTH,
    LINE_HEIGHT,
    label_box,
    place_labels,
    side_by_side,
    wrap,
)

FIGURES = Path(__file__).parents[1] / "figures"
MINI, EXT3 = FIGURES / "extension-mini", FIGURES / "extension-3task-mini"


def _plot_px(fig, axis: str) -> float:
    """Width (x) or height (y) of the plotting area in px."""
    m = fig.layout.margin
    if axis == "x":
        return fig.layout.width - (80 if m.l is None else m.l) - (80 if m.r is None else m.r)
    return fig.layout.height - (100 if m.t is None else m.t) - (80 if m.b is None else m.b)


def _labels_and_whiskers(fig):
    """(label x, label y, text, whisker top y) for every value label of a grouped-bar figure."""
    tops = {}
    for bar in fig.data:
        up = bar.error_y.array if bar.error_y and bar.error_y.array is not None else None
        for i, (x, y) in enumerate(zip(bar.x, bar.y, strict=True)):
            if y is not None and not math.isnan(y):
                tops[round(float(x), 9)] = y + (float(up[i]) if up is not None else 0.0)
    return [(a.x, a.y, a.text, tops[round(float(a.x), 9)])
            for a in fig.layout.annotations if a.name == "value label"]  # fmt: skip


def _assert_labels_clear(fig):
    """Every value label starts above its bar's upper whisker, and no two labels overlap."""
    labels = _labels_and_whiskers(fig)
    assert labels, "no value labels"
    per_x = _plot_px(fig, "x") / (fig.layout.xaxis.range[1] - fig.layout.xaxis.range[0])
    per_y = _plot_px(fig, "y") / (fig.layout.yaxis.range[1] - fig.layout.yaxis.range[0])
    for a in fig.layout.annotations:
        if a.name == "value label":
            assert a.yanchor == "bottom" and a.showarrow is False
    for _, y, _, whisker in labels:
        assert y > whisker  # the label's bottom edge is above the whisker's cap
        assert y < fig.layout.yaxis.range[1]  # and stays on the plot
    size = fig.layout.annotations[0].font.size
    height = LINE_HEIGHT * size
    for i, (x1, y1, t1, _) in enumerate(labels):
        for x2, y2, t2, _ in labels[i + 1 :]:
            if abs(y1 - y2) * per_y < height:  # at one height: they must not touch sideways
                gap = abs(x1 - x2) * per_x
                assert gap > CHAR_WIDTH * size * (len(t1) + len(t2)) / 2, (t1, t2)


def test_knockout_labels_sit_above_the_upper_whisker_and_apart():
    ko = pd.read_csv(MINI / "knockout_summary.csv")
    fig = knockout_by_model(ko)
    _assert_labels_clear(fig)
    # templated-low's own top-10: 0.55 with its interval up to 0.82, labelled above 0.82
    (label,) = [(y, t) for x, y, t, _ in _labels_and_whiskers(fig)
                if t == "0.55" and x == pytest.approx(3.0)]  # fmt: skip
    assert label[0] == pytest.approx(0.8182 + 0.012, abs=1e-3)
    assert [t.name for t in fig.data] == ["no knockout", "own top-10", "random-10, same layers"]


def test_cross_patching_draws_each_bars_interval_and_labels_above_it():
    summary = pd.read_csv(EXT3 / "mdqa" / "cross_summary.csv")
    assert {"f1_lo", "f1_hi"} <= set(summary.columns)
    fig = cross_patch_by_variant(summary, metric="f1")
    _assert_labels_clear(fig)
    bars = {t.name.split(" ")[0]: t for t in fig.data}
    inter = bars["Inter"]
    row = summary[(summary["condition"] == "inter") & (summary["model_variant"] == "symbolic")]
    i = 3  # symbolic is the fourth recipient
    assert inter.y[i] + inter.error_y.array[i] == pytest.approx(row["f1_hi"].item())
    assert inter.y[i] - inter.error_y.arrayminus[i] == pytest.approx(row["f1_lo"].item())
    assert "Inter 13" in fig.layout.xaxis.ticktext[i]  # head counts in the category label


def test_cross_patching_without_intervals_has_no_error_bars():
    fig = cross_patch_by_variant(pd.read_csv(MINI / "cross_summary.csv"))
    assert all(t.error_y.array is None for t in fig.data)
    _assert_labels_clear(fig)


def _recall_figure():
    pooled = pd.read_csv(EXT3 / "pooled.csv", keep_default_na=False, na_values=[""])
    corr = json.loads((EXT3 / "correlation.json").read_text())
    fig = recall_by_task(pooled, correlations=corr["per_task"],
                         pooled_correlation=corr["pooled_within_task"])  # fmt: skip
    return pooled, fig


def _panel_points(fig, axis: str):
    """Every marker of one panel as (x px, y px, radius, label, textposition)."""
    m = fig.layout.margin
    width = (fig.layout.width - m.l - m.r) * (fig.layout[f"xaxis{axis[1:]}"].domain[1]
                                              - fig.layout[f"xaxis{axis[1:]}"].domain[0])
    height = fig.layout.height - m.t - m.b
    xr = fig.layout[f"xaxis{axis[1:]}"].range
    yr = fig.layout[f"yaxis{axis[1:]}"].range
    out = []
    for t in fig.data:
        if t.xaxis != axis:
            continue
        for x, y, text, pos in zip(t.x, t.y, t.text, t.textposition, strict=True):
            out.append(((x - xr[0]) / (xr[1] - xr[0]) * width,
                        (y - yr[0]) / (yr[1] - yr[0]) * height,
                        t.marker.size / 2 + 1, text, pos))  # fmt: skip
    return out, width, height


def test_recall_by_task_labels_cover_no_label_marker_or_edge():
    pooled, fig = _recall_figure()
    for axis in ("x", "x2", "x3"):
        points, width, height = _panel_points(fig, axis)
        boxes = []
        for x, y, r, text, pos in points:
            if text:
                b = label_box(pos, text, 10, r)
                boxes.append((x + b[0], x + b[1], y + b[2], y + b[3], (x, y)))
        assert boxes
        for i, a in enumerate(boxes):
            assert a[0] >= 0 and a[1] <= width and a[2] >= 0 and a[3] <= height, a
            for b in boxes[i + 1 :]:  # no two labels overlap
                assert min(a[1], b[1]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[2], b[2])
            for x, y, r, *_ in points:  # nor does a label cover a marker
                assert (x + r <= a[0] or x - r >= a[1] or y + r <= a[2] or y - r >= a[3]), (a, x)
        for i, (x1, y1, r1, *_) in enumerate(points):  # markers drawn apart, not on one another
            for x2, y2, r2, *_ in points[i + 1 :]:
                assert math.hypot(x1 - x2, y1 - y2) >= r1 + r2 - 1e-6
    # the mdqa pair the committed figure overprinted: templated-low and -high at F1 0.5
    mdqa = pooled[pooled["task"] == "mdqa"].set_index("label")
    assert mdqa.loc["templated-low", "performance"] == mdqa.loc["templated-high", "performance"]


def test_recall_by_task_sets_coincident_markers_side_by_side_and_keeps_their_values():
    pooled, fig = _recall_figure()
    multihop = [t for t in fig.data if t.xaxis == "x2"]
    at_top = [(t.name, x, c) for t in multihop
              for x, y, c in zip(t.x, t.y, t.customdata, strict=True) if y == 1.0]
    assert len(at_top) == 3  # reference, limited real data and realistic-low, all at (1, 1)
    assert len({round(x, 6) for _, x, _ in at_top}) == 3  # drawn at three x positions
    assert all(float(c[1]) == 1.0 for *_, c in at_top)  # hover keeps the exact recall
    assert any("side by side" in (a.text or "") for a in fig.layout.annotations)


def test_recall_by_task_titles_give_the_permutation_p_not_a_full_range_interval():
    _, fig = _recall_figure()
    titles = {a.text.split(" ")[0]: a.text for a in fig.layout.annotations if "<br>" in a.text}
    assert "[-1.00, 1.00]" not in " ".join(titles.values())
    assert titles["mdqa"].endswith("Spearman ρ = 0.26, n = 4, exact permutation p = 1.000")
    assert titles["multihop"].endswith("n = 4, exact permutation p = 0.333")
    # n = 12 pooled: its interval says something and stays
    assert "ρ = 0.57 [-0.17, 0.94], n = 12, exact permutation p = 0.108" in fig.layout.title.text


def test_place_labels_moves_a_label_off_its_neighbours_marker_and_label():
    points = [(100.0, 100.0, 6.5), (118.0, 100.0, 6.5)]  # two markers 18 px apart
    first, second = place_labels(points, ["templated-low", "templated-high"], 10, 400, 300)
    boxes = [label_box(p, t, 10, 6.5) for p, t in ((first, "templated-low"),
                                                   (second, "templated-high"))]  # fmt: skip
    a = (100 + boxes[0][0], 100 + boxes[0][1], 100 + boxes[0][2], 100 + boxes[0][3])
    b = (118 + boxes[1][0], 118 + boxes[1][1], 100 + boxes[1][2], 100 + boxes[1][3])
    assert min(a[1], b[1]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[2], b[2])
    assert first != second
    # a label that would leave the panel on the left goes right
    (pos,) = place_labels([(5.0, 150.0, 6.5)], ["symbolic"], 10, 400, 300)
    assert label_box(pos, "symbolic", 10, 6.5)[0] + 5 >= 0


def test_side_by_side_spreads_only_markers_on_one_another():
    offsets = side_by_side([(50, 50, 6), (52, 50, 8), (51, 51, 7), (200, 50, 6)], step=18)
    assert offsets[:3] == [-18.0, 0.0, 18.0] and offsets[3] == 0.0


def test_wrap_breaks_long_names_at_spaces():
    assert wrap("reference (realistic needles in real essays)", 16) == (
        "reference<br>(realistic<br>needles in real<br>essays)"
    )
    assert wrap("symbolic", 16) == "symbolic"


def test_cross_summary_carries_the_claims_kind_of_interval():
    from mechinterp.experiments.extension.report import cross_intervals, cross_summary

    rng = np.random.default_rng(0)
    rows = []
    for e in range(6):
        for cond, base in (("recipient", 0.2), ("inter", 0.7), ("donor", 1.0)):
            rows.append({"model_variant": "m", "condition": cond, "example_id": f"e{e}",
                         "f1": min(1.0, base + 0.1 * rng.random())})
        for s in range(3):
            rows.append({"model_variant": "m", "condition": f"rand-s{s}", "example_id": f"e{e}",
                         "f1": 0.1 * s + 0.2 * rng.random()})
    cross = pd.DataFrame(rows).assign(answer_logprob=-1.0, n_heads=4)
    iv = cross_intervals(cross, "f1", 0.95).set_index("condition")
    means = cross.assign(c=cross["condition"].str.replace(r"-s\d", "", regex=True))
    for cond, g in means.groupby("c"):
        key = "rand-s0" if cond == "rand" else cond
        assert iv.loc[key, "f1_lo"] <= g["f1"].mean() <= iv.loc[key, "f1_hi"]
    assert iv.loc["rand-s0", "f1_lo"] == iv.loc["rand-s2", "f1_lo"]  # one Rand interval
    assert (iv[["f1_lo", "f1_hi"]] >= 0).all().all() and (iv["f1_hi"] <= 1).all()
    summary = cross_summary(cross, "f1", 0.95).set_index("condition")
    assert summary.loc["inter", "f1_lo"] == iv.loc["inter", "f1_lo"]
    inter = summary.loc["inter"]
    assert inter["f1_lo"] < inter["f1"] < inter["f1_hi"]


def test_the_committed_cross_intervals_are_what_the_report_computes():
    import json

    from mechinterp.experiments.extension.config import performance_metric
    from mechinterp.experiments.extension.report import cross_summary

    for task in ("mdqa", "multihop", "citation"):
        config = json.loads((EXT3 / task / "config.json").read_text())
        metric = performance_metric(config["task"])
        new = cross_summary(pd.read_parquet(EXT3 / task / "cross.parquet"), metric,
                            config["claims"]["level"])  # fmt: skip
        old = pd.read_csv(EXT3 / task / "cross_summary.csv")
        pd.testing.assert_frame_equal(old, new[list(old.columns)], check_dtype=False, atol=1e-9)


def test_extension_figures_script_draws_the_mini_run_from_its_summary_tables():
    script = runpy.run_path(str(FIGURES / "extension_figures.py"))
    figs = script["figures"](MINI, model="smollm2-135m", task="mdqa",
                             reference="realistic-high", level=0.95)  # fmt: skip
    assert sorted(figs) == ["cross_patching", "head_overlap", "knockout_by_model",
                            "recall_vs_performance"]  # fmt: skip
    ticks = list(figs["knockout_by_model"].layout.xaxis.ticktext)
    assert ticks[0].startswith("reference<br>") and "templated-low" in ticks
    assert figs["head_overlap"].layout.yaxis.title.text == "model A (row)"
    with pytest.raises(ValueError, match="not a model_variant"):
        script["figures"](MINI, model="m", task="mdqa", reference="nope", level=0.95)


def test_recall_scatter_labels_keep_off_the_fit_line():
    """The mini run's templated-high label sat on the least-squares line; no label may."""
    script = runpy.run_path(str(FIGURES / "extension_figures.py"))
    figs = script["figures"](MINI, model="smollm2-135m", task="mdqa",
                             reference="realistic-high", level=0.95)  # fmt: skip
    fig = figs["recall_vs_performance"]
    line = next(t for t in fig.data if t.mode == "lines")
    xr, yr = fig.layout.xaxis.range, fig.layout.yaxis.range
    w, h = _plot_px(fig, "x"), _plot_px(fig, "y")

    def px(x, y):
        return (x - xr[0]) / (xr[1] - xr[0]) * w, (y - yr[0]) / (yr[1] - yr[0]) * h

    samples = [px(line.x[0] + t * (line.x[1] - line.x[0]), line.y[0] + t * (line.y[1] - line.y[0]))
               for t in np.linspace(0, 1, 200)]  # fmt: skip
    labelled = 0
    for t in fig.data:
        if t.mode == "lines" or t.text is None:
            continue
        for x, y, text, pos in zip(t.x, t.y, t.text, t.textposition, strict=True):
            cx, cy = px(x, y)
            b = label_box(pos, text, 11, t.marker.size / 2 + 1)
            box = (cx + b[0], cx + b[1], cy + b[2], cy + b[3])
            labelled += 1
            assert not any(box[0] < sx < box[1] and box[2] < sy < box[3] for sx, sy in samples), (
                text, pos)
    assert labelled == 5
