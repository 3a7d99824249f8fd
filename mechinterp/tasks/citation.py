"""The citation task, in the Summary-of-a-Haystack format (Laban et al. 2024, arXiv 2407.01370).

A haystack is a topic with subtopics; each subtopic has insights; each document lists the ids
of the insights it contains. One example per subtopic: every document of the haystack in order
(`Document [i]`), and a request to summarise the subtopic's insights as bullets citing the
documents that contain each one, like `[1][4]`. There is no judge model: `parse_citations`
reads the citations in the forms models write them (`[2, 5]`, `[Document 2]`, `Documents 2 and
5`, ...), `citation_scores` matches each bullet to the insight whose words it covers best
(ROUGE-1 recall > 0.5) and scores the bullets' citations against the documents that contain that
insight, and `citation_correct` is the task's pass/fail gate (every insight covered, citation
precision and recall each at least 0.5). `cite_all_baseline` scores the response that cites every
document, the floor a model's citations have to beat.

- `load_summhay(path)`: the released format (one JSON haystack per file: `topic`, `subtopics[]`
  with `subtopic`, `query` and `insights[]` with `insight_id` and `insight`, `documents[]` with
  `document_text` and `insights_included`).
- `synthetic_citation(n, realism=…, diversity=…)`: the same shape, generated along the axes of
  the other tasks: needle realism (realistic / templated / symbolic insights) × haystack
  diversity (essay passages or repetitive filler). Each insight is planted verbatim in its own
  documents, so it is also a needle (an exact token span) for retrieval-head detection.

In `Example.meta["insights"]` each insight is `{"id", "text", "docs"}` with `docs` the 1-based
numbers of the documents that contain it, as the prompt shows them. Gold documents are those
that contain any of the subtopic's insights (`gold_doc` spans when rendered).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mechinterp.errors import InputError
from mechinterp.tasks.example import Document, Example
from mechinterp.tasks.mdqa import (
    HaystackDiversity,
    build_documents,
    check_synthetic_args,
    decode_utf8,
    synthetic_example,
)
from mechinterp.tasks.needles import NeedleRealism, make_facts

if TYPE_CHECKING:
    import pandas as pd

_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")

# A document number: 1 to 3 digits, not part of a longer number, a decimal or a thousands group
# (so a year such as 2019 or an amount such as 5,000 is never one).
_NUM = r"(?<!\d)\d{1,3}(?!\d|\.\d|,\d{3}(?!\d))"
_ITEM = rf"{_NUM}(?:\s*[-–—]\s*{_NUM}|\s+(?:to|through)\s+{_NUM})?"  # 2, or a range 2-4
_SEP = r"(?:\s*,\s*(?:and\s+|&\s*)?|\s*[;&]\s*|\s+and\s+)"
# Document, Documents, Doc, Docs, Doc. (not "document." ending a sentence), then an optional #
_KW = r"\b(?:docs?\.|doc(?:ument)?s?(?![a-z.]))\s*(?:#\s*)?"
_BRACKETED = rf"\[\s*(?:{_KW})?{_ITEM}(?:{_SEP}(?:{_KW})?{_ITEM})*\s*\]"
_K_ITEM = rf"(?:{_ITEM}|\[\s*{_ITEM}\s*\])"
_PHRASE = rf"{_KW}{_K_ITEM}(?:{_SEP}(?:{_KW})?{_K_ITEM})*"
_CITE = re.compile(rf"{_BRACKETED}|\(\s*{_PHRASE}\s*\)|{_PHRASE}", re.IGNORECASE)
_RANGE = re.compile(rf"({_NUM})(?:\s*[-–—]\s*|\s+(?:to|through)\s+)({_NUM})", re.IGNORECASE)
_EMPTY = re.compile(r"\((?:\s*(?:see|cf\.))?\s*\)|\[(?:\s*(?:see|cf\.))?\s*\]", re.IGNORECASE)

#: The defaults of `citation_correct`: citation precision and recall must each reach these.
MIN_PRECISION = 0.5
MIN_RECALL = 0.5


def question_for(subtopic: str, n_insights: int) -> str:
    """The request of a citation example (the SummHay summarisation instruction, shortened)."""
    return (
        f'Summarize the {n_insights} main insights about "{subtopic}" as a bullet list, one '
        "sentence per insight. After each insight, cite every document that contains it by its "
        "number, like [1][4]."
    )


def reference_summary(insights: Sequence[Mapping[str, Any]]) -> str:
    """The gold answer: one bullet per insight with its documents cited."""
    return "\n".join(
        f"- {ins['text']} " + "".join(f"[{d}]" for d in ins["docs"]) for ins in insights
    )


def parse_citations(text: str) -> frozenset[int]:
    """The document numbers `text` cites, in the forms models write them.

    The prompt labels documents `Document [i]` and asks for citations like `[1][4]`; models
    answer in that form and in others. Read as citations (case-insensitive):

    - bare numbers in square brackets: `[2]`, `[2][5]`, `[2, 5]`, `[2; 5]`, `[2 and 5]`;
    - the document keyword (`Document`, `Documents`, `Doc`, `Docs`, `Doc.`, optionally `#`)
      followed by numbers, bracketed or not, in brackets, parentheses or running text:
      `[Document 2]`, `[Doc 2, Doc 5]`, `(Doc 2)`, `(Document 2, 5)`, `Documents 2 and 5`,
      `Document [2]`, `doc #2`;
    - ranges inside either form: `[2-4]`, `Documents 2 to 4` (both ends included).

    Not read as citations: numbers in prose without brackets or the keyword (`in 2019 there were
    5 ...`), list numbering (`1. ...`, `2) ...`), bare numbers in parentheses (`(2)` reads as an
    enumeration), a number of four or more digits even in brackets (`[2019]` is a year; no
    haystack here has 1000 documents), decimals and thousands (`[1.5]`, `[5,000]`), ordinals
    (`the second document`), brackets holding other words (`[see note 2]`), and `document.`
    ending a sentence before a number. A number that names no document (`[0]`, `[99]` of 8) is
    still a citation, and a wrong one."""
    cited: set[int] = set()
    for m in _CITE.finditer(text):
        rest = m.group(0)
        for r in _RANGE.finditer(rest):
            a, b = sorted((int(r.group(1)), int(r.group(2))))
            cited.update(range(a, b + 1))
        cited.update(int(n) for n in re.findall(_NUM, _RANGE.sub(" ", rest)))
    return frozenset(cited)


def strip_citations(text: str) -> str:
    """`text` without the citations `parse_citations` reads (and the brackets they leave empty
    or holding only "see" or "cf."), whitespace collapsed."""
    return " ".join(_EMPTY.sub(" ", _CITE.sub(" ", text)).split())


def parse_bullets(text: str) -> list[tuple[str, frozenset[int]]]:
    """(text without citations, cited document numbers) per bullet of a summary. Lines that start
    with `-`, `*`, `•` or `1.` open a bullet; other non-empty lines continue the current one
    (a summary without bullet marks is one bullet per line). Citations are read by
    `parse_citations`; the bullet mark is removed first, so list numbering is not one."""
    bullets: list[list[str]] = []
    has_marks = any(_BULLET.match(line) for line in text.splitlines())
    for line in text.splitlines():
        if not line.strip():
            continue
        if _BULLET.match(line) or not has_marks or not bullets:
            bullets.append([_BULLET.sub("", line)])
        else:
            bullets[-1].append(line)
    out = []
    for parts in bullets:
        joined = " ".join(p.strip() for p in parts)
        out.append((strip_citations(joined), parse_citations(joined)))
    return out


def citation_scores(
    prediction: str, insights: Sequence[Mapping[str, Any]], *, match: float = 0.5
) -> dict[str, float]:
    """Citation precision, recall and F1 over (insight, document) pairs, and coverage.

    Each bullet covers at most one insight: the one whose words it covers best (ROUGE-1 recall
    of the insight's words in the bullet, counted only above `match`; ties go to the earlier
    insight). Its citations then count as that insight's predicted documents. A bullet that
    merges two insights therefore covers only the better-matched one, and its citations of the
    other insight's documents are wrong pairs: each insight needs its own bullet. Gold pairs are
    (insight, each document containing it), so an insight no bullet covers loses all its pairs
    (recall), and a wrong citation costs precision. `coverage` is the share of insights some
    bullet covers. Citations are read by `parse_citations`."""
    from mechinterp.metrics import rouge1_recall

    if not insights:
        raise InputError("citation_scores needs the example's insights (Example.meta['insights'])")
    predicted: set[tuple[int, int]] = set()
    covered: set[int] = set()
    for text, cited in parse_bullets(prediction):
        recalls = [rouge1_recall(text, [ins["text"]]) for ins in insights]
        best = max(range(len(insights)), key=recalls.__getitem__)
        if recalls[best] > match:
            covered.add(best)
            predicted |= {(best, d) for d in cited}
    gold = {(i, d) for i, ins in enumerate(insights) for d in ins["docs"]}
    hits = len(predicted & gold)
    precision = hits / len(predicted) if predicted else 0.0
    recall = hits / len(gold) if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {
        "citation_precision": precision,
        "citation_recall": recall,
        "citation_f1": f1,
        "coverage": len(covered) / len(insights),
    }


def citation_correct(
    scores: Mapping[str, float],
    *,
    min_precision: float = MIN_PRECISION,
    min_recall: float = MIN_RECALL,
) -> bool:
    """The citation task's gate on `citation_scores`: correct when every insight is covered
    (coverage 1, one bullet per insight, see `citation_scores`) and citation precision and
    recall each reach their minimum (defaults `MIN_PRECISION` = `MIN_RECALL` = 0.5: at least half
    the cited (insight, document) pairs are right and at least half the gold pairs are cited).

    Citing every document for every insight has recall 1 and precision equal to the share of
    (insight, document) pairs that are gold, so it passes only where the insights' documents make
    up at least `min_precision` of that grid (`cite_all_baseline` measures it)."""
    for name, value in (("min_precision", min_precision), ("min_recall", min_recall)):
        if not 0 <= value <= 1:
            raise InputError(f"{name} must lie in [0, 1], got {value}")
    return (
        scores["coverage"] == 1.0
        and scores["citation_precision"] >= min_precision
        and scores["citation_recall"] >= min_recall
    )


def cite_every_document(insights: Sequence[Mapping[str, Any]], n_docs: int) -> str:
    """The cite-everything response: one bullet per insight, stated verbatim, each citing every
    document `[1]`...`[n_docs]`. Its coverage is 1 by construction, so its scores measure the
    citations alone."""
    every = "".join(f"[{d}]" for d in range(1, n_docs + 1))
    return "\n".join(f"- {ins['text']} {every}" for ins in insights)


def cite_all_baseline(
    examples: Sequence[Example],
    *,
    min_precision: float = MIN_PRECISION,
    min_recall: float = MIN_RECALL,
) -> pd.DataFrame:
    """Per example (a DataFrame row): `citation_scores` of `cite_every_document` for its
    insights and documents, and `correct` by `citation_correct` at the given minimums. The floor
    a model's citations must beat: a model that cites indiscriminately scores about this."""
    import pandas as pd

    rows = []
    for ex in examples:
        if ex.task != "citation":
            raise InputError(f"example {ex.id!r} is a {ex.task} example; the cite-all baseline "
                             "scores citation examples only, pass those")  # fmt: skip
        scores = citation_scores(cite_every_document(ex.meta["insights"], len(ex.documents)),
                                 ex.meta["insights"])  # fmt: skip
        correct = citation_correct(scores, min_precision=min_precision, min_recall=min_recall)
        rows.append({"example_id": ex.id, **scores, "correct": correct})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the released format


