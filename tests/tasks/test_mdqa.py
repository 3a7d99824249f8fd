from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mechinterp.tasks import haystack
from mechinterp.tasks.example import read_jsonl, write_jsonl
from mechinterp.tasks.mdqa import load_mdqa, synthetic_mdqa, variant_name

FIXTURE = Path(__file__).parent.parent / "fixtures" / "mdqa_sample.jsonl"
VARIANTS = [
    ("realistic", "high"),
    ("realistic", "low"),
    ("templated", "high"),
    ("templated", "low"),
    ("symbolic", "high"),
]
KV_LINE = re.compile(r"The value of key ([0-9a-f]{4}-[0-9a-f]{4}) is ([0-9a-f]{4}-[0-9a-f]{4})\.")


# --- real data --------------------------------------------------------------------------------


def test_load_mdqa_reads_gold_answers_titles_and_ids():
    exs = load_mdqa(FIXTURE)
    assert [e.id for e in exs] == ["mdqa_sample.jsonl:1", "nq-canberra", "mdqa_sample.jsonl:3"]
    assert [e.gold_indices for e in exs] == [(1,), (3,), (0,)]
    assert [e.meta["gold_index"] for e in exs] == [1, 3, 0]
    assert [e.meta["n_docs"] for e in exs] == [3, 4, 3]
    assert [e.meta["line"] for e in exs] == [1, 2, 3]
    assert exs[0].answers == ("Herman Melville",)
    assert exs[2].answers == ("1989", "9 November 1989")
    assert [d.title for d in exs[1].documents] == [
        "Australian Capital Territory", "Sydney", "Melbourne", "Canberra",
    ]  # fmt: skip
    assert all(e.task == "mdqa" and e.variant == "real" and e.needles == () for e in exs)
    assert exs[0].meta["source"] == "mdqa_sample.jsonl"


def test_isgold_wins_over_hasanswer_when_present():
    # Record 2 has a hasanswer=true distractor at index 0; only the isgold passage is gold.
    ex = load_mdqa(FIXTURE)[1]
    assert ex.gold_indices == (3,)
    assert ex.documents[3].text.startswith("Canberra is the capital")


def test_hasanswer_is_the_fallback_without_isgold_keys():
    ex = load_mdqa(FIXTURE)[2]
    assert ex.gold_indices == (0,)
    assert ex.documents[0].title == "Berlin Wall"


def test_load_mdqa_limit_and_variant():
    exs = load_mdqa(FIXTURE, limit=2, variant="nq-open-10")
    assert len(exs) == 2 and {e.variant for e in exs} == {"nq-open-10"}
    assert load_mdqa(FIXTURE, limit=0) == []


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps(
    {"question": "q", "answers": ["a"], "ctxs": [{"title": "t", "text": "a", "isgold": True}]}
)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"answers": ["a"], "ctxs": []}), "missing key 'question'"),
        (json.dumps({"question": "q", "answers": ["a"], "ctxs": []}), "ctxs must be a non-empty"),
        (
            json.dumps(
                {"question": "q", "answers": ["a"], "ctxs": [{"text": "x", "isgold": False}]}
            ),
            "no gold document",
        ),
        (
            json.dumps(
                {"question": "q", "answers": ["a"], "ctxs": [{"text": "x", "hasanswer": False}]}
            ),
            "hasanswer",
        ),
        (
            json.dumps({"question": "q", "answers": [], "ctxs": [{"text": "x", "isgold": True}]}),
            "answer",
        ),
        (json.dumps(["a list"]), "JSON object"),
    ],
)
def test_malformed_line_raises_with_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path, [GOOD, "", bad])
    with pytest.raises(ValueError, match=message) as info:
        load_mdqa(path)
    assert "bad.jsonl:3:" in str(info.value)


def test_empty_file_is_rejected(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.jsonl: no records"):
        load_mdqa(path)


# --- synthetic --------------------------------------------------------------------------------


@pytest.mark.parametrize(("realism", "diversity"), VARIANTS)
def test_synthetic_is_deterministic_in_the_seed(realism, diversity):
    a = synthetic_mdqa(3, realism=realism, diversity=diversity, seed=11)
    b = synthetic_mdqa(3, realism=realism, diversity=diversity, seed=11)
    c = synthetic_mdqa(3, realism=realism, diversity=diversity, seed=12)
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]
    assert [e.to_dict() for e in a] != [e.to_dict() for e in c]
    # A prefix does not depend on n.
    assert synthetic_mdqa(1, realism=realism, diversity=diversity, seed=11)[0] == a[0]


