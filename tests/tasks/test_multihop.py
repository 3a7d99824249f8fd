from __future__ import annotations

import json
from pathlib import Path

import pytest

from mechinterp.tasks import haystack
from mechinterp.tasks.example import read_jsonl, write_jsonl
from mechinterp.tasks.multihop import load_musique, synthetic_multihop

FIXTURE = Path(__file__).parent.parent / "fixtures" / "musique_sample.jsonl"
VARIANTS = [
    ("realistic", "high"),
    ("realistic", "low"),
    ("templated", "high"),
    ("templated", "low"),
    ("symbolic", "low"),
]


# --- real data --------------------------------------------------------------------------------


def test_load_musique_skips_unanswerable_and_reads_supporting_paragraphs():
    exs = load_musique(FIXTURE)
    assert [e.id for e in exs] == ["2hop__101_202", "3hop1__505_606_707"]
    assert [e.gold_indices for e in exs] == [(1, 3), (0, 2, 4)]
    assert [e.meta["gold_indices"] for e in exs] == [[1, 3], [0, 2, 4]]
    assert exs[0].answers == ("Paris", "City of Light")
    assert exs[1].answers == ("1879", "in 1879")
    assert [d.title for d in exs[0].documents] == [
        "Loire", "Victor Hugo", "Besancon", "Les Miserables",
    ]  # fmt: skip
    assert all(e.task == "multihop" and e.variant == "real" and e.needles == () for e in exs)
    assert [e.meta["line"] for e in exs] == [1, 3]


def test_load_musique_can_include_unanswerable():
    exs = load_musique(FIXTURE, include_unanswerable=True)
    assert [e.id for e in exs] == ["2hop__101_202", "2hop__303_404", "3hop1__505_606_707"]
    assert exs[1].gold_indices == () and exs[1].meta["answerable"] is False


def test_load_musique_limit_counts_returned_examples():
    assert [e.id for e in load_musique(FIXTURE, limit=2)] == [
        "2hop__101_202", "3hop1__505_606_707",
    ]  # fmt: skip


def _record(**overrides):
    record = {
        "id": "x",
        "paragraphs": [{"idx": 0, "title": "t", "paragraph_text": "p", "is_supporting": True}],
        "question": "q",
        "answer": "a",
        "answer_aliases": [],
        "answerable": True,
    }
    record.update(overrides)
    return {k: v for k, v in record.items() if v is not None}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("[1, 2", "invalid JSON"),
        (json.dumps(_record(answer=None)), "missing key 'answer'"),
        (json.dumps(_record(paragraphs=[])), "paragraphs must be a non-empty"),
        (
            json.dumps(
                _record(paragraphs=[{"title": "t", "paragraph_text": "p", "is_supporting": False}])
            ),
            "no supporting paragraph",
        ),
        (json.dumps(_record(answer_aliases="Paris")), "answer_aliases"),
    ],
)
def test_malformed_line_raises_with_file_and_line(tmp_path, bad, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_record()) + "\n" + bad + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        load_musique(path)
    assert "bad.jsonl:2:" in str(info.value)


def test_empty_file_is_rejected(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="no records"):
        load_musique(path)


# --- synthetic --------------------------------------------------------------------------------


@pytest.mark.parametrize(("realism", "diversity"), VARIANTS)
def test_synthetic_is_deterministic_in_the_seed(realism, diversity):
    a = synthetic_multihop(3, realism=realism, diversity=diversity, seed=5)
    b = synthetic_multihop(3, realism=realism, diversity=diversity, seed=5)
    c = synthetic_multihop(3, realism=realism, diversity=diversity, seed=6)
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]
    assert [e.to_dict() for e in a] != [e.to_dict() for e in c]


@pytest.mark.parametrize(("realism", "diversity"), VARIANTS)
def test_each_hop_is_planted_in_its_own_gold_document(realism, diversity):
    for ex in synthetic_multihop(6, n_docs=5, realism=realism, diversity=diversity, seed=1):
        assert ex.task == "multihop" and len(ex.needles) == 2
        p1, p2 = ex.meta["gold_indices"]
        assert p1 != p2 and sorted((p1, p2)) == list(ex.gold_indices)
        assert ex.needles[0] in ex.documents[p1].text
        assert ex.needles[1] in ex.documents[p2].text
        for i, doc in enumerate(ex.documents):
            if i not in (p1, p2):
                assert not any(n in doc.text for n in ex.needles)
        assert ex.answers[0] in ex.needles[1] and ex.answers[0] not in ex.needles[0]
        assert ex.meta["bridge"] in ex.needles[0] and ex.meta["bridge"] in ex.needles[1]
        assert ex.meta["bridge"] not in ex.question


def test_hop_positions_vary_and_hop_one_may_come_second():
    exs = synthetic_multihop(30, realism="templated", diversity="low", seed=0)
    positions = [tuple(e.meta["gold_indices"]) for e in exs]
    assert len(set(positions)) > 5
    assert any(p1 > p2 for p1, p2 in positions) and any(p1 < p2 for p1, p2 in positions)


def test_low_diversity_distractors_are_only_filler():
    for ex in synthetic_multihop(3, realism="realistic", diversity="low", seed=2):
        for doc in ex.documents:
            text = doc.text
            for needle in ex.needles:
                text = text.replace(needle, "")
            assert set(haystack.sentences(text)) <= set(haystack.FILLER_SENTENCES)


def test_high_diversity_distractors_are_verbatim_essay_passages():
    essays = dict(haystack.essays())
    for ex in synthetic_multihop(3, realism="templated", diversity="high", seed=2):
        for doc in ex.documents:
            if not doc.gold:
                assert doc.text in essays[doc.title]


def test_jsonl_round_trip_is_lossless(tmp_path):
    exs = [
        *synthetic_multihop(2, realism="realistic", diversity="high", seed=1),
        *synthetic_multihop(2, realism="symbolic", diversity="low", seed=1),
        *load_musique(FIXTURE, include_unanswerable=True),
    ]
    back = read_jsonl(write_jsonl(exs, tmp_path / "multihop.jsonl"))
    assert [e.to_dict() for e in back] == [e.to_dict() for e in exs]


def test_multihop_needs_two_documents():
    with pytest.raises(ValueError, match="n_docs must be >= 2"):
        synthetic_multihop(1, n_docs=1, realism="templated", diversity="low")
