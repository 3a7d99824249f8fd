from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from mechinterp.config import (
    ConfigError,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_config,
    parse_override,
    to_dict,
)
from mechinterp.experiments import KNOCKOUT_TASK, KnockoutConfig, ModelSpec, TaskSpec

Mode = Literal["zero", "mean"]


@dataclass(frozen=True)
class Inner:
    ks: tuple[int, ...] = (1, 2)
    rate: float = 0.5
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if any(k < 1 for k in self.ks):
            raise ValueError(f"ks must be >= 1, got {self.ks}")


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    preset: Inner = field(default_factory=lambda: Inner(ks=(7,), rate=2.0))
    mode: Mode = "zero"
    gate: float | None = 0.5
    depths: tuple[float, ...] | None = None
    flag: bool = False
    label: str | None = None
    seed: int = 0
    pair: tuple[int, str] = (0, "a")
    out: Path = Path("runs")

    def __post_init__(self) -> None:
        if self.gate is not None and self.gate > 1:
            raise ValueError(f"gate must be <= 1, got {self.gate}")


@dataclass(frozen=True)
class Run:
    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=lambda: TaskSpec(lengths=(128,)))
    template: Literal["chat", "plain"] | None = None


@dataclass(frozen=True)
class Required:
    name: str
    n: int = 1


CHANGED = Outer(
    inner=Inner(ks=(3, 4), rate=0.25, names=("a", "b")),
    preset=Inner(),
    mode="mean",
    gate=None,
    depths=(0.0, 1.0),
    flag=True,
    label="x",
    seed=7,
    pair=(2, "b"),
    out=Path("/tmp/somewhere"),
)


def error(cls, data) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(cls, data)
    return str(info.value)


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [Outer(), CHANGED, Run(), Run(ModelSpec("/m", "bfloat16", "cuda", 1e6), KNOCKOUT_TASK, "chat")],
)
def test_to_dict_is_plain_json_and_from_dict_inverts_it(config):
    data = to_dict(config)
    assert json.loads(json.dumps(data)) == data  # lists, not tuples; str, not Path
    assert from_dict(type(config), data) == config


def test_dump_yaml_keeps_field_order_and_loads_back(tmp_path):
    text = dump_yaml(CHANGED)
    assert [line.split(":")[0] for line in text.splitlines() if not line[0].isspace()] == [
        f.name for f in dataclasses.fields(Outer)
    ]
    assert "ks: [3, 4]" in text
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(Outer, tmp_path / "c.yaml") == CHANGED


def test_dump_yaml_quotes_strings_that_would_load_as_other_types(tmp_path):
    config = Outer(label="1e-3", inner=Inner(names=("yes", "true", "null")))
    (tmp_path / "c.yaml").write_text(dump_yaml(config))
    assert load_config(Outer, tmp_path / "c.yaml") == config


