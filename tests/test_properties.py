"""Property-based tests of every parser and entry point that reads a user's input: head lists,
config lists (YAML, comma strings and command-line flags), data records and head-score tables,
generated at random (Hypothesis). Each input is either accepted and round-trips exactly, or
refused with the suite's own error (a ValueError: `ConfigError` is one) — never another
exception, never a silent change.

The profile sets how many inputs each test draws: `ci` (the default, derandomised so a run is
reproducible) or `thorough` (`HYPOTHESIS_PROFILE=thorough`, 3,000 per test)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mechinterp.config import ConfigError, dump_yaml, load_config
from mechinterp.experiments.knockout import KnockoutConfig
from mechinterp.experiments.specs import read_head_scores
from mechinterp.heads import Head, parse_heads
from mechinterp.interventions.resume import check_positions
from mechinterp.selection import check_selection
from mechinterp.tasks.mdqa import load_mdqa

settings.register_profile("ci", max_examples=150, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
settings.register_profile("thorough", max_examples=3000, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# text a user might type: head-ish tokens, numbers, separators, brackets, junk and non-ASCII
_ATOMS = st.sampled_from(["L", "H", "l", "h", "-", ".", ":", "/", ",", ";", " ", "\t", "[",
                          "]", "0", "1", "7", "12", "-3", "1.5", "nan", "inf", "", "é", "'",
                          '"', "{", "}", "None", "true", "#", "\n"])  # fmt: skip
_TYPED = st.lists(_ATOMS, max_size=12).map("".join)
_TEXT = st.one_of(_TYPED, st.text(max_size=20))


# --- head lists -----------------------------------------------------------------------------

_HEADS = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=8)
_SEP = st.sampled_from([",", " ", ";", ", ", " ; ", "\t", ",\n"])
_FORM = st.sampled_from(["L{}H{}", "l{}h{}", "{}-{}", "{}.{}", "{}:{}", "{}/{}", " L{}H{} "])


@given(_HEADS, _SEP, _FORM)
def test_a_written_head_list_parses_to_itself_or_is_refused_for_a_repeat(pairs, sep, form):
    text = sep.join(form.format(a, b) for a, b in pairs)
    expected = tuple(Head(a, b) for a, b in pairs)
    if len(set(pairs)) < len(pairs):
        with pytest.raises(ValueError, match="head list repeats"):
            parse_heads(text)
        return
    assert parse_heads(text) == expected
    assert parse_heads([text]) == expected  # one string holding several heads
    assert parse_heads(pairs) == expected
    assert parse_heads(",".join(map(str, expected))) == expected


@given(_TEXT)
def test_any_text_is_a_head_list_or_a_value_error(text):
    try:
        heads = parse_heads(text)
    except ValueError:
        return
    assert parse_heads(" ".join(map(str, heads))) == heads  # accepted → round-trips


# --- the selection rule and positions -------------------------------------------------------


@given(st.lists(st.integers(-5, 30), max_size=10), st.integers(1, 25), st.integers(-2, 26))
def test_positions_are_selected_exactly_or_refused(positions, n_pos, patch_from):
    ok = (bool(positions) and len(set(positions)) == len(positions)
          and all(0 <= p < n_pos for p in positions) and 0 <= patch_from < n_pos)  # fmt: skip
    if not ok:
        with pytest.raises(ValueError):
            check_positions(n_pos, positions, patch_from)
        return
    assert check_positions(n_pos, positions, patch_from) == positions


@given(st.lists(st.one_of(st.integers(-3, 3), st.sampled_from(["a", "b"]), st.floats(0, 1))))
def test_a_selection_is_kept_as_given_or_refused(values):
    unique = len({(type(v), v) for v in values}) == len(values) and len(set(values)) == len(values)
    if values and unique:
        assert check_selection("x", values) == values
    else:
        with pytest.raises(ValueError):
            check_selection("x", values)


# --- config lists: YAML lists, comma strings, single values ---------------------------------

_LIST_FIELDS = {  # field → what a valid item is
    "ks": st.integers(-2, 40),
    "seeds": st.integers(-3, 12),
    "task.lengths": st.integers(0, 3000),
    "task.depths": st.one_of(st.floats(-0.5, 1.5), st.just(float("nan"))),
}


def _render(values, style):
    if style == "yaml":
        return "[" + ", ".join(map(str, values)) + "]"
    return ",".join(map(str, values))


@given(st.sampled_from(sorted(_LIST_FIELDS)), st.data(), st.sampled_from(["yaml", "comma"]))
def test_a_config_list_is_taken_exactly_or_refused(field, data, style):
    values = data.draw(st.lists(_LIST_FIELDS[field], max_size=6), label="values")
    override = f"{field}={_render(values, style)}"
    try:
        config = load_config(KnockoutConfig, None, [override, "heads=L0H1"])
    except ConfigError:
        return
    got = config
    for key in field.split("."):
        got = getattr(got, key)
    assert list(got) == [type(got[0])(v) for v in values] if values else got == ()
    assert len(set(got)) == len(got) and got  # the rule: nothing repeated, nothing empty
    assert not any(isinstance(v, float) and math.isnan(v) for v in got)
    again = load_config(KnockoutConfig, None, [f"{k}={v}" for k, v in _flat(config)])
    assert again == config  # the printed config reads back to the same config


def _flat(config):
    """`key=value` overrides that rebuild `config` from its YAML dump."""
    import yaml

    def walk(prefix, node):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(f"{prefix}{key}.", value)
            else:
                yield f"{prefix}{key}", json.dumps(value)

    return list(walk("", yaml.safe_load(dump_yaml(config))))


@given(_TEXT, st.sampled_from(["ks", "seeds", "task.lengths", "task.depths", "heads",
                                "modes", "task.needles", "task.n"]))  # fmt: skip
def test_any_text_for_a_config_key_is_taken_or_a_config_error(text, key):
    extra = [] if key == "heads" else ["heads=L0H1"]
    try:
        load_config(KnockoutConfig, None, [f"{key}={text}", *extra])
    except ConfigError:
        pass


# --- the command line -----------------------------------------------------------------------

_FLAGS = ["--ks", "--seeds", "--lengths", "--depths", "--heads", "--needles", "--task.n",
          "--modes", "--max-new-tokens", "--rows"]  # fmt: skip


@given(st.lists(st.tuples(st.sampled_from(_FLAGS), _TEXT), min_size=1, max_size=3,
                unique_by=lambda t: t[0]))  # fmt: skip
def test_the_command_line_prints_a_config_or_exits_2_with_a_message(flags):
    from mechinterp.cli import main

    argv = ["knockout", "--print-config"] + [f"{f}={v}" for f, v in flags]
    if not any(f == "--heads" for f, _ in flags):
        argv.append("--heads=L0H1")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own usage error
            code = e.code
    assert code in (0, 2)
    if code == 2:
        assert err.getvalue().strip(), "refused without a message"
    else:
        import yaml

        printed = yaml.safe_load(out.getvalue())
        assert isinstance(printed, dict) and printed["heads"]


# --- data records ---------------------------------------------------------------------------

_STR = st.one_of(st.text(max_size=12), st.just(""), st.just("  "))
_JSONISH = st.one_of(_STR, st.integers(-2, 2), st.none(), st.booleans(),
                     st.lists(_STR, max_size=3))  # fmt: skip
_CTX = st.fixed_dictionaries(
    {"title": st.one_of(_STR, st.none()), "text": _JSONISH},
    optional={"isgold": st.booleans(), "hasanswer": st.booleans()},
)
_RECORD = st.fixed_dictionaries(
    {"question": _JSONISH, "answers": st.one_of(st.lists(_STR, max_size=3), _JSONISH),
     "ctxs": st.one_of(st.lists(_CTX, max_size=3), _JSONISH)},
    optional={"id": st.sampled_from(["a", "b", "c", 1, 2])},
)  # fmt: skip


@given(st.lists(_RECORD, min_size=1, max_size=4))
def test_a_data_file_is_read_exactly_or_refused_naming_its_line(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")  # fmt: skip
    try:
        examples = load_mdqa(path)
    except ValueError as e:
        assert str(e).startswith(f"{path}:"), e  # the file, and the line
        return
    assert len(examples) == len(records)
    assert len({ex.id for ex in examples}) == len(examples)
    for ex, rec in zip(examples, records, strict=True):
        assert ex.question == rec["question"] and ex.question.strip()
        assert list(ex.answers) == rec["answers"] and all(a.strip() for a in ex.answers)
        assert [d.text for d in ex.documents] == [c["text"] for c in rec["ctxs"]]


# --- head-score tables ----------------------------------------------------------------------

_CELL = st.one_of(st.integers(-2, 30), st.floats(allow_nan=True, allow_infinity=True),
                  st.sampled_from(["", "x", "nan", "1.0", "3"]))  # fmt: skip


@given(st.lists(st.tuples(_CELL, _CELL, _CELL), min_size=1, max_size=6),
       st.sampled_from(["csv", "parquet"]))  # fmt: skip
def test_a_score_table_ranks_exactly_or_is_refused(tmp_path_factory, rows, fmt):
    path = tmp_path_factory.mktemp("scores") / f"scores.{fmt}"
    frame = pd.DataFrame(rows, columns=["layer", "head", "score"]).astype(str)
    if fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    try:
        table = read_head_scores(path)
    except ValueError as e:
        assert str(e).startswith(str(path)), e
        return
    layer, head, score = table["layer"], table["head"], table["score"]
    assert layer.dtype.kind == head.dtype.kind == "i" and score.dtype.kind == "f"
    assert score.map(math.isfinite).all() and (layer >= 0).all() and (head >= 0).all()
    assert len(set(zip(layer, head, strict=True))) == len(table) == len(rows)
    assert list(score) == sorted(score, reverse=True)
