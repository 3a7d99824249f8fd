"""The extension pipeline end to end on a tiny model and tiny data, and its resume."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mechinterp.finetune import LoraSpec
from mechinterp.runs.common import ModelSpec
from mechinterp.study.config import DetectStage, NiahSpec
from mechinterp.study.extension import REFERENCE_LABEL, ExtensionConfig, run_extension


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
        cross_seeds=(0,),
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
    assert config.lora.steps == 100 and len(config.variants) == 4


def test_a_model_that_passes_no_detection_gate_gets_an_empty_head_set(config, tmp_path):
    import dataclasses

    strict = dataclasses.replace(config, detect=dataclasses.replace(config.detect, gate=0.99))
    with pytest.warns(UserWarning, match="its head set is empty"):
        out = run_extension(strict, out=tmp_path / "run", png=False, progress=False)
    assert not (out / "recall_vs_performance.html").exists()
    heads = pd.read_csv(out / "heads.csv")
    assert heads["n_heads"].eq(0).all() and not (out / "cross.parquet").exists()


def test_changing_one_stage_recomputes_only_what_depends_on_it(config, tmp_path):
    import dataclasses

    out = tmp_path / "run"
    run_extension(config, out=out, png=None, progress=False)
    more_tokens = dataclasses.replace(config, max_new_tokens=5)  # evaluation + patching only
    run_extension(more_tokens, out=out, png=None, progress=False)
    prov = json.loads((out / "provenance.json").read_text())
    n = 1 + len(config.variants)
    assert prov["shards"]["skipped"] == 2 * n  # fine-tunes and detections reused
    assert prov["shards"]["computed"] == n + len(config.variants)  # evals and cross
    retrained = dataclasses.replace(config, lora=dataclasses.replace(config.lora, seed=1))
    run_extension(retrained, out=out, png=None, progress=False)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["shards"]["skipped"] == 0  # new checkpoints: everything downstream recomputes
