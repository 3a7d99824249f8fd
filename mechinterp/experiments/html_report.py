"""`report.html`: one self-contained page per run, beside `report.md`.

It holds the verdict table (from the run's claims), the run's interactive figures (the same
plotly figures `mechinterp figures` draws), the attention of the top retrieval head over one
example's prompt with the needle highlighted, and the provenance. plotly.js is embedded once,
inline, and the page loads nothing from the network: it opens offline, from a copied directory.

    write_attention_example(run_dir, model, config, tables)   # attention_example.csv (a model)
    write_html(run_dir, title=..., headline=..., claims=..., figures=..., fmt=...)   # tables only

The attention example needs a model, so the study computes it at its end, where its model is
loaded, and stores it as a small table; `mechinterp report` redraws the page from that table.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from mechinterp import store
from mechinterp.errors import InputError

#: The attention example's table in a run directory: one row per prompt token.
ATTENTION_TABLE = "attention_example.csv"
ATTENTION_COLUMNS = ("position", "token", "attention", "in_needle", "example_id", "head",
                     "query_position")  # fmt: skip
#: Provenance keys shown first, in this order; the rest follow alphabetically.
PROVENANCE_ORDER = ("model_card", "git_commit", "created", "packages", "python", "platform",
                    "engine", "device", "timings", "seeds", "shards")  # fmt: skip
#: Provenance entries shown folded (long, and seldom what a reader looks for).
FOLDED = ("seal", "shard_seconds")
_VERDICT_CLASS = {"supported": "yes", "not supported": "no"}

# ---------------------------------------------------------------- the attention example


def attention_row(model, input_ids, layer: int, head: int) -> np.ndarray:
    """The attention `head` of `layer` pays over the prompt's keys from its last position (where
    the answer's first token is predicted): one query row, read with `models.attention.read_rows`
    (on a fused layer only that row is computed; no T × T pattern)."""
    import torch

    from mechinterp.evaluate import left_pad
    from mechinterp.models.attention import RowReader, read_rows

    got: list = []

    def keep(pattern):  # [batch, head, rows, keys]
        got.append(pattern[0, head, -1].float().cpu())

    reader = RowReader(lambda n_queries, n_keys: torch.tensor([n_queries - 1]), keep)
    ids, mask = left_pad(model, [list(input_ids)])
    with torch.no_grad(), read_rows(model, {layer: reader}):
        model(ids, attention_mask=mask, logits_to_keep=1)
    if len(got) != 1 or got[0].shape[-1] != len(input_ids):
        raise RuntimeError(f"expected one attention row over {len(input_ids)} keys from layer "
                           f"{layer}, read {[tuple(g.shape) for g in got]}")  # fmt: skip
    return got[0].numpy()


def chosen_example(tables: Mapping[str, pd.DataFrame]) -> tuple[str, int, int]:
    """(instance id, layer, head): the top-ranked retrieval head and the counted detection
    instance on which its retrieval score is highest (the first such one on a tie)."""
    scores, inst = tables["detect_scores"], tables["detect_instances"]
    top = scores.sort_values("rank").iloc[0]
    layer, head = int(top["layer"]), int(top["head"])
    mine = inst[(inst["layer"] == layer) & (inst["head"] == head) & inst["counted"]]
    if mine.empty:
        raise InputError(f"no counted detection instance for {top['head_name']}: the attention "
                         "example needs one the model answered")  # fmt: skip
    best = mine.loc[mine["value"].idxmax()]
    return str(best["instance_id"]), layer, head


def attention_example(model, config, tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The study's attention example: the top retrieval head's attention over the prompt of the
    detection instance it scores highest on, one row per token (`ATTENTION_COLUMNS`)."""
    from mechinterp.detect.retrieval import needle_mask
    from mechinterp.evaluate import render_all
    from mechinterp.heads import Head
    from mechinterp.tasks.niah import niah_grid

    example_id, layer, head = chosen_example(tables)
    n = config.detect.niah
    grid = niah_grid(model.tokenizer, lengths=n.lengths, depths=n.depths, needles=list(n.needles),
                     haystack=n.haystack, seed=n.seed)  # fmt: skip
    examples = [ex for ex in grid if ex.id == example_id]
    if not examples:
        raise InputError(f"detection instance {example_id!r} is not in the config's detect.niah "
                         "grid: the run directory's config and tables disagree")  # fmt: skip
    (prompt,) = render_all(model, examples, template=config.template)
    row = attention_row(model, prompt.input_ids, layer, head)
    tok = model.tokenizer
    return pd.DataFrame({
        "position": np.arange(prompt.n_tokens),
        "token": [tok.decode([i]) for i in prompt.input_ids],
        "attention": row.astype(float),
        "in_needle": needle_mask(prompt).numpy(),
        "example_id": example_id,
        "head": str(Head(layer, head)),
        "query_position": prompt.n_tokens - 1,
    })  # fmt: skip


