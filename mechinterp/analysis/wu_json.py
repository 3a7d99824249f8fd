"""Wu et al.'s head-score JSON: `{"layer-head": [score per detection instance, ...]}`.

Read it to use published head lists; write it so the reference tools can read ours. This is the
only place the `"layer-head"` key form is parsed or written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mechinterp.analysis.headsets import HeadScores
from mechinterp.errors import InputError
from mechinterp.heads import Head, HeadShape
from mechinterp.store import write_text


def read_wu_scores(
    path: str | Path, shape: HeadShape | None = None
) -> tuple[HeadScores, dict[Head, list[float]]]:
    """(mean score per head as a layer × head matrix, per-instance scores per head).

    Without `shape` the matrix is sized by the largest layer and head in the file. Heads the file
    does not list score 0.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise InputError(f"{path} is empty; expected a Wu head-score JSON object")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(raw, dict) or not raw:
        raise InputError(f'{path} must be a non-empty JSON object {{"layer-head": [scores]}}')
    per_head: dict[Head, list[float]] = {}
    for key, values in raw.items():
        try:
            head = Head.parse(key)
        except ValueError:
            raise InputError(f"{path}: key {key!r} is not 'layer-head'") from None
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        ):
            raise InputError(f"{path}: head {key!r} needs a non-empty list of numbers")
        per_head[head] = [float(v) for v in values]
    if shape is None:
        shape = HeadShape(max(h.layer for h in per_head) + 1, max(h.head for h in per_head) + 1, 1)
    scores = torch.zeros(shape.n_layers, shape.n_heads, dtype=torch.float64)
    for head, values in per_head.items():
        shape.validate(head)
        scores[head.layer, head.head] = sum(values) / len(values)
    return scores, per_head


def wu_scores(per_instance: Mapping[Head, Sequence[float]]) -> dict[str, list[float]]:
    """Per-instance scores in Wu's format (`{"layer-head": [...]}`), heads in (layer, head)
    order."""
    if not per_instance:
        raise InputError("no head scores to write")
    return {h.wu_key: [float(v) for v in per_instance[h]] for h in sorted(per_instance)}


def write_wu_scores(path: str | Path, per_instance: Mapping[Head, Sequence[float]]) -> Path:
    """Write per-instance scores in Wu's format (atomically)."""
    return write_text(path, json.dumps(wu_scores(per_instance)))
