"""The extension pipeline end to end on a tiny model and tiny data, and its resume."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mechinterp.experiments.extension import (
    REFERENCE_LABEL,
    ExtensionConfig,
    LofitStage,
    ModelKnockout,
    run_extension,
)
from mechinterp.experiments.specs import ModelSpec
from mechinterp.experiments.study.config import DetectStage, NiahSpec
from mechinterp.finetune import LofitSpec, LoraSpec


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    from mechinterp.models.tiny import tiny_model

    directory = tmp_path_factory.mktemp("ext-base")
    tiny_model(n_kv_heads=2, directory=directory)
    return ExtensionConfig(
        model=ModelSpec(name=str(directory)),
        variants=("templated-high", "templated-low", "symbolic"),
        n_train=4, n_eval=2, n_docs=2, doc_words=20, max_new_tokens=6,
        lora=LoraSpec(r=2, lr=1e-2, steps=3, save_every=3),
        detect=DetectStage(niah=NiahSpec(needles=(0,), lengths=(400,), depths=(0.5,)),
                           gate=None, top_k=3, max_new_tokens=6),
        knockout=ModelKnockout(ks=(1, 2), seeds=(0,), target="gold"),  # random model: never answers
        cross_seeds=(0,),
        lofit=LofitStage(spec=LofitSpec(steps=2, lr=1e-2), top_share=0.25, l1_sweep=(0.0, 100.0),
                         localised=True),
    )  # fmt: skip


def test_the_pipeline_runs_end_to_end_and_resumes_after_a_kill(config, tmp_path, kill_after):
    restore = kill_after(5)
    with pytest.raises(KeyboardInterrupt):
        run_extension(config, out=tmp_path / "run", png=False, progress=False)
    restore()
    out = run_extension(config, out=tmp_path / "run", png=False, progress=False)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["shards"]["skipped"] == 5 and prov["shards"]["computed"] > 0

    losses = pd.read_parquet(out / "losses.parquet")
    assert set(losses["variant"]) == {"realistic-high", *config.variants}
    assert losses.groupby("variant").size().eq(3).all()
    for v in ("realistic-high", *config.variants):
        assert (out / "checkpoints" / v / "adapter_config.json").is_file()
    evals = pd.read_parquet(out / "eval.parquet")
    assert evals.groupby("model_variant").size().eq(2).all()
    heads = pd.read_csv(out / "heads.csv").set_index("model_variant")
    assert heads.loc["realistic-high", "recall"] == 1.0  # the reference recalls itself
    assert heads.loc["realistic-high", "label"] == REFERENCE_LABEL
    assert heads["n_heads"].eq(3).all()
    cross = pd.read_parquet(out / "cross.parquet")
    assert {"recipient", "donor"} <= set(cross["condition"])
    assert set(cross["model_variant"]) == set(config.variants)
    knockout = pd.read_parquet(out / "knockout.parquet")
    assert set(knockout["model_variant"]) <= {"realistic-high", *config.variants}
    lofit = pd.read_parquet(out / "lofit.parquet")
    assert len(lofit) == 8 and lofit["bias_tuned"].sum() == 2  # 2 layers x 4 heads, top 25 %
    assert (out / "checkpoints" / "lofit-realistic-high" / "lofit_bias.safetensors").is_file()
    assert set(json.loads((out / "lofit_vs_retrieval.json").read_text())) >= {
        "spearman_norm_vs_score", "reference_heads_in_lofit_top"}  # fmt: skip
    sweep = pd.read_parquet(out / "lofit_sweep.parquet").set_index("l1")
    assert sweep.loc[0.0, "n_selected"] == 8  # no penalty: every head moves off zero
    assert sweep.loc[100.0, "n_selected"] == 0  # lr · λ = 1 per step: every A is thresholded
    localised = pd.read_parquet(out / "lofit_localised.parquet")
    sizes = localised.groupby("head_set")["n_heads"].first().to_dict()
    assert sizes == {"base": 0, "retrieval": 3, "lofit": 3, "random": 3}
    assert localised.groupby("head_set").size().eq(2).all()  # every evaluation example
    base_f1 = localised.loc[localised["head_set"] == "base", "answer_logprob"].to_numpy()
    tuned = localised.loc[localised["head_set"] == "retrieval", "answer_logprob"].to_numpy()
    assert (base_f1 != tuned).any()  # the bias vectors changed the model
    claims = pd.read_csv(out / "claims_headline.csv")
    assert list(claims["claim"]) == ["recall_predicts", "subset", "inter_beats_rand", "necessary"]
    report = (out / "report.md").read_text()
    assert "## Verdicts" in report and "## LoFiT localised to retrieval heads" in report
    assert "| 100 | 0 of 8 | 0.0% |" in report and "LoRA on realistic-high" in report
    assert set(json.loads((out / "provenance.json").read_text())["timings"]) >= {
        "finetune_s", "eval_s", "detect_s", "knockout_s", "cross_s", "total_s"}  # fmt: skip


def test_the_report_and_figures_regenerate_from_the_tables_alone(config, tmp_path, monkeypatch):
    from mechinterp import cli
    from mechinterp.models import load as load_module

    out = run_extension(config, out=tmp_path / "run", png=False, progress=False)
    before = pd.read_csv(out / "claims.csv")
    (out / "claims.csv").unlink()
    (out / "report.md").unlink()

    def no_model(*a, **k):
        raise AssertionError("the report must not load a model")

    monkeypatch.setattr(load_module, "load_model", no_model)
    assert cli.main(["report", str(out)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "claims.csv"), before)
    assert cli.main(["figures", str(out), "--no-png"]) == 0
    for name in ("head_overlap", "cross_patching", "knockout_by_model"):
        assert (out / "figures" / f"{name}.html").is_file()


def test_detection_on_the_task_uses_the_answer_span(config, tmp_path):
    import dataclasses

    on_task = dataclasses.replace(config, detect_on="task", n_detect=2)
    out = run_extension(on_task, out=tmp_path / "run", png=None, progress=False)
    per = pd.read_parquet(out / "detect_instances.parquet")
    assert per["instance_id"].str.startswith("mdqa-realistic-high-s2-").all()  # held-out seed
    assert per.groupby("model_variant")["instance_id"].nunique().eq(2).all()


def test_bad_extension_configs_are_refused():
    with pytest.raises(ValueError, match="repeat the reference"):
        ExtensionConfig(variants=("realistic-high",))
    with pytest.raises(ValueError, match="unknown variant"):
        ExtensionConfig(variants=("shiny",))


def test_the_mini_config_loads():
    from pathlib import Path

    from mechinterp.config import load_config

    path = Path(__file__).parents[2] / "experiments" / "extension-mini.yaml"
    config = load_config(ExtensionConfig, path)
    assert config.lora.steps == 150 and len(config.variants) == 4
    assert config.detect_on == "task" and config.knockout.ks == (5, 10)


@pytest.mark.parametrize("name", ["extension-multihop-mini", "extension-full"])
def test_the_other_extension_configs_load(name):
    from pathlib import Path

    from mechinterp.config import load_config

    path = Path(__file__).parents[2] / "experiments" / f"{name}.yaml"
    config = load_config(ExtensionConfig, path)
    assert config.detect_on == "task" and config.reference == "realistic-high"


def test_a_model_that_passes_no_detection_gate_gets_an_empty_head_set(config, tmp_path):
    import dataclasses

    strict = dataclasses.replace(config, detect=dataclasses.replace(config.detect, gate=0.99))
    with pytest.warns(UserWarning, match="its head set is empty"):
        out = run_extension(strict, out=tmp_path / "run", png=False, progress=False)
    assert not (out / "figures" / "recall_vs_performance.html").exists()
    heads = pd.read_csv(out / "heads.csv")
    assert heads["n_heads"].eq(0).all() and not (out / "cross.parquet").exists()


def test_changing_one_stage_recomputes_only_what_depends_on_it(config, tmp_path):
    import dataclasses

    out = tmp_path / "run"
    run_extension(config, out=out, png=None, progress=False)
    more_tokens = dataclasses.replace(config, max_new_tokens=5)  # the stages that generate
    run_extension(more_tokens, out=out, png=None, progress=False)
    prov = json.loads((out / "provenance.json").read_text())
    n, sweep = 1 + len(config.variants), len(config.lofit.l1_sweep)
    # fine-tunes, detections, LoFiT and its λ sweep reused
    assert prov["shards"]["skipped"] == 2 * n + 1 + sweep
    # eval, knockout, cross, and the 4 localised LoFiT runs (which generate)
    assert prov["shards"]["computed"] == 2 * n + len(config.variants) + 4
    retrained = dataclasses.replace(config, lora=dataclasses.replace(config.lora, seed=1))
    run_extension(retrained, out=out, png=None, progress=False)
    prov = json.loads((out / "provenance.json").read_text())
    # new checkpoints (and max_new_tokens back at 6): all but LoFiT and its λ sweep, which start
    # from the base model and do not generate
    assert prov["shards"]["skipped"] == 1 + sweep


def test_lofit_head_sets_are_equal_sized_and_the_random_one_is_layer_matched_and_disjoint():
    from mechinterp.experiments.extension.stages import lofit_head_sets
    from mechinterp.heads import HeadShape, parse_heads

    shape = HeadShape(4, 8, 8)
    norms = pd.DataFrame({"head_name": ["L3H0", "L1H1", "L2H2", "L0H0"], "rank": [1, 2, 3, 4]})
    sets = lofit_head_sets(norms, parse_heads("L1H1 L2H3 L2H0"), shape)
    assert sets["base"] == [] and sets["retrieval"] == ["L1H1", "L2H3", "L2H0"]
    assert sets["lofit"] == ["L3H0", "L1H1", "L2H2"]
    rand = parse_heads(sets["random"])
    assert sorted(h.layer for h in rand) == [1, 2, 2]
    assert not set(sets["random"]) & (set(sets["retrieval"]) | set(sets["lofit"]))