def write_attention_example(run_dir: str | Path, model, config, tables) -> Path:
    """Compute the attention example with `model` and store it as `attention_example.csv`."""
    return store.write_table(attention_example(model, config, tables),
                             Path(run_dir) / ATTENTION_TABLE)  # fmt: skip


def read_attention_example(run_dir: str | Path) -> pd.DataFrame | None:
    """The stored attention example, or None where the run directory has none."""
    path = Path(run_dir) / ATTENTION_TABLE
    if not path.is_file():
        return None
    table = pd.read_csv(path, dtype={"token": str, "example_id": str, "head": str},
                        keep_default_na=False, na_values={"attention": [""]})  # fmt: skip
    missing = set(ATTENTION_COLUMNS) - set(table)
    if missing:
        raise InputError(f"{path} lacks the columns {sorted(missing)}: it was not written by "
                         "this version; delete it and rerun the study to recompute it")  # fmt: skip
    return table.assign(in_needle=table["in_needle"].astype(bool))


def attention_figure(table: pd.DataFrame):
    """Bars over the prompt's token positions: attention at the answer position, the needle's
    tokens in their own colour; hover shows position, token, attention and span."""
    import plotly.graph_objects as go

    first = table.iloc[0]
    fig = go.Figure()
    for inside, name, colour in ((False, "context", "#8c8c8c"), (True, "needle", "#d62728")):
        part = table[table["in_needle"] == inside]
        fig.add_trace(go.Bar(
            x=part["position"], y=part["attention"], name=name, marker_color=colour,
            customdata=[html.escape(t) for t in part["token"]],
            hovertemplate=f"{first['head']} · {name}<br>position %{{x}}: %{{customdata}}<br>"
            "attention=%{y:.4f}<extra></extra>",
        ))  # fmt: skip
    fig.update_layout(
        title=f"{first['head']} · attention from the answer position (query position "
        f"{first['query_position']}) · {first['example_id']}",
        xaxis={"title": "prompt token position"}, yaxis={"title": "attention"}, bargap=0,
        width=960, height=380, template="plotly_white",
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "x": 1, "xanchor": "right"},
    )  # fmt: skip
    return fig


def token_strip(table: pd.DataFrame) -> str:
    """The prompt as text, each token shaded by its attention (relative to the largest); the
    needle's tokens underlined in red; hover (title) gives position and value."""
    top = float(table["attention"].max()) or 1.0
    out = []
    for r in table.itertuples():
        alpha = min(1.0, max(0.0, r.attention / top))
        cls = "tok needle" if r.in_needle else "tok"
        text = html.escape(r.token).replace("\n", "↵\n")
        out.append(f'<span class="{cls}" style="background:rgba(31,119,180,{alpha:.3f})" '
                   f'title="position {r.position}: {r.attention:.4f}">{text}</span>')  # fmt: skip
    return '<div class="strip">' + "".join(out) + "</div>"


def _attention_section(table: pd.DataFrame | None) -> tuple[str, object | None]:
    if table is None:
        return ("<p class=\"absent\">No attention example: this run directory has no "
                f"<code>{ATTENTION_TABLE}</code>. A study writes it at its end, with its model "
                "loaded; redrawing from the tables alone cannot compute it.</p>", None)  # fmt: skip
    first = table.iloc[0]
    needle = table.loc[table["in_needle"], "attention"].sum()
    peak = table.loc[table["attention"].idxmax()]
    where = "inside" if peak["in_needle"] else "outside"
    text = (f"<p>Head <b>{html.escape(first['head'])}</b> (the top-ranked retrieval head) on "
            f"<code>{html.escape(first['example_id'])}</code>, from the prompt's last position "
            f"(the answer's first token is predicted there): {len(table)} tokens, "
            f"{int(table['in_needle'].sum())} of them the needle's (red bars; underlined in red "
            "below, where each token is shaded by its attention). "
            f"Attention mass on the needle: <b>{needle:.3f}</b>; the largest weight, "
            f"{peak['attention']:.3f}, falls on position {int(peak['position'])} "
            f"({html.escape(repr(peak['token']))}), {where} the needle.</p>")  # fmt: skip
    return text, attention_figure(table)


