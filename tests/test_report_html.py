"""report.html: one self-contained page per study (and extension) run, checked as written and as
headless Chromium renders it offline (console, network, every figure drawn, a screenshot).

Set MECHINTERP_DOCS_SCREENSHOT=1 to also copy the tiny study's screenshot to
docs/assets/report_html.png (the picture docs/experiments/study.md shows).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from plotly.offline import get_plotlyjs

from mechinterp.experiments import html_report
from mechinterp.experiments.study.report import FIGURES, _fmt, read_config

#: The figures of the tiny study (no addressing stage, so no address circuit).
DRAWN = [name for name in FIGURES if name != "address_circuit"]

ROOT = Path(__file__).resolve().parents[1]
PAGE_HEIGHT = 5600  # px: the tiny study's whole page, provenance included
#: The embedded plotly.js bundle (its own license text and map defaults name URLs it never
#: fetches for the traces these pages draw).
BUNDLE = re.compile(r"<script[^>]*>/\*\*\s*\* plotly\.js v.*?</script>", re.S)
EXTERNAL = re.compile(r"""(?:src|href|action|poster|data)\s*=\s*["']?\s*(?:https?:)?//"""
                      r"""|url\(\s*["']?\s*(?:https?:)?//|@import|<link\b|<iframe\b""",
                      re.I)  # fmt: skip


def find_chromium() -> str | None:
    """The browser kaleido uses: BROWSER_PATH, else the first Chromium on PATH."""
    if os.environ.get("BROWSER_PATH"):
        return os.environ["BROWSER_PATH"]
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
    return next((p for p in map(shutil.which, names) if p), None)


def page_requests(netlog: Path) -> list[str]:
    """URLs the page itself asked the network for (Chromium's own background requests, made
    outside the page's origin, are not the page's)."""
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    out = []
    for e in log["events"]:
        p = e.get("params", {})
        if e["type"] == start and str(p.get("network_isolation_key", "")).startswith("file://"):
            if not p["url"].startswith(("file:", "data:", "blob:", "about:")):
                out.append(p["url"])
    return out


def open_in_chromium(page: Path, out: Path, *, height: int = 1200) -> dict:
    """Load `page` in headless Chromium with every network request sent to a closed port: the
    DOM after the scripts ran, the console lines, the page's network requests and a 1280-wide
    screenshot."""
    chrome = find_chromium()
    out.mkdir(parents=True, exist_ok=True)
    common = [chrome, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
              "--no-first-run", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
              f"--user-data-dir={out / 'profile'}", "--virtual-time-budget=15000"]  # fmt: skip
    url = page.resolve().as_uri()
    netlog = out / "netlog.json"
    run = subprocess.run(
        [*common, "--enable-logging=stderr", "--v=0", f"--log-net-log={netlog}", "--dump-dom",
         url], capture_output=True, text=True, timeout=180, check=True,
    )  # fmt: skip
    shot = out / "screenshot.png"
    subprocess.run([*common, f"--window-size=1280,{height}", f"--screenshot={shot}", url],
                   capture_output=True, timeout=180, check=True)  # fmt: skip
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    return {"dom": run.stdout, "console": console, "requests": page_requests(netlog),
            "screenshot": shot}  # fmt: skip


def figure_sections(text: str) -> dict[str, str]:
    """name → the page's text from that figure's section to the next one's."""
    parts = re.split(r'<section class="figure" data-figure="([a-z_]+)"', text)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def hovertemplates(section: str) -> list[str]:
    """The hover templates of the figure in `section` (JSON strings in its script)."""
    return [json.loads(t) for t in re.findall(r'"hovertemplate":("(?:[^"\\]|\\.)*")', section)]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


needs_chromium = pytest.mark.skipif(
    find_chromium() is None,
    reason="no Chromium found (BROWSER_PATH or chromium on PATH): apt-get install -y chromium",
)


# ---------------------------------------------------------------- the attention example


