"""No input passes silently: the selection rule (empty selects nothing, a repeat is refused),
errors that name their source, and arguments checked at the API's boundary."""

import json

import pandas as pd
import pytest
import torch

from mechinterp.config import ConfigError, check_lists, load_config
from mechinterp.experiments.knockout import KnockoutConfig
from mechinterp.experiments.specs import TaskSpec, check_inputs, read_head_scores
from mechinterp.heads import Head, parse_heads
from mechinterp.interventions import KnockoutSpec, knockout, patch_heads
from mechinterp.selection import check_selection
from mechinterp.tasks.mdqa import load_mdqa
from mechinterp.tasks.multihop import load_musique


def _metric(logits):
    return logits[:, 0]


CLEAN, CORRUPT = [1, 2, 3, 4, 5], [1, 2, 7, 4, 5]


# --- the selection rule --------------------------------------------------------------------


def test_check_selection_refuses_empty_and_repeats_and_keeps_order():
    assert check_selection("ks", (5, 1, 2)) == [5, 1, 2]
    assert check_selection("heads", [], empty=True) == []
    with pytest.raises(ValueError, match="ks is empty, so it selects nothing"):
        check_selection("ks", [])
    with pytest.raises(ValueError, match="seeds repeats 3, 1; give each value once"):
        check_selection("seeds", [3, 1, 3, 2, 1, 3])
    with pytest.raises(ValueError, match="must be a list"):
        check_selection("lengths", "128")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("task.lengths=128,128", "task.lengths repeats 128"),
        ("task.depths=[0.5, 0.5]", "task.depths repeats 0.5"),
        ("ks=[]", r"ks is empty, so it selects nothing.*\(default: 1,2,5,10,20\)"),
        ("seeds=1,,2", "seeds: '1,,2' has an empty item between commas"),
        ("modes=zero,zero", "modes repeats zero"),
        ("heads=L1H2,L1H2", "heads repeats L1H2"),
    ],
)
def test_config_lists_follow_the_rule(override, message):
    extra = [] if override.startswith("heads") else ["heads=L0H1"]
    with pytest.raises(ConfigError, match=message):
        load_config(KnockoutConfig, None, [override, *extra])


def test_an_empty_list_whose_default_is_empty_means_none():
    assert load_config(KnockoutConfig, None, ["heads=[]", "scores=tests/fixtures"]).heads == ()


def test_check_lists_applies_the_rule_to_configs_built_in_python():
    config = KnockoutConfig(heads=("L0H1",), task=TaskSpec(lengths=(128, 256, 128)))
    with pytest.raises(ConfigError, match="task.lengths repeats 128"):
        check_lists(config)
    with pytest.raises(ConfigError, match="seeds repeats 0"):
        check_lists(KnockoutConfig(heads=("L0H1",), seeds=(0, 1, 0)))
    check_lists(KnockoutConfig(heads=("L0H1",)))


def test_a_head_string_may_hold_several_heads_however_they_are_separated():
    assert parse_heads(["L1H2 L3H4", "5-6;L7H0"]) == (
        Head(1, 2), Head(3, 4), Head(5, 6), Head(7, 0)
    )
    config = load_config(KnockoutConfig, None, ["heads=L1H2 L3H4"])
    assert parse_heads(config.heads) == (Head(1, 2), Head(3, 4))
    with pytest.raises(ValueError, match="head list repeats L1H2"):
        parse_heads(["L1H2", "l1h2"])
    for bad in ([(1, -2)], [(True, 1)]):
        with pytest.raises(ValueError, match="is not a head"):
            parse_heads(bad)


# --- patching's selections and token batches ------------------------------------------------


def test_patch_heads_refuses_an_empty_or_repeated_position_list(tiny_gqa):
    with pytest.raises(ValueError, match=r"positions=\[\] selects no position"):
        patch_heads(tiny_gqa, CLEAN, CORRUPT, _metric, positions=[])
    with pytest.raises(ValueError, match=r"positions repeat \[3\]"):
        patch_heads(tiny_gqa, CLEAN, CORRUPT, _metric, positions=[3, 2, 3])
    with pytest.raises(ValueError, match="token indices"):
        patch_heads(tiny_gqa, CLEAN, CORRUPT, _metric, positions=[2.0])
    one = patch_heads(tiny_gqa, CLEAN, CORRUPT, _metric, positions=[3], per_position=True)
    assert torch.isnan(one.values[..., 2]).all() and not torch.isnan(one.values[..., 3]).any()


@pytest.mark.parametrize(
    ("clean", "corrupt", "message"),
    [
        ([[1, 2], [3, 4]], [[1, 2], [3, 5]], r"a flat list of ints; got list items \(a batch\?\)"),
        (torch.tensor([CLEAN]), torch.tensor([CORRUPT]), r"a 1-D tensor; got shape \(1, 5\)"),
        ([], [], "clean is empty"),
        ("hello", "hellp", "got str"),
        ([1.5, 2.0], [1.5, 3.0], "got float items"),
    ],
)
def test_patch_heads_refuses_anything_but_one_prompt(tiny_gqa, clean, corrupt, message):
    with pytest.raises(ValueError, match=message):
        patch_heads(tiny_gqa, clean, corrupt, _metric)


