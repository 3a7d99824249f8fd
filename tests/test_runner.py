"""Shards: atomic, skipped when finished, recomputed when corrupt or stale, resumable after a
kill (also a real SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest

from mechinterp import runner
from mechinterp.runner import Shard, ShardStats, run_shards, shard_status


def square_shard(model, *, values: list[int], sleep: float = 0.0) -> pd.DataFrame:
    time.sleep(sleep)
    return pd.DataFrame({"value": values, "square": [v * v for v in values]})


def _shards(n=4, sleep=0.0):
    return [Shard(f"stage/part-{i}", square_shard, {"values": [i, i + 10], "sleep": sleep})
            for i in range(n)]  # fmt: skip


def test_a_rerun_skips_finished_shards_and_returns_the_same_table(tmp_path):
    first, second = ShardStats(), ShardStats()
    a = run_shards(_shards(), tmp_path, model=object(), stats=first, progress=False)
    b = run_shards(_shards(), tmp_path, model=None, stats=second, progress=False)  # no model needed
    assert first.computed == [s.name for s in _shards()] and not first.skipped
    assert second.skipped == first.computed and not second.computed
    pd.testing.assert_frame_equal(a, b)
    assert list(a["value"]) == [0, 10, 1, 11, 2, 12, 3, 13]


def test_an_interrupted_sweep_recomputes_only_unfinished_shards(tmp_path, monkeypatch):
    real = runner.write_shard
    calls = []

    def crash_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the third shard is being written
        calls.append(args[1].name)
        real(*args, **kwargs)

    monkeypatch.setattr(runner, "write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_shards(_shards(), tmp_path, model=object(), progress=False)
    monkeypatch.setattr(runner, "write_shard", real)
    stats = ShardStats()
    resumed = run_shards(_shards(), tmp_path, model=object(), stats=stats, progress=False)
    assert stats.skipped == ["stage/part-0", "stage/part-1"]
    assert stats.computed == ["stage/part-2", "stage/part-3"]
    fresh = run_shards(_shards(), tmp_path / "fresh", model=object(), progress=False)
    pd.testing.assert_frame_equal(resumed, fresh)
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_table", "bad_record"])
def test_a_damaged_shard_is_detected_and_recomputed_never_read(tmp_path, damage):
    run_shards(_shards(), tmp_path, model=object(), progress=False)
    table = tmp_path / "stage" / "part-1.parquet"
    record = tmp_path / "stage" / "part-1.json"
    data = table.read_bytes()
    if damage == "truncate":
        table.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        table.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "delete_table":
        table.unlink()
    else:
        record.write_text("{not json")
    assert shard_status(tmp_path, _shards()[1])[0] == "corrupt"
    stats = ShardStats()
    with pytest.warns(UserWarning, match="stage/part-1 is unusable"):
        df = run_shards(_shards(), tmp_path, model=object(), stats=stats, progress=False)
    assert stats.computed == ["stage/part-1"] and stats.repaired == ["stage/part-1"]
    assert list(df["square"]) == [0, 100, 1, 121, 4, 144, 9, 169]


def test_a_shard_computed_from_other_inputs_is_recomputed(tmp_path):
    run_shards(_shards(), tmp_path, model=object(), progress=False)
    changed = _shards()
    changed[2] = Shard("stage/part-2", square_shard, {"values": [7]})
    stats = ShardStats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = run_shards(changed, tmp_path, model=object(), stats=stats, progress=False)
    assert stats.computed == ["stage/part-2"]
    assert any("other inputs" in str(w.message) for w in caught)
    assert 49 in set(df["square"])


def test_bad_shard_names_and_duplicates_are_refused(tmp_path):
    with pytest.raises(ValueError, match="bad shard name"):
        Shard("../escape", square_shard)
    with pytest.raises(ValueError, match="duplicate shard names"):
        run_shards(_shards()[:1] * 2, tmp_path, model=object(), progress=False)
    with pytest.raises(ValueError, match="engine must be"):
        run_shards(_shards(), tmp_path, model=object(), engine="spark", progress=False)


def test_a_sigkilled_sweep_resumes_where_it_stopped(tmp_path):
    """A real SIGKILL mid-sweep: finished shards survive, the one in flight leaves no file."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_runner import _shards
        from mechinterp.runner import run_shards
        run_shards(_shards(6, sleep=0.4), {str(tmp_path)!r}, model=object(), progress=False)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ})
    deadline = time.time() + 60
    while time.time() < deadline and len(list(tmp_path.rglob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.stem for p in tmp_path.rglob("*.json"))
    assert 2 <= len(done) < 6, done
    stats = ShardStats()
    df = run_shards(_shards(6, sleep=0.4), tmp_path, model=object(), stats=stats, progress=False)
    assert sorted(n.split("/")[1] for n in stats.skipped) == done
    assert len(stats.computed) == 6 - len(done) and not stats.repaired
    assert len(df) == 12 and not list(tmp_path.rglob("*.tmp"))