def test_the_attention_example_is_the_top_heads_row_read_from_the_fused_run(
    tiny_study, monkeypatch
):
    """The stored row is the rank-1 head's attention from the prompt's last position on its best
    counted detection instance: read as one row on the fused (SDPA) path, equal to the explicit
    pattern's row, summing to one, with the needle's positions marked."""
    from mechinterp.detect.retrieval import needle_mask
    from mechinterp.evaluate import render_all
    from mechinterp.models import attention, load_model
    from mechinterp.tasks.niah import niah_grid

    table = html_report.read_attention_example(tiny_study)
    scores = pd.read_parquet(tiny_study / "detect_scores.parquet")
    inst = pd.read_parquet(tiny_study / "detect_instances.parquet")
    top = scores.sort_values("rank").iloc[0]
    assert set(table["head"]) == {top["head_name"]}
    mine = inst[(inst["layer"] == top["layer"]) & (inst["head"] == top["head"]) & inst["counted"]]
    (example_id,) = set(table["example_id"])
    assert example_id in set(mine["instance_id"])
    assert mine.set_index("instance_id").loc[example_id, "value"] == mine["value"].max()
    assert table["attention"].sum() == pytest.approx(1.0, abs=1e-5)
    assert (table["attention"] >= 0).all()
    assert json.loads((tiny_study / "provenance.json").read_text())["model_card"]["attention"] \
        == "sdpa"  # fmt: skip

    config = read_config(tiny_study)
    fused = config.model.load()
    n = config.detect.niah
    (ex,) = [e for e in niah_grid(fused.tokenizer, lengths=n.lengths, depths=n.depths,
                                   needles=list(n.needles), haystack=n.haystack, seed=n.seed)
             if e.id == example_id]  # fmt: skip
    (prompt,) = render_all(fused, [ex], template=config.template)
    assert list(table["position"]) == list(range(prompt.n_tokens))
    assert set(table["query_position"]) == {prompt.n_tokens - 1}
    assert list(table["in_needle"]) == needle_mask(prompt).tolist()
    assert table["in_needle"].sum() > 0
    assert list(table["token"]) == [fused.tokenizer.decode([i]) for i in prompt.input_ids]

    seen = []
    real = attention._needs_scores
    monkeypatch.setattr(attention, "_needs_scores", lambda a: seen.append(real(a)) or seen[-1])
    layer, head = int(top["layer"]), int(top["head"])
    row = html_report.attention_row(fused, prompt.input_ids, layer, head)
    assert seen and not any(seen), "the row was read through the explicit T x T pattern"
    torch.testing.assert_close(torch.tensor(row), torch.tensor(table["attention"].to_numpy(),
                               dtype=torch.float32), atol=1e-6, rtol=0)  # fmt: skip
    monkeypatch.undo()
    explicit = load_model(config.model.name, device="cpu", attention="eager")
    name = f"blocks.{layer}.attn.hook_pattern"
    _, cache = explicit.run_with_cache(torch.tensor([prompt.input_ids]), names_filter=name)
    want = cache[name][0, head, -1].float()
    torch.testing.assert_close(torch.tensor(row), want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the page as written


def test_the_page_holds_verdicts_figures_attention_and_provenance(tiny_study):
    text = (tiny_study / "report.html").read_text()
    headline = pd.read_csv(tiny_study / "claims_headline.csv")
    claims = pd.read_csv(tiny_study / "claims.csv")
    prov = json.loads((tiny_study / "provenance.json").read_text())
    for h in headline.itertuples():
        assert html.escape(h.statement) in text
        prim = claims[(claims["claim"] == h.claim) & claims["primary"]]
        for r in prim.itertuples():
            cells = (f'<td class="num">{_fmt(r.estimate, r.unit)}</td><td class="num">'
                     f"[{_fmt(r.ci_low, r.unit)}, {_fmt(r.ci_high, r.unit)}]</td>"
                     f'<td class="num">{r.n}</td>')  # fmt: skip
            assert cells in text, (h.claim, r.label)
    verdicts = re.findall(r'<table class="verdicts">.*?</table>', text, re.S)[0]
    assert re.findall(r'<span class="verdict \w+">([^<]+)</span>', verdicts) == list(
        headline["verdict"]
    )
    # the study's figures (each stage ran), then the attention example; plotly.js once, inline
    sections = figure_sections(text)
    assert list(sections) == [*DRAWN, "attention_example"]
    assert len(re.findall(r"\* plotly\.js v\d", text)) == 1
    assert BUNDLE.search(sections["retrieval_scores"]), "plotly.js is not in the first figure"
    # hover: the head and its value on the head maps, the interval on the knockout curves
    for name in ("retrieval_scores", "patch_recovery"):
        assert any(t.startswith("L%{y}H%{x}<br>") and t.endswith("=%{z:.3f}<extra></extra>")
                   for t in hovertemplates(sections[name])), name  # fmt: skip
    assert any("%{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]" in t
               for t in hovertemplates(sections["knockout_vs_k"]))  # fmt: skip
    head = str(html_report.read_attention_example(tiny_study)["head"].iloc[0])
    assert f"{head} · needle<br>position %{{x}}: %{{customdata}}<br>attention=%{{y:.4f}}" \
        "<extra></extra>" in hovertemplates(sections["attention_example"])  # fmt: skip
    assert text.count('<span class="tok needle"') == int(
        html_report.read_attention_example(tiny_study)["in_needle"].sum()
    )
    for value in (prov["git_commit"], prov["packages"]["torch"], prov["model_card"]["source"],
                  f"{prov['timings']['total_s']:g}"):  # fmt: skip
        assert f"<td>{value}</td>" in text, value
    # self-contained: outside plotly.js (embedded as plotly ships it) nothing names a URL or
    # loads a resource; that nothing is fetched at all is the browser test's
    bundle = BUNDLE.search(text).group(0)
    assert get_plotlyjs() in bundle and len(bundle) < len(get_plotlyjs()) + 100
    rest = text.replace(bundle, "")
    assert not re.search(r"https?://|www\.", rest)
    assert not EXTERNAL.search(rest)


def test_the_page_is_redrawn_from_the_tables_and_says_when_the_example_is_absent(
    tiny_study, tmp_path, monkeypatch
):
    """`mechinterp report` (no model) redraws the attention view from attention_example.csv, and
    says so where that table is missing."""
    from mechinterp.experiments.from_tables import rewrite_report
    from mechinterp.models import load as load_module

    def no_model(*a, **k):
        raise AssertionError("the report must not load a model")

    monkeypatch.setattr(load_module, "load_model", no_model)
    run = tmp_path / "run"
    shutil.copytree(tiny_study, run, ignore=shutil.ignore_patterns("shards"))
    before = (run / "report.html").read_text()
    (run / "report.html").unlink()
    rewrite_report(run)
    assert (run / "report.html").read_text() == before
    (run / html_report.ATTENTION_TABLE).unlink()
    rewrite_report(run)
    text = (run / "report.html").read_text()
    assert "No attention example" in text and html_report.ATTENTION_TABLE in text
    assert list(figure_sections(text)) == DRAWN
    assert 'class="tok' not in text


# ---------------------------------------------------------------- the page in a browser


@needs_chromium
def test_the_browser_check_sees_errors_and_requests(tmp_path):
    """The checks below can fail: a thrown error reaches the console lines and a fetched image
    reaches the page's requests."""
    page = tmp_path / "bad.html"
    page.write_text('<html><body><img src="https://example.com/x.png">'
                    "<script>missingFunction();</script></body></html>")  # fmt: skip
    got = open_in_chromium(page, tmp_path / "browser", height=200)
    assert any("Uncaught ReferenceError" in line for line in got["console"])
    assert got["requests"] == ["https://example.com/x.png"]


@needs_chromium
def test_the_study_page_renders_offline_in_headless_chromium(tiny_study, tmp_path):
    got = open_in_chromium(tiny_study / "report.html", tmp_path / "browser", height=PAGE_HEIGHT)
    assert got["console"] == [], got["console"]
    assert got["requests"] == []
    sections = figure_sections(got["dom"])
    assert list(sections) == [*DRAWN, "attention_example"]
    for name, part in sections.items():
        assert 'class="main-svg"' in part, f"figure {name} was not drawn"
    assert png_size(got["screenshot"]) == (1280, PAGE_HEIGHT)
    assert got["screenshot"].stat().st_size > 50_000  # a drawn page, not a blank one
    if os.environ.get("MECHINTERP_DOCS_SCREENSHOT"):
        shutil.copyfile(got["screenshot"], ROOT / "docs" / "assets" / "report_html.png")


@needs_chromium
def test_an_extension_run_writes_its_page_too(tmp_path):
    """The extension's page: its claims, its figures (as `mechinterp figures` draws them), no
    attention example (said so), rendered without a console error or a request."""
    from mechinterp.experiments.extension import ExtensionConfig, ModelKnockout, run_extension
    from mechinterp.experiments.extension.report import build_figures
    from mechinterp.experiments.specs import ModelSpec
    from mechinterp.experiments.study.config import DetectStage, NiahSpec
    from mechinterp.finetune import LoraSpec
    from mechinterp.models.tiny import tiny_model

    tiny_model(n_kv_heads=2, directory=tmp_path / "model")
    config = ExtensionConfig(
        model=ModelSpec(name=str(tmp_path / "model")), variants=("templated-high", "symbolic"),
        n_train=4, n_eval=2, n_docs=2, doc_words=20, max_new_tokens=6,
        lora=LoraSpec(r=2, lr=1e-2, steps=2, save_every=2),
        detect=DetectStage(niah=NiahSpec(needles=(0,), lengths=(400,), depths=(0.5,)),
                           gate=None, top_k=3, max_new_tokens=6),
        knockout=ModelKnockout(ks=(1, 2), seeds=(0,), target="gold"), cross_seeds=(0,),
    )  # fmt: skip
    out = run_extension(config, out=tmp_path / "run", png=None, progress=False)
    text = (out / "report.html").read_text()
    headline = pd.read_csv(out / "claims_headline.csv")
    assert all(html.escape(s) in text for s in headline["statement"])
    assert list(figure_sections(text)) == list(build_figures(out))
    assert "No attention example" in text
    assert not re.search(r"https?://|www\.", BUNDLE.sub("", text))
    got = open_in_chromium(out / "report.html", tmp_path / "browser")
    assert got["console"] == [] and got["requests"] == []
    for name, part in figure_sections(got["dom"]).items():
        assert 'class="main-svg"' in part, f"figure {name} was not drawn"
