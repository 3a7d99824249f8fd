"""Experiments: each a config, its stages (shards on `mechinterp.runner`) and its report, composed
from the primitives below (`models`, `tasks`, `detect`, `interventions`, `finetune`,
`analysis`, `plots`).

- The single commands, each one module run by `command.run_command`: `eval`, `detect`,
  `knockout`, `patch`, `atp` and `path-patch` (`attribution`), `cross_patch`.
- `study`: the necessity & sufficiency study (`mechinterp study`).
- `extension`: the synthetic-context-extension pipeline (`mechinterp study extension`).
- `specs` (the model and task specs every experiment shares) and `rundir` (the run directory's
  lock, config check and seal).
"""

from functools import partial

from mechinterp.experiments.attribution import ATP, PATH_PATCH, AtpConfig, PathPatchConfig
from mechinterp.experiments.command import Command, run_command
from mechinterp.experiments.cross_patch import CROSS_PATCH, CrossPatchConfig
from mechinterp.experiments.detect import DETECT, DETECT_TASK, DetectConfig
from mechinterp.experiments.eval import EVAL, EvalConfig, summarise
from mechinterp.experiments.knockout import KNOCKOUT, KNOCKOUT_TASK, KnockoutConfig
from mechinterp.experiments.patch import PATCH, PATCH_TASK, HeadSelection, PatchConfig
from mechinterp.experiments.specs import (
    ModelSpec,
    TaskSpec,
    build_examples,
    parse_variant,
    read_head_scores,
)

#: The single commands by CLI name.
COMMANDS: dict[str, Command] = {
    c.name: c for c in (EVAL, DETECT, KNOCKOUT, PATCH, ATP, PATH_PATCH, CROSS_PATCH)
}

run_eval = partial(run_command, EVAL)
run_detect = partial(run_command, DETECT)
run_knockout = partial(run_command, KNOCKOUT)
run_patch = partial(run_command, PATCH)
run_cross_patch = partial(run_command, CROSS_PATCH)

__all__ = [
    "COMMANDS",
    "AtpConfig",
    "PathPatchConfig",
    "DETECT_TASK",
    "KNOCKOUT_TASK",
    "PATCH_TASK",
    "CrossPatchConfig",
    "DetectConfig",
    "EvalConfig",
    "HeadSelection",
    "KnockoutConfig",
    "ModelSpec",
    "PatchConfig",
    "TaskSpec",
    "build_examples",
    "parse_variant",
    "read_head_scores",
    "run_command",
    "run_cross_patch",
    "run_detect",
    "run_eval",
    "run_knockout",
    "run_patch",
    "summarise",
]
