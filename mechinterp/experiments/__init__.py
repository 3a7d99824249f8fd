"""Runs: one frozen config → one run directory of tidy tables, figures, config and provenance.

- `run_eval` (`EvalConfig`): a task on a model, one row per example.
- `run_detect` (`DetectConfig`): a head detector, one row per head.
- `run_knockout` (`KnockoutConfig`): top-k vs random-complement knockout sweep.
- `run_patch` (`PatchConfig`): per-head activation patching against a corruption.
- `run_cross_patch` (`CrossPatchConfig`): donor head sets patched into a recipient.
"""

from mechinterp.experiments.detect import DETECT_TASK, DetectConfig, run_detect
from mechinterp.experiments.eval import EvalConfig, run_eval, summarise
from mechinterp.experiments.knockout import KNOCKOUT_TASK, KnockoutConfig, run_knockout
from mechinterp.experiments.patch import (
    PATCH_TASK,
    CrossPatchConfig,
    HeadSelection,
    PatchConfig,
    run_cross_patch,
    run_patch,
)
from mechinterp.experiments.specs import (
    ModelSpec,
    TaskSpec,
    build_examples,
    parse_variant,
    read_head_scores,
)

__all__ = [
    "DETECT_TASK",
    "KNOCKOUT_TASK",
    "PATCH_TASK",
    "CrossPatchConfig",
    "DetectConfig",
    "EvalConfig",
    "KnockoutConfig",
    "HeadSelection",
    "ModelSpec",
    "PatchConfig",
    "TaskSpec",
    "build_examples",
    "parse_variant",
    "read_head_scores",
    "run_cross_patch",
    "run_detect",
    "run_eval",
    "run_knockout",
    "run_patch",
    "summarise",
]
