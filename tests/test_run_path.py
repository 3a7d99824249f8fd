"""The one run path of the single commands: each resumes after a real SIGKILL without
recomputing its finished shards, runs on Ray with the same tables, reuses shards by content
(not by path), and holds its run directory alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from mechinterp.cli import main
from mechinterp.experiments import rundir

#: A process that writes one shard and is then SIGKILLed (a crash, not an exception).
DIE_AFTER_ONE_SHARD = """
import os, signal, sys
from mechinterp import runner
real = runner.write_shard
def write_then_die(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
runner.write_shard = write_then_die
from mechinterp.cli import main
sys.exit(main(sys.argv[1:]))
"""

#: command → (its arguments on the tiny model, in ≥ 2 shards; its main table)
COMMANDS = {
    "eval": (["--task", "mdqa", "--task.variant", "templated-low", "--task.n", "3",
              "--task.n-docs", "2",
              "--max-new-tokens", "2", "--examples-per-shard", "1"], "results.parquet"),
    "detect": (["--lengths", "300", "--depths", "0.25,0.75", "--needles", "1", "--gate", "none",
                "--max-new-tokens", "3", "--examples-per-shard", "1"], "per_instance.parquet"),
    "knockout": (["--heads", "L1H1,L0H2", "--set", "ks=[1,2]", "--set", "seeds=[0]",
                  "--set", "task.task=mdqa", "--set", "task.n=2", "--set", "task.n_docs=2",
                  "--set", "max_new_tokens=1", "--set", "target=gold",
                  "--set", "examples_per_shard=1"], "knockout.parquet"),
    "patch": (["--lengths", "400", "--depths", "0.25,0.75", "--needles", "1"], "patch.parquet"),
    "atp": (["--lengths", "400", "--depths", "0.25,0.75", "--needles", "1", "--verify-top", "2"],
            "atp.parquet"),
    "path-patch": (["--lengths", "400", "--depths", "0.25,0.75", "--needles", "1", "--heads",
                    "L1H0,L1H2"], "paths.parquet"),
    "cross-patch": (["--heads", "L0H0,L1H2", "--lengths", "400", "--depths", "0.25,0.75",
                     "--needles", "1", "--max-new-tokens", "2", "--examples-per-shard", "1"],
                    "cross.parquet"),
}  # fmt: skip


@pytest.fixture(scope="module")
def models(tiny_gqa, tmp_path_factory):
    from mechinterp.models.tiny import tiny_model

    donor = tiny_model(n_kv_heads=2, seed=1, directory=tmp_path_factory.mktemp("donor"))
    return tiny_gqa.mechinterp_card.source, donor.mechinterp_card.source


def _args(command: str, models, root: Path) -> list[str]:
    model, donor = models
    extra = ["--donor", donor] if command == "cross-patch" else []
    return [command, "--model", model, *extra, *COMMANDS[command][0], "--no-png",
            "--root", str(root)]  # fmt: skip


def _only_run(root: Path) -> Path:
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    return run


def _prov(run: Path) -> dict:
    return json.loads((run / "provenance.json").read_text())


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """Each command run once, uninterrupted, in this process: command → run directory."""
    out = {}
    for command in COMMANDS:
        root = tmp_path_factory.mktemp(f"ref-{command}")
        assert main(_args(command, models, root)) == 0
        out[command] = _only_run(root)
    return out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_command_killed_by_sigkill_resumes_without_recomputing_finished_shards(
    command, models, reference, tmp_path
):
    args = _args(command, models, tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", DIE_AFTER_ONE_SHARD, *args], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = _only_run(tmp_path)
    assert not (run / "provenance.json").exists() and not (run / COMMANDS[command][1]).exists()
    assert len(list((run / "shards").rglob("*.json"))) == 1
    assert (run / rundir.LOCK).exists()  # the dead process's lock: taken over below
    assert main(args) == 0
    shards = _prov(run)["shards"]
    total = _prov(reference[command])["shards"]["computed"]
    assert total >= 2 and shards == {"computed": total - 1, "skipped": 1, "repaired": []}
    table = COMMANDS[command][1]
    pd.testing.assert_frame_equal(pd.read_parquet(run / table),
                                  pd.read_parquet(reference[command] / table))  # fmt: skip
    assert not (run / rundir.LOCK).exists()


def test_every_command_runs_on_ray_with_the_same_tables(models, reference, tmp_path):
    import ray  # installed by `make setup` (the `ray` extra): CI must run this test

    try:
        for command, (_, table) in COMMANDS.items():
            root = tmp_path / command
            assert main(_args(command, models, root) + ["--engine", "ray"]) == 0
            run = _only_run(root)
            assert _prov(run)["engine"] == "ray"
            pd.testing.assert_frame_equal(pd.read_parquet(run / table),
                                          pd.read_parquet(reference[command] / table))  # fmt: skip
    finally:
        ray.shutdown()


def test_an_edited_data_file_recomputes_its_shards(models, tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    lines = Path("tests/fixtures/mdqa_sample.jsonl").read_text().splitlines()
    data.write_text("\n".join(lines) + "\n")
    args = ["eval", "--model", models[0], "--task", "mdqa", "--data", str(data),
            "--max-new-tokens", "2", "--no-png", "--root", str(tmp_path / "runs")]  # fmt: skip
    assert main(args) == 0
    run = _only_run(tmp_path / "runs")
    first = pd.read_parquet(run / "results.parquet")
    record = json.loads(lines[0])
    record["question"] = "Which planet is known as the red planet?"
    record["answers"] = ["Mars"]
    data.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    with pytest.warns(UserWarning, match="computed from other inputs"):
        assert main(args) == 0
    assert _only_run(tmp_path / "runs") == run  # the same config: the same directory
    second = pd.read_parquet(run / "results.parquet")
    assert first["answer"].iloc[0] == "Herman Melville" and second["answer"].iloc[0] == "Mars"
    assert second["answer"].iloc[1:].tolist() == first["answer"].iloc[1:].tolist()
    assert _prov(run)["shards"]["computed"] == 1
    assert _prov(run)["inputs"]["task.data"] == rundir.fingerprint(data)


def test_retrained_model_weights_recompute_the_shards(tmp_path):
    import shutil

    from mechinterp.models.tiny import tiny_model

    model_dir = Path(tiny_model(n_kv_heads=2, directory=tmp_path / "m").mechinterp_card.source)
    args = ["eval", "--model", str(model_dir), "--task", "mdqa", "--task.n", "2",
            "--task.n-docs", "2", "--max-new-tokens", "2", "--no-png",
            "--root", str(tmp_path / "runs")]  # fmt: skip
    assert main(args) == 0
    run = _only_run(tmp_path / "runs")
    before = pd.read_parquet(run / "results.parquet")
    shutil.rmtree(model_dir)  # "retrained" in place: other weights under the same path
    tiny_model(n_kv_heads=2, seed=7, directory=tmp_path / "m")
    with pytest.warns(UserWarning, match="computed from other inputs"):
        assert main(args) == 0
    assert _prov(run)["shards"]["computed"] == 1
    after = pd.read_parquet(run / "results.parquet")
    assert (after["prediction"] != before["prediction"]).any() or not after.equals(before)


def test_a_second_writer_is_refused_waits_or_takes_over_a_dead_ones_lock(tmp_path):
    out = tmp_path / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        lock = {"pid": sleeper.pid, "host": os.uname().nodename, "since": "now"}
        (out / rundir.LOCK).write_text(json.dumps(lock))
        with pytest.raises(rundir.RunLockedError, match=f"PID {sleeper.pid}"):
            with rundir.RunLock(out):
                pass
        release = threading.Timer(0.5, lambda: (out / rundir.LOCK).unlink())
        release.start()
        t0 = time.monotonic()
        with rundir.RunLock(out, wait=True, poll=0.1):
            assert json.loads((out / rundir.LOCK).read_text())["pid"] == os.getpid()
        assert time.monotonic() - t0 >= 0.4 and not (out / rundir.LOCK).exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    (out / rundir.LOCK).write_text(json.dumps({**lock, "pid": sleeper.pid}))  # now dead
    with rundir.RunLock(out):
        assert json.loads((out / rundir.LOCK).read_text())["pid"] == os.getpid()


def test_the_cli_refuses_a_run_directory_another_process_is_writing(models, tmp_path, capsys):
    args = _args("eval", models, tmp_path / "runs")
    assert main(args + ["--print-config"]) == 0
    assert main(args) == 0
    run = _only_run(tmp_path / "runs")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": sleeper.pid, "host": os.uname().nodename, "since": "now"}
        (run / rundir.LOCK).write_text(json.dumps(lock))
        capsys.readouterr()
        for argv in (args, ["figures", str(run), "--no-png"]):
            assert main(argv) == 2
            assert f"being written by PID {sleeper.pid}" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()
    assert main(["figures", str(run), "--no-png"]) == 0  # the dead holder's lock is taken over


def test_fingerprints_change_with_the_input(tmp_path, monkeypatch):
    small = tmp_path / "data.jsonl"
    small.write_text("a")
    first = rundir.fingerprint(small)
    small.write_text("b")
    assert rundir.fingerprint(small) != first  # by content
    monkeypatch.setattr(rundir, "HASH_UP_TO", 0)  # a "large" file: by size and time
    big = rundir.fingerprint(small)
    os.utime(small, ns=(1, 1))
    assert rundir.fingerprint(small) != big
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_text("x")
    before = rundir.fingerprint(folder)
    (folder / "weights.bin").write_text("xy")
    assert rundir.fingerprint(folder) != before
    assert rundir.model_fingerprint(str(folder)) == rundir.fingerprint(folder)
    assert rundir.model_fingerprint("smollm2-135m") is not None  # the embedded GGUF
    assert rundir.fingerprint(tmp_path / "missing") is None
