"""Figures: an extension run's four per-task figures (recall vs performance, head overlap,
cross-model patching, knockout by model) from its summary tables alone, as PNG (no model).

    .venv/bin/python figures/extension_figures.py figures/extension-mini \
        --out figures/extension-mini --model smollm2-135m --task mdqa --reference realistic-high

For a directory that keeps only `heads.csv`, `correlation.json`, `cross_summary.csv` and
`knockout_summary.csv` (no config.json, no per-example tables, so `mechinterp figures` cannot
read it); the figures are the ones `mechinterp figures` draws for a full run directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from mechinterp import plots
from mechinterp.errors import InputError, MechinterpError
from mechinterp.experiments.extension.config import performance_metric
from mechinterp.store import write_figure


def figures(run: Path, *, model: str, task: str, reference: str, level: float) -> dict:
    """name -> plotly figure, from the tables in `run`."""
    metric = performance_metric(task)
    name = "citation F1" if metric == "citation_f1" else "F1"
    heads = pd.read_csv(run / "heads.csv", keep_default_na=False, na_values=[""])
    labels = dict(zip(heads["model_variant"], heads["label"], strict=True))
    if reference not in labels:
        raise InputError(f"--reference {reference!r} is not a model_variant of "
                         f"{run / 'heads.csv'}: pick one of {sorted(labels)}")  # fmt: skip
    corr = json.loads((run / "correlation.json").read_text()) or None
    out = {}
    drawable = heads.dropna(subset=["recall", "performance"])
    if len(drawable):
        y = f"{name} on the reference task"
        out["recall_vs_performance"] = plots.recall_scatter(
            drawable.rename(columns={"label": "variant", "performance": y}), y=y,
            reference=labels[reference], correlation=corr,
            title=f"{model} · {task}: head recall vs {name} per fine-tuning variant",
        )  # fmt: skip
    sets = {lab: ("" if pd.isna(h) else h).split()
            for lab, h in zip(heads["label"], heads["heads"], strict=True)}  # fmt: skip
    out["head_overlap"] = plots.overlap_heatmap(
        sets, title=f"{model} · {task}: retrieval-head overlap (|A∩B| / |A|)"
    )
    if (run / "cross_summary.csv").is_file():
        out["cross_patching"] = plots.cross_patch_by_variant(
            pd.read_csv(run / "cross_summary.csv"), metric=metric,
            title=f"{model} · {task}: reference heads patched into each synthetic model ({name})",
        )  # fmt: skip
    if (run / "knockout_summary.csv").is_file():
        ko = pd.read_csv(run / "knockout_summary.csv")
        mode = ko["mode"].iloc[0]
        ko = ko[ko["mode"] == mode].assign(model_variant=lambda d: d["model_variant"].map(labels))
        out["knockout_by_model"] = plots.knockout_by_model(
            ko, title=f"{model} · {task}: knockout of each model's own heads ({mode}, "
            f"{int(level * 100)}% CI)",
        )  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a directory with the extension's summary tables")
    ap.add_argument("--out", type=Path, default=None, help="folder (default: RUN/figures)")
    ap.add_argument("--model", required=True, help="the model's name in the titles")
    ap.add_argument("--task", required=True, help="the task (mdqa, multihop, citation)")
    ap.add_argument("--reference", required=True, help="the reference model's variant")
    ap.add_argument("--level", type=float, default=0.95, help="the intervals' level")
    args = ap.parse_args(argv)
    if not (args.run / "heads.csv").is_file():
        print(f"error: {args.run / 'heads.csv'} not found: is {args.run} an extension run's "
              "directory?", file=sys.stderr)  # fmt: skip
        return 2
    try:
        figs = figures(args.run, model=args.model, task=args.task, reference=args.reference,
                       level=args.level)  # fmt: skip
    except MechinterpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, fig in figs.items():
        for path in write_figure(fig, (args.out or args.run / "figures") / name, formats=("png",)):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
