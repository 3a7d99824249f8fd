"""`mechinterp plan`: the model's shape read without weights, the formula's exact terms checked
against what a forward really allocates, the stage workloads against the config, and the
refusal (exit 2, naming the knob) when a stage cannot fit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mechinterp.cli import main
from mechinterp.experiments.plan import Forward, model_shape, plan, study_plan
from mechinterp.experiments.specs import ModelSpec
from mechinterp.experiments.study import StudyConfig


def test_the_shape_is_read_without_weights_and_matches_the_loaded_model(tiny_gqa):
    spec = ModelSpec(name=tiny_gqa.mechinterp_card.source)
    shape = model_shape(spec)
    cfg = tiny_gqa.cfg
    assert (shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.d_head) == (
        cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads, cfg.d_head)  # fmt: skip
    assert shape.n_params == sum(p.numel() for p in tiny_gqa.original_model.parameters())
    assert shape.fused  # llama: the fused path
    assert not model_shape(dataclasses.replace(spec, attention="eager")).fused
    assert model_shape(dataclasses.replace(spec, dtype="bfloat16")).dtype_bytes == 2


def test_the_kv_term_is_what_a_cached_forward_keeps(tiny_gqa):
    """KV bytes of rows × (cached + new + steps) positions = the DynamicCache's tensors."""
    from mechinterp.evaluate import generate_batch

    shape = model_shape(ModelSpec(name=tiny_gqa.mechinterp_card.source))
    kept = {}

    def grab(module, args, kwargs, output):
        cache = kwargs.get("past_key_values") or kwargs.get("cache")
        if cache is not None:
            kept["bytes"] = sum(t.nbytes for layer in cache.layers
                                for t in (layer.keys, layer.values))  # fmt: skip

    handle = tiny_gqa.original_model.register_forward_hook(grab, with_kwargs=True)
    try:
        generate_batch(tiny_gqa, [list(range(3, 40)), list(range(5, 42))], 6, frozenset())
    finally:
        handle.remove()
    f = Forward(rows=2, new=37, steps=5)  # 6 tokens: the prefill's, then 5 decode steps
    assert kept["bytes"] == f.kv_bytes(shape) == shape.kv_bytes_per_position * 2 * (37 + 5)
    assert f.peak_bytes(shape) > f.kv_bytes(shape)


def test_stage_workloads_follow_the_config(tiny_gqa):
    shape = model_shape(ModelSpec(name=tiny_gqa.mechinterp_card.source))
    config = StudyConfig()
    stages = {s.name: s for s in study_plan(config, shape)}
    d = config.detect
    n_detect = len(d.niah.needles) * len(d.niah.lengths) * len(d.niah.depths)
    assert sum(f.rows for f in stages["detect"].forwards) == n_detect
    assert max(f.new for f in stages["detect"].forwards) == max(d.niah.lengths)
    k = config.knockout
    n_cond = 1 + len(k.ks) * len(k.modes) * (1 + len(k.seeds) * len(k.draws))
    n_examples = len(k.niah.needles) * len(k.niah.lengths) * len(k.niah.depths) + k.mdqa.n
    rows = sum(f.rows for f in stages["knockout"].forwards if f.cached)
    assert rows == n_cond * n_examples
    longer = dataclasses.replace(config, detect=dataclasses.replace(
        d, niah=dataclasses.replace(d.niah, lengths=(4096,))))  # fmt: skip
    short_peak = stages["detect"].peak(shape)[0]
    assert {s.name: s for s in study_plan(longer, shape)}["detect"].peak(shape)[0] > short_peak


def test_the_addressing_stage_is_planned_only_when_asked_and_a_key_swap_costs_more(tiny_gqa):
    shape = model_shape(ModelSpec(name=tiny_gqa.mechinterp_card.source))
    config = StudyConfig()
    assert "addressing" not in {s.name for s in study_plan(config, shape)}

    def stage(*kinds):
        asked = dataclasses.replace(config, addressing=dataclasses.replace(
            config.addressing, kinds=kinds))  # fmt: skip
        return {s.name: s for s in study_plan(asked, shape)}["addressing"]

    q, k = stage("question_swap"), stage("key_swap")
    niah = config.addressing.niah
    n = len(niah.needles) * len(niah.lengths) * len(niah.depths)
    assert sum(f.steps > 0 for f in q.forwards) == n  # both prompts generated, once per pair
    # a key swap recomputes from the needle (at depth 0.75), a question swap from
    # the question on
    assert max(f.new for f in k.forwards if f.cached) == max(
        f.new for f in q.forwards if f.cached) + round(0.25 * max(config.addressing.niah.lengths))
    assert k.seconds(shape) > q.seconds(shape)


def test_eager_attention_costs_the_square_and_fused_does_not(tiny_gqa):
    spec = ModelSpec(name=tiny_gqa.mechinterp_card.source)
    fused, eager = model_shape(spec), model_shape(dataclasses.replace(spec, attention="eager"))
    small, big = Forward(rows=1, new=2000), Forward(rows=1, new=8000)
    grow = lambda s: big.peak_bytes(s) / small.peak_bytes(s)  # noqa: E731
    assert 3.0 < grow(fused) < 4.5  # linear in T (plus the constant logits)
    assert grow(eager) > 10  # quadratic