# ---------------------------------------------------------------- tables


def _td(x, cls: str = "", attrs: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f"<td{c}{attrs}>{x}</td>"


def _verdict(v: str) -> str:
    return f'<span class="verdict {_VERDICT_CLASS.get(v, "maybe")}">{html.escape(v)}</span>'


def _n(x) -> str:
    return "—" if x is None or pd.isna(x) else str(int(x))


def verdict_table(headline: pd.DataFrame, claims: pd.DataFrame, fmt: Callable) -> str:
    """One row per primary claim row under its claim's statement and verdict: the estimate, its
    interval and n (what the verdict rests on)."""
    rows = ["<table class=\"verdicts\"><thead><tr><th>claim</th><th>verdict</th><th>primary "
            "row</th><th>estimate</th><th>interval</th><th>n</th></tr></thead><tbody>"]  # fmt: skip
    for h in headline.itertuples():
        prim = claims[(claims["claim"] == h.claim) & claims["primary"].astype(bool)]
        span = f' rowspan="{max(1, len(prim))}"'
        lead = _td(html.escape(h.statement), attrs=span) + _td(_verdict(h.verdict), attrs=span)
        if prim.empty:
            rows.append(f"<tr>{lead}<td colspan=\"4\">no primary row</td></tr>")
        for i, r in enumerate(prim.itertuples()):
            cells = (_td(html.escape(str(r.label))) + _td(fmt(r.estimate, r.unit), "num")
                     + _td(f"[{fmt(r.ci_low, r.unit)}, {fmt(r.ci_high, r.unit)}]", "num")
                     + _td(_n(r.n), "num"))  # fmt: skip
            rows.append(f"<tr>{lead if i == 0 else ''}{cells}</tr>")
    return "\n".join(rows) + "</tbody></table>"


def claims_table(claims: pd.DataFrame, fmt: Callable) -> str:
    """Every claim row (primary and secondary), collapsed."""
    head = ("claim", "row", "estimate", "interval", "n", "resampled", "verdict")
    rows = ["<details><summary>All claim rows (" + str(len(claims)) + ")</summary>"
            "<table class=\"claims\"><thead><tr>" + "".join(f"<th>{h}</th>" for h in head)
            + "</tr></thead><tbody>"]  # fmt: skip
    for r in claims.itertuples():
        res = getattr(r, "resampled", None)
        rows.append("<tr>" + _td(html.escape(str(r.claim)))
                    + _td(html.escape(str(r.label)) + ("" if r.primary else " (secondary)"))
                    + _td(fmt(r.estimate, r.unit), "num")
                    + _td(f"[{fmt(r.ci_low, r.unit)}, {fmt(r.ci_high, r.unit)}]", "num")
                    + _td(_n(r.n), "num")
                    + _td(html.escape(res) if isinstance(res, str) and res else "—")
                    + _td(_verdict(str(r.verdict))) + "</tr>")  # fmt: skip
    return "\n".join(rows) + "</tbody></table></details>"


def _value(x, key: str = "") -> str:
    if isinstance(x, dict):
        return _mapping(x, fold=key in FOLDED or len(x) > 24)
    if isinstance(x, list | tuple):
        return html.escape(", ".join(str(v) for v in x)) or "—"
    if isinstance(x, float):
        return f"{x:g}"
    return "—" if x is None else html.escape(str(x))


def _mapping(d: Mapping, *, fold: bool = False) -> str:
    """`d` as a key/value table, nested ones inside (`FOLDED` and long ones folded away)."""
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_value(v, str(k))}</td></tr>"
                   for k, v in d.items())  # fmt: skip
    table = f'<table class="kv">{rows}</table>'
    if fold:
        return f"<details><summary>{len(d)} entries</summary>{table}</details>"
    return table