def test_a_1d_tensor_prompt_gives_the_list_result(tiny_gqa):
    from_list = patch_heads(tiny_gqa, CLEAN, CORRUPT, _metric)
    from_tensor = patch_heads(tiny_gqa, torch.tensor(CLEAN), torch.tensor(CORRUPT), _metric)
    torch.testing.assert_close(from_tensor.values, from_list.values)


class _NotLoaded:
    """A model-like object with a bridge's config but no model card."""

    def __init__(self, model):
        self.cfg = model.cfg


def test_a_model_not_built_by_load_model_is_named(tiny_gqa):
    bare = _NotLoaded(tiny_gqa)
    with pytest.raises(ValueError, match="not loaded by mechinterp.load_model.*boot_bridge"):
        patch_heads(bare, CLEAN, CORRUPT, _metric)
    with pytest.raises(ValueError, match="not loaded by mechinterp.load_model"):
        with knockout(bare, KnockoutSpec(heads=(Head(0, 1),), scope="all")):
            pass


def test_a_knockout_entered_twice_is_refused_by_name(tiny_gqa):
    ids = torch.tensor([CLEAN])
    block = knockout(tiny_gqa, KnockoutSpec(heads=(Head(0, 1),), scope="all"))
    with block:
        tiny_gqa(ids)
    with pytest.raises(RuntimeError, match=r"this knockout\(\.\.\.\) object was already entered"):
        with block:
            pass
    with knockout(tiny_gqa, KnockoutSpec(heads=(Head(0, 1),), scope="all")):  # a new one works
        tiny_gqa(ids)


# --- score tables ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("0,1,0.5\n0,2,\n", "score is missing, NaN or not a finite number at line 3"),
        ("0,1,0.5\n1,1,nan\n", "at line 3"),
        ("0,1,abc\n", "at line 2"),
        ("0,1,inf\n", "at line 2"),
        ("0,1,0.5\n0,1,0.2\n", r"heads listed twice: L0H1 \(at line 2, line 3\)"),
        ("0,1.5,0.5\n", "head is not a non-negative integer at line 2"),
        ("-1,1,0.5\n", "layer is not a non-negative integer at line 2"),
    ],
)
def test_a_score_table_that_would_rank_silently_wrong_is_refused(tmp_path, rows, message):
    path = tmp_path / "scores.csv"
    path.write_text("layer,head,score\n" + rows)
    with pytest.raises(ValueError, match=message):
        read_head_scores(path)


def test_a_clean_score_table_reads_sorted(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text("layer,head,score\n0,1,0.2\n1,0,0.7\n0,0,0.2\n")
    table = read_head_scores(path)
    assert list(zip(table["layer"], table["head"], strict=True)) == [(1, 0), (0, 0), (0, 1)]


# --- data files -----------------------------------------------------------------------------


def _record(i, **over):
    rec = {"id": f"q{i}", "question": "who wrote it", "answers": ["Melville"],
           "ctxs": [{"title": "A", "text": "Melville wrote it.", "isgold": True}]}  # fmt: skip
    rec.update(over)
    return rec


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_repeated_ids_are_refused_with_both_lines(tmp_path):
    path = _write(tmp_path / "d.jsonl", [_record(0), _record(1), _record(0, question="why")])
    with pytest.raises(ValueError, match=r"d.jsonl:3: id 'q0' was already used on line 1"):
        load_mdqa(path)
    exact = _write(tmp_path / "e.jsonl", [_record(0), _record(1), _record(0)])
    with pytest.raises(ValueError, match="e.jsonl:3: repeats the record on line 1 exactly"):
        load_mdqa(exact)
    no_ids = [{k: v for k, v in _record(0).items() if k != "id"}] * 2  # ids would differ
    with pytest.raises(ValueError, match="f.jsonl:2: repeats the record on line 1"):
        load_mdqa(_write(tmp_path / "f.jsonl", no_ids))


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"question": "  "}, ":1: question is empty"),
        ({"answers": []}, ":1: answers is an empty list"),
        ({"answers": ["Melville", ""]}, r":1: answers\[1\] is empty"),
        ({"question": 3}, ":1: question must be a string"),
    ],
)
def test_an_empty_field_names_file_line_and_field(tmp_path, over, message):
    path = _write(tmp_path / "d.jsonl", [_record(0, **over)])
    with pytest.raises(ValueError, match="d.jsonl" + message):
        load_mdqa(path)


def test_a_file_that_is_not_utf8_says_so_with_its_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps(_record(0)).encode() + b"\n"
    path.write_bytes(good + json.dumps(_record(1, question="caf\u00e9")).encode("utf-8")
                     .replace(b"\\u00e9", b"\xe9") + b"\n")  # fmt: skip
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not UTF-8 \(byte 0xe9"):
        load_mdqa(path)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + good)
    assert [ex.id for ex in load_mdqa(bom)] == ["q0"]


