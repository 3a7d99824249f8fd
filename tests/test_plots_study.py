"""Study figures (no model): knockout heatmap panels, knockout curves with CI bands, and the
recall-vs-performance scatter, plus the figure script that draws the scatter from a table."""

from __future__ import annotations

import json
import runpy

import numpy as np
import pandas as pd
import pytest

from mechinterp.plots import accuracy_panels, knockout_ci_curves, recall_scatter


@pytest.fixture
def examples() -> pd.DataFrame:
    """Two panels over a 2 × 2 grid; panel B lacks the (2000, 1.0) cell."""
    rows = [
        ("A", 1000, 0.0, 1), ("A", 1000, 0.0, 0), ("A", 1000, 1.0, 1),
        ("A", 2000, 0.0, 0), ("A", 2000, 1.0, 1), ("A", 2000, 1.0, 1), ("A", 2000, 1.0, 0),
        ("B", 1000, 0.0, 0), ("B", 1000, 1.0, 0), ("B", 2000, 0.0, 1),
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["panel", "length", "depth", "accuracy"])


def test_accuracy_panels_has_one_heatmap_per_panel_with_cell_means(examples):
    fig = accuracy_panels(examples.iloc[::-1].reset_index(drop=True))  # B appears first
    assert [t.name for t in fig.data] == ["B", "A"]
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["B", "A"]
    b, a = fig.data
    assert list(a.y) == ["1000", "2000"] and list(a.x) == ["0", "1"]
    np.testing.assert_allclose(np.array(a.z, dtype=float), [[0.5, 1.0], [0.0, 2 / 3]])
    z_b = np.array(b.z, dtype=float)
    np.testing.assert_allclose(z_b[:, 0], [0.0, 1.0])
    assert z_b[0, 1] == 0.0 and np.isnan(z_b[1, 1])  # the missing cell stays empty
    assert a.text[1][1] == "0.67<br>n=3" and b.text[1][1] == ""
    # one shared colour scale, fixed to 0..1
    assert a.coloraxis == b.coloraxis == "coloraxis"
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == (0, 1)


def test_accuracy_panels_widens_with_the_panel_count(examples):
    many = pd.concat([examples.assign(panel=f"p{i}") for i in range(5)])
    assert accuracy_panels(many).layout.width > accuracy_panels(examples).layout.width
    assert len(accuracy_panels(many).data) == 5


def test_accuracy_panels_refuses_missing_columns_and_empty_tables(examples):
    with pytest.raises(ValueError, match="panel"):
        accuracy_panels(examples.drop(columns="panel"))
    with pytest.raises(ValueError, match="correct"):
        accuracy_panels(examples, value="correct")
    with pytest.raises(ValueError, match="empty"):
        accuracy_panels(examples.iloc[:0])


@pytest.fixture
def sweep() -> pd.DataFrame:
    rows = []
    for t, task in enumerate(("niah", "mdqa")):
        for m, mode in enumerate(("zero", "uniform_attention")):
            for k in (1, 2, 5, 10, 20):
                for c, condition in enumerate(("top", "random")):
                    v = 0.9 - 0.01 * k * (2 - c) - 0.1 * t - 0.05 * m
                    rows.append((task, mode, k, condition, v, v - 0.1, v + 0.05))
        rows.append((task, "none", 0, "none", 0.95 - 0.1 * t, 0.9, 1.0))
    return pd.DataFrame(rows, columns=["task", "mode", "k", "condition", "value", "lo", "hi"])


def test_knockout_ci_curves_draws_bands_from_lo_and_hi(sweep):
    fig = knockout_ci_curves(sweep)
    assert [a.text for a in fig.layout.annotations] == [
        "niah · zero", "niah · uniform_attention", "mdqa · zero", "mdqa · uniform_attention"
    ]  # fmt: skip
    # per subplot: band + line for top and random, and the baseline
    assert len(fig.data) == 4 * 5
    bands = [t for t in fig.data if t.fill == "toself"]
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert len(bands) == len(lines) == 8
    want = sweep.query("task == 'mdqa' and mode == 'zero' and condition == 'random'")
    band = next(b for b in bands if b.xaxis == "x3" and b.legendgroup == "random")
    np.testing.assert_allclose(band.y, list(want["hi"]) + list(want["lo"])[::-1])
    assert list(band.x) == [1, 2, 5, 10, 20, 20, 10, 5, 2, 1]
    line = next(t for t in lines if t.xaxis == "x3" and t.legendgroup == "random")
    np.testing.assert_allclose(line.y, want["value"])
    # red top, blue random, each in the legend once
    assert {t.line.color for t in lines if t.legendgroup == "top"} == {"rgb(214,39,40)"}
    assert {t.line.color for t in lines if t.legendgroup == "random"} == {"rgb(31,119,180)"}
    assert sorted(t.name for t in fig.data if t.showlegend is not False) == [
        "no knockout", "random k heads, same layers", "top-k ranked heads"
    ]  # fmt: skip


