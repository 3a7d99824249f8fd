"""mechinterp: retrieval heads in long-context LLMs — detect, knock out, patch.

The names users reach for first are importable from the top (loaded on first use):
`load_model`, `knockout`, `KnockoutSpec`, `patch_heads`, `Detection`, the detectors
and the task builders."""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "load_model": "mechinterp.models",
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
