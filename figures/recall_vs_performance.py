"""Figure: fine-tuned variants' task performance vs head recall, from a stored table (no model).

    .venv/bin/python figures/recall_vs_performance.py runs/<study>/recall.parquet [--out DIR]
        [--x recall] [--y performance] [--reference "real data"] [--no-png]

The table (parquet or CSV) has one row per variant: columns `variant`, the recall column and the
performance column. A `correlation.json` next to it ({"method", "estimate", "low", "high", "n"})
is shown on the figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from mechinterp.plots import recall_scatter
from mechinterp.store import write_figure


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", type=Path, help="a parquet or CSV table, one row per variant")
    ap.add_argument(
        "--out", type=Path, default=None, help="folder for the figure (default: the table's)"
    )
    ap.add_argument("--x", default="recall", help="head-recall column")
    ap.add_argument("--y", default="performance", help="task-performance column")
    ap.add_argument("--reference", default=None, help="the variant the heads were compared against")
    ap.add_argument("--no-png", action="store_true", help="write the HTML only")
    args = ap.parse_args(argv)
    if not args.table.is_file():
        print(f"error: {args.table} not found", file=sys.stderr)
        return 2
    read = pd.read_parquet if args.table.suffix == ".parquet" else pd.read_csv
    df = read(args.table)
    missing = {"variant", args.x, args.y} - set(df.columns)
    if missing:
        print(
            f"error: {args.table} lacks columns {sorted(missing)} (has {list(df.columns)})",
            file=sys.stderr,
        )
        return 2
    if df.empty:
        print(f"error: {args.table} has no rows", file=sys.stderr)
        return 2
    if args.reference is not None and not (df["variant"] == args.reference).any():
        print(f"error: no variant {args.reference!r} in {args.table}", file=sys.stderr)
        return 2
    corr_file = args.table.parent / "correlation.json"
    correlation = json.loads(corr_file.read_text()) if corr_file.is_file() else None
    fig = recall_scatter(
        df,
        x=args.x,
        y=args.y,
        reference=args.reference,
        correlation=correlation,
        title=f"{args.y} vs head {args.x} across fine-tuned variants",
    )
    out = args.out or args.table.parent
    formats = ("html",) if args.no_png else ("html", "png")
    for path in write_figure(fig, out / "recall_vs_performance", formats=formats):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
