"""The citation task: bullet and citation parsing, citation F1 by hand, the SummHay loader on a
hand-written haystack, the synthetic generator, exact spans, evaluation and detection."""

from pathlib import Path

import pytest
import torch

from mechinterp.detect import retrieval_scores
from mechinterp.evaluate import evaluate, is_correct
from mechinterp.tasks.citation import (
    citation_scores,
    load_summhay,
    parse_bullets,
    reference_summary,
    synthetic_citation,
)
from mechinterp.tasks.example import read_jsonl, write_jsonl
from mechinterp.tasks.prompt import render

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "summhay_sample.json"
BOND = "A municipal bond will cover most of the construction cost."
INSIGHTS = [
    {"id": "a", "text": BOND, "docs": [1, 4]},
    {"id": "b", "text": "Local donors pledged money for the children's wing.", "docs": [3]},
]


def test_bullets_and_their_citations_are_parsed():
    text = "Here:\n- First point [1][4]\n  continued here [2]\n* Second [3]\n1. Third, no citation"
    assert parse_bullets(text) == [
        ("Here:", frozenset()),
        ("First point continued here", frozenset({1, 2, 4})),
        ("Second", frozenset({3})),
        ("Third, no citation", frozenset()),
    ]
    assert parse_bullets("plain line [2]\nanother [5]") == [
        ("plain line", frozenset({2})), ("another", frozenset({5}))
    ]


def test_citation_f1_by_hand():
    perfect = citation_scores(reference_summary(INSIGHTS), INSIGHTS)
    assert perfect == {"citation_precision": 1.0, "citation_recall": 1.0, "citation_f1": 1.0,
                       "coverage": 1.0}
    # insight a cited [1][2]: pair (a,1) right, (a,2) wrong; insight b not covered at all.
    partial = citation_scores("- A municipal bond will cover most of the cost [1][2]", INSIGHTS)
    assert partial["citation_precision"] == pytest.approx(1 / 2)
    assert partial["citation_recall"] == pytest.approx(1 / 3)  # gold: (a,1) (a,4) (b,3)
    assert partial["citation_f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert partial["coverage"] == 0.5
    # a bullet that matches no insight's words cites nothing that counts
    off = citation_scores("- The weather was mild [1][3][4]", INSIGHTS)
    assert off["citation_f1"] == 0.0 and off["coverage"] == 0.0
    with pytest.raises(ValueError, match="insights"):
        citation_scores("x", [])


def test_summhay_haystack_loads_one_example_per_subtopic():
    exs = load_summhay(FIXTURE)
    assert [ex.task for ex in exs] == ["citation", "citation"]
    funding, site = exs
    assert len(funding.documents) == 5 and funding.variant == "real"
    assert funding.meta["insights"] == [
        {"id": "a", "text": INSIGHTS[0]["text"], "docs": [1, 4]},
        {"id": "b", "text": INSIGHTS[1]["text"], "docs": [3]},
    ]
    assert funding.gold_indices == (0, 2, 3)
    assert funding.answers[0] == reference_summary(funding.meta["insights"])
    # the insight no document contains is left out; the subtopic keeps the one that is held
    assert [ins["id"] for ins in site.meta["insights"]] == ["c"]
    assert site.gold_indices == (2,)
    assert "2 main insights" in funding.question and "[1][4]" in funding.question


def test_a_malformed_haystack_is_refused_by_name(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"topic": "x"}')
    with pytest.raises(ValueError, match="needs 'documents' and 'subtopics'"):
        load_summhay(bad)


@pytest.mark.parametrize(("realism", "diversity"), [
    ("realistic", "high"), ("realistic", "low"), ("templated", "high"), ("templated", "low"),
    ("symbolic", "high"),
])  # fmt: skip
def test_synthetic_insights_are_planted_verbatim_where_the_meta_says(realism, diversity, tmp_path):
    exs = synthetic_citation(3, n_docs=6, n_insights=2, docs_per_insight=2, realism=realism,
                             diversity=diversity, seed=4)  # fmt: skip
    assert exs == synthetic_citation(3, n_docs=6, n_insights=2, docs_per_insight=2,
                                     realism=realism, diversity=diversity, seed=4)  # fmt: skip
    for ex in exs:
        docs = [d.text for d in ex.documents]
        for ins in ex.meta["insights"]:
            holding = [j + 1 for j, t in enumerate(docs) if ins["text"] in t]
            assert holding == ins["docs"] and len(holding) == 2
        assert citation_scores(ex.answers[0], ex.meta["insights"])["citation_f1"] == 1.0
    assert read_jsonl(write_jsonl(exs, tmp_path / "c.jsonl")) == exs
    with pytest.raises(ValueError, match="need at least 6 documents"):
        synthetic_citation(1, n_docs=5, n_insights=3, docs_per_insight=2, realism=realism,
                           diversity=diversity)  # fmt: skip


def test_rendered_spans_are_exact_tokens_of_each_document_and_insight(tiny_gqa):
    (ex,) = synthetic_citation(1, n_docs=5, realism="templated", diversity="low", doc_words=20)
    prompt = render(ex, tiny_gqa.tokenizer)
    tok = tiny_gqa.tokenizer
    assert len(prompt.spans["document"]) == 5 and len(prompt.spans["gold_doc"]) == 4
    for (s, e), ins in zip(prompt.spans["needle"], ex.meta["insights"], strict=True):
        assert tok.decode(prompt.input_ids[s:e]) == ins["text"]
    for j, (s, e) in enumerate(prompt.spans["document"]):
        assert tok.decode(prompt.input_ids[s:e]) == ex.documents[j].text
        # the document's number, as citations name it, precedes its text
        assert f"Document [{j + 1}]" in tok.decode(prompt.input_ids[max(0, s - 40) : s])


def test_evaluation_reports_citation_f1_and_detection_runs_on_the_insight_spans(tiny_gqa):
    exs = synthetic_citation(2, n_docs=4, realism="symbolic", diversity="high", doc_words=15)
    df = evaluate(tiny_gqa, exs, max_new_tokens=4, progress=False)
    assert {"citation_f1", "citation_precision", "citation_recall", "coverage"} <= set(df)
    assert df["citation_f1"].between(0, 1).all()
    assert (df["correct"] == (df["citation_f1"] >= 0.5)).all()
    insights = exs[0].meta["insights"]
    assert is_correct("citation", exs[0].answers[0], [], insights=insights)
    assert not is_correct("citation", "- nothing relevant [1]", [], insights=insights)
    prompts = [render(ex, tiny_gqa.tokenizer) for ex in exs]
    d = retrieval_scores(tiny_gqa, prompts, [ex.answers for ex in exs], gate=None,
                         max_new_tokens=4)  # fmt: skip
    assert d.per_instance.shape[0] == 2 and torch.isfinite(d.per_instance).all()
