"""Interventions on attention heads, each a frozen spec plus a context manager.

- `knockout` / `KnockoutSpec`: zero, mean, resample, uniform_attention, edge_knockout.
- `patch_heads`: per-head activation patching (denoising / noising), batched per layer.
- `donor_reference`: cross-model patching through `knockout(..., "resample")`.
- `knockout_sweep`: top-k ranked heads vs random complement heads.
"""

from mechinterp.interventions.knockout import (
    MODES,
    KnockoutSpec,
    Reference,
    head_outputs,
    knockout,
    mean_reference,
    resample_reference,
)
from mechinterp.interventions.patching import (
    PatchResult,
    donor_reference,
    logit_diff_metric,
    normalised_recovery,
    patch_heads,
    run_from_layer,
)
from mechinterp.interventions.sweep import knockout_sweep, summarise_sweep

__all__ = [
    "MODES",
    "KnockoutSpec",
    "PatchResult",
    "Reference",
    "donor_reference",
    "head_outputs",
    "knockout",
    "knockout_sweep",
    "logit_diff_metric",
    "mean_reference",
    "normalised_recovery",
    "patch_heads",
    "resample_reference",
    "run_from_layer",
    "summarise_sweep",
]
