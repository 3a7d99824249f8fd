"""The synthetic-context-extension experiment (`mechinterp study extension`): fine-tune on task
variants, then compare their retrieval heads with a reference model's and judge the claims.

- `config`: `ExtensionConfig` (and `TaskRun` for several tasks).
- `stages`: the data of each split and one shard function per stage.
- `heads`: each model's head set and its overlap with the reference's (tables only).
- `run`: `run_extension` / `run_tasks`, the shards in order, then the analysis.
- `report` / `tasks`: claims, report.md and figures from the stored tables (one task / pooled).
"""

from mechinterp.experiments.extension.config import (
    LIMITED,
    REFERENCE_LABEL,
    ExtensionClaims,
    ExtensionConfig,
    LofitStage,
    ModelKnockout,
    TaskRun,
    performance_metric,
)
from mechinterp.experiments.extension.heads import compare_heads, head_sets, model_scores
from mechinterp.experiments.extension.run import run_extension, run_tasks
from mechinterp.experiments.extension.stages import build_data, data_args

__all__ = [
    "LIMITED",
    "REFERENCE_LABEL",
    "ExtensionClaims",
    "ExtensionConfig",
    "LofitStage",
    "ModelKnockout",
    "TaskRun",
    "build_data",
    "compare_heads",
    "data_args",
    "head_sets",
    "model_scores",
    "performance_metric",
    "run_extension",
    "run_tasks",
]