def test_the_cli_refuses_a_run_that_cannot_fit_and_names_the_knob(tiny_gqa, tmp_path, capsys):
    source = tiny_gqa.mechinterp_card.source
    config = tmp_path / "study.yaml"
    config.write_text(f"model:\n  name: {source}\npatch:\n  batch_size: 64\n")
    assert main(["plan", "study", "--config", str(config), "--budget-gib", "64"]) == 0
    out = capsys.readouterr().out
    assert "detect" in out and "patch" in out and "fits" in out
    rows, _, _ = plan(StudyConfig(model=ModelSpec(name=source)), budget_gib=64)
    smallest = min(r.peak_gib for r in rows)
    assert main(["plan", "study", "--config", str(config), "--budget-gib",
                 str(smallest / 2)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "cannot fit" in err and "lower" in err
    assert main(["plan", "study", "--model", "/no/such/model"]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.integration
def test_the_embedded_models_plan_for_the_long_study():
    """study-long.yaml fits on this machine class (24 GB) with fused attention and would not
    with the explicit T × T attention."""
    from mechinterp.config import config_from_flags

    config = config_from_flags(StudyConfig, "experiments/study-long.yaml", [], {})
    rows, shape, _ = plan(config, budget_gib=22)
    assert shape.n_layers == 30
    assert shape.fused and all(r.fits for r in rows)
    eager = config_from_flags(StudyConfig, "experiments/study-long.yaml",
                              ["model.attention=eager"], {})  # fmt: skip
    assert not all(r.fits for r in plan(eager, budget_gib=22)[0])
    assert torch.tensor([r.peak_gib for r in rows]).max() < 10


def test_every_command_the_study_and_the_extension_have_a_plan(tiny_gqa, capsys):
    """`mechinterp plan KIND` takes the flags of the command it plans, for every command."""
    from mechinterp.experiments import COMMANDS
    from mechinterp.experiments.plan import planners

    source = tiny_gqa.mechinterp_card.source
    assert set(planners()) == {*COMMANDS, "study", "extension"}
    needs = {"knockout": ["--heads", "L0H0,L0H1,L1H0,L1H1", "--ks", "1,2"],
             "cross-patch": ["--heads", "L1H0", "--donor", source],
             "path-patch": ["--heads", "L1H0"],
             "extension": ["--n-train", "4", "--detect.niah.lengths", "512", "--n-docs", "2",
                           "--doc-words", "20"],
             "study": ["--detect.niah.lengths", "512", "--knockout.niah.lengths", "512"]}
    mdqa = ["--task", "mdqa", "--task.n", "2", "--task.n-docs", "2"]
    for kind in planners():
        flags = needs.get(kind, []) + (mdqa if kind in COMMANDS else [])
        argv = ["plan", kind, "--model", source, *flags, "--budget-gib", "64"]
        assert main(argv) == 0, (kind, capsys.readouterr().err)
        assert "fits" in capsys.readouterr().out
    assert main(["plan", "study", "--scope", "all"]) == 2  # the study's flag is dotted
    assert "did you mean --knockout.scope or --paths.scope?" in capsys.readouterr().err


def test_a_command_is_planned_at_the_lengths_its_prompts_render_to(tiny_gqa):
    """The planned lengths are the prompts the run builds with the bridge's own tokenizer
    (the plan reads the tokenizer from disk, without the weights)."""
    from mechinterp.evaluate import render_all
    from mechinterp.experiments.plan_commands import prompt_lengths
    from mechinterp.experiments.specs import TaskSpec, build_examples

    spec = ModelSpec(name=tiny_gqa.mechinterp_card.source)
    for task in (TaskSpec(task="niah", lengths=(320, 512), depths=(0.5,), needles=2),
                 TaskSpec(task="mdqa", n=3, n_docs=2)):  # fmt: skip
        prompts = render_all(tiny_gqa, build_examples(task, tiny_gqa.tokenizer))
        assert prompt_lengths(task, spec, None, tiny_gqa.cfg.n_ctx) == [p.n_tokens for p in prompts]


def test_the_knockout_command_plans_the_study_stage_it_runs(tiny_gqa):
    """Same grid, same conditions: the command's knockout stage scores as many condition rows
    per example as the study's."""
    from mechinterp.experiments.knockout import KnockoutConfig
    from mechinterp.experiments.plan_commands import knockout_plan
    from mechinterp.experiments.specs import TaskSpec

    spec = ModelSpec(name=tiny_gqa.mechinterp_card.source)
    shape = model_shape(spec)
    k = StudyConfig().knockout
    task = TaskSpec(task="niah", lengths=(320,), depths=(0.5,), needles=2)
    config = KnockoutConfig(model=spec, task=task, heads=("L0H0", "L1H0", "L1H1"), ks=(1, 2),
                            seeds=(0, 1, 2), modes=k.modes, draws=k.draws)  # fmt: skip
    stages = {s.name: s for s in knockout_plan(config, shape)}
    rows = sum(f.rows for f in stages["knockout"].forwards if f.cached)
    assert rows == 2 * (1 + 2 * len(k.modes) * (1 + 3 * len(k.draws)))
    base = StudyConfig()
    study = {s.name: s for s in study_plan(dataclasses.replace(
        base, knockout=dataclasses.replace(k, ks=(1, 2), seeds=(0, 1, 2)),
        claims=dataclasses.replace(base.claims, k=2)), shape)}  # fmt: skip
    per_example = sum(f.rows for f in study["knockout"].forwards if f.cached) / sum(
        1 for f in study["knockout"].forwards if not f.cached)  # fmt: skip
    assert per_example == rows / 2


def test_a_training_step_keeps_every_layer_and_costs_more_than_its_forward(tiny_gqa):
    shape = model_shape(ModelSpec(name=tiny_gqa.mechinterp_card.source))
    f, step = Forward(rows=1, new=512, kept=512), Forward(rows=1, new=512, kept=512, backward=True)
    assert step.peak_bytes(shape) > f.peak_bytes(shape) + shape.n_layers * 512 * 4
    assert step.seconds(shape) > 2 * f.seconds(shape)
