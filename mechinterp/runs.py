"""Deprecated: the single commands moved to `mechinterp.experiments` (`run_eval`, `EvalConfig`,
...; this alias goes in the next release)."""

import warnings

from mechinterp.experiments import *  # noqa: F403
from mechinterp.experiments import __all__  # noqa: F401

warnings.warn(
    "mechinterp.runs moved to mechinterp.experiments; import from there",
    DeprecationWarning,
    stacklevel=2,
)
