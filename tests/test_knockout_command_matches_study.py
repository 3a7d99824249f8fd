"""`mechinterp knockout` is the study's knockout stage on one task: with the same examples,
ranking, k, mode and seeds its rows (and its summary) are the study's, teacher-forced and
generated alike, and its defaults are the study stage's."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from mechinterp.errors import InputError
from mechinterp.experiments import KnockoutConfig, TaskSpec, run_knockout
from mechinterp.experiments.study.config import (
    AttributionStage,
    ClaimSettings,
    KnockoutStage,
    MdqaSpec,
    NiahSpec,
    PatchStage,
    PathsStage,
    RobustnessStage,
)

#: One study knockout row: k, mode and seed (both draws), on a NIAH grid and synthetic MDQA that a
#: `TaskSpec` also describes (held-out needles 0 and 2 by index; seed 1 differs from detection's).
ROW = {"ks": (2,), "seeds": (1,), "modes": ("uniform_attention",)}
NIAH = {"lengths": (500,), "depths": (0.0, 1.0), "seed": 1}
MDQA = {"n": 2, "n_docs": 2, "variant": "templated-high", "seed": 1}
KEYS = ["example_id", "mode", "k", "condition", "seed"]


@pytest.fixture(scope="module")
def study(tiny_study_config, tmp_path_factory):
    """(model, study config, run directory): the tiny study's knockout stage at ROW, its
    generation rows (robustness) at the same row, one patching pair."""
    from mechinterp.experiments.study import run_study

    base = tiny_study_config()
    knockout = dataclasses.replace(base.knockout, niah=NiahSpec(needles=(0, 2), **NIAH),
                                   mdqa=MdqaSpec(**MDQA), **ROW)  # fmt: skip
    config = tiny_study_config(
        knockout=knockout, claims=ClaimSettings(k=2),
        robustness=RobustnessStage(scopes=(), generate=True),
        patch=PatchStage(n_pairs=1, seeds=(0,), max_tries=2),
        attribution=AttributionStage(enabled=False), paths=PathsStage(inputs=()),
    )  # fmt: skip
    model = config.model.load()
    out = tmp_path_factory.mktemp("study") / "run"
    run_study(config, out=out, model=model, png=False, progress=False)
    return model, config, out


def _command(study, tmp_path, task: TaskSpec, **changes):
    """The command's run directory on `task`, ranked by the study's detection table."""
    model, config, out = study
    k = config.knockout
    settings = {"target": k.target, "max_new_tokens": k.max_new_tokens,
                "examples_per_shard": k.examples_per_shard, **ROW, **changes}  # fmt: skip
    command = KnockoutConfig(model=config.model, task=task,
                             scores=str(out / "detect_scores.parquet"), **settings)  # fmt: skip
    return run_knockout(command, out=tmp_path / "ko", model=model, png=False, progress=False)


def _rows(table: pd.DataFrame, task: str) -> pd.DataFrame:
    part = table[table["task"] == task]
    return part.sort_values(KEYS, na_position="first").reset_index(drop=True)


TASKS = {"niah": TaskSpec(needle_ids=(0, 2), **NIAH), "mdqa": TaskSpec(task="mdqa", **MDQA)}


@pytest.mark.parametrize("task", list(TASKS))
def test_the_command_reproduces_the_study_knockout_rows_and_summary(study, tmp_path, task):
    from mechinterp.experiments.study import knockout_summary
    from mechinterp.experiments.study.report import read_tables

    _, config, out = study
    run = _command(study, tmp_path, TASKS[task])
    tables = read_tables(out)
    mine, theirs = _rows(pd.read_parquet(run / "knockout.parquet"), task), _rows(
        tables["knockout"], task)  # fmt: skip
    # every example the study scored, under every condition: none, top-2, and both draws
    assert len(mine) == len(theirs) == 4 * theirs["example_id"].nunique() > 0
    assert set(mine["condition"]) == {"none", "top", "random", "random_uniform"}
    cols = [*KEYS, "heads", "retrieved", "answer_top1"]
    pd.testing.assert_frame_equal(mine[cols], theirs[cols])
    pd.testing.assert_series_equal(mine["answer_logprob"], theirs["answer_logprob"], rtol=1e-6)
    # the knockout moved the score: the rows compared are not all the clean one
    clean = mine.loc[mine["condition"] == "none", "answer_logprob"].to_numpy()
    top = mine.loc[mine["condition"] == "top", "answer_logprob"].to_numpy()
    assert abs(top - clean).max() > 1e-4
    # the summary row of the command is the study's summary row
    summary = pd.read_csv(run / "summary.csv")
    study_summary = knockout_summary(tables, config)
    study_summary = study_summary[study_summary["task"] == task].reset_index(drop=True)
    assert list(summary.columns) == list(study_summary.columns)
    pd.testing.assert_frame_equal(summary, study_summary, check_dtype=False, atol=1e-9)
    # the baseline is the study's clean answers for this task
    base = pd.read_parquet(run / "baseline.parquet")
    theirs_base = tables["baseline"].query("task == @task").reset_index(drop=True)
    assert list(base["prediction"]) == list(theirs_base["prediction"])
    assert (run / "knockout_vs_k.html").stat().st_size > 1_000


def test_generate_scoring_reproduces_the_study_generation_rows(study, tmp_path):
    from mechinterp.experiments.study.report import read_tables

    _, config, out = study
    run = _command(study, tmp_path, TASKS["niah"], scoring="generate")
    mine = _rows(pd.read_parquet(run / "knockout.parquet"), "niah")
    robust = read_tables(out)["robustness"]
    theirs = _rows(robust[robust["method"] == "generation"], "niah")
    assert len(mine) == len(theirs) > 0 and set(mine["method"]) == {"generation"}
    cols = [*KEYS, "heads", "scope", "retrieved", "prediction"]
    pd.testing.assert_frame_equal(mine[cols], theirs[cols])
    # knocking out heads changes what the model generates on some condition
    by_example = mine.groupby("example_id")["prediction"].nunique()
    assert (by_example > 1).any()


def test_a_scores_table_ranks_as_the_study_ranks(study):
    from mechinterp.experiments.knockout import ranked_table_heads
    from mechinterp.heads import HeadShape

    model, _, out = study
    scores = pd.read_parquet(out / "detect_scores.parquet").sort_values("rank")
    ranked = ranked_table_heads(out / "detect_scores.parquet", HeadShape.of(model))
    assert [str(h) for h in ranked] == list(scores["head_name"])
    # ties (many heads at score 0) are not in layer order, as a plain sort would put them
    tied = scores[scores["score"] == scores["score"].min()]
    assert len(tied) > 2 and list(tied["layer"]) != sorted(tied["layer"])


def test_the_command_defaults_are_the_study_stage_defaults():
    command, stage = KnockoutConfig(heads=("L0H0",)), KnockoutStage()
    for name in ("ks", "seeds", "modes", "draws", "scope", "target", "max_new_tokens",
                 "batch_size", "examples_per_shard"):  # fmt: skip
        assert getattr(command, name) == getattr(stage, name), name
    assert command.scoring == "teacher_forced" and command.level == ClaimSettings().level


def test_a_model_that_answers_nothing_is_told_to_teacher_force_the_gold_answer(study, tmp_path):
    with pytest.raises(InputError, match=r"answered none of the 2 examples.*target=gold"):
        _command(study, tmp_path, TaskSpec(needles=1, **NIAH), target="response")
