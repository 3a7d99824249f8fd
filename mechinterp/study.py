"""Deprecated: the study moved to `mechinterp.experiments.study` (this alias goes in the next
release)."""

import warnings

from mechinterp.experiments.study import *  # noqa: F403
from mechinterp.experiments.study import __all__  # noqa: F401

warnings.warn(
    "mechinterp.study moved to mechinterp.experiments.study; import from there",
    DeprecationWarning,
    stacklevel=2,
)