def test_musique_needs_a_question_and_an_answer(tmp_path):
    paragraph = {"title": "t", "paragraph_text": "x", "is_supporting": True}
    rec = {"id": "m0", "question": "q?", "answer": "x", "paragraphs": [paragraph]}
    path = _write(tmp_path / "m.jsonl", [rec])
    assert [ex.id for ex in load_musique(path)] == ["m0"]
    _write(path, [{**rec, "answer": " "}])
    with pytest.raises(ValueError, match="m.jsonl:1: answer is empty"):
        load_musique(path)


def test_data_is_checked_before_the_model_loads(tmp_path):
    bad = _write(tmp_path / "d.jsonl", [_record(0), _record(0, question="why")])
    config = KnockoutConfig(heads=("L0H1",), model=_unloadable(),
                            task=TaskSpec(task="mdqa", data=str(bad)))  # fmt: skip
    with pytest.raises(ValueError, match="id 'q0' was already used"):
        check_inputs(config)
    scores = tmp_path / "s.csv"
    scores.write_text("layer,head,score\n0,1,nan\n")
    with pytest.raises(ValueError, match="NaN"):
        check_inputs(KnockoutConfig(scores=str(scores), model=_unloadable()))


def test_the_cli_reports_bad_data_without_loading_the_model(tmp_path, capsys):
    from mechinterp.cli import main

    bad = _write(tmp_path / "d.jsonl", [_record(0), _record(0, question="why")])
    args = ["eval", "--model", str(tmp_path / "no-such-model"), "--task", "mdqa",
            "--data", str(bad), "--root", str(tmp_path / "runs")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "d.jsonl:2: id 'q0' was already used on line 1" in err
    assert not (tmp_path / "runs").exists()


def _unloadable():
    from mechinterp.experiments.specs import ModelSpec

    return ModelSpec(name="/nonexistent/model")


# --- numbers out of range, run directories, full disks -----------------------------------


@pytest.mark.parametrize("budget", [-1.0, 0.0, float("nan"), float("inf")])
def test_plan_refuses_a_budget_that_is_not_a_positive_size(budget):
    from mechinterp.experiments.plan import plan
    from mechinterp.experiments.study import StudyConfig

    with pytest.raises(ValueError, match="positive number of GiB"):
        plan(StudyConfig(), budget_gib=budget)


def test_figures_on_a_run_without_provenance_says_so(tmp_path, capsys):
    from mechinterp.cli import main
    from mechinterp.config import to_dict
    from mechinterp.experiments import KnockoutConfig

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(to_dict(KnockoutConfig(heads=("L0H1",)))))
    assert main(["figures", str(run)]) == 2
    assert "has no provenance.json, so it is not a finished run" in capsys.readouterr().err
    (run / "config.json").write_text("{}")  # not any command's config
    assert main(["figures", str(run)]) == 2
    assert "is not the config of any mechinterp command" in capsys.readouterr().err


def test_a_full_disk_names_the_path(tmp_path, monkeypatch):
    import errno
    import os

    from mechinterp import store

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store.os, "replace", full)
    target = tmp_path / "table.csv"
    with pytest.raises(OSError, match=f"No space left on device while writing {target}"):
        store.write_table(pd.DataFrame({"a": [1]}), target)
    assert list(tmp_path.iterdir()) == []  # the temp file is gone too


@pytest.mark.parametrize("written", [";", " , ", ",;\t"])
def test_a_head_list_of_separators_only_names_no_head(written):
    with pytest.raises(ValueError, match="names no head"):
        parse_heads(written)
    with pytest.raises(ValueError, match="names no head"):
        KnockoutConfig(heads=(written,))
    assert parse_heads("") == ()  # nothing written: nothing selected


def test_needle_ids_pick_the_studys_needles_by_index_and_refuse_bad_ones():
    from mechinterp.errors import InputError
    from mechinterp.experiments.specs import build_examples
    from mechinterp.models.load import model_tokenizer
    from mechinterp.tasks.niah import niah_grid

    tok = model_tokenizer("smollm2-135m")
    spec = TaskSpec(lengths=(300,), depths=(0.5,), needle_ids=(5, 2), seed=1)
    mine = build_examples(spec, tok)
    study = niah_grid(tok, lengths=[300], depths=[0.5], needles=[5, 2], seed=1)
    assert [e.to_dict() for e in mine] == [e.to_dict() for e in study]
    assert len(mine) == 2 and mine[0].to_dict() != build_examples(
        TaskSpec(lengths=(300,), depths=(0.5,), needles=2, seed=1), tok)[0].to_dict()
    with pytest.raises(InputError, match="indices into the 16 NIAH needles"):
        TaskSpec(needle_ids=(16,))
    with pytest.raises(InputError, match="repeat a needle"):
        TaskSpec(needle_ids=(3, 3))