@pytest.mark.parametrize(("realism", "diversity"), VARIANTS)
def test_needle_is_planted_in_exactly_the_gold_document(realism, diversity):
    for ex in synthetic_mdqa(5, n_docs=6, realism=realism, diversity=diversity, seed=3):
        (needle,) = ex.needles
        assert ex.answers[0] in needle
        assert ex.gold_indices == (ex.meta["gold_index"],)
        assert [needle in d.text for d in ex.documents] == [d.gold for d in ex.documents]
        assert len(ex.documents) == ex.meta["n_docs"] == 6
        assert ex.variant == variant_name(realism, diversity)
        assert (ex.meta["realism"], ex.meta["seed"]) == (realism, 3)


def test_gold_position_is_honoured():
    for pos in (0, 4, 9):
        exs = synthetic_mdqa(3, realism="templated", diversity="low", gold_position=pos)
        assert all(e.gold_indices == (pos,) and e.meta["gold_index"] == pos for e in exs)


def test_random_gold_positions_vary():
    exs = synthetic_mdqa(30, realism="templated", diversity="low", seed=0)
    assert len({e.meta["gold_index"] for e in exs}) > 3


@pytest.mark.parametrize("pos", [-1, 10, "middle"])
def test_bad_gold_position_is_rejected(pos):
    with pytest.raises(ValueError, match="gold_position"):
        synthetic_mdqa(1, realism="templated", diversity="low", gold_position=pos)


def test_low_diversity_documents_are_only_filler_plus_the_needle():
    for ex in synthetic_mdqa(4, realism="realistic", diversity="low", seed=5, doc_words=60):
        for i, doc in enumerate(ex.documents):
            assert doc.title == f"Document {i + 1}"
            text = doc.text.replace(ex.needles[0], "") if doc.gold else doc.text
            sents = haystack.sentences(text)
            assert sents and set(sents) <= set(haystack.FILLER_SENTENCES)
            assert sum(len(s.split()) for s in sents) >= 60


def test_high_diversity_distractors_are_verbatim_essay_passages():
    essays = dict(haystack.essays())
    for ex in synthetic_mdqa(3, realism="templated", diversity="high", seed=2, doc_words=80):
        titles = [d.title for d in ex.documents]
        assert len(set(titles)) == len(titles)
        for doc in ex.documents:
            assert doc.title in essays
            if not doc.gold:
                assert doc.text in essays[doc.title]
                assert len(doc.text.split()) >= min(80, len(essays[doc.title].split()))


def test_high_diversity_gold_is_an_essay_passage_with_the_needle_at_a_sentence_boundary():
    essays = dict(haystack.essays())
    ex = synthetic_mdqa(1, realism="realistic", diversity="high", seed=9)[0]
    gold = ex.documents[ex.meta["gold_index"]]
    before, after = gold.text.split(ex.needles[0])
    assert before == "" or before.endswith(" ")
    for part in (before.strip(), after.strip()):
        assert part in essays[gold.title]


def test_symbolic_documents_are_key_value_lines_with_distinct_keys():
    for ex in synthetic_mdqa(
        3, n_docs=8, realism="symbolic", diversity="low", seed=1, doc_words=70
    ):
        assert ex.variant == "symbolic" and ex.meta["diversity"] == "n/a"
        keys, values = [], []
        for i, doc in enumerate(ex.documents):
            assert doc.title == f"Document {i + 1}"
            lines = doc.text.split("\n")
            assert len(lines) == 10
            for line in lines:
                m = KV_LINE.fullmatch(line)
                assert m is not None
                keys.append(m.group(1))
                values.append(m.group(2))
        assert len(set(keys)) == len(keys) == 80
        assert not set(keys) & set(values)
        assert values.count(ex.answers[0]) == 1


def test_symbolic_ignores_diversity():
    a = synthetic_mdqa(2, realism="symbolic", diversity="low", seed=4)
    b = synthetic_mdqa(2, realism="symbolic", diversity="high", seed=4)
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]


def test_jsonl_round_trip_is_lossless(tmp_path):
    exs = [
        *synthetic_mdqa(2, realism="realistic", diversity="high", seed=1),
        *synthetic_mdqa(2, realism="symbolic", diversity="low", seed=1),
        *load_mdqa(FIXTURE),
    ]
    back = read_jsonl(write_jsonl(exs, tmp_path / "mdqa.jsonl"))
    assert [e.to_dict() for e in back] == [e.to_dict() for e in exs]


def test_bad_synthetic_arguments_are_rejected():
    with pytest.raises(ValueError, match="diversity"):
        synthetic_mdqa(1, realism="templated", diversity="medium")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_docs"):
        synthetic_mdqa(1, n_docs=0, realism="templated", diversity="low")
