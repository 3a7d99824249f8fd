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
    args = ["eval", "--model", tiny_dir, "--task", "mdqa", "--variant", "templated-low",
            "--n", "3", "--n-docs", "3", "--max-new-tokens", "3", "--out", str(tmp_path)]
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
    # the same config again reuses the finished run
    mtime = (run / "results.parquet").stat().st_mtime_ns
    assert main(args) == 0 and (run / "results.parquet").stat().st_mtime_ns == mtime


def test_eval_on_user_mdqa_file(tiny_dir, tmp_path):
    args = ["eval", "--model", tiny_dir, "--task", "mdqa", "--data",
            "tests/fixtures/mdqa_sample.jsonl", "--max-new-tokens", "2", "--no-png",
            "--out", str(tmp_path)]
    assert main(args) == 0
    (run,) = tmp_path.iterdir()
    assert set(pd.read_parquet(run / "results.parquet").variant) == {"real"}


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--model", "gpt-17", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'gpt-17'" in err and "smollm2-135m" in err
    assert not any(tmp_path.iterdir())


def test_context_longer_than_the_window_leaves_no_output(tiny_dir, tmp_path, capsys):
    args = ["eval", "--model", tiny_dir, "--lengths", "4000", "--depths", "0.5", "--needles",
            "1", "--out", str(tmp_path)]
    assert main(args) == 2
    assert "longer than the model's context window of 2048" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
