"""Multi-hop QA: answering needs two (or more) gold documents among distractors.

Real data is MuSiQue JSONL, one record a line:
`{"id", "paragraphs": [{"idx", "title", "paragraph_text", "is_supporting"}], "question", "answer",
"answer_aliases": [...], "answerable": bool}`. The gold documents are the supporting paragraphs.

Synthetic variants plant a two-hop fact pair (`mechinterp.tasks.needles.make_two_hop`): each hop's
fact goes into its own gold document, at two distinct random positions, among distractors built
exactly as in `mechinterp.tasks.mdqa` (same variant names, same haystack kinds).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mechinterp.errors import InputError
from mechinterp.tasks.example import Document, Example
from mechinterp.tasks.mdqa import (
    HaystackDiversity,
    as_str,
    as_str_list,
    build_documents,
    check_synthetic_args,
    file_example,
    read_examples,
    synthetic_example,
)
from mechinterp.tasks.needles import NeedleRealism, make_two_hop


def _musique_example(record: Mapping[str, Any], *, source: str, line: int, variant: str) -> Example:
    question = as_str(record["question"], "question")
    answerable = bool(record.get("answerable", True))
    aliases = as_str_list(record.get("answer_aliases", []), "answer_aliases", empty=True)
    answers = (as_str(record["answer"], "answer"), *aliases)
    paragraphs = record["paragraphs"]
    if not isinstance(paragraphs, list) or not paragraphs:
        raise InputError("paragraphs must be a non-empty list")
    if not all(isinstance(p, dict) for p in paragraphs):
        raise InputError("every paragraph must be a JSON object")
    documents = tuple(
        Document(
            text=as_str(p["paragraph_text"], f"paragraphs[{i}].paragraph_text", empty=True),
            title=as_str(p.get("title") or "", f"paragraphs[{i}].title", empty=True),
            gold=bool(p.get("is_supporting", False)),
        )
        for i, p in enumerate(paragraphs)
    )
    gold = [i for i, d in enumerate(documents) if d.gold]
    if answerable and not gold:
        raise InputError("no supporting paragraph (no paragraph has is_supporting=true)")
    return file_example(record, "multihop", documents, question, dict.fromkeys(answers),
                        source=source, line=line, variant=variant, gold_indices=gold,
                        answerable=answerable)  # fmt: skip


def load_musique(
    path: str | Path,
    *,
    limit: int | None = None,
    include_unanswerable: bool = False,
    variant: str = "real",
) -> list[Example]:
    """Read MuSiQue records as `Example`s (task `"multihop"`).

    Answers are `(answer, *answer_aliases)` without duplicates. Records with `answerable` false
    are skipped unless `include_unanswerable`; kept ones may have no gold document. `limit`
    counts returned examples. Errors name the file and line.
    """
    def make(record, source: str, line: int) -> Example | None:
        if not include_unanswerable and record.get("answerable", True) is False:
            return None
        return _musique_example(record, source=source, line=line, variant=variant)

    return read_examples(path, limit, make)


def synthetic_multihop(
    n: int,
    *,
    n_docs: int = 10,
    realism: NeedleRealism,
    diversity: HaystackDiversity,
    seed: int = 0,
    doc_words: int = 100,
) -> list[Example]:
    """`n` synthetic two-hop examples: each hop's fact in its own gold document among `n_docs`.

    Example `i` is drawn from `random.Random(f"multihop:{seed}:{i}")`. `needles` are the two fact
    texts in hop order; `meta["gold_indices"]` are their document positions in the same order
    (hop 1 may come after hop 2), and `meta["bridge"]` is the bridge entity.
    """
    check_synthetic_args(n, n_docs, doc_words, min_docs=2)
    out = []
    for i in range(n):
        rng = random.Random(f"multihop:{seed}:{i}")
        positions = rng.sample(range(n_docs), 2)
        hop = make_two_hop(rng, realism)
        docs = build_documents(
            rng, dict(zip(positions, hop.facts, strict=True)), n_docs=n_docs, realism=realism,
            diversity=diversity, doc_words=doc_words,
        )  # fmt: skip
        out.append(synthetic_example(
            "multihop", i, docs, hop.question, hop.answer, [f.text for f in hop.facts],
            seed=seed, realism=realism, diversity=diversity, gold_indices=positions,
            bridge=hop.bridge))  # fmt: skip
    return out
