"""Head detectors: each scores every query head and returns a `Detection`.

- `retrieval_scores`: Wu et al.'s copy-paste retrieval score (greedy decoding, success gate).
- `qr_scores`: QRHead attention mass from the question to the gold document (optionally calibrated).
- `pattern_scores`: previous-token, duplicate-token, induction heads on repeated random tokens.

`detect(model, examples, name, **settings)` runs a registered detector on task examples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from mechinterp.detect.patterns import PATTERN_KINDS, pattern_scores
from mechinterp.detect.qr import qr_scores
from mechinterp.detect.result import Detection
from mechinterp.detect.retrieval import NoInstancePassedError, copy_score, retrieval_scores
from mechinterp.errors import InputError
from mechinterp.tasks.example import Example

__all__ = [
    "DETECTORS",
    "Detection",
    "NoInstancePassedError",
    "copy_score",
    "detect",
    "pattern_scores",
    "qr_scores",
    "register_detector",
    "retrieval_scores",
]

#: A detector run on task examples: (model, examples, settings) -> Detection.
DetectorFn = Callable[..., Detection]
DETECTORS: dict[str, DetectorFn] = {}
#: Detectors that score task examples (the others build their own sequences).
NEEDS_EXAMPLES: set[str] = set()


def register_detector(name: str, fn: DetectorFn, *, needs_examples: bool) -> None:
    if name in DETECTORS:
        raise InputError(f"detector {name!r} is already registered")
    DETECTORS[name] = fn
    if needs_examples:
        NEEDS_EXAMPLES.add(name)


def _render(model, examples: Sequence[Example], template):
    from mechinterp.evaluate import render_all

    return render_all(model, examples, template=template)


def _retrieval(model, examples, *, template=None, **settings) -> Detection:
    prompts = _render(model, examples, template)
    return retrieval_scores(model, prompts, [ex.answers for ex in examples], **settings)


NULL_QUESTION = "N/A"


def _qr(model, examples, *, template=None, calibrate: bool = False, **settings) -> Detection:
    prompts = _render(model, examples, template)
    null = None
    if calibrate:
        null = _render(
            model, [dataclasses.replace(ex, question=NULL_QUESTION) for ex in examples], template
        )
    return qr_scores(model, prompts, null_prompts=null, **settings)


register_detector("retrieval", _retrieval, needs_examples=True)
register_detector("qr", _qr, needs_examples=True)
for _kind in PATTERN_KINDS:
    register_detector(
        _kind,
        lambda model, examples=None, *, _k=_kind, **s: pattern_scores(model, _k, **s),
        needs_examples=False,
    )


def detect(model, examples: Sequence[Example] | None, name: str, **settings: Any) -> Detection:
    """Run detector `name` (a key of `DETECTORS`) with its keyword settings."""
    if name not in DETECTORS:
        raise InputError(f"unknown detector {name!r}; expected one of {sorted(DETECTORS)}")
    if name in NEEDS_EXAMPLES and not examples:
        raise InputError(f"detector {name!r} needs task examples")
    return DETECTORS[name](model, examples, **settings)