def test_knockout_ci_curves_baseline_is_the_tasks_no_knockout_value(sweep):
    fig = knockout_ci_curves(sweep)
    base = {t.xaxis: t.y[0] for t in fig.data if t.name == "no knockout"}
    assert base == pytest.approx({"x": 0.95, "x2": 0.95, "x3": 0.85, "x4": 0.85})
    assert list(fig.layout.xaxis.tickvals) == [1, 2, 5, 10, 20]
    assert fig.layout.xaxis.type == "log"
    assert fig.layout.yaxis.range[0] <= 0 and fig.layout.yaxis.range[1] >= 1
    # without baseline rows there is no baseline line
    no_base = knockout_ci_curves(sweep[sweep["condition"] != "none"])
    assert not [t for t in no_base.data if t.name == "no knockout"]


def test_knockout_ci_curves_refuses_bad_tables(sweep):
    with pytest.raises(ValueError, match="hi"):
        knockout_ci_curves(sweep.drop(columns=["lo", "hi"]))
    with pytest.raises(ValueError, match="no top/random"):
        knockout_ci_curves(sweep[sweep["condition"] == "none"])
    with pytest.raises(ValueError, match="one row per"):
        knockout_ci_curves(pd.concat([sweep, sweep.iloc[:1]]))


@pytest.fixture
def variants() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "variant": ["real", "synth-a", "synth-b", "synth-c"],
            "recall": [1.0, 0.2, 0.5, 0.8],
            "performance": [0.9, 0.3, 0.5, 0.7],
        }
    )


CORRELATION = {"method": "spearman", "estimate": 0.9, "low": 0.4, "high": 1.0, "n": 5}


def test_recall_scatter_places_markers_and_fits_the_variants(variants):
    fig = recall_scatter(variants, reference="real", correlation=CORRELATION)
    fit, points, ref = fig.data
    assert list(points.x) == [0.2, 0.5, 0.8] and list(points.y) == [0.3, 0.5, 0.7]
    assert list(points.text) == ["synth-a", "synth-b", "synth-c"]
    assert list(ref.x) == [1.0] and list(ref.y) == [0.9] and ref.name == "real"
    assert ref.marker.symbol != points.marker.symbol
    # the fit is over the variants only: y = 2/3 x + 1/6 here, not pulled by the reference
    np.testing.assert_allclose(fit.x, [0.2, 0.8])
    np.testing.assert_allclose(fit.y, [0.3, 0.7])
    (note,) = fig.layout.annotations
    assert note.text == "Spearman ρ = 0.90 [0.40, 1.00], n = 5"


def test_recall_scatter_without_reference_correlation_or_spread(variants):
    fig = recall_scatter(variants.iloc[1:2])
    assert len(fig.data) == 1 and not fig.layout.annotations  # one x value: no fit line
    fig = recall_scatter(variants, correlation={"method": "pearson", "estimate": -0.25})
    assert [t.name for t in fig.data] == ["least-squares fit (variants)", "variants"]
    assert fig.layout.annotations[0].text == "Pearson r = -0.25"


def test_recall_scatter_refuses_bad_input(variants):
    with pytest.raises(ValueError, match="performance"):
        recall_scatter(variants.drop(columns="performance"))
    with pytest.raises(ValueError, match="empty"):
        recall_scatter(variants.iloc[:0])
    with pytest.raises(ValueError, match="reference"):
        recall_scatter(variants, reference="nope")
    with pytest.raises(ValueError, match="estimate"):
        recall_scatter(variants, correlation={"method": "spearman"})


def test_recall_figure_script_draws_from_a_csv_and_its_correlation(variants, tmp_path, capsys):
    main = runpy.run_path("figures/recall_vs_performance.py")["main"]
    table = tmp_path / "recall.csv"
    variants.to_csv(table, index=False)
    (tmp_path / "correlation.json").write_text(json.dumps(CORRELATION))
    out = tmp_path / "fig"
    assert main([str(table), "--out", str(out), "--reference", "real", "--no-png"]) == 0
    html = (out / "recall_vs_performance.html").read_text()
    assert "= 0.90 [0.40, 1.00], n = 5" in html and '"name":"real"' in html  # ρ is escaped
    assert not (out / "recall_vs_performance.png").exists()
    assert "recall_vs_performance.html" in capsys.readouterr().out


def test_recall_figure_script_exits_2_on_a_missing_table_or_column(variants, tmp_path, capsys):
    main = runpy.run_path("figures/recall_vs_performance.py")["main"]
    assert main([str(tmp_path / "absent.csv"), "--no-png"]) == 2
    table = tmp_path / "recall.csv"
    variants.drop(columns="recall").to_csv(table, index=False)
    assert main([str(table), "--no-png"]) == 2
    assert "recall" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.html"))


