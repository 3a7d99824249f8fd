"""Command-line flags generated from the config dataclasses, and the errors every command gives
for bad input before anything runs."""

from __future__ import annotations

from typing import ClassVar

import pytest

from mechinterp.cli import main
from mechinterp.config import ConfigError, config_flags, config_from_flags, load_config
from mechinterp.experiments import CrossPatchConfig, EvalConfig, KnockoutConfig, PatchConfig
from mechinterp.experiments.extension import ExtensionConfig
from mechinterp.experiments.study import StudyConfig


@pytest.mark.parametrize(
    "cls", [EvalConfig, KnockoutConfig, PatchConfig, CrossPatchConfig, StudyConfig,
            ExtensionConfig],  # fmt: skip
)
def test_every_config_field_gets_one_unique_flag(cls):
    flags = config_flags(cls)
    names = [f.flag for f in flags]
    assert len(set(names)) == len(names)
    assert len({f.path for f in flags}) == len(flags)


def test_flags_are_dotted_paths_with_declared_aliases():
    cross = {n: f.path for f in config_flags(CrossPatchConfig) for n in (f.flag, *f.aliases)}
    assert cross["--model"] == cross["--model.name"] == "model.name"
    assert cross["--donor"] == cross["--donor.name"] == "donor.name"
    assert cross["--model.dtype"] == "model.dtype" and cross["--donor.dtype"] == "donor.dtype"
    assert "--dtype" not in cross  # two models: no short alias says which
    assert cross["--heads"] == "select.heads" and cross["--top-k"] == "select.top_k"
    study = {f.flag: f for f in config_flags(StudyConfig)}
    assert study["--detect.niah.lengths"].path == "detect.niah.lengths"
    assert study["--knockout.max-new-tokens"].path == "knockout.max_new_tokens"
    assert study["--attribution.enabled"].aliases == () and "--ks" not in study


def test_an_alias_must_name_a_field_and_must_not_shadow_a_flag():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Bad:
        FLAG_ALIASES: ClassVar[dict[str, str]] = {"--k": "ks"}
        k: int = 1

    with pytest.raises(AssertionError, match="names no field 'ks'"):
        config_flags(Bad)

    @dataclass(frozen=True)
    class Shadow:
        FLAG_ALIASES: ClassVar[dict[str, str]] = {"--a": "b"}
        a: int = 1
        b: int = 2

    with pytest.raises(AssertionError, match="alias --a"):
        config_flags(Shadow)


def test_every_flag_has_help_and_the_flag_page_is_current():
    from pathlib import Path

    from mechinterp.experiments.flag_table import flags_markdown
    from mechinterp.experiments.listing import experiment_configs

    missing = [(n, f.flag) for n, c in experiment_configs().items()
               for f in config_flags(c) if not f.help]  # fmt: skip
    assert missing == []
    page = Path(__file__).parents[1] / "docs" / "flags.md"
    assert page.read_text() == flags_markdown(), "flags changed: run `make flags`, commit it"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["study", "--knockout-scope", "all"], "did you mean --knockout.scope?"),
        (["study", "extension", "--scope", "all"], "did you mean --knockout.scope?"),
        (["detect", "--n", "3"], "did you mean --task.n?"),
        (["knockout", "--tpo-k", "3"], "unrecognized flag --tpo-k"),
        (["study", "--knock", "x"], "unrecognized flag --knock"),  # no prefix abbreviations
    ],
)
def test_an_unknown_flag_names_the_flag_it_likely_meant(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_help_comes_from_the_field_docstrings(capsys):
    with pytest.raises(SystemExit):
        main(["knockout", "--help"])
    out = capsys.readouterr().out
    assert "random baselines: layer_matched" in out
    assert "--draws DRAWS" in out and "(default: 1,2,5,10,20)" in out


def _given(**flags) -> dict:
    return {f"cfg:{k}": v for k, v in flags.items()}


def test_file_then_set_then_flags(tmp_path):
    path = tmp_path / "k.yaml"
    path.write_text("heads: [L0H0, L1H1]\nks: [1]\ntask:\n  seed: 4\n")
    config = config_from_flags(KnockoutConfig, path, ["task.n=3"],
                               _given(**{"ks": "1,2", "draws": "uniform",
                                         "model.device": "none"}))  # fmt: skip
    assert config.heads == ("L0H0", "L1H1") and config.ks == (1, 2) and config.draws == ("uniform",)
    assert config.task.seed == 4 and config.task.n == 3 and config.model.device is None
    # a text field keeps what was typed: a model called "123" is not the int 123
    named = config_from_flags(EvalConfig, None, [], _given(**{"model.name": "123"}))
    assert named.model.name == "123"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ks", "1,2", "--set", "ks=[3]"], "both set 'ks'"),
        (["--ks", "one,two"], "ks: expected a list of int, got 'one,two'"),
        (["--set", "task.sed=3"], "did you mean 'seed'"),
        (["--modes", "zero,half"], "one of 'zero', 'uniform_attention'"),
        (["--rows", "-3"], "--rows must be >= 1"),
        (["--device", "gpu"], "not a torch device"),
        (["--scope", "all", "--set", "scope=query"], "both set 'scope'"),
        (["--config", "/nonexistent.yaml"], "does not exist"),
        (["--heads", "L0H0,L0H0"], "repeats L0H0"),
    ],
)
def test_bad_flags_are_clear_errors_before_anything_runs(argv, message, tmp_path, capsys):
    base = ["knockout", "--heads", "L0H0", "--model", "/nonexistent-model", "--root",
            str(tmp_path)]  # fmt: skip
    if "--heads" in argv:
        base = base[:1] + base[3:]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_contradicting_head_selections_are_errors():
    with pytest.raises(ConfigError, match="--threshold or by --top-k, not both"):
        config_from_flags(PatchConfig, None, [], _given(**{"select.scores": "tests/fixtures",
                          "select.threshold": "0.2", "select.top_k": "3"}))  # fmt: skip
    with pytest.raises(ConfigError, match="give --scores"):
        config_from_flags(PatchConfig, None, [], _given(**{"select.top_k": "3"}))


