"""Study inputs: the YAML configs, held-out needle grids, answer location, corruption offsets,
and the CLI's errors for bad configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from mechinterp.config import ConfigError, load_config
from mechinterp.experiments.study import StudyConfig

EXPERIMENTS = Path(__file__).parents[2] / "experiments"


def test_the_demo_yaml_spells_out_the_default_config():
    assert load_config(StudyConfig, EXPERIMENTS / "study.yaml") == StudyConfig()


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("study*.yaml")), ids=lambda p: p.name)
def test_every_experiment_config_loads(path):
    assert isinstance(load_config(StudyConfig, path), StudyConfig)


def test_bad_study_configs_are_refused_with_the_key_named(tmp_path):
    with pytest.raises(ConfigError, match=r"knockout\.kss.*did you mean 'ks'"):
        load_config(StudyConfig, overrides=["knockout.kss=[1]"])
    with pytest.raises(ConfigError, match="claims.k=7 must be one of knockout.ks"):
        load_config(StudyConfig, overrides=["claims.k=7"])
    with pytest.raises(ConfigError, match="shares needles"):
        load_config(StudyConfig, overrides=["knockout.niah.needles=[0]", "knockout.niah.seed=0"])
    with pytest.raises(ConfigError, match="study version 3"):
        load_config(StudyConfig, overrides=["version=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("knockout: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(StudyConfig, bad)


def test_the_cli_reports_config_errors_without_a_traceback(capsys):
    from mechinterp.cli import main

    assert main(["study", "--set", "detect.niah.lenghts=[256]"]) == 2
    err = capsys.readouterr().err
    assert "detect.niah.lenghts" in err and "lengths" in err and "Traceback" not in err
    assert main(["study", "--set", "knockout.ks=[1,2]", "--print-config"]) == 2  # claims.k=10
    assert main(["figures", "/nonexistent/run"]) == 2


def test_needle_indices_select_held_out_needles(tiny_gqa):
    from mechinterp.tasks.niah import NEEDLES, niah_grid

    grid = niah_grid(tiny_gqa.tokenizer, lengths=[600], depths=[0.5], needles=[5, 2])
    assert [e.meta["needle_index"] for e in grid] == [5, 2]
    assert grid[0].answers == (NEEDLES[5].answer,) and grid[0].id.startswith("niah-n5-")
    with pytest.raises(ValueError, match="needles repeats 1"):
        niah_grid(tiny_gqa.tokenizer, lengths=[600], depths=[0.5], needles=[1, 1])


def test_locate_answer_finds_the_answer_tokens_in_a_response(tiny_gqa):
    from mechinterp.evaluate import locate_answer

    tok = tiny_gqa.tokenizer
    ids = tok.encode("It is Blue Harmonica.", add_special_tokens=False)
    start, end = locate_answer(tok, ids, "blue harmonica")
    assert tok.decode(ids[start:end]) == "Blue Harmonica"
    assert locate_answer(tok, ids, "green") is None


def test_corrupt_answer_can_replace_a_later_answer_token(tiny_gqa):
    from mechinterp.evaluate import render_all
    from mechinterp.tasks.corrupt import corrupt_answer
    from mechinterp.tasks.niah import niah_grid

    (ex,) = niah_grid(tiny_gqa.tokenizer, lengths=[600], depths=[0.5], needles=[2])
    (prompt,) = render_all(tiny_gqa, [ex])
    a0, a1 = prompt.spans["answer"][0]
    c = corrupt_answer(prompt, tiny_gqa.tokenizer, offset=3)
    assert c.position == a0 + 3
    changed = [i for i, (x, y) in enumerate(zip(c.clean, c.corrupt, strict=True)) if x != y]
    assert changed == [a0 + 3]
    with pytest.raises(ValueError, match="offset"):
        corrupt_answer(prompt, tiny_gqa.tokenizer, offset=a1 - a0)
