"""How the command behaves around the experiments: --version, --debug, crashes versus errors
raised on purpose (exit 1 with a traceback versus exit 2 with one line), and `runs`."""

import json
import os

import pandas as pd
import pytest

from mechinterp import errors
from mechinterp.cli import main
from mechinterp.config import to_dict
from mechinterp.experiments import KnockoutConfig, listing
from mechinterp.experiments.listing import list_runs, run_kind, run_status
from mechinterp.experiments.rundir import LOCK


def test_version_names_the_suite_and_what_it_runs_on(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("mechinterp 0.1.0 (")
    assert f"torch {metadata.version('torch')}" in out
    assert f"transformer-lens {metadata.version('transformer-lens')}" in out


def _raising(exc):
    def handler(args):
        raise exc

    return handler


@pytest.fixture()
def fake_runs(monkeypatch):
    """`mechinterp runs` whose handler raises what a test gives it."""

    def use(exc):
        monkeypatch.setattr(listing, "runs_text", _raising(exc))

    return use


def test_an_error_raised_on_purpose_is_one_line_and_exit_2(fake_runs, capsys, tmp_path):
    fake_runs(errors.InputError("lengths must be positive: give --task.lengths 256,512"))
    assert main(["runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "mechinterp runs: error: lengths must be positive: give --task.lengths 256,512\n"


def test_debug_adds_the_traceback_to_an_error_on_purpose(fake_runs, capsys, monkeypatch, tmp_path):
    fake_runs(errors.UnsupportedError("no hook point for the rotated queries on Phi-3"))
    assert main(["runs", str(tmp_path), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "UnsupportedError" in err
    assert main(["--debug", "runs", str(tmp_path)]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("MECHINTERP_DEBUG", "1")
    assert main(["runs", str(tmp_path)]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("MECHINTERP_DEBUG", "0")
    assert main(["runs", str(tmp_path)]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("exc", [
    RuntimeError("hook_z never fired in layer 3"),
    KeyError("n_layers"),
    TypeError("unsupported operand"),
    ValueError("math domain error"),  # a ValueError the suite did not raise on purpose
    OSError(5, "Input/output error"),  # no file named: a failure of the machine
])  # fmt: skip
def test_anything_else_is_a_crash_with_its_traceback_and_exit_1(fake_runs, capsys, exc, tmp_path):
    fake_runs(exc)
    assert main(["runs", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert f"crashed with {type(exc).__name__}. This is not an input error" in err
    assert "Out of memory" not in err


def test_out_of_memory_is_a_crash_that_points_to_plan(fake_runs, capsys, tmp_path):
    fake_runs(MemoryError())
    assert main(["runs", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "Out of memory: `mechinterp plan" in err


def test_a_file_the_system_refuses_is_one_line(fake_runs, capsys, tmp_path):
    fake_runs(PermissionError(13, "Permission denied", str(tmp_path / "scores.csv")))
    assert main(["runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Permission denied" in err and "scores.csv" in err


def test_the_suites_errors_are_still_the_builtin_kinds():
    assert issubclass(errors.InputError, ValueError)
    assert issubclass(errors.UnsupportedError, NotImplementedError)
    assert issubclass(errors.MissingFileError, FileNotFoundError)
    full = errors.DiskFullError(28, "No space left on device while writing x")
    assert isinstance(full, OSError) and full.errno == 28
    from mechinterp.config import ConfigError
    from mechinterp.experiments.rundir import RunDirError, RunLockedError

    for kind in (ConfigError, RunDirError, RunLockedError):
        assert issubclass(kind, errors.MechinterpError)


def test_a_bad_config_key_from_the_real_command_is_one_line(capsys):
    assert main(["knockout", "--heads", "L0H1", "--set", "task.lenghts=128"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lenghts" in err and "Traceback" not in err


# --- runs -----------------------------------------------------------------------------------


def _run(root, name, config, *, provenance=None, headline=None):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config))
    if provenance is not None:
        (run / "provenance.json").write_text(json.dumps(provenance))
    if headline is not None:
        pd.DataFrame({"verdict": headline, "statement": ["a claim"] * len(headline)}).to_csv(
            run / "claims_headline.csv", index=False
        )
    return run


def test_runs_lists_command_model_status_wall_time_and_verdicts(tmp_path, capsys):
    from mechinterp.experiments.study import StudyConfig

    knock = to_dict(KnockoutConfig(heads=("L0H1",)))
    study = to_dict(StudyConfig())
    _run(tmp_path, "knockout-a", knock,
         provenance={"created": "2026-12-01T10:00:00+00:00", "timings": {"total_s": 75.4}})
    _run(tmp_path, "study-b", study, provenance={"created": "2026-12-02T10:00:00+00:00",
         "timings": {"load_s": 40.0, "detect_s": 3600.0}},
         headline=["supported", "inconclusive", "supported"])  # fmt: skip
    partial = _run(tmp_path, "study-c", {**study, "model": {**study["model"], "name": "other"}})
    (tmp_path / "notes").mkdir()  # not a run: left out
    frame = list_runs(tmp_path)
    assert set(frame.run) == {"knockout-a", "study-b", "study-c"}
    rows = frame.set_index("run")
    assert rows.loc["knockout-a", "command"] == "knockout"
    assert rows.loc["knockout-a", "wall_s"] == 75.4
    assert rows.loc["study-b", "wall_s"] == 3640.0  # the stages' sum where no total was kept
    assert rows.loc["study-b", "verdicts"] == "1 inconclusive, 2 supported"
    assert rows.loc["study-c", "status"] == "partial" and rows.loc["study-c", "model"] == "other"
    assert rows.loc["knockout-a", "status"] == "finished"

    (partial / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    assert run_status(partial) == f"running (PID {os.getpid()})"
    (partial / LOCK).write_text(json.dumps({"pid": 2**22 + 7, "host": os.uname().nodename}))
    assert run_status(partial) == "partial"  # a dead holder's lock is not a running run

    assert main(["runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["run", "command", "model", "status", "wall", "created", "verdicts"]
    line = next(x for x in out if x.startswith("study-b"))
    assert "1h00m" in line and "1 inconclusive, 2 supported" in line
    assert "1m15s" in next(x for x in out if x.startswith("knockout-a"))


def test_run_kind_tells_the_extension_and_its_task_runs_apart(tmp_path):
    from mechinterp.experiments.extension import ExtensionConfig
    from mechinterp.experiments.extension.config import TaskRun

    one = to_dict(ExtensionConfig())
    many = to_dict(ExtensionConfig(tasks=(TaskRun("mdqa"), TaskRun("multihop"))))
    assert run_kind(_run(tmp_path, "e", one)) == "study extension"
    assert run_kind(_run(tmp_path, "t", many)) == "study extension (tasks)"


def test_runs_on_an_empty_or_missing_root(tmp_path, capsys):
    assert main(["runs", str(tmp_path)]) == 0
    assert "no run directories under" in capsys.readouterr().out
    assert main(["runs", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
