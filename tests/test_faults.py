"""The table of bad inputs and faults (`benchmarks/faults.py`): every case is refused with a
clear error or survived; none escapes as a traceback, passes silently or loses earlier results."""

import runpy

import pandas as pd


def test_every_bad_input_and_fault_is_refused_clearly_or_survived(tmp_path):
    main = runpy.run_path("benchmarks/faults.py", run_name="faults")["main"]
    out = tmp_path / "faults.csv"
    status = main(["--out", str(out)])
    table = pd.read_csv(out)
    bad = table[~table["outcome"].isin(["clear", "recovered"])]
    assert bad.empty, bad[["id", "outcome", "detail"]].to_string()
    assert status == 0 and len(table) >= 100
    assert (table["outcome"] == "recovered").sum() >= 10  # kills, locks, corrupt shards, inputs
