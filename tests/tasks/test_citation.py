"""The citation task: citation parsing on a table of model-written forms, bullet parsing, citation
F1 and the correctness gate by hand, the cite-every-document baseline, the SummHay loader on a
hand-written haystack, the synthetic generator, exact spans, evaluation and detection."""

import dataclasses
from pathlib import Path

import pytest
import torch

from mechinterp.detect import retrieval_scores
from mechinterp.evaluate import evaluate, is_correct
from mechinterp.tasks.citation import (
    citation_correct,
    citation_scores,
    cite_all_baseline,
    cite_every_document,
    load_summhay,
    parse_bullets,
    parse_citations,
    reference_summary,
    strip_citations,
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


@pytest.mark.parametrize(("text", "cited"), [
    # the prompt's own form and the forms models write instead
    ("The bond covers the cost [2].", {2}),
    ("The bond covers the cost [2][5].", {2, 5}),
    ("The bond covers the cost [2] [5].", {2, 5}),
    ("The bond covers the cost [2, 5].", {2, 5}),
    ("The bond covers the cost [2,5].", {2, 5}),
    ("The bond covers the cost [2; 5].", {2, 5}),
    ("The bond covers the cost [2 and 5].", {2, 5}),
    ("The bond covers the cost [12].", {12}),
    ("The bond covers the cost [Document 2].", {2}),
    ("The bond covers the cost [Documents 2, 5].", {2, 5}),
    ("The bond covers the cost [Doc 2, Doc 5].", {2, 5}),
    ("The bond covers the cost [Doc 2].", {2}),
    ("The bond covers the cost (Doc 2).", {2}),
    ("The bond covers the cost (Document 2, 5).", {2, 5}),
    ("The bond covers the cost (Documents 2 & 5).", {2, 5}),
    ("Documents 2 and 5 say the bond covers the cost.", {2, 5}),
    ("Documents 2, 5, and 7 say the bond covers the cost.", {2, 5, 7}),
    ("According to Document 2, the bond covers the cost.", {2}),
    ("According to document 2 and document 5, the bond covers it.", {2, 5}),
    ("As doc 2 notes, the bond covers the cost.", {2}),
    ("DOCUMENT 3 says so.", {3}),
    ("Document [2] says so.", {2}),
    ("Documents [2] and [5] say so.", {2, 5}),
    ("Document [1][4] says so.", {1, 4}),
    ("Doc. 3 says so.", {3}),
    ("doc #4 says so.", {4}),
    ("Sources: Document2.", {2}),
    ("The bond covers the cost [2-4].", {2, 3, 4}),
    ("The bond covers the cost [2–4].", {2, 3, 4}),
    ("Documents 2 to 4 agree.", {2, 3, 4}),
    ("The bond covers the cost (see Document 2).", {2}),
    # numbers that are not citations
    ("In 2019 there were 5 new clinics.", set()),
    ("1. The bond covers the cost.", set()),
    ("The bond was issued [2019].", set()),
    ("Two goals: (1) a new wing and (2) a garden.", set()),
    ("It cost [1.5] million.", set()),
    ("Donors gave [5,000] dollars.", set()),
    ("The second document agrees.", set()),
    ("Both documents agree; 2 of them mention the bond.", set()),
    ("See the footnote [see note 2].", set()),
    ("It is stated in the document. 2 new clinics opened.", set()),
    ("The documentation 2 pages long.", set()),
    ("The doctor 2 saw patients.", set()),
    ("The 2 documents disagree.", set()),
    ("Document 2019 was the budget.", set()),
])  # fmt: skip
def test_citations_are_read_in_the_forms_models_write_them(text, cited):
    assert parse_citations(text) == frozenset(cited)


def test_citations_are_stripped_from_the_text_they_leave():
    assert strip_citations("The bond (see Document 2) covers [2, 5] it.") == "The bond covers it."
    assert strip_citations("In 2019 there were 5 [2019].") == "In 2019 there were 5 [2019]."


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
    # a numbered list's numbers are bullet marks, not citations
    assert parse_bullets("1. Bond [Document 4]\n2. Donors (Docs 3, 5)") == [
        ("Bond", frozenset({4})), ("Donors", frozenset({3, 5}))
    ]  # fmt: skip


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


@pytest.mark.parametrize("summary", [
    f"- {BOND} [1, 4]\n- Local donors pledged money for the children's wing. [3]",
    f"- {BOND} [Document 1][Document 4]\n- Local donors pledged money for the children's wing "
    "[Document 3]",
    f"- {BOND} (Documents 1 and 4)\n- Local donors pledged money for the children's wing (Doc 3)",
    f"1. According to Documents 1 and 4, {BOND.lower()}\n2. Document 3: local donors pledged "
    "money for the children's wing.",
])  # fmt: skip
def test_correct_citations_in_any_accepted_form_score_one(summary):
    scores = citation_scores(summary, INSIGHTS)
    assert scores == {"citation_precision": 1.0, "citation_recall": 1.0, "citation_f1": 1.0,
                      "coverage": 1.0}  # fmt: skip
    assert citation_correct(scores)


def test_the_gate_needs_every_insight_covered_and_both_minimums():
    # one bullet merging both insights covers only the first: its [3] is a wrong pair for it
    merged = citation_scores(f"- {BOND[:-1]}, and local donors pledged money for the children's "
                             "wing [1][3][4]", INSIGHTS)  # fmt: skip
    assert merged["coverage"] == 0.5
    assert merged["citation_precision"] == pytest.approx(2 / 3)
    assert merged["citation_recall"] == pytest.approx(2 / 3)
    assert merged["citation_f1"] >= 0.5 and not citation_correct(merged)  # F1 alone passed it
    # both covered, one of a's two documents cited: recall 2/3, precision 1
    half = citation_scores(f"- {BOND} [1]\n- Local donors pledged money for the children's "
                           "wing [3]", INSIGHTS)  # fmt: skip
    assert half["citation_recall"] == pytest.approx(2 / 3) and half["coverage"] == 1.0
    assert citation_correct(half)
    assert not citation_correct(half, min_recall=0.7)
    # both covered, two wrong documents beside the three right ones: precision 3/5
    noisy = citation_scores(f"- {BOND} [1][2][4]\n- Local donors pledged money for the "
                            "children's wing [3][5]", INSIGHTS)  # fmt: skip
    assert noisy["citation_precision"] == pytest.approx(3 / 5)
    assert citation_correct(noisy) and not citation_correct(noisy, min_precision=0.61)
    with pytest.raises(ValueError, match="min_precision must lie in"):
        citation_correct(noisy, min_precision=1.5)


def test_citing_every_document_is_scored_as_the_baseline():
    text = cite_every_document(INSIGHTS, 5)
    assert text.splitlines() == [f"- {BOND} [1][2][3][4][5]",
                                 "- Local donors pledged money for the children's wing. "
                                 "[1][2][3][4][5]"]  # fmt: skip
    # 10 cited pairs, 3 of them gold: precision 0.3, recall 1, F1 0.6 / 1.3
    scores = citation_scores(text, INSIGHTS)
    assert scores["citation_precision"] == pytest.approx(0.3)
    assert scores["citation_recall"] == 1.0 and scores["coverage"] == 1.0
    assert scores["citation_f1"] == pytest.approx(0.6 / 1.3)
    assert not citation_correct(scores) and citation_correct(scores, min_precision=0.3)
    exs = synthetic_citation(3, n_docs=5, realism="templated", diversity="low", doc_words=10)
    base = cite_all_baseline(exs)
    assert list(base["example_id"]) == [ex.id for ex in exs]
    # 2 insights in 2 of 5 documents each: precision 4 / 10 in every example
    assert base["citation_precision"].tolist() == pytest.approx([0.4] * 3)
    assert base["citation_f1"].tolist() == pytest.approx([0.8 / 1.4] * 3)
    assert not base["correct"].any()
    assert cite_all_baseline(exs, min_precision=0.4)["correct"].all()
    with pytest.raises(ValueError, match="citation examples only"):
        cite_all_baseline([dataclasses.replace(exs[0], task="mdqa")])


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
    gate = [citation_correct(r) for r in df[["citation_precision", "citation_recall",
                                              "coverage"]].to_dict("records")]  # fmt: skip
    assert df["correct"].tolist() == gate
    insights = exs[0].meta["insights"]
    assert is_correct("citation", exs[0].answers[0], [], insights=insights)
    assert not is_correct("citation", "- nothing relevant [1]", [], insights=insights)
    prompts = [render(ex, tiny_gqa.tokenizer) for ex in exs]
    d = retrieval_scores(tiny_gqa, prompts, [ex.answers for ex in exs], gate=None,
                         max_new_tokens=4)  # fmt: skip
    assert d.per_instance.shape[0] == 2 and torch.isfinite(d.per_instance).all()
