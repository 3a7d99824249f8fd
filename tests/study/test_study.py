"""The study end to end on a tiny random model: tables, resume after a kill, Ray = in-process,
figures and report from tables alone, and refusal of another config's directory."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from mechinterp.experiments.specs import ModelSpec
from mechinterp.experiments.study import RunDirError, run_study, write_report
from mechinterp.experiments.study.config import ClaimSettings
from mechinterp.experiments.study.report import read_config

TABLES = ("detect_scores", "detect_instances", "baseline", "knockout", "robustness", "patch",
          "attribution", "paths", "head_patterns")  # fmt: skip


def _assert_same_tables(a, b) -> None:
    for name in TABLES:
        pd.testing.assert_frame_equal(
            pd.read_parquet(a / f"{name}.parquet"), pd.read_parquet(b / f"{name}.parquet")
        )


def _tables(run):
    return {name: pd.read_parquet(run / f"{name}.parquet") for name in TABLES}


def test_the_study_writes_every_table_with_the_expected_shape(tiny_study):
    t = _tables(tiny_study)
    n_heads = 3 * 4
    assert len(t["detect_scores"]) == n_heads
    assert len(t["detect_instances"]) == 2 * n_heads
    assert set(t["baseline"]["task"]) == {"niah", "mdqa"} and len(t["baseline"]) == 6
    ko = t["knockout"]
    # per example: none + per mode (2) x k (3) x (top + 2 draws (layer-matched, uniform) x 2 seeds)
    assert len(ko) == 6 * (1 + 2 * 3 * 5)
    assert ko.groupby("example_id").size().eq(31).all()
    assert (ko["condition"] == "random_uniform").sum() == (ko["condition"] == "random").sum()
    random = ko[ko["condition"].str.startswith("random")]
    top2 = set(t["detect_scores"].head(4)["head_name"])
    assert not any(set(h.split()) & top2 for h in random["heads"])  # never a top-max(k) head
    rb = t["robustness"]
    # per example: (scopes query, all teacher-forced + generation) x (none + top + 2 draws x 2)
    assert len(rb) == 6 * 3 * 6
    assert set(rb.groupby("method")["scope"].unique().map(tuple)) == {
        ("query", "all"),
        ("response",),
    }
    assert set(rb["k"]) == {0, 2} and set(rb["mode"]) == {"none", "zero"}
    # free generation without knockout, its prompt shared from a KV cache, writes exactly the
    # clean greedy answer of step 2
    gen = rb[(rb["method"] == "generation") & (rb["condition"] == "none")]
    clean = t["baseline"].set_index("example_id")["prediction"]
    assert (gen.set_index("example_id")["prediction"] == clean.reindex(gen["example_id"])).all()
    p = t["patch"]
    assert set(p["kind"]) == {"head", "set"}
    sets = p[p["kind"] == "set"]
    assert set(sets["name"]) >= {"all", "random-s0", "random-s1"}
    # patching every head after the context restores the clean metric exactly
    all_rows = sets[sets["name"] == "all"]
    assert (all_rows["value"] - all_rows["clean_metric"]).abs().max() < 1e-4
    # the AtP* screen: every head on every patch pair, estimates beside the same pair's exact rows
    at = t["attribution"]
    assert len(at) == p["example_id"].nunique() * n_heads
    assert set(at["example_id"]) == set(p["example_id"])
    ranks = at.groupby("example_id")["atp_star_rank"]
    assert all(sorted(g) == list(range(n_heads)) for _, g in ranks)
    # path patching: every head below the last receiver, alone and together, per input
    pa = t["paths"]
    receivers = pa["receivers"].iloc[0].split(",")
    scores = t["detect_scores"]
    assert receivers == list(scores.loc[scores["retrieval_head"], "head_name"])
    last = max(int(r[1:].split("H")[0]) for r in receivers)
    per = pa[pa["kind"] != "same_heads"].groupby(["example_id", "receiver_input"])
    assert per.size().eq(4 * last + 1).all() and set(pa["receiver_input"]) == {"q", "k"}
    assert (pa.loc[pa["kind"] == "sender", "layer"] < last).all()
    # and into the queries and the keys of the same query heads (2 per KV head): the KV groups
    # wholly inside the receivers, when there is one, and every group they touch
    groups = {(h[0], h[1] // 2) for h in ((int(r[1:].split("H")[0]), int(r.split("H")[1]))
                                          for r in receivers)}  # fmt: skip
    inside = {g for g in groups if {f"L{g[0]}H{2 * g[1] + i}" for i in (0, 1)} <= set(receivers)}
    same = pa[pa["kind"] == "same_heads"]
    for comparison, chosen in (("receiver_groups", inside), ("whole_groups", groups)):
        rows = same[same["comparison"] == comparison]
        want = ",".join(f"L{la}H{2 * g + i}" for la, g in sorted(chosen) for i in (0, 1))
        assert set(rows["compared_heads"]) == ({want} if chosen else set())
        assert len(rows) == 2 * pa["example_id"].nunique() * bool(chosen)
        assert (rows["n_kv_groups"] == len(chosen)).all()
    assert len(t["head_patterns"]) == n_heads
    for name in ("report.md", "claims.csv", "figures/retrieval_scores.html", "provenance.json"):
        assert (tiny_study / name).is_file(), name
    prov = json.loads((tiny_study / "provenance.json").read_text())
    assert prov["engine"] == "local" and set(prov["timings"]) >= {"detect_s", "knockout_s"}


def test_the_report_numbers_are_recomputed_from_the_tables(tiny_study):
    """Each stored claim estimate equals a by-hand computation from the stored tables (plain
    pandas, none of mechinterp's claim code), and the report prints it."""
    claims = pd.read_csv(tiny_study / "claims.csv")
    config = read_config(tiny_study)
    report = (tiny_study / "report.md").read_text()
    # sparse: share of heads whose mean score over counted instances exceeds the threshold
    inst = pd.read_parquet(tiny_study / "detect_instances.parquet")
    means = inst[inst["counted"]].groupby(["layer", "head"])["value"].mean()
    sparse = claims[claims["claim"] == "sparse"].iloc[0]
    assert sparse["estimate"] == pytest.approx((means > config.detect.threshold).mean())
    assert f"{sparse['estimate']:.1%}" in report
    # necessary: per example, mean answer-retrieved over the random draws minus the top-k's
    ko = pd.read_parquet(tiny_study / "knockout.parquet")
    ko = ko[ko["k"] == config.claims.k]
    rows = claims[(claims["claim"] == "necessary") & (claims["metric"] == "retrieved")]
    rows = rows[rows["robustness"].ne(True)]  # the robustness rows are checked below
    assert len(rows) == 2 * ko.groupby(["task", "mode"]).ngroups > 0  # both baselines
    assert set(rows.loc[rows["primary"], "baseline"]) == {"layer-matched"}
    for r in rows.itertuples():
        g = ko[(ko["task"] == r.task) & (ko["mode"] == r.mode)]
        top = g[g["condition"] == "top"].set_index("example_id")["retrieved"].astype(float)
        cond = "random" if r.baseline == "layer-matched" else "random_uniform"
        rand = g[g["condition"] == cond].groupby("example_id")["retrieved"].mean()
        assert r.estimate == pytest.approx((rand - top.reindex(rand.index)).mean())
        assert r.n == len(rand)
    # robustness: the same difference per scope and method, the primary scope from step 2
    rb = pd.read_parquet(tiny_study / "robustness.parquet")
    rob = claims[claims["label"].str.contains("scope")]
    assert set(zip(rob["scope"], rob["method"], strict=True)) == {
        ("response", "teacher-forced"), ("query", "teacher-forced"), ("all", "teacher-forced"),
        ("response", "generation")}  # fmt: skip
    assert not rob["primary"].any()
    for r in rob.itertuples():
        src = (
            ko
            if (r.scope, r.method) == (config.knockout.scope, "teacher-forced")
            else rb[
                (rb["scope"] == r.scope) & (rb["method"] == r.method) & (rb["k"] == config.claims.k)
            ]
        )
        g = src[(src["task"] == r.task) & (src["mode"] == r.mode)]
        top = g[g["condition"] == "top"].set_index("example_id")["retrieved"].astype(float)
        cond = "random" if r.baseline == "layer-matched" else "random_uniform"
        rand = g[g["condition"] == cond].groupby("example_id")["retrieved"].mean()
        assert r.estimate == pytest.approx((rand - top.reindex(rand.index)).mean())
    assert "### Where it holds" in report
    # path patching: per same-heads comparison, Σ recovered / Σ gap over the flipped pairs from
    # all upstream heads into the queries, into the keys, and the queries' share of the two
    # (random models rarely flip a pair: the same rows again with every pair counted)
    from mechinterp.experiments.study.claims import path_rows

    paths = pd.read_parquet(tiny_study / "paths.parquet")
    every = pd.DataFrame(path_rows(paths.assign(flipped=True), config.claims))
    for same, rows in (
        (paths[paths["flipped"]], claims[claims["metric"].isin(["recovery_q", "recovery_k",
                                                                 "query_share"])]),
        (paths, every),
    ):  # fmt: skip
        same = same[same["kind"] == "same_heads"]
        assert len(rows) == 3 * same["compared_heads"].nunique()
        for r in rows.itertuples():
            g = same[same["comparison"] == r.comparison]
            assert r.compared_heads == g["compared_heads"].iloc[0]
            moved = (g["value"] - g["corrupt_metric"]).groupby(g["receiver_input"]).sum()
            gap = (g["clean_metric"] - g["corrupt_metric"]).groupby(g["receiver_input"]).sum()
            if r.metric == "query_share" and "no share to split" in r.label:
                assert pd.isna(r.estimate)
            elif r.metric == "query_share":
                assert r.estimate == pytest.approx(moved["q"] / (moved["q"] + moved["k"]))
            else:
                node = r.metric.removeprefix("recovery_")
                assert r.estimate == pytest.approx(moved[node] / gap[node])
    assert len(every) >= 3
    assert paths[paths["kind"] == "same_heads"].empty or "of the *same* query heads" in report
    assert "## What feeds the retrieval heads" in report and "## Screening every head" in report
    # sufficient: mean joint recovery of the retrieval set over the flipped pairs
    patch = pd.read_parquet(tiny_study / "patch.parquet")
    flipped = patch[patch["flipped"] & (patch["kind"] == "set") & (patch["name"] == "retrieval")]
    suff = claims[(claims["claim"] == "sufficient") & claims["primary"]].iloc[0]
    if len(flipped):
        assert suff["estimate"] == pytest.approx(flipped["recovery"].mean())
        assert suff["n"] == flipped["example_id"].nunique()


def test_a_killed_study_resumes_without_recomputing_finished_shards(
    tiny_study_config, tiny_study, tmp_path, kill_after
):
    restore = kill_after(5)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_study(tiny_study_config(), out=out, png=False, progress=False)
    restore()
    run_study(tiny_study_config(), out=out, png=False, progress=False)
    prov = json.loads((out / "provenance.json").read_text())
    total = len(list((tiny_study / "shards").rglob("*.json")))
    assert prov["shards"]["skipped"] == 5
    assert prov["shards"]["computed"] == total - 5
    _assert_same_tables(out, tiny_study)


def test_a_truncated_shard_in_a_finished_study_is_recomputed(
    tiny_study_config, tiny_study, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(tiny_study, out)
    shard = sorted((out / "shards" / "knockout").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.warns(UserWarning, match="unusable"):
        run_study(tiny_study_config(), out=out, png=False, progress=False)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["shards"]["computed"] == 1 and len(prov["shards"]["repaired"]) == 1
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "knockout.parquet"), pd.read_parquet(tiny_study / "knockout.parquet")
    )


def test_ray_and_in_process_studies_give_identical_tables(tiny_study_config, tiny_study, tmp_path):
    import ray  # installed by `make setup` (the `ray` extra): CI must run this test

    out = tmp_path / "ray"
    try:
        run_study(tiny_study_config(), out=out, engine="ray", png=False, progress=False)
    finally:
        ray.shutdown()
    assert json.loads((out / "provenance.json").read_text())["engine"] == "ray"
    _assert_same_tables(out, tiny_study)


def test_figures_and_report_regenerate_from_tables_without_a_model(
    tiny_study, tmp_path, monkeypatch
):
    import mechinterp.models
    from mechinterp.cli import main

    def no_model(*a, **k):
        raise AssertionError("a figure tried to load a model")

    monkeypatch.setattr(mechinterp.models, "load_model", no_model)
    monkeypatch.setattr(ModelSpec, "load", no_model)
    out = tmp_path / "copy"
    shutil.copytree(
        tiny_study, out, ignore=shutil.ignore_patterns("shards", "figures", "report.md")
    )
    assert main(["figures", str(out), "--no-png"]) == 0
    names = {p.name for p in (out / "figures").iterdir()}
    expected = ("retrieval_scores", "niah_knockout", "knockout_vs_k", "patch_recovery",
                "path_patching")  # fmt: skip
    assert names == {f"{n}.html" for n in expected}
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text().count("## ") >= 4
    write_report(out)


def test_a_directory_from_another_config_or_version_is_refused(
    tiny_study_config, tiny_study, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(tiny_study, out)
    other = tiny_study_config(claims=ClaimSettings(k=4))
    with pytest.raises(RunDirError, match="another config .*claims"):
        run_study(other, out=out, png=False, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    cfg["version"] = 0
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunDirError, match="study version 0"):
        run_study(tiny_study_config(), out=out, png=False, progress=False)


def test_each_figure_script_redraws_its_figure_from_the_tables(tiny_study, tmp_path):
    import runpy
    import sys
    from pathlib import Path

    out = tmp_path / "copy"
    shutil.copytree(tiny_study, out, ignore=shutil.ignore_patterns("shards", "figures"))
    figures = Path(__file__).parents[2] / "figures"
    addressed = tmp_path / "addressing"  # the tiny study runs no addressing stage
    shutil.copytree(figures / "study-addressing", addressed,
                    ignore=shutil.ignore_patterns("figures"))  # fmt: skip
    scripts = sorted(figures.glob("study_*.py"))
    assert len(scripts) == 6
    for script in scripts:
        run = addressed if script.stem == "study_address_circuit" else out
        argv = sys.argv
        sys.argv = [str(script), str(run), "--no-png"]
        try:
            with pytest.raises(SystemExit) as done:
                runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = argv
        assert done.value.code == 0
        assert (run / "figures" / f"{script.stem.removeprefix('study_')}.html").is_file()
    from mechinterp.experiments.study.report import figure_main

    assert figure_main("no_such_figure", [str(out)]) == 2


def test_the_report_says_how_many_top_k_heads_pass_the_threshold(tiny_study_config):
    import pandas as pd

    from mechinterp.experiments.study.report import _necessary_text

    config = tiny_study_config()  # ks (1, 2, 4), threshold 0.1
    scores = pd.DataFrame({"rank": [3, 1, 2, 4, 5], "score": [0.1, 0.5, 0.2, 0.0, 0.0]})
    base = pd.DataFrame({"task": ["niah"], "correct": [True], "scorable": [True]})
    text = " ".join(_necessary_text({"detect_scores": scores, "baseline": base}, config))
    # ranks 1, 2 score above 0.1; rank 3 sits exactly at it (not above)
    assert "(score > 0.1): k=1: 1, k=2: 2, k=4: 2." in text


def test_sufficiency_pairs_cover_the_lengths_and_depths():
    from mechinterp.experiments.study.stages import stratified_pairs
    from mechinterp.tasks.example import Document, Example

    def ex(length, depth, needle):
        return Example(
            id=f"n{needle}-L{length}-d{depth}",
            task="niah",
            variant="essays",
            documents=(Document("a haystack", gold=True),),
            question="q",
            answers=("a",),
            meta={"length": length, "depth": depth, "needle_index": needle},
        )

    needles = (2, 4, 5)
    grid = [ex(L, d, n) for L in (256, 512, 1024) for d in (0.0, 0.5, 1.0) for n in needles]
    six = stratified_pairs(grid, 6)
    assert len(six) == 6 and len({e.id for e in six}) == 6
    for key in ("length", "depth", "needle_index"):  # every length, depth and needle, twice each
        counts = pd.Series([e.meta[key] for e in six]).value_counts()
        assert len(counts) == 3 and (counts == 2).all(), counts
    assert len(stratified_pairs(grid, 60)) == 27  # no more pairs than examples


def test_report_and_figures_refuse_a_replaced_config_or_missing_table(
    tiny_study_config, tiny_study, tmp_path, capsys
):
    from mechinterp.cli import main
    from mechinterp.config import to_dict

    out = tmp_path / "copy"
    shutil.copytree(tiny_study, out, ignore=shutil.ignore_patterns("shards"))
    before = {p: (out / p).read_bytes() for p in ("report.md", "claims.csv")}
    other = to_dict(tiny_study_config(claims=ClaimSettings(k=4)))
    (out / "config.json").write_text(json.dumps(other))  # another run's config
    with pytest.raises(RunDirError, match="is not the config its tables were computed from"):
        write_report(out)
    for argv in (["report", str(out)], ["figures", str(out), "--no-png"]):
        assert main(argv) == 2
        assert "is not the config its tables were computed from" in capsys.readouterr().err
    shutil.copy(tiny_study / "config.json", out / "config.json")
    (out / "knockout.parquet").unlink()
    assert main(["report", str(out)]) == 2
    assert "knockout.parquet is missing" in capsys.readouterr().err
    shutil.copy(tiny_study / "knockout.parquet", out / "knockout.parquet")
    (out / "patch.parquet").write_bytes((out / "patch.parquet").read_bytes()[:-8] + b"\0" * 8)
    assert main(["report", str(out)]) == 2
    assert "patch.parquet was altered" in capsys.readouterr().err
    assert {p: (out / p).read_bytes() for p in before} == before  # left untouched
    shutil.copy(tiny_study / "patch.parquet", out / "patch.parquet")
    assert main(["report", str(out)]) == 0
