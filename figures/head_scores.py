"""Figure: layer × head heatmap of a detector's scores, regenerated from a stored run (no model).

.venv/bin/python figures/head_scores.py runs/detect-retrieval-smollm2-135m-niah-essays-<hash>
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from mechinterp.plots import head_heatmap
from mechinterp.store import write_figure


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run directory written by `mechinterp detect`")
    ap.add_argument("--out", type=Path, default=None, help="folder for the figure (default: run)")
    ap.add_argument("--value", default="score", choices=["score", "frequency"])
    ap.add_argument("--top-k", type=int, default=10, help="heads to label")
    args = ap.parse_args(argv)
    table = args.run / "scores.parquet"
    if not table.is_file():
        print(f"error: {table} not found: is {args.run} a finished detect run?", file=sys.stderr)
        return 2
    df = pd.read_parquet(table)
    if df[args.value].isna().all():
        print(f"error: this detector has no {args.value!r} column values", file=sys.stderr)
        return 2
    prov = json.loads((args.run / "provenance.json").read_text())
    title = (
        f"{prov['model_card']['id']} · {prov['detector']} {args.value} "
        f"({df['task'].iloc[0]}, n={prov['n_counted']})"
    )
    fig = head_heatmap(df, value=args.value, top_k=args.top_k, title=title)
    for path in write_figure(fig, (args.out or args.run) / f"heads_{args.value}"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
