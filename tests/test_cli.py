"""The `mechinterp eval` command end to end on a tiny model directory."""

import json
import runpy
import shutil

import pandas as pd
import pytest

from mechinterp.cli import main


@pytest.fixture()
def tiny_dir(tiny_gqa):
    return tiny_gqa.mechinterp_card.source


def test_eval_writes_a_complete_run_directory(tiny_dir, tmp_path, capsys):
    args = ["eval", "--model", tiny_dir, "--task", "mdqa", "--task.variant", "templated-low",
            "--task.n", "3", "--task.n-docs", "3", "--max-new-tokens", "3", "--root", str(tmp_path)]
    assert main(args) == 0
    (run,) = tmp_path.iterdir()
    df = pd.read_parquet(run / "results.parquet")
    assert len(df) == 3 and set(df.variant) == {"templated-low"}
    assert json.loads((run / "config.json").read_text())["task"]["variant"] == "templated-low"
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["model_card"]["n_kv_heads"] == 2 and prov["n_examples"] == 3
    assert len((run / "examples.jsonl").read_text().splitlines()) == 3
    png = run / "accuracy.png"
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        assert png.stat().st_size > 5_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "accuracy" in capsys.readouterr().out
    # the figure script regenerates the heatmap from the stored table alone
    fig_main = runpy.run_path("figures/niah_accuracy.py")["main"]
    assert fig_main([str(run), "--out", str(tmp_path / "fig"), "--value", "f1"]) == 0
    html = (tmp_path / "fig" / "niah_f1.html").read_text()
    assert "f1 by context length" not in html and "NIAH f1" in html
    # the same config again reuses every finished shard
    assert json.loads((run / "provenance.json").read_text())["shards"]["computed"] == 1
    assert main(args) == 0
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["shards"] == {"computed": 0, "skipped": 1, "repaired": []}


def test_eval_on_user_mdqa_file(tiny_dir, tmp_path):
    args = ["eval", "--model", tiny_dir, "--task", "mdqa", "--data",
            "tests/fixtures/mdqa_sample.jsonl", "--max-new-tokens", "2", "--no-png",
            "--root", str(tmp_path)]
    assert main(args) == 0
    (run,) = tmp_path.iterdir()
    assert set(pd.read_parquet(run / "results.parquet").variant) == {"real"}


@pytest.mark.parametrize("data", [None, "tests/fixtures/summhay_sample.json"])
def test_eval_on_the_citation_task_reports_citation_f1(tiny_dir, tmp_path, data):
    source = ["--data", data] if data else ["--task.variant", "templated-low", "--task.n", "2"]
    args = ["eval", "--model", tiny_dir, "--task", "citation", *source, "--task.n-docs", "4",
            "--max-new-tokens", "3", "--no-png", "--root", str(tmp_path)]
    assert main(args) == 0
    (run,) = tmp_path.iterdir()
    df = pd.read_parquet(run / "results.parquet")
    assert len(df) == 2 and set(df.task) == {"citation"}
    assert df["citation_f1"].between(0, 1).all()
    assert set(df.variant) == ({"real"} if data else {"templated-low"})


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--model", "gpt-17", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'gpt-17'" in err and "smollm2-135m" in err
    assert not any(tmp_path.iterdir())


