from __future__ import annotations

import random
import re

import pytest

from mechinterp.tasks.needles import (
    NEEDLE_REALISMS,
    Fact,
    TwoHop,
    make_fact,
    make_facts,
    make_two_hop,
)

HEX_KEY = re.compile(r"^[0-9a-f]{4}-[0-9a-f]{4}$")


@pytest.mark.parametrize("realism", NEEDLE_REALISMS)
def test_fact_answer_occurs_once_in_text_and_never_in_question(realism):
    rng = random.Random(0)
    for _ in range(200):
        fact = make_fact(rng, realism)
        assert fact.text.count(fact.answer) == 1
        assert fact.answer not in fact.question
        assert fact.subject in fact.text and fact.subject in fact.question


@pytest.mark.parametrize("realism", NEEDLE_REALISMS)
def test_facts_are_deterministic_in_the_seed(realism):
    a = make_facts(random.Random(7), realism, 5)
    b = make_facts(random.Random(7), realism, 5)
    c = make_facts(random.Random(8), realism, 5)
    assert a == b
    assert a != c


def test_realistic_facts_use_several_sentence_forms():
    rng = random.Random(1)
    questions = {make_fact(rng, "realistic").question.split()[0:2][0] for _ in range(200)}
    assert {"Which", "What", "In"} <= questions


def test_templated_fact_follows_the_rigid_template():
    fact = make_fact(random.Random(3), "templated")
    m = re.fullmatch(r"The (.+) of (.+) is (.+)\.", fact.text)
    assert m is not None
    relation, subject, value = m.groups()
    assert (subject, value) == (fact.subject, fact.answer)
    assert fact.question == f"What is the {relation} of {subject}?"


def test_symbolic_fact_is_a_hex_key_value_line():
    fact = make_fact(random.Random(0), "symbolic")
    assert HEX_KEY.match(fact.subject) and HEX_KEY.match(fact.answer)
    assert fact.text == f"The value of key {fact.subject} is {fact.answer}."
    assert fact.question == f"What is the value of key {fact.subject}?"


@pytest.mark.parametrize("realism", NEEDLE_REALISMS)
def test_make_facts_never_repeats_a_subject_or_answer(realism):
    facts = make_facts(random.Random(2), realism, 12)
    entities = [f.subject for f in facts] + [f.answer for f in facts]
    assert len(set(entities)) == len(entities)


def test_make_facts_respects_avoid():
    first = make_facts(random.Random(5), "symbolic", 3)
    avoid = {first[0].subject, first[1].answer}
    again = make_facts(random.Random(5), "symbolic", 3, avoid=avoid)
    assert not avoid & {s for f in again for s in (f.subject, f.answer)}


def test_make_facts_refuses_more_facts_than_the_pools_hold():
    with pytest.raises(ValueError, match="distinct templated facts"):
        make_facts(random.Random(0), "templated", 500)


@pytest.mark.parametrize("realism", NEEDLE_REALISMS)
def test_two_hop_chains_through_a_bridge_the_question_does_not_name(realism):
    rng = random.Random(4)
    for _ in range(100):
        hop = make_two_hop(rng, realism)
        f1, f2 = hop.facts
        assert f1.answer == hop.bridge == f2.subject
        assert hop.answer == f2.answer and hop.answer in f2.text
        assert hop.answer not in f1.text
        assert f1.subject in hop.question
        assert hop.bridge not in hop.question and hop.answer not in hop.question
        assert len({f1.subject, hop.bridge, hop.answer}) == 3


def test_fact_rejects_an_answer_missing_from_its_text():
    with pytest.raises(ValueError, match="not in fact text"):
        Fact("The sky is blue.", "What colour is the sky?", "green")


def test_two_hop_rejects_an_unchained_pair():
    f1 = Fact("The mentor of A B is C D.", "Who is the mentor of A B?", "C D", "A B")
    f2 = Fact("The favorite city of E F is Oslo.", "?", "Oslo", "E F")
    with pytest.raises(ValueError, match="bridge"):
        TwoHop((f1, f2), "What is the favorite city of the mentor of A B?", "Oslo")


def test_unknown_realism_is_rejected():
    with pytest.raises(ValueError, match="unknown needle realism"):
        make_fact(random.Random(0), "poetic")  # type: ignore[arg-type]
