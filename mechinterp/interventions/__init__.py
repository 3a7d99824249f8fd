"""Interventions on attention heads, each a frozen spec plus a context manager.

- `knockout` / `KnockoutSpec`: zero, mean, resample, uniform_attention, edge_knockout.
- `patch_heads`: per-head activation patching (denoising / noising), batched across layers;
  `screen="atp*"` ranks the heads by attribution patching first, verifies the top exactly and
  samples the rest for the false-negative diagnostic. `patch_nodes`: the same for each head's
  query, key or value.
- `attribution_patch`: AtP / AtP* (QK fix on queries and keys, GradDrop) estimates for every
  head's output, query, key or value.
- `path_patch`: exact two-pass path patching of sender heads into receivers' q / k / v / resid
  (`path_patch_inputs`: several of q / k / v from one first pass).
- `cross_patch`: cross-model patching (donor head outputs into a recipient, same input), with
  `cross_model_patching` / `patch_head_sets` for Inter / Compl / Rand head sets.
- `knockout_sweep`: top-k ranked heads vs random complement heads.
- `answer_pair`: the clean / corrupt pair for patching a retrieved answer token.
"""

from mechinterp.interventions.attribution import AttributionResult, attribution_patch
from mechinterp.interventions.cross import (
    cross_model_patching,
    cross_patch,
    patch_head_sets,
    summarise_cross,
)
from mechinterp.interventions.knockout import (
    MODES,
    KnockoutSpec,
    Reference,
    head_outputs,
    knockout,
    mean_reference,
    resample_reference,
)
from mechinterp.interventions.pairs import AnswerPair, answer_pair
from mechinterp.interventions.patching import (
    PatchResult,
    logit_diff_metric,
    logprob_metric,
    normalised_recovery,
    patch_heads,
    patch_nodes,
    patch_sets,
    run_from_layer,
)
from mechinterp.interventions.paths import path_patch, path_patch_inputs
from mechinterp.interventions.sweep import knockout_sweep, summarise_sweep

__all__ = [
    "MODES",
    "AnswerPair",
    "AttributionResult",
    "KnockoutSpec",
    "PatchResult",
    "Reference",
    "answer_pair",
    "attribution_patch",
    "cross_model_patching",
    "cross_patch",
    "head_outputs",
    "knockout",
    "knockout_sweep",
    "logit_diff_metric",
    "logprob_metric",
    "mean_reference",
    "normalised_recovery",
    "patch_head_sets",
    "patch_heads",
    "patch_nodes",
    "patch_sets",
    "path_patch",
    "path_patch_inputs",
    "resample_reference",
    "run_from_layer",
    "summarise_cross",
    "summarise_sweep",
]