def load_summhay(path: str | Path, *, limit: int | None = None) -> list[Example]:
    """One example per subtopic of a SummHay haystack JSON file (all its documents, in order)."""
    path = Path(path)
    try:
        topic = json.loads(decode_utf8(path.read_bytes(), str(path)))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a readable SummHay haystack JSON file ({e})") from e
    try:
        docs = topic["documents"]
        subtopics = topic["subtopics"]
        name = str(topic.get("topic", path.stem))
    except (KeyError, TypeError) as e:
        raise InputError(
            f"{path}: a SummHay haystack needs 'documents' and 'subtopics' (missing {e})"
        ) from e
    out = []
    for s, sub in enumerate(subtopics[:limit] if limit is not None else subtopics):
        where = f"{path}: subtopic {s}"
        try:
            ids = {str(ins["insight_id"]): str(ins["insight"]) for ins in sub["insights"]}
            contains = [{str(i) for i in d.get("insights_included", ())} for d in docs]
            texts = [str(d["document_text"]) for d in docs]
            subtopic = str(sub.get("subtopic") or sub.get("subtopic_name") or f"subtopic {s}")
        except (KeyError, TypeError) as e:
            raise InputError(f"{where}: malformed ({e!r})") from e
        insights = [
            {"id": iid, "text": text,
             "docs": [j + 1 for j, inc in enumerate(contains) if iid in inc]}
            for iid, text in ids.items()
        ]  # fmt: skip
        insights = [ins for ins in insights if ins["docs"]]  # an insight no document holds
        if not insights:
            continue
        gold = {d for ins in insights for d in ins["docs"]}
        out.append(Example(
            id=f"summhay-{path.stem}-{s}", task="citation", variant="real",
            documents=tuple(Document(t, gold=j + 1 in gold) for j, t in enumerate(texts)),
            question=question_for(subtopic, len(insights)),
            answers=(reference_summary(insights),),
            meta={"topic": name, "subtopic": subtopic, "query": sub.get("query", ""),
                  "insights": insights, "n_docs": len(texts)},
        ))  # fmt: skip
    if not out:
        raise InputError(f"{path}: no subtopic has an insight that a document contains")
    return out


