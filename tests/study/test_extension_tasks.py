"""The extension over several tasks (MDQA + citation here) on a tiny model: one run per task, the
limited-real baseline, citation F1 as the citation task's performance, the pooled within-task
correlation, and the report regenerated from the tables alone."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mechinterp.experiments.extension import (
    LIMITED,
    ExtensionConfig,
    LofitStage,
    ModelKnockout,
    TaskRun,
    build_data,
    data_args,
    run_extension,
)
from mechinterp.experiments.specs import ModelSpec
from mechinterp.experiments.study.config import DetectStage
from mechinterp.finetune import LofitSpec, LoraSpec

VARIANTS = ("templated-high", "templated-low", "symbolic")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    from mechinterp.models.tiny import tiny_model

    directory = tmp_path_factory.mktemp("ext-tasks-base")
    tiny_model(n_kv_heads=2, directory=directory)
    return ExtensionConfig(
        model=ModelSpec(name=str(directory)), variants=VARIANTS,
        n_train=4, limited=2, n_eval=2, n_docs=5, doc_words=10, max_new_tokens=6,
        lora=LoraSpec(r=2, lr=1e-2, steps=2, save_every=2, max_tokens=4096),
        detect_on="task", n_detect=2, detect=DetectStage(gate=None, top_k=3, max_new_tokens=6),
        knockout=ModelKnockout(ks=(1, 2), seeds=(0,), target="gold"), cross_seeds=(0,),
        lofit=LofitStage(spec=LofitSpec(steps=2, lr=1e-2), top_share=0.25, localised=True),
        tasks=(TaskRun("mdqa", n_docs=3, lofit=True), TaskRun("citation", max_new_tokens=8)),
    )  # fmt: skip


@pytest.fixture(scope="module")
def run(config, tmp_path_factory):
    return run_extension(config, out=tmp_path_factory.mktemp("ext-tasks") / "run", png=False,
                         progress=False)  # fmt: skip


def test_each_task_is_a_whole_extension_run_with_the_task_settings_laid_over(config, run):
    from mechinterp.experiments.extension.report import read_config

    for task in ("mdqa", "citation"):
        sub = read_config(run / task)
        assert sub == config.for_task(next(t for t in config.tasks if t.task == task))
        assert sub.task == task and not sub.tasks and (run / task / "report.md").is_file()
    mdqa, citation = read_config(run / "mdqa"), read_config(run / "citation")
    assert (mdqa.n_docs, mdqa.max_new_tokens, mdqa.lofit is not None) == (3, 6, True)
    assert (citation.n_docs, citation.max_new_tokens, citation.lofit) == (5, 8, None)
    assert citation.detect.max_new_tokens == 8  # a summary is as long in detection
    assert (run / "mdqa" / "lofit_localised.parquet").is_file()
    assert not (run / "citation" / "lofit.parquet").exists()


def test_the_limited_baseline_is_the_reference_on_its_first_examples(config, run):
    args = data_args(config, LIMITED, "train")
    assert args["variant"] == config.reference and args["n"] == 2
    full = build_data(**data_args(config, config.reference, "train"))
    assert [e.id for e in build_data(**args)] == [e.id for e in full[:2]]
    for task in ("mdqa", "citation"):
        losses = pd.read_parquet(run / task / "losses.parquet")
        assert set(losses["variant"]) == {config.reference, LIMITED, *VARIANTS}
        assert (run / task / "checkpoints" / LIMITED / "adapter_config.json").is_file()
    pooled = pd.read_csv(run / "pooled.csv")
    limited = pooled[pooled["model_variant"] == LIMITED]
    assert len(limited) == 2 and not limited["synthetic"].any()
    assert limited["label"].str.startswith("real data (limited").all()


def test_citation_performance_is_citation_f1_and_detection_reads_the_insights(config, run):
    from mechinterp.tasks.prompt import render

    ev = pd.read_parquet(run / "citation" / "eval.parquet")
    heads = pd.read_csv(run / "citation" / "heads.csv").set_index("model_variant")
    want = ev.groupby("model_variant")["citation_f1"].mean()
    assert np.allclose(heads.loc[want.index, "performance"], want)
    mdqa = pd.read_csv(run / "mdqa" / "heads.csv").set_index("model_variant")
    mdqa_ev = pd.read_parquet(run / "mdqa" / "eval.parquet").groupby("model_variant")["f1"]
    assert np.allclose(mdqa.loc[mdqa_ev.mean().index, "performance"], mdqa_ev.mean())
    pooled = pd.read_csv(run / "pooled.csv")
    assert set(pooled.groupby("task")["metric"].first().items()) == {
        ("mdqa", "F1"), ("citation", "citation F1")}  # fmt: skip
    # the citation examples' needle spans are their insights, planted verbatim
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(config.model.name)
    sub = config.for_task(config.tasks[1])
    ex = build_data(**data_args(sub, sub.reference, "detect"))[0]
    prompt = render(ex, tok)
    spans = prompt.spans["needle"]
    assert len(spans) == len(ex.meta["insights"]) == 2
    for (a, b), ins in zip(spans, ex.meta["insights"], strict=True):
        assert ins["text"] in tok.decode(prompt.input_ids[a:b])
    per = pd.read_parquet(run / "citation" / "detect_instances.parquet")
    assert set(per["instance_id"]) == {e.id for e in build_data(**data_args(sub, sub.reference,
                                                                            "detect"))}


def test_the_pooled_correlation_ranks_within_tasks(config, run):
    from mechinterp.analysis.stats import stratified_correlation

    pooled = pd.read_csv(run / "pooled.csv")
    assert len(pooled) == 2 * (2 + len(VARIANTS))
    syn = pooled[pooled["synthetic"]]
    assert set(syn["model_variant"]) == set(VARIANTS)
    corr = json.loads((run / "correlation.json").read_text())
    assert set(corr) == {"pooled_within_task", "per_task", "pooled_naive"}
    pw = corr["pooled_within_task"]
    try:
        want = stratified_correlation(syn["recall"], syn["performance"], syn["task"],
                                      n_boot=config.claims.n_boot)  # fmt: skip
    except ValueError as e:  # a random tiny model may tie everything: then so must the table
        assert pw["undefined"] == str(e)
    else:
        assert pw["estimate"] == pytest.approx(want.estimate)
        assert pw["p_permutation"] == pytest.approx(want.p_permutation)
    claims = pd.read_csv(run / "claims.csv")
    assert claims["primary"].sum() == 1 and len(claims) == 4  # pooled; 2 tasks; naive
    assert list(pd.read_csv(run / "claims_headline.csv")["claim"]) == ["recall_predicts"]


def test_the_pooled_report_regenerates_from_the_tables_alone(config, run, monkeypatch):
    from mechinterp import cli
    from mechinterp.models import load as load_module

    before = pd.read_csv(run / "pooled.csv")
    (run / "report.md").unlink()
    (run / "citation" / "report.md").unlink()

    def no_model(*a, **k):
        raise AssertionError("the report must not load a model")

    monkeypatch.setattr(load_module, "load_model", no_model)
    assert cli.main(["report", str(run)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(run / "pooled.csv"), before)
    report = (run / "report.md").read_text()
    assert "## Verdict" in report and "[citation](citation/report.md)" in report
    assert "## mdqa: LoFiT localised to retrieval heads" in report
    assert (run / "citation" / "report.md").is_file()  # every task's report is rewritten too
    citation_report = (run / "citation" / "report.md").read_text()
    assert "| cite every document (baseline) | 0.40 |" in citation_report
    assert cli.main(["figures", str(run), "--no-png"]) == 0
    assert (run / "figures" / "recall_by_task.html").is_file()


def test_a_task_directory_from_another_config_is_refused(config, run, tmp_path):
    import shutil

    from mechinterp.experiments.extension.tasks import analyse_tasks

    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "shards"))
    cfg = json.loads((copy / "citation" / "config.json").read_text())
    cfg["n_eval"] = 3
    (copy / "citation" / "config.json").write_text(json.dumps(cfg))
    before = (copy / "report.md").read_text()
    with pytest.raises(ValueError, match="is not the config its tables were computed from"):
        analyse_tasks(copy, png=None)
    assert (copy / "report.md").read_text() == before  # left untouched
    shutil.rmtree(copy / "citation")  # another task's finished directory in its place
    shutil.copytree(copy / "mdqa", copy / "citation")
    with pytest.raises(ValueError, match="is not task 'citation'"):
        analyse_tasks(copy, png=None)
    assert (copy / "report.md").read_text() == before
    (copy / "citation" / "heads.csv").unlink()
    with pytest.raises(ValueError, match="task 'citation' has not finished"):
        analyse_tasks(copy, png=None)


def test_bad_multi_task_configs_are_refused():
    with pytest.raises(ValueError, match="repeat a task"):
        ExtensionConfig(tasks=(TaskRun("mdqa"), TaskRun("mdqa")))
    with pytest.raises(ValueError, match="limited must lie in"):
        ExtensionConfig(n_train=8, limited=8)
    assert ExtensionConfig(tasks=(TaskRun("mdqa"), TaskRun("citation"))).slug.endswith(
        "mdqa+citation")


def test_the_three_task_config_loads():
    from pathlib import Path

    from mechinterp.config import load_config

    path = Path(__file__).parents[2] / "experiments" / "extension-3task-mini.yaml"
    config = load_config(ExtensionConfig, path)
    assert [t.task for t in config.tasks] == ["mdqa", "multihop", "citation"]
    assert [t.lofit for t in config.tasks] == [True, False, False]
    assert config.limited == 16 and len(config.variants) == 4
    assert config.for_task(config.tasks[2]).detect.max_new_tokens == 64
