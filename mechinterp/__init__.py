"""mechinterp: retrieval heads in long-context LLMs — detect, knock out, patch.

`import mechinterp as mi` gives what a notebook reaches for (each loaded on first use): the
model loader, heads, the task builders and prompt rendering, `mi.detect(model, examples,
"retrieval")`, knockout and the knockout sweep, patching, attribution patching, path patching,
cross-model patching, and the answer metrics on logits. Every result has `.frame()` (a tidy
DataFrame in the run tables' columns) and `.plot()` (the command's figure). Everything else
lives in the subpackages.

`mi.detect` is the `mechinterp.detect` subpackage made callable: calling it runs a registered
detector (`mechinterp.detect.detect`), and its attributes are the subpackage's
(`mi.detect.retrieval_scores`).
"""

import sys
from importlib import import_module
from types import ModuleType

__version__ = "0.1.0"

_PUBLIC = {
    "load_model": "mechinterp.models",
    "Head": "mechinterp.heads",
    "HeadShape": "mechinterp.heads",
    "parse_heads": "mechinterp.heads",
    "render_all": "mechinterp.evaluate",
    "answer_ids": "mechinterp.evaluate",
    "context_end": "mechinterp.tasks.prompt",
    "corrupt_answer": "mechinterp.tasks.corrupt",
    "rank_heads": "mechinterp.analysis.headsets",
    "random_complement": "mechinterp.analysis.headsets",
    "knockout_sweep": "mechinterp.interventions",
    "summarise_sweep": "mechinterp.interventions",
    "patch_sets": "mechinterp.interventions",
    "answer_pair": "mechinterp.interventions",
    "logit_diff_metric": "mechinterp.interventions",
    "logprob_metric": "mechinterp.interventions",
    "normalised_recovery": "mechinterp.interventions",
    "attribution_patch": "mechinterp.interventions",
    "path_patch": "mechinterp.interventions",
    "path_patch_inputs": "mechinterp.interventions",
    "knockout": "mechinterp.interventions",
    "KnockoutSpec": "mechinterp.interventions",
    "patch_heads": "mechinterp.interventions",
    "patch_nodes": "mechinterp.interventions",
    "cross_patch": "mechinterp.interventions",
    "cross_model_patching": "mechinterp.interventions",
    "patch_head_sets": "mechinterp.interventions",
    "summarise_cross": "mechinterp.interventions",
    "PatchResult": "mechinterp.interventions",
    "AttributionResult": "mechinterp.interventions",
    "Detection": "mechinterp.detect",
    "retrieval_scores": "mechinterp.detect",
    "qr_scores": "mechinterp.detect",
    "pattern_scores": "mechinterp.detect",
    "AnswerMetric": "mechinterp.metrics",
    "answer_logit_diff": "mechinterp.metrics",
    "answer_logprob": "mechinterp.metrics",
    "answer_prob": "mechinterp.metrics",
    "niah_grid": "mechinterp.tasks.niah",
    "synthetic_mdqa": "mechinterp.tasks.mdqa",
    "load_mdqa": "mechinterp.tasks.mdqa",
    "synthetic_multihop": "mechinterp.tasks.multihop",
    "load_musique": "mechinterp.tasks.multihop",
    "synthetic_citation": "mechinterp.tasks.citation",
    "load_summhay": "mechinterp.tasks.citation",
}
__all__ = sorted([*_PUBLIC, "detect"])


class _CallableDetect(ModuleType):
    """The `mechinterp.detect` subpackage, callable as its `detect` function."""

    def __call__(self, model, examples, name: str, **settings):
        """Run detector `name` (`mechinterp.detect.detect`)."""
        return self.detect(model, examples, name, **settings)


class _Package(ModuleType):
    """This package: when the `detect` subpackage is imported (and bound here as `detect`), it
    is made callable, so `mi.detect(...)` runs a detector however it was first imported."""

    def __setattr__(self, name: str, value) -> None:
        if name == "detect" and type(value) is ModuleType:
            value.__class__ = _CallableDetect
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name == "detect":
        return import_module("mechinterp.detect")
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'mechinterp' has no attribute {name!r}")
