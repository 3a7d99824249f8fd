"""Figure: NIAH length × depth accuracy heatmap, regenerated from a stored run (no model).

    .venv/bin/python figures/niah_accuracy.py runs/eval-smollm2-135m-niah-essays-<hash> [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from mechinterp.plots import accuracy_heatmap
from mechinterp.store import write_figure


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run directory written by `mechinterp eval`")
    ap.add_argument("--out", type=Path, default=None, help="folder for the figure (default: run)")
    ap.add_argument("--value", default="correct", help="metric column to plot")
    args = ap.parse_args(argv)
    table = args.run / "results.parquet"
    if not table.is_file():
        print(f"error: {table} not found: is {args.run} a finished eval run?", file=sys.stderr)
        return 2
    df = pd.read_parquet(table)
    card = json.loads((args.run / "provenance.json").read_text())["model_card"]
    fig = accuracy_heatmap(df, value=args.value, title=f"{card['id']}: NIAH {args.value}")
    for path in write_figure(fig, (args.out or args.run) / f"niah_{args.value}"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