# ---------------------------------------------------------------- synthetic haystacks


def synthetic_citation(
    n: int,
    *,
    n_docs: int = 8,
    n_insights: int = 2,
    docs_per_insight: int = 2,
    realism: NeedleRealism,
    diversity: HaystackDiversity,
    seed: int = 0,
    doc_words: int = 60,
) -> list[Example]:
    """`n` synthetic citation examples: `n_insights` insights (planted facts), each verbatim in
    `docs_per_insight` distinct documents among `n_docs` (one insight per gold document).

    Example `i` is drawn from its own `random.Random(f"citation:{seed}:{i}")`, as the other
    generators do. Symbolic insights are key-value lines in key-value documents."""
    check_synthetic_args(n, n_docs, doc_words)
    if n_insights < 1 or docs_per_insight < 1:
        raise InputError("n_insights and docs_per_insight must be >= 1")
    if n_insights * docs_per_insight > n_docs:
        raise InputError(
            f"{n_insights} insights × {docs_per_insight} documents each need at least "
            f"{n_insights * docs_per_insight} documents, got n_docs={n_docs}"
        )
    out = []
    for i in range(n):
        rng = random.Random(f"citation:{seed}:{i}")
        facts = make_facts(rng, realism, n_insights)
        slots = rng.sample(range(n_docs), n_insights * docs_per_insight)
        planted = {slot: facts[k // docs_per_insight] for k, slot in enumerate(slots)}
        docs = build_documents(rng, planted, n_docs=n_docs, realism=realism,
                               diversity=diversity, doc_words=doc_words)  # fmt: skip
        insights = [
            {"id": f"i{k}", "text": fact.text,
             "docs": sorted(s + 1 for s, f in planted.items() if f is fact)}
            for k, fact in enumerate(facts)
        ]  # fmt: skip
        subtopic = "the facts these documents state about " + ", ".join(f.subject for f in facts)
        out.append(synthetic_example(
            "citation", i, docs, question_for(subtopic, n_insights),
            reference_summary(insights), [f.text for f in facts], seed=seed, realism=realism,
            diversity=diversity, insights=insights))  # fmt: skip
    return out