def test_result_is_frozen():
    config = from_dict(Outer, {"inner": {"ks": [5]}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.inner.ks = (1,)  # type: ignore[misc]


# --- conversions -----------------------------------------------------------------------------


def test_missing_keys_take_defaults_and_partial_nested_mappings_lay_over_the_default():
    config = from_dict(Outer, {"inner": {"rate": 1}, "preset": {"rate": 3}})
    assert config.inner == Inner(rate=1.0)
    assert config.preset == Inner(ks=(7,), rate=3.0)  # the field's own default, not Inner()
    assert isinstance(config.inner.rate, float) and config.mode == "zero"


def test_partial_task_override_keeps_the_configs_own_default_task():
    config = load_config(KnockoutConfig, None, ["heads=L18H6,L20H1", "task.seed=3"])
    assert config.task == dataclasses.replace(KNOCKOUT_TASK, seed=3)
    assert config.heads == ("L18H6", "L20H1")


def test_values_convert_to_field_types():
    config = from_dict(
        Outer,
        {
            "inner": {"ks": "1, 2,5", "names": "a,b", "rate": 2},
            "preset": {"ks": 9},
            "depths": [0, 0.5],
            "gate": 1,
            "pair": [3, "c"],
            "out": "x/y",
        },
    )
    assert config.inner == Inner(ks=(1, 2, 5), rate=2.0, names=("a", "b"))
    assert config.preset.ks == (9,)
    assert config.depths == (0.0, 0.5) and all(type(d) is float for d in config.depths)
    assert config.gate == 1.0 and type(config.gate) is float
    assert config.pair == (3, "c") and config.out == Path("x/y")
    assert from_dict(Outer, {"depths": "0,0.25"}).depths == (0.0, 0.25)
    assert from_dict(Outer, {"depths": None, "gate": None, "inner": {"names": ""}}).gate is None


def test_real_specs_load_from_strings_and_lists():
    config = from_dict(Run, {"task": {"lengths": [256, 512], "depths": "0,1"}, "template": None})
    assert config.task.lengths == (256, 512) and config.task.depths == (0.0, 1.0)
    assert config.model == ModelSpec()


# --- errors ----------------------------------------------------------------------------------


def test_unknown_nested_key_names_the_dotted_key_class_allowed_keys_and_a_suggestion():
    message = error(Outer, {"inner": {"kss": [1]}})
    assert "'inner.kss'" in message and "Inner" in message
    assert "did you mean 'ks'?" in message and "allowed keys: ks, rate, names" in message


def test_unknown_key_is_prefixed_by_where_and_may_point_into_a_nested_config():
    with pytest.raises(ConfigError, match=r"'knockout\.kss'.*did you mean 'ks'\?"):
        from_dict(Inner, {"kss": 1}, where="knockout")
    assert "did you mean 'task.seed'?" in error(Run, {"seed": 1})
    assert "did you mean" not in error(Inner, {"zzzz": 1})


@pytest.mark.parametrize(
    ("cls", "data", "expected"),
    [
        (Run, {"task": {"lengths": "abc"}}, "task.lengths: expected a list of int, got 'abc'"),
        (Run, {"task": {"lengths": [256, "x"]}}, "task.lengths: expected a list of int"),
        (Run, {"task": {"haystack": "web"}}, "expected one of 'essays', 'filler', got 'web'"),
        (Run, {"template": "x"}, "template: expected one of 'chat', 'plain' or null, got 'x'"),
        (Run, {"model": {"rope_theta": "big"}}, "model.rope_theta: expected float or null"),
        (Run, {"model": "smollm2"}, "model: expected a mapping of ModelSpec fields"),
        (Outer, {"seed": None}, "seed: expected int, got None"),
        (Outer, {"seed": 1.5}, "seed: expected int, got 1.5"),
        (Outer, {"seed": True}, "seed: expected int, got True"),
        (Outer, {"gate": "high"}, "gate: expected float or null, got 'high'"),
        (Outer, {"flag": 1}, "flag: expected a bool (true or false), got 1"),
        (Outer, {"flag": "false"}, "flag: expected a bool (true or false), got 'false'"),
        (Outer, {"label": 3}, "label: expected str or null, got 3"),
        (Outer, {"pair": [1]}, "pair: expected a list of 2: [int, str], got [1]"),
        (Outer, {"depths": {"a": 1}}, "depths: expected a list of float or null"),
        (Outer, {"inner": {"names": [1]}}, "inner.names: expected a list of str, got [1]"),
        (Required, {"n": 2}, "Required: missing required key 'name'"),
    ],
)
def test_wrong_values_name_the_dotted_key_the_expected_type_and_the_value(cls, data, expected):
    assert expected in error(cls, data)


def test_post_init_errors_are_prefixed_with_their_location():
    assert error(Outer, {"inner": {"ks": [0]}}) == "inner: ks must be >= 1, got (0,)"
    assert error(Outer, {"gate": 2}) == "Outer: gate must be <= 1, got 2.0"
    assert error(Run, {"task": {"lengths": [8]}}).startswith("task: lengths must be")
    with pytest.raises(ConfigError, match=r"^run\.task: depths must lie in \[0, 1\]"):
        from_dict(Run, {"task": {"depths": [2]}}, where="run")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# --- overrides -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "keys", "value"),
    [
        ("ks=[1,2,5]", ["ks"], [1, 2, 5]),
        ("task.seed=3", ["task", "seed"], 3),
        ("model.name=/path/x", ["model", "name"], "/path/x"),
        ("flag=true", ["flag"], True),
        ("flag=FALSE", ["flag"], False),
        ("flag=yes", ["flag"], "yes"),  # YAML 1.2: only true/false are bools
        ("label=no", ["label"], "no"),
        ("gate=1e-3", ["gate"], 0.001),  # YAML 1.1 would read this as a string
        ("data=", ["data"], None),
        ("name=a=b", ["name"], "a=b"),
        (" a.b = 1 ", ["a", "b"], 1),
    ],
)
def test_parse_override_reads_the_value_as_yaml(text, keys, value):
    assert parse_override(text) == (keys, value)


@pytest.mark.parametrize("text", ["seed", "=3", "task.=3", "a..b=1", ""])
def test_malformed_override_shows_the_right_form(text):
    with pytest.raises(ConfigError, match=r"key=value \(e\.g\. task\.seed=3"):
        parse_override(text)


def test_override_with_bad_yaml_value_is_a_config_error():
    with pytest.raises(ConfigError, match=r"'ks=\[1': the value is not valid YAML"):
        parse_override("ks=[1")


def test_apply_overrides_copies_creates_merges_and_lets_later_ones_win():
    data = {"inner": {"ks": [1], "rate": 0.1}, "seed": 1}
    out = apply_overrides(data, ["inner.rate=2", "a.b.c=x", "seed=2", "seed=3", "inner={ks: [4]}"])
    assert out == {"inner": {"ks": [4], "rate": 2}, "seed": 3, "a": {"b": {"c": "x"}}}
    assert data == {"inner": {"ks": [1], "rate": 0.1}, "seed": 1}
    assert apply_overrides({"a": 1}, ["a.b=2"]) == {"a": {"b": 2}}
    with pytest.raises(TypeError):
        apply_overrides({}, "seed=3")


def test_override_bools_and_unknown_keys_are_checked_by_from_dict():
    assert load_config(Outer, None, ["flag=True"]).flag is True
    with pytest.raises(ConfigError, match="flag: expected a bool .*got 'yes'"):
        load_config(Outer, None, ["flag=yes"])
    with pytest.raises(ConfigError, match=r"'inner\.rat'.*did you mean 'rate'"):
        load_config(Outer, None, ["inner.rat=1"])


# --- files -----------------------------------------------------------------------------------


def test_load_config_reads_yaml_then_applies_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mode: mean\ninner:\n  ks: [3, 4]\n  rate: 1\nlabel: on\ngate: 1e-2\n")
    config = load_config(Outer, path, ["inner.ks=[5]", "preset.names=a,b", "seed=4"])
    assert config == Outer(
        inner=Inner(ks=(5,), rate=1.0),
        preset=Inner(ks=(7,), rate=2.0, names=("a", "b")),
        mode="mean",
        gate=0.01,
        label="on",
        seed=4,
    )


def test_empty_file_and_no_file_give_the_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing set\n")
    assert load_config(Outer, tmp_path / "empty.yaml") == Outer() == load_config(Outer)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_malformed_yaml_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\ninner: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(Outer, path)
    assert "bad.yaml is not valid YAML" in str(info.value) and "line 3" in str(info.value)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just text\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="must hold a mapping of keys at the top level"):
        load_config(Outer, path)
