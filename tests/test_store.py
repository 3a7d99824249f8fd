import json
from importlib import metadata

import pandas as pd
import pytest

from mechinterp import store
from mechinterp.experiments import EvalConfig, TaskSpec


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "table.parquet"
    with pytest.raises(RuntimeError), store.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_and_is_readable(tmp_path):
    df = pd.DataFrame({"layer": [0, 1], "head": [2, 3], "score": [0.5, 0.25]})
    path = store.write_table(df, tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(path), df)
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode
    with pytest.raises(ValueError, match="must end in .parquet or .csv"):
        store.write_table(df, tmp_path / "t.pkl")


def test_run_dir_is_keyed_by_the_resolved_config(tmp_path):
    a = store.run_dir(tmp_path, "eval x", EvalConfig())
    assert a == store.run_dir(tmp_path, "eval x", EvalConfig())
    b = store.run_dir(tmp_path, "eval x", EvalConfig(task=TaskSpec(seed=1)))
    assert a != b and a.name.startswith("eval-x-")


def test_provenance_names_versions_and_extras():
    prov = store.provenance(seed=3)
    assert prov["seed"] == 3 and prov["packages"]["torch"] == metadata.version("torch")
    json.dumps(prov)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"task": "qa"}, "unknown task 'qa'"), ({"depths": (1.5,)}, "depths must lie in"),
     ({"variant": "wild-high"}, "unknown variant 'wild-high'"),
     ({"task": "mdqa", "data": "/no/such.jsonl"}, "does not exist")],
)
def test_bad_task_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskSpec(**kwargs)
