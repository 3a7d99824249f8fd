"""The extension report's citation table on planted responses: every model rescored from its
stored responses, beside the cite-every-document baseline on the same evaluation examples."""

from __future__ import annotations

import pandas as pd
import pytest

from mechinterp.experiments.extension import ExtensionConfig, build_data, data_args
from mechinterp.experiments.extension.report import citation_baseline, citation_lines


@pytest.fixture
def config():
    return ExtensionConfig(task="citation", n_eval=3, n_docs=5, doc_words=10)


@pytest.fixture
def tables(config):
    examples = build_data(**data_args(config, config.reference, "eval"))
    rows = []
    for ex in examples:
        bracketed = ex.answers[0]  # the reference summary: [1][4] after each insight
        worded = "\n".join(f"- {ins['text']} (Documents {' and '.join(map(str, ins['docs']))})"
                           for ins in ex.meta["insights"])  # fmt: skip
        for variant, text in (("realistic-high", bracketed), ("realistic-low", worded),
                              ("symbolic", "- Nothing here [1][2]")):  # fmt: skip
            # stored scores from an older scorer: the table must not read them
            rows.append({"model_variant": variant, "example_id": ex.id, "prediction": text,
                         "citation_f1": -1.0, "correct": False})  # fmt: skip
    return {"eval": pd.DataFrame(rows)}


def test_models_are_rescored_beside_the_cite_all_baseline(config, tables):
    rows = citation_baseline(tables, config).set_index("model_variant")
    assert list(rows.index) == ["realistic-high", "realistic-low", "symbolic", "cite-all"]
    assert (rows["n"] == 3).all()
    for perfect in ("realistic-high", "realistic-low"):  # "[1][4]" and "(Documents 1 and 4)"
        assert rows.loc[perfect, ["citation_f1", "coverage", "correct"]].tolist() == [1, 1, 1]
    assert rows.loc["symbolic", ["citation_f1", "coverage", "correct"]].tolist() == [0, 0, 0]
    # 2 insights, each in 2 of the 5 documents: 4 gold pairs of 10 cited
    assert rows.loc["cite-all", "citation_precision"] == pytest.approx(0.4)
    assert rows.loc["cite-all", "citation_recall"] == 1.0
    assert rows.loc["cite-all", "citation_f1"] == pytest.approx(0.8 / 1.4)
    assert rows.loc["cite-all", "correct"] == 0.0
    lines = citation_lines(tables, config)
    assert "| cite every document (baseline) | 0.40 | 1.00 | 0.57 | 1.00 | 0.00 | 3 |" in lines
    assert any(line.startswith("| reference (realistic needles") for line in lines)


def test_the_table_is_for_the_citation_task_and_for_its_own_examples(config, tables):
    import dataclasses

    assert citation_lines(tables, dataclasses.replace(config, task="mdqa")) == []
    other = dataclasses.replace(config, n_eval=2)  # builds only the first two examples
    with pytest.raises(ValueError, match="rerun the evaluation with this config"):
        citation_baseline(tables, other)
    assert "Not computed: the eval table holds examples" in citation_lines(tables, other)[-1]


def test_the_rescoring_script_scores_before_and_after_the_citation_parser(config, tables, tmp_path):
    import runpy

    from mechinterp import store
    from mechinterp.config import to_dict

    rescore = runpy.run_path("benchmarks/rescore_citation.py", run_name="rescore")["rescore"]
    run = tmp_path / "run" / "citation"  # a multi-task run's citation directory
    store.write_json(run / "config.json", to_dict(config))
    # without the responses only the baseline is scored
    (base,) = rescore(run.parent).to_dict("records")
    assert base["model_variant"] == "cite-all" and base["n"] == 3
    assert base["before_citation_f1"] == base["after_citation_f1"] == pytest.approx(0.8 / 1.4)
    assert (base["before_correct"], base["after_correct"]) == (1.0, 0.0)  # F1 ≥ 0.5 passed it
    store.write_table(tables["eval"], run / "eval.parquet")
    rows = rescore(run).set_index("model_variant")
    assert list(rows.index) == ["realistic-high", "realistic-low", "symbolic", "cite-all"]
    # "[1][4]" reads the same before and after; "(Documents 1 and 4)" only after
    f1 = ["before_citation_f1", "after_citation_f1"]
    assert rows.loc["realistic-high", f1].tolist() == [1, 1]
    assert rows.loc["realistic-low", f1].tolist() == [0, 1]
    assert rows.loc["realistic-low", "before_coverage"] == 1.0  # covered, but no citation read
    assert rows.loc["realistic-low", "label"] == "realistic-low"