def test_context_longer_than_the_window_leaves_no_output(tiny_dir, tmp_path, capsys):
    args = ["eval", "--model", tiny_dir, "--lengths", "4000", "--depths", "0.5", "--needles",
            "1", "--root", str(tmp_path)]
    assert main(args) == 2
    assert "longer than the model's context window of 2048" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_detect_writes_scores_instances_wu_json_and_heatmap(tiny_dir, tmp_path, capsys):
    from mechinterp.analysis.wu_json import read_wu_scores

    args = ["detect", "--model", tiny_dir, "--detector", "induction", "--seq-len", "12",
            "--n-sequences", "3", "--root", str(tmp_path)]
    assert main(args) == 0
    (run,) = tmp_path.iterdir()
    assert run.name.startswith("detect-induction-")
    scores = pd.read_parquet(run / "scores.parquet")
    assert len(scores) == 2 * 4 and sorted(scores["rank"]) == list(range(1, 9))
    assert set(scores.columns) >= {"layer", "head", "head_name", "score", "n_instances", "model",
                                   "task", "config_hash", "detector"}
    assert scores["n_instances"].eq(3).all() and scores["frequency"].isna().all()
    assert len(pd.read_parquet(run / "per_instance.parquet")) == 3 * 8
    means, per_head = read_wu_scores(run / "scores_wu.json")
    by_head = scores.set_index(["layer", "head"])["score"]
    assert all(len(v) == 3 for v in per_head.values())
    assert all(abs(means[la, h].item() - s) < 1e-6 for (la, h), s in by_head.items())
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        assert (run / "heads.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "head_name" in out and "of 8 heads score > 0.1" in out
    fig_main = runpy.run_path("figures/head_scores.py")["main"]
    assert fig_main([str(run), "--out", str(tmp_path / "fig"), "--top-k", "3"]) == 0
    assert "induction score" in (tmp_path / "fig" / "heads_score.html").read_text()
    assert fig_main([str(run), "--value", "frequency", "--out", str(tmp_path / "f")]) == 2


def test_detect_retrieval_refuses_when_no_instance_passes_the_gate(tiny_dir, tmp_path, capsys):
    args = ["detect", "--model", tiny_dir, "--lengths", "300", "--depths", "0.5", "--needles",
            "2", "--max-new-tokens", "3", "--no-png", "--root", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no detection instance passed the success gate" in err and "0% of 2" in err
    (failed,) = tmp_path.iterdir()  # its shards are kept; no table, no sealed provenance
    assert not (failed / "scores.parquet").exists() and not (failed / "provenance.json").exists()
    assert len(list((failed / "shards").rglob("*.parquet"))) == 1
    # without the gate every instance counts (another config: another directory)
    assert main(args + ["--gate", "none"]) == 0
    (run,) = set(tmp_path.iterdir()) - {failed}
    instances = pd.read_parquet(run / "instances.parquet")
    assert len(instances) == 2 and instances["counted"].all()
    assert (instances["needle_end"] > instances["needle_start"]).all()


def test_detect_qr_with_calibration_on_documents(tiny_dir, tmp_path):
    args = ["detect", "--model", tiny_dir, "--detector", "qr", "--calibrate", "--task", "mdqa",
            "--task.n", "2", "--task.n-docs", "2", "--no-png", "--root", str(tmp_path)]
    assert main(args) == 0
    (run,) = tmp_path.iterdir()
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["settings"]["calibrated"] is True and prov["n_counted"] == 2


def _sets(**keys) -> list[str]:
    """`--set key=value` for each config key (robust to how the flags are spelled)."""
    return [a for k, v in keys.items() for a in ("--set", f"{k}={v}")]


def test_knockout_writes_the_study_tables_top_vs_random_rows(tiny_dir, tmp_path, capsys):
    # the study's defaults: both modes, layer-matched and uniform draws, teacher-forced scoring
    # (a random model answers nothing, so the gold answer is teacher-forced)
    args = ["knockout", "--model", tiny_dir, "--heads", "L1H1,L0H2,L1H0",
            *_sets(ks="[1,2]", seeds="[0,1]", target="gold", max_new_tokens=2,
                   **{"task.task": "mdqa", "task.n": 2, "task.n_docs": 2}),
            "--root", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    (run,) = tmp_path.iterdir()
    df = pd.read_parquet(run / "knockout.parquet")
    assert (df["answer_logprob"] < 0).all()
    # knocking heads out moves the teacher-forced score
    none = df[df.condition == "none"].set_index("example_id")["answer_logprob"]
    top = df[(df.condition == "top") & (df.k == 2)].groupby("example_id")["answer_logprob"].first()
    assert (top - none).abs().max() > 1e-3
    # 1 baseline + 2 modes × 2 ks × (top + 2 draws × 2 seeds) conditions, 2 examples each
    assert len(df) == (1 + 2 * 2 * 5) * 2
    top = df[df.condition == "top"].drop_duplicates(["mode", "k"])
    assert sorted(top.heads.unique()) == ["L1H1", "L1H1 L0H2"]
    rand = df[df.condition.isin(["random", "random_uniform"])]
    assert not any(h in {"L1H1", "L0H2"} for hs in rand.heads for h in hs.split())
    assert (rand.heads.str.split().str.len() == rand.k).all()
    # layer-matched draws (condition random) take the top-k's layers: L1 and L0 at k=2
    matched = df[(df.condition == "random") & (df.k == 2)].heads.str.findall(r"L(\d+)H")
    assert all(sorted(layers) == ["0", "1"] for layers in matched)
    summary = pd.read_csv(run / "summary.csv")
    assert set(summary.condition) == {"none", "top", "random", "random_uniform"}
    assert {"task", "value", "lo", "hi"} <= set(summary.columns) and summary.n.eq(2).all()
    assert len(pd.read_parquet(run / "baseline.parquet")) == 2
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        assert (run / "knockout_vs_k.png").read_bytes()[:4] == b"\x89PNG"
    assert "condition" in capsys.readouterr().out


def test_knockout_takes_a_detection_table_and_refuses_bad_rankings(tiny_dir, tmp_path, capsys):
    det = ["detect", "--model", tiny_dir, "--detector", "previous_token", "--seq-len", "8",
           "--n-sequences", "2", "--no-png", "--root", str(tmp_path / "det")]
    assert main(det) == 0
    (det_run,) = (tmp_path / "det").iterdir()
    ko = ["knockout", "--model", tiny_dir, "--scores", str(det_run),
          *_sets(ks="[2]", seeds="[3]", target="gold", max_new_tokens=1,
                 **{"task.task": "mdqa", "task.n": 1, "task.n_docs": 2}),
          "--no-png", "--root", str(tmp_path / "ko")]  # fmt: skip
    assert main(ko) == 0
    (ko_run,) = (tmp_path / "ko").iterdir()
    scores = pd.read_parquet(det_run / "scores.parquet").sort_values("rank")
    top2 = " ".join(scores.head_name.head(2))
    table = pd.read_parquet(ko_run / "knockout.parquet")
    assert set(table.query("condition == 'top'").heads) == {top2}
    capsys.readouterr()
    assert main(ko + ["--heads", "L0H0"]) == 2
    assert "exactly one of --heads" in capsys.readouterr().err
    assert main(ko[:3] + ["--heads", "L0H0"] + ko[5:]) == 2  # k=2 but one ranked head
    assert "k=2 exceeds the 1 ranked heads" in capsys.readouterr().err
    bad = ["knockout", "--model", tiny_dir, "--heads", "L7H0",
           *_sets(ks="[1]", **{"task.task": "mdqa", "task.n": 1, "task.n_docs": 2}),
           "--no-png", "--root", str(tmp_path / "bad")]  # fmt: skip
    assert main(bad) == 2
    assert "outside the model" in capsys.readouterr().err


def test_patch_writes_per_head_recovery_for_each_instance(tiny_dir, tmp_path, capsys):
    args = ["patch", "--model", tiny_dir, "--lengths", "400", "--depths", "0.5", "--needles", "2",
            "--root", str(tmp_path)]
    assert main(args) == 0
    (run,) = tmp_path.iterdir()
    df = pd.read_parquet(run / "patch.parquet")
    assert len(df) == 2 * 2 * 4 and df["example_id"].nunique() == 2
    one = df[df.example_id == df.example_id.iloc[0]]
    assert one["clean_metric"].nunique() == 1 and (one["value"] != one["corrupt_metric"]).any()
    heads = pd.read_parquet(run / "heads.parquet")
    assert len(heads) == 8 and "recovery" in heads
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        assert (run / "recovery.png").read_bytes()[:4] == b"\x89PNG"
    assert "head_name" in capsys.readouterr().out


def test_atp_screens_every_head_and_verifies_the_top_exactly(tiny_dir, tmp_path, capsys):
    from mechinterp.experiments import ModelSpec, PatchConfig, TaskSpec, run_command
    from mechinterp.experiments.patch import PATCH

    args = ["atp", "--model", tiny_dir, "--lengths", "400", "--depths", "0.5", "--needles", "2",
            "--verify-top", "3", "--fn-sample", "2", "--root", str(tmp_path / "atp")]  # fmt: skip
    assert main(args) == 0
    (run,) = (tmp_path / "atp").iterdir()
    df = pd.read_parquet(run / "atp.parquet")
    assert len(df) == 2 * 8 and df.groupby("example_id")["exact"].count().eq(3 + 2).all()
    verified = df.dropna(subset=["exact"])
    top, drawn = verified[~verified["sampled"]], verified[verified["sampled"]]
    assert (top["atp_star_rank"] < 3).all() and (drawn["atp_star_rank"] >= 3).all()
    # the verified values are exact per-head patching's, from `mechinterp patch` on the same pairs
    config = PatchConfig(model=ModelSpec(name=tiny_dir),
                         task=TaskSpec(lengths=(400,), depths=(0.5,), needles=2))  # fmt: skip
    patch = pd.read_parquet(run_command(PATCH, config, tmp_path / "patch", png=False)
                            / "patch.parquet")  # fmt: skip
    both = verified.merge(patch, on=["example_id", "head_name"])
    assert len(both) == 10
    assert both["exact"].to_numpy() == pytest.approx(both["value"].to_numpy(), abs=1e-5)
    # the diagnostic: sampled heads above 5 % of the gap, and the bound on the 5 unverified
    pairs = pd.read_parquet(run / "pairs.parquet").set_index("example_id")
    for ex, g in both[both["sampled"]].groupby("example_id"):
        gap = abs(g["clean_metric_x"].iloc[0] - g["corrupt_metric_x"].iloc[0])
        found = int(((g["value"] - g["corrupt_metric_x"]).abs() > 0.05 * gap).sum())
        assert pairs.loc[ex, "fn_found"] == found
        assert found <= pairs.loc[ex, "fn_max_above"] <= found + 3
    assert "atp_star_recovery" in capsys.readouterr().out


def test_path_patch_writes_every_sender_per_receiver_input(tiny_dir, tmp_path, capsys):
    args = ["path-patch", "--model", tiny_dir, "--lengths", "400", "--depths", "0.5",
            "--needles", "1", "--heads", "L1H1,L1H3", "--inputs", "q,k,v", "--no-png",
            "--root", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    (run,) = tmp_path.iterdir()
    df = pd.read_parquet(run / "paths.parquet")
    assert set(df["receiver_input"]) == {"q", "k", "v"}
    senders = df[df["kind"] == "sender"]
    assert sorted(senders["head_name"].unique()) == ["L0H0", "L0H1", "L0H2", "L0H3"]
    assert (senders["value"] != senders["corrupt_metric"]).any()
    assert len(pd.read_parquet(run / "senders.parquet")) == 3 * 4
    assert "receiver_input" in capsys.readouterr().out
    bad = ["path-patch", "--model", tiny_dir, "--lengths", "400", "--depths", "0.5",
           "--needles", "1", "--heads", "L0H1", "--root", str(tmp_path / "bad")]  # fmt: skip
    assert main(bad) == 2
    assert "layer 0" in capsys.readouterr().err


def test_corruption_replaces_one_answer_token_with_another(tiny_gqa, smollm):
    from mechinterp.evaluate import render_all
    from mechinterp.tasks.corrupt import corrupt_answer
    from mechinterp.tasks.niah import niah_grid

    for model in (tiny_gqa, smollm):
        ex = niah_grid(model.tokenizer, lengths=[400], depths=[0.5], needles=2)
        for p in render_all(model, ex):
            c = corrupt_answer(p, model.tokenizer, seed=0)
            diff = [i for i, (a, b) in enumerate(zip(c.clean, c.corrupt, strict=True)) if a != b]
            assert diff == [c.position] == [p.span("answer")[0]]
            assert c.clean_token == p.input_ids[c.position] != c.corrupt_token
            assert c == corrupt_answer(p, model.tokenizer, seed=0)  # seeded
    word = smollm.tokenizer.decode([c.corrupt_token]).strip()
    from mechinterp.tasks.corrupt import REPLACEMENTS

    assert word in REPLACEMENTS


def scores_csv(path, scores):
    """A head-score table for the 2-layer, 4-head tiny model: {"L0H1": 0.5, ...}, others 0."""
    rows = [{"layer": la, "head": h, "score": scores.get(f"L{la}H{h}", 0.0)}
            for la in range(2) for h in range(4)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def test_patch_takes_a_head_list_or_marks_a_score_tables_heads(tiny_dir, tmp_path, capsys):
    base = ["patch", "--model", tiny_dir, "--lengths", "400", "--depths", "0.5", "--needles", "1",
            "--no-png"]
    assert main(base + ["--heads", "L1H2,L0H0", "--root", str(tmp_path / "list")]) == 0
    (run,) = (tmp_path / "list").iterdir()
    df = pd.read_parquet(run / "patch.parquet")
    assert sorted(df["head_name"]) == ["L0H0", "L1H2"] and df["in_set"].all()
    table = scores_csv(tmp_path / "s.csv", {"L1H3": 0.4, "L0H2": 0.2, "L1H0": 0.05})
    assert main(base + ["--scores", table, "--root", str(tmp_path / "table")]) == 0
    (run,) = (tmp_path / "table").iterdir()
    df = pd.read_parquet(run / "patch.parquet")
    assert len(df) == 8 and sorted(df.loc[df.in_set, "head_name"]) == ["L0H2", "L1H3"]
    sets = pd.read_csv(run / "sets.csv").set_index("set")
    assert sets.loc["selected", "n_heads"] == 2 and sets.loc["rest", "n_heads"] == 6
    picked = df[df.in_set].groupby("example_id")["recovery"].sum().mean()
    assert sets.loc["selected", "total"] == pytest.approx(picked)
    assert "in_set" in capsys.readouterr().out
    assert main(base + ["--scores", table, "--threshold", "0.9", "--root", str(tmp_path)]) == 2
    assert "picks no heads" in capsys.readouterr().err


def test_cross_patch_patches_donor_head_sets_into_the_model(tiny_dir, tmp_path, capsys):
    from mechinterp.models.tiny import tiny_model

    donor = tiny_model(n_kv_heads=2, seed=1, directory=tmp_path / "donor")
    donor_dir = donor.mechinterp_card.source
    base = ["cross-patch", "--model", tiny_dir, "--donor", donor_dir, "--lengths", "400",
            "--depths", "0.5", "--needles", "2", "--max-new-tokens", "3", "--no-png"]
    theirs = scores_csv(tmp_path / "donor.csv", {"L1H3": 0.5, "L0H2": 0.3, "L1H1": 0.2})
    ours = scores_csv(tmp_path / "ours.csv", {"L1H3": 0.6, "L1H1": 0.4, "L0H0": 0.2})
    args = base + ["--scores", theirs, "--recipient-scores", ours, "--seeds", "0,1",
                   "--root", str(tmp_path / "sets")]
    assert main(args) == 0
    (run,) = (tmp_path / "sets").iterdir()
    sets = json.loads((run / "head_sets.json").read_text())
    assert sets["inter"] == ["L1H3", "L1H1"] and sets["compl"] == ["L0H2"]
    assert set(sets) == {"inter", "compl", "rand-s0", "rand-s1"}
    assert not set(sets["rand-s0"]) & {"L1H3", "L0H2", "L1H1", "L0H0"}
    df = pd.read_parquet(run / "cross.parquet")
    assert len(df) == 6 * 2 and set(df["donor"]) == {"donor"}  # the card id of its folder
    summary = pd.read_csv(run / "summary.csv").set_index("condition")
    assert summary.loc["donor", "answer_logprob_recovery"] == pytest.approx(1.0)
    assert summary.loc["inter", "n_heads"] == 2
    assert "answer_logprob_recovery" in capsys.readouterr().out
    mha = tiny_model(n_kv_heads=4, directory=tmp_path / "mha").mechinterp_card.source
    bad = ["cross-patch", "--model", tiny_dir, "--donor", mha, "--heads", "L0H0", "--lengths",
           "400", "--depths", "0.5", "--needles", "1", "--no-png", "--root", str(tmp_path / "bad")]
    assert main(bad) == 2
    assert "differ in shape" in capsys.readouterr().err
    assert main(bad[:5] + ["--recipient-scores", ours, "--root", str(tmp_path / "bad")]) == 2
    assert "needs heads" in capsys.readouterr().err
    theirs_only = bad[:5] + ["--heads", "L0H0", "--recipient-scores", ours]
    assert main(theirs_only + ["--root", str(tmp_path / "bad")]) == 2
    assert "--recipient-scores goes with --scores" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
