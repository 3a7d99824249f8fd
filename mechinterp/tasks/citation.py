"""The citation task, in the Summary-of-a-Haystack format (Laban et al. 2024, arXiv 2407.01370).

A haystack is a topic with subtopics; each subtopic has insights; each document lists the ids
of the insights it contains. One example per subtopic: every document of the haystack in order
(`Document [i]`), and a request to summarise the subtopic's insights as bullets citing the
documents that contain each one, like `[1][4]`. There is no judge model: `citation_scores`
matches each bullet to the insight whose words it covers best (ROUGE-1 recall > 0.5) and scores
the bullets' citations against the documents that contain that insight.

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
from typing import Any

from mechinterp.tasks.example import Document, Example
from mechinterp.tasks.mdqa import (
    HaystackDiversity,
    build_documents,
    check_synthetic_args,
    synthetic_example,
)
from mechinterp.tasks.needles import NeedleRealism, make_facts

_CITE = re.compile(r"\[(\d+)\]")
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")


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


def parse_bullets(text: str) -> list[tuple[str, frozenset[int]]]:
    """(text without citations, cited document numbers) per bullet of a summary. Lines that start
    with `-`, `*`, `•` or `1.` open a bullet; other non-empty lines continue the current one
    (a summary without bullet marks is one bullet per line)."""
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
        cited = frozenset(int(m) for m in _CITE.findall(joined))
        out.append((" ".join(_CITE.sub(" ", joined).split()), cited))
    return out


def citation_scores(
    prediction: str, insights: Sequence[Mapping[str, Any]], *, match: float = 0.5
) -> dict[str, float]:
    """Citation precision, recall and F1 over (insight, document) pairs, and coverage.

    Each bullet is assigned to the insight whose words it covers best (ROUGE-1 recall of the
    insight's words in the bullet, counted only above `match`); its citations then count as that
    insight's predicted documents. Gold pairs are (insight, each document containing it), so an
    insight no bullet covers loses all its pairs (recall), and a wrong citation costs
    precision. `coverage` is the share of insights some bullet covers."""
    from mechinterp.metrics import rouge1_recall

    if not insights:
        raise ValueError("citation_scores needs the example's insights (Example.meta['insights'])")
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


# ---------------------------------------------------------------- the released format


def load_summhay(path: str | Path, *, limit: int | None = None) -> list[Example]:
    """One example per subtopic of a SummHay haystack JSON file (all its documents, in order)."""
    path = Path(path)
    try:
        topic = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable SummHay haystack JSON file ({e})") from e
    try:
        docs = topic["documents"]
        subtopics = topic["subtopics"]
        name = str(topic.get("topic", path.stem))
    except (KeyError, TypeError) as e:
        raise ValueError(
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
            raise ValueError(f"{where}: malformed ({e!r})") from e
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
        raise ValueError(f"{path}: no subtopic has an insight that a document contains")
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
        raise ValueError("n_insights and docs_per_insight must be >= 1")
    if n_insights * docs_per_insight > n_docs:
        raise ValueError(
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
