"""Table: each cross-patching bar's interval, added to an extension run's `cross_summary.csv` as
`<metric>_lo` / `<metric>_hi` columns (the cross-patching figure draws them as error bars).

    .venv/bin/python figures/cross_intervals.py runs/<extension run>/<task>

Computed from the run's per-example `cross.parquet` (no model) the way the Inter-beats-Rand
claim computes its interval (`mechinterp.analysis.stats.cluster_mean`, the claims' level):
for the recipient, Inter, Compl and the donor, the mean over the evaluation examples; for Rand,
the mean over examples × random draws, the draws crossed with the examples (every `rand-s<seed>`
row gets this same Rand interval). F1 scores are bounded to [0, 1].
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from mechinterp.analysis.stats import cluster_mean
from mechinterp.experiments.extension.config import performance_metric


def intervals(cross: pd.DataFrame, metric: str, level: float) -> pd.DataFrame:
    """One row per (model_variant, condition) with `<metric>_lo` / `<metric>_hi`; Rand's
    interval on each of its seeds' rows."""
    bounds = None if metric == "answer_logprob" else (0.0, 1.0)
    rows = []
    for v, g in cross.groupby("model_variant", sort=False):
        rand = g[g["condition"].str.startswith("rand-")]
        wide = rand.pivot_table(index="example_id", columns="condition", values=metric,
                                aggfunc="mean").dropna()  # fmt: skip
        rand_iv = cluster_mean(wide.to_numpy(dtype=float), level=level, bounds=bounds)
        for cond, part in g.groupby("condition", sort=False):
            if cond.startswith("rand-"):
                iv = rand_iv
            else:
                iv = cluster_mean(part[metric].to_numpy(dtype=float), level=level, bounds=bounds)
            rows.append({"model_variant": v, "condition": cond, f"{metric}_lo": iv.low,
                         f"{metric}_hi": iv.high})  # fmt: skip
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="one task's extension run directory")
    args = ap.parse_args(argv)
    paths = [args.run / n for n in ("cross.parquet", "cross_summary.csv", "config.json")]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        print(f"error: {', '.join(absent)} not found: is {args.run} a finished extension run "
              "(one task's directory)?", file=sys.stderr)  # fmt: skip
        return 2
    config = json.loads(paths[2].read_text())
    metric = performance_metric(config["task"])
    level = float(config.get("claims", {}).get("level", 0.95))
    summary = pd.read_csv(paths[1])
    summary = summary.drop(columns=[f"{metric}_lo", f"{metric}_hi"], errors="ignore")
    iv = intervals(pd.read_parquet(paths[0]), metric, level)
    out = summary.merge(iv, on=["model_variant", "condition"], how="left", validate="1:1")
    out.to_csv(paths[1], index=False)
    print(f"wrote {paths[1]} ({metric}_lo, {metric}_hi at level {level})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
