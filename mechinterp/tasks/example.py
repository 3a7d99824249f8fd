"""The one example type every task produces, and its JSONL round trip.

An `Example` is tokenizer-free text: documents, a question, gold answers, and the exact needle
strings planted in the gold documents. Rendering it for a model (chat template, token spans) is
`mechinterp.tasks.prompt.render`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from mechinterp.errors import InputError
from mechinterp.store import atomic_path

TaskName = Literal["niah", "mdqa", "multihop", "citation"]
TASK_NAMES: tuple[TaskName, ...] = ("niah", "mdqa", "multihop", "citation")


@dataclass(frozen=True)
class Document:
    """One passage of context. `gold` marks the passages that hold the answer."""

    text: str
    title: str = ""
    gold: bool = False


@dataclass(frozen=True)
class Example:
    """A long-context retrieval instance.

    `needles` are exact substrings of gold documents (the planted facts); `answers` are the
    accepted answer strings (the first is the reference). `meta` holds task coordinates such as
    `length`, `depth`, `seed`, `gold_index`; it must be JSON-serialisable.
    """

    id: str
    task: TaskName
    variant: str
    documents: tuple[Document, ...]
    question: str
    answers: tuple[str, ...]
    needles: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASK_NAMES:
            raise InputError(f"unknown task {self.task!r}; expected one of {TASK_NAMES}")
        if not self.documents:
            raise InputError(f"example {self.id!r} has no documents")
        if not self.answers or not all(a.strip() for a in self.answers):
            raise InputError(f"example {self.id!r} needs at least one non-empty answer")
        gold_text = [d.text for d in self.documents if d.gold]
        for needle in self.needles:
            if not any(needle in text for text in gold_text):
                raise InputError(
                    f"example {self.id!r}: needle {needle[:60]!r} is not an exact substring of "
                    "any gold document; plant it verbatim or mark its document gold=True"
                )

    @property
    def gold_indices(self) -> tuple[int, ...]:
        return tuple(i for i, d in enumerate(self.documents) if d.gold)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["meta"] = dict(self.meta)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Example:
        try:
            return cls(
                id=str(d["id"]),
                task=d["task"],
                variant=str(d["variant"]),
                documents=tuple(Document(**doc) for doc in d["documents"]),
                question=str(d["question"]),
                answers=tuple(d["answers"]),
                needles=tuple(d.get("needles", ())),
                meta=dict(d.get("meta", {})),
            )
        except (KeyError, TypeError) as e:
            raise InputError(f"malformed example record ({e!r}): {str(dict(d))[:200]}") from e


def write_jsonl(examples: Iterable[Example], path: str | Path) -> Path:
    """Write examples as JSONL atomically (temp file + rename)."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[Example]:
    """Read examples written by `write_jsonl`."""
    path = Path(path)
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(Example.from_dict(json.loads(line)))
            except (json.JSONDecodeError, ValueError) as e:
                raise InputError(f"{path}:{lineno}: {e}") from e
    return out
