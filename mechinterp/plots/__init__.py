"""DataFrame → plotly Figure. Pure: no model, no I/O, no `fig.show()`. One module per experiment
family: `commands` (the single commands, also used by the studies), `study`, `extension`."""

from mechinterp.plots.commands import (
    accuracy_heatmap,
    cross_patch_bars,
    head_heatmap,
    knockout_curve,
)
from mechinterp.plots.extension import (
    cross_patch_by_variant,
    knockout_by_model,
    overlap_heatmap,
    recall_by_task,
    recall_scatter,
)
from mechinterp.plots.study import accuracy_panels, knockout_ci_curves, sender_heatmaps

__all__ = [
    "accuracy_heatmap",
    "accuracy_panels",
    "cross_patch_bars",
    "cross_patch_by_variant",
    "head_heatmap",
    "knockout_by_model",
    "knockout_ci_curves",
    "knockout_curve",
    "overlap_heatmap",
    "recall_by_task",
    "recall_scatter",
    "sender_heatmaps",
]
