"""mechinterp: retrieval heads in long-context LLMs — detect, knock out, patch.

The names users reach for first are importable from the top (loaded on first use): the model
loader, the task builders and prompt rendering, the detectors, head ranking and random baselines,
knockout and patching. Everything else lives in the subpackages (`mechinterp.detect.detect`, the
detector registry, is one: the name `detect` at the top is the subpackage)."""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "load_model": "mechinterp.models",
    "Head": "mechinterp.heads",
    "HeadShape": "mechinterp.heads",
    "parse_heads": "mechinterp.heads",
    "render_all": "mechinterp.evaluate",
    "corrupt_answer": "mechinterp.tasks.corrupt",
    "rank_heads": "mechinterp.analysis.headsets",
    "random_complement": "mechinterp.analysis.headsets",
    "knockout_sweep": "mechinterp.interventions",
    "summarise_sweep": "mechinterp.interventions",
    "patch_sets": "mechinterp.interventions",
    "answer_pair": "mechinterp.interventions",
    "logit_diff_metric": "mechinterp.interventions",
    "attribution_patch": "mechinterp.interventions",
    "path_patch": "mechinterp.interventions",
    "knockout": "mechinterp.interventions",
    "KnockoutSpec": "mechinterp.interventions",
    "patch_heads": "mechinterp.interventions",
    "Detection": "mechinterp.detect",
    "retrieval_scores": "mechinterp.detect",
    "qr_scores": "mechinterp.detect",
    "pattern_scores": "mechinterp.detect",
    "niah_grid": "mechinterp.tasks.niah",
    "synthetic_mdqa": "mechinterp.tasks.mdqa",
    "load_mdqa": "mechinterp.tasks.mdqa",
    "synthetic_multihop": "mechinterp.tasks.multihop",
    "load_musique": "mechinterp.tasks.multihop",
    "synthetic_citation": "mechinterp.tasks.citation",
    "load_summhay": "mechinterp.tasks.citation",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'mechinterp' has no attribute {name!r}")