def test_print_config_round_trips(tmp_path, capsys):
    assert main(["knockout", "--heads", "L0H0,L1H1", "--ks", "1", "--set", "draws=[uniform]",
                 "--task.seed", "5", "--print-config"]) == 0  # fmt: skip
    path = tmp_path / "printed.yaml"
    path.write_text(capsys.readouterr().out)
    config = load_config(KnockoutConfig, path)
    assert config.heads == ("L0H0", "L1H1") and config.ks == (1,) and config.task.seed == 5
    assert config.draws == ("uniform",)


def test_study_thresholds_and_the_model_window_are_checked_first(tiny_study_config, tmp_path):
    from dataclasses import replace

    from mechinterp.experiments.study import run_study
    from mechinterp.experiments.study.config import DetectStage, NiahSpec

    with pytest.raises(ValueError, match="threshold must lie in"):
        DetectStage(threshold=-0.1)
    base = tiny_study_config()
    out = tmp_path / "run"
    too_many = replace(base.knockout, ks=(2, 500))
    with pytest.raises(ValueError, match="knockout.ks goes up to 500 but the model has 12 heads"):
        run_study(tiny_study_config(knockout=too_many), out=out, png=False, progress=False)
    assert not out.exists()
    long = replace(base.knockout, niah=NiahSpec(needles=(4,), lengths=(9000,), seed=1))
    with pytest.raises(ValueError, match="longer than the model's context window"):
        run_study(tiny_study_config(knockout=long), out=out, png=False, progress=False)
    assert not out.exists()


def test_api_misuse_is_a_clear_error(tiny_gqa):
    from mechinterp.heads import parse_heads
    from mechinterp.interventions.patching import logit_diff_metric, patch_heads

    with pytest.raises(TypeError, match="parse_heads"):  # (under pytest, beartype says it first)
        parse_heads(None)
    vocab = tiny_gqa.cfg.d_vocab
    with pytest.raises(ValueError, match=f"outside the model's vocabulary \\[0, {vocab}\\)"):
        patch_heads(tiny_gqa, [1, 2, vocab + 5], [1, 2, 3], logit_diff_metric(1, 2))


def test_unwritable_output_and_missing_gpu_are_errors(tiny_gqa, tmp_path, capsys):
    import torch

    model = tiny_gqa.mechinterp_card.source
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = ["eval", "--model", model, "--task", "mdqa", "--task.n", "1", "--task.n-docs", "2"]
    assert main(args + ["--root", str(blocker / "runs")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert main(args + ["--root", "/proc/mechinterp-runs"]) == 2
    assert "is not writable" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(args + ["--device", "cuda", "--root", str(tmp_path / "r")]) == 2
        assert "this machine has no CUDA GPU" in capsys.readouterr().err
        assert not (tmp_path / "r").exists()
