"""Coverage of the claims report's 95 % intervals on planted data (`mechinterp.analysis.coverage`)
at 3, 5, 8 and 20 clusters, beside the percentile cluster bootstrap the report used before
(resampling clusters, and draws crossed with them). Writes
benchmarks/results/interval_coverage.json and prints a Markdown table.

    .venv/bin/python benchmarks/interval_coverage.py [--reps 2000] [--boot-reps 1000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mechinterp.analysis.coverage import DESIGNS, Replication, coverage
from mechinterp.analysis.stats import Interval

CLUSTERS = (3, 5, 8, 20)


def percentile_bootstrap(rep: Replication, level: float, n_boot: int = 1000) -> Interval:
    """The comparator: resample the clusters with replacement (and the draws, crossed), take
    the statistic, and read the interval off the percentiles."""
    rng = np.random.default_rng(0)
    _, which = np.unique(rep.clusters, return_inverse=True)
    g = which.max() + 1
    w = rng.multinomial(g, np.full(g, 1 / g), size=n_boot)[:, which].astype(float)  # [boot, item]
    if rep.stat is not None:
        boots = np.array([rep.stat(row) for row in w])
        est = rep.stat(np.ones(len(which)))
    else:
        y = rep.values if rep.values.ndim == 2 else rep.values[:, None]
        d = y.shape[1]
        v = rng.multinomial(d, np.full(d, 1 / d), size=n_boot).astype(float)  # [boot, draw]
        num = np.einsum("bi,id,bd->b", w, y, v) / (w.sum(1) * v.sum(1))
        if rep.denominator is None:
            boots, est = num, float(y.mean())
        else:
            boots = num / ((w @ rep.denominator) / w.sum(1))
            est = float(y.mean() / rep.denominator.mean())
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boots, [alpha, 1 - alpha])
    return Interval(est, float(lo), float(hi), len(which), int(g))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=2000, help="replications per cell (the report's "
                    "intervals)")  # fmt: skip
    ap.add_argument("--boot-reps", type=int, default=1000, help="replications per cell (the "
                    "percentile bootstrap, which is slower)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/interval_coverage.json"))
    args = ap.parse_args()
    rows = []
    cells = [(d, g) for d in DESIGNS for g in CLUSTERS]
    for design, g in tqdm(cells, desc="coverage"):
        rows.append({"design": design, "clusters": g,
                     "now": coverage(design, g, reps=args.reps),
                     "percentile_bootstrap": coverage(design, g, reps=args.boot_reps,
                                                      method=percentile_bootstrap),
                     "reps": args.reps, "boot_reps": args.boot_reps})  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print("| design | " + " | ".join(f"{g} clusters" for g in CLUSTERS) + " |")
    print("| --- |" + " --- |" * len(CLUSTERS))
    for design in DESIGNS:
        cells = [r for r in rows if r["design"] == design]
        print(f"| {design} | " + " | ".join(
            f"{r['now']:.3f} ({r['percentile_bootstrap']:.3f})" for r in cells) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
