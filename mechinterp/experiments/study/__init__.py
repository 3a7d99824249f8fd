"""The necessity & sufficiency study (`mechinterp study`): detect retrieval heads, knock them out
against random heads, patch them, and judge the claims from the stored tables."""

from mechinterp.experiments.study.config import StudyConfig
from mechinterp.experiments.study.report import (
    draw_figures,
    head_recovery,
    knockout_summary,
    niah_panels,
    read_config,
    read_tables,
    write_report,
)
from mechinterp.experiments.study.run import RunDirError, run_study, shard_overview

__all__ = [
    "RunDirError",
    "StudyConfig",
    "draw_figures",
    "head_recovery",
    "knockout_summary",
    "niah_panels",
    "read_config",
    "read_tables",
    "run_study",
    "shard_overview",
    "write_report",
]