def _pooled() -> pd.DataFrame:
    rows = []
    for task, metric in (("mdqa", "F1"), ("citation", "citation F1")):
        rows.append({"task": task, "label": "reference (realistic needles in real essays)",
                     "recall": 1.0, "performance": 0.9, "metric": metric, "synthetic": False})
        rows.append({"task": task, "label": "real data (limited: realistic-high on 16 examples)",
                     "recall": 0.8, "performance": 0.7, "metric": metric, "synthetic": False})
        for i, v in enumerate(("realistic-low", "templated-high", "symbolic")):
            rows.append({"task": task, "label": v, "recall": 0.3 * i, "performance": 0.2 * i,
                         "metric": metric, "synthetic": True})
    return pd.DataFrame(rows)


def test_recall_by_task_draws_one_panel_per_task_with_each_kind_of_model():
    from mechinterp.plots import recall_by_task

    corr = {"mdqa": {"method": "spearman", "estimate": 1.0, "low": 1.0, "high": 1.0, "n": 3,
                     "p_permutation": 0.333}}  # fmt: skip
    pooled = {"method": "spearman", "estimate": 1.0, "low": 0.2, "high": 1.0, "n": 6,
              "p_permutation": 0.028, "exact": True}  # fmt: skip
    fig = recall_by_task(_pooled(), correlations=corr, pooled_correlation=pooled, title="t")
    titles = [a.text for a in fig.layout.annotations]
    assert titles[0] == "mdqa (F1)<br>Spearman ρ = 1.00 [1.00, 1.00], n = 3, permutation p = 0.333"
    assert titles[1] == "citation (citation F1)"  # no correlation given for it
    assert ("pooled within tasks: Spearman ρ = 1.00 [0.20, 1.00], n = 6, exact permutation "
            "p = 0.028") in fig.layout.title.text
    by = {(t.name, t.xaxis): t for t in fig.data}
    assert len(by) == 6  # 3 kinds × 2 panels
    syn = by["synthetic variant", "x2"]
    assert list(syn.x) == [0.0, 0.3, 0.6] and list(syn.text) == ["realistic-low",
                                                                 "templated-high", "symbolic"]
    assert list(by["real data (limited)", "x"].y) == [0.7]
    assert by["reference", "x"].marker.symbol == "star"


def test_recall_by_task_refuses_missing_columns_and_empty_tables():
    from mechinterp.plots import recall_by_task

    with pytest.raises(ValueError, match=r"needs columns \['metric'\]"):
        recall_by_task(_pooled().drop(columns="metric"))
    with pytest.raises(ValueError, match="no model has both"):
        recall_by_task(_pooled().assign(recall=np.nan))


def _address_senders() -> pd.DataFrame:
    rows = []
    for corruption, planted in (("question_swap", {"q": "L19H1"}), ("key_swap", {"k": "L16H0"})):
        for inp in ("q", "k"):
            for la in range(3, 18):
                for h in range(3):
                    name = f"L{la}H{h}"
                    rec = 0.5 if planted.get(inp) == name else 0.01 * ((la * 3 + h) % 7) - 0.02
                    rows.append({"corruption": corruption, "receiver_input": inp, "layer": la,
                                 "head": h, "head_name": name, "recovery": rec})  # fmt: skip
    rows += [{"corruption": c, "receiver_input": "q", "layer": 19, "head": 1, "head_name": "L19H1",
              "recovery": 0.5 if c == "question_swap" else 0.0}
             for c in ("question_swap", "key_swap")]  # fmt: skip
    return pd.DataFrame(rows)


def test_address_circuit_draws_each_inputs_top_senders_into_the_receivers():
    from mechinterp.errors import InputError
    from mechinterp.plots.study import address_circuit

    fig = address_circuit(_address_senders(), ["L20H6", "L21H8"], top_k=3)
    assert [a.text for a in fig.layout.annotations] == ["question swap", "key swap"]
    edges = [t for t in fig.data if t.mode == "lines" and t.hovertemplate]
    assert len(edges) == 2 * 2 * 3  # two panels, two inputs, three senders each
    widest = max(edges, key=lambda t: t.line.width)
    assert "recovery 0.500" in widest.hovertemplate  # the planted senders draw the widest edges
    labels = [t.text[0] for t in fig.data if t.mode == "markers+text" and len(t.text) == 1]
    assert any(s.startswith("L19H1  q +0.50") for s in labels)
    assert any(s.startswith("L16H0  k +0.50") for s in labels)
    with pytest.raises(InputError, match="needs columns"):
        address_circuit(_address_senders().drop(columns="recovery"), ["L20H6"])
    with pytest.raises(InputError, match="no senders or no receivers"):
        address_circuit(_address_senders(), [])
