"""What `mechinterp figures` and `mechinterp report` do: redraw a finished run's figures, or
recompute a study's claims and report, from the tables stored in its run directory (no model).

    redraw("runs/study-smollm2-135m-...")          # every figure of the run, whatever wrote it
    rewrite_report("runs/study-smollm2-135m-...")  # claims tables and report.md
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mechinterp.errors import InputError
from mechinterp.experiments import rundir
from mechinterp.experiments.listing import run_kind


def finished_kind(run: Path) -> str:
    """What wrote a finished run directory (`listing.run_kind`); refuses one that did not finish
    (a study's or a single command's provenance.json is written last)."""
    kind = run_kind(run)
    if not kind.startswith("study extension") and not (run / "provenance.json").is_file():
        raise InputError(f"{run} has no provenance.json, so it is not a finished run (or the file "
                         "was removed): rerun the command that wrote it; finished shards are "
                         "reused")  # fmt: skip
    return kind


def redraw(run: str | Path, *, png: bool = True, wait: bool = False) -> list[Path]:
    """Redraw every figure of a finished run directory; returns the files written."""
    from mechinterp.experiments import COMMANDS, command
    from mechinterp.experiments.extension import report, tasks
    from mechinterp.experiments.study import draw_figures

    run = Path(run)
    draw = {"study extension (tasks)": tasks.draw_figures,
            "study extension": report.draw_figures, "study": draw_figures}  # fmt: skip
    kind = finished_kind(run)
    with rundir.RunLock(run, wait=wait):
        if kind in COMMANDS:
            return command.draw(COMMANDS[kind], run, png=png)
        return draw[kind](run, png=png)


def rewrite_report(run: str | Path, *, wait: bool = False) -> Path:
    """Recompute a study's (or an extension's) claims and report from its tables; returns the
    report's path."""
    from mechinterp.experiments.extension import report, tasks
    from mechinterp.experiments.study import write_report

    run = Path(run)
    kind = finished_kind(run)
    if not kind.startswith("study"):
        raise InputError(f"{run} is a {kind} run: it has tables and figures, no claims report "
                         "(`mechinterp figures` redraws its figures)")  # fmt: skip
    with rundir.RunLock(run, wait=wait):
        if kind == "study extension (tasks)":
            return tasks.analyse_tasks(run, png=None)  # every task's report, then the pooled one
        if kind == "study extension":
            return report.analyse(run, png=None)  # claims and report; `figures` redraws figures
        return write_report(run)


def headline(run: str | Path) -> str:
    """The run's headline verdicts, one line each (`claims_headline.csv`)."""
    rows = pd.read_csv(Path(run) / "claims_headline.csv").itertuples()
    return "\n".join(f"{r.verdict:>14}  {r.statement}" for r in rows)