def provenance_table(prov: Mapping, extra: Mapping | None = None) -> str:
    """The run's provenance.json (versions, commit, timings, model card, ...) as nested tables,
    the keys that matter most first; `extra` rows (e.g. the config hash) at the top."""
    if not prov:
        return '<p class="absent">This run directory has no provenance.json.</p>'
    keys = [k for k in PROVENANCE_ORDER if k in prov] + sorted(set(prov) - set(PROVENANCE_ORDER))
    return _mapping({**(extra or {}), **{k: prov[k] for k in keys}})


def read_provenance(run_dir: str | Path) -> dict:
    """provenance.json of `run_dir` ({} where there is none)."""
    path = Path(run_dir) / "provenance.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# ---------------------------------------------------------------- the page

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1200px;padding:0 24px 48px;color:#1d2330;line-height:1.45}
h1{font-size:1.6em;margin:28px 0 6px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;
margin-top:36px}nav a{margin-right:14px}
table{border-collapse:collapse;margin:10px 0;font-size:14px}
th,td{border:1px solid #d6d9e0;padding:4px 8px;text-align:left;vertical-align:top}
thead th{background:#f1f3f7}td.num{text-align:right;font-variant-numeric:tabular-nums;
white-space:nowrap}table.kv th{background:#f7f8fa;font-weight:600}
.verdict{padding:1px 8px;border-radius:10px;font-weight:600;white-space:nowrap}
.verdict.yes{background:#d8f0dc;color:#17612a}.verdict.no{background:#fadbd8;color:#8a1c12}
.verdict.maybe{background:#eceef2;color:#4a5160}
.figure{margin:18px 0;overflow-x:auto}.absent{color:#8a1c12}
.strip{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;white-space:pre-wrap;
border:1px solid #d6d9e0;padding:8px;max-height:360px;overflow-y:auto;line-height:1.7}
.tok.needle{box-shadow:inset 0 -3px #d62728}
"""


def _figure_html(name: str, fig, first: bool) -> str:
    div = fig.to_html(full_html=False, include_plotlyjs=first, div_id=f"figure-{name}",
                      config={"displaylogo": False, "responsive": True})  # fmt: skip
    return f'<section class="figure" data-figure="{html.escape(name)}">{div}</section>'


def write_html(
    run_dir: str | Path,
    *,
    title: str,
    headline: pd.DataFrame,
    claims: pd.DataFrame,
    figures: Mapping[str, object],
    fmt: Callable[[float, str], str],
    intro: str = "",
    extra_provenance: Mapping | None = None,
    attention: bool = True,
) -> Path:
    """Write `report.html` in `run_dir`: verdicts, `figures` (name → plotly figure), the attention
    example (from `attention_example.csv`, when `attention`) and the provenance. plotly.js goes
    inline once, in the first figure; nothing is loaded from the network."""
    run_dir = Path(run_dir)
    table = read_attention_example(run_dir) if attention else None
    att_html, att_fig = _attention_section(table)
    parts, first = [], True
    for name, fig in figures.items():
        if fig is None:
            continue
        parts.append(f"<h3>{html.escape(name.replace('_', ' '))}</h3>"
                     + _figure_html(name, fig, first))  # fmt: skip
        first = False
    nav = ["verdicts", "figures", *(["attention"] if attention else []), "provenance"]
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{intro}</p>" if intro else "",
        "<nav>" + "".join(f'<a href="#{s}">{s}</a>' for s in nav) + "</nav>",
        '<h2 id="verdicts">Verdicts</h2>', verdict_table(headline, claims, fmt),
        claims_table(claims, fmt),
        '<h2 id="figures">Figures</h2>',
        *(parts or ['<p class="absent">No figure: the stages that draw them did not run.</p>']),
    ]  # fmt: skip
    if attention:
        body += ['<h2 id="attention">Attention over the prompt</h2>', att_html]
        if att_fig is not None:
            body += [_figure_html("attention_example", att_fig, first), token_strip(table)]
    body += ['<h2 id="provenance">Provenance</h2>',
             provenance_table(read_provenance(run_dir), extra_provenance)]  # fmt: skip
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>{html.escape(title)}"
            f"</title><style>{_CSS}</style></head><body>\n" + "\n".join(body)
            + "\n</body></html>\n")  # fmt: skip
    return store.write_text(run_dir / "report.html", page)
