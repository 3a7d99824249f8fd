"""Address corruptions: a question swap and a key swap give aligned prompt pairs that differ only
where the corruption is, with every needle's span recorded; what cannot be aligned is refused."""

from __future__ import annotations

import re

import pytest

from mechinterp.errors import InputError
from mechinterp.tasks.address import (
    AddressPair,
    address_pairs,
    key_word,
    key_words,
    misalignment,
    partner,
)
from mechinterp.tasks.niah import NEEDLES


@pytest.fixture(scope="module")
def tok():
    from mechinterp.models.load import model_tokenizer

    return model_tokenizer("smollm2-135m")


def _differing(a, b) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(a.input_ids, b.input_ids, strict=True)) if x != y]


def test_key_words_are_the_names_the_question_asks_about():
    keys = {i: key_word(n) for i, n in enumerate(NEEDLES)}
    assert keys[2] == "lighthouse" and keys[4] == "Ishida" and keys[13] == "Okonkwo"
    for i, n in enumerate(NEEDLES):  # in the needle before its answer, and in the question
        assert keys[i] in n.text[: n.text.find(n.answer)] and keys[i] in n.question


def test_a_question_swap_asks_for_the_other_needle_in_the_same_context(tok):
    pairs = address_pairs("question_swap", tok, lengths=[300], depths=[0.25, 0.75],
                          needles=[0, 3], seed=1)  # fmt: skip
    assert len(pairs) == 4
    for pair in pairs:
        clean, corrupt = pair.prompts(tok)
        a, b = NEEDLES[pair.clean.meta["needle_index"]], NEEDLES[pair.clean.meta["partner_index"]]
        assert pair.clean.documents == pair.corrupt.documents
        assert (pair.clean.question, pair.corrupt.question) == (a.question, b.question)
        assert clean.n_tokens == corrupt.n_tokens
        q0, q1 = clean.span("question")
        diff = _differing(clean, corrupt)
        assert diff and all(q0 <= i < q1 for i in diff)
        # both needles located, A first; each prompt's answer span lies in the needle it asks for
        (a0, a1), (b0, b1) = clean.spans["needle"]
        assert tok.decode(clean.input_ids[a0:a1]).strip().startswith(a.text[:20])
        assert tok.decode(clean.input_ids[b0:b1]).strip().startswith(b.text[:20])
        assert a0 <= clean.span("answer")[0] < a1 and b0 <= corrupt.span("answer")[0] < b1
        assert abs(a0 - b0) > 20  # half the context apart
    assert partner(0, tok) == 3


def test_a_key_swap_changes_only_the_key_inside_the_needle(tok):
    pairs = address_pairs("key_swap", tok, lengths=[300], depths=[0.5], needles=[2, 4], seed=1)
    for pair in pairs:
        clean, corrupt = pair.prompts(tok)
        n0, n1 = clean.span("needle")
        diff = _differing(clean, corrupt)
        assert diff and all(n0 <= i < n1 for i in diff)
        swapped = pair.corrupt.needles[0]
        head = swapped[: swapped.find(pair.clean.answers[0])]
        keys, subs = pair.key.split(", "), pair.substitute.split(", ")
        assert keys == key_words(NEEDLES[pair.clean.meta["needle_index"]])
        assert len(subs) == len(keys)
        assert not any(re.search(rf"\b{k}\b", head) for k in keys)  # the question matches none
        assert all(s_ in head for s_ in subs)
        assert pair.corrupt.answers == pair.clean.answers
        assert tok.decode(corrupt.input_ids[slice(*corrupt.span("answer"))]).strip() == (
            pair.clean.answers[0])  # fmt: skip
    # "Ishida" is three tokens here: three substitute words keep the pair aligned
    assert pairs[0].key == "password, old, lighthouse"
    keys = pairs[1].key.split(", ")
    subs = pairs[1].substitute.split(", ")
    assert "Ishida" in keys and len(subs[keys.index("Ishida")].split()) == 3


def test_what_cannot_be_aligned_is_refused(tok):
    with pytest.raises(InputError, match=r"needles \[2\] have no needle"):
        address_pairs("question_swap", tok, lengths=[300], depths=[0.5], needles=[2, 3])
    with pytest.raises(InputError, match="unknown address corruption"):
        address_pairs("content_swap", tok, lengths=[300], depths=[0.5], needles=1)
    (pair,) = address_pairs("key_swap", tok, lengths=[300], depths=[0.5], needles=[2], seed=1)
    clean, _ = pair.prompts(tok)
    assert misalignment(clean, clean, "needle") == "the prompts are identical"
    shifted = AddressPair("key_swap", pair.clean, pair.corrupt.__class__(
        **{**pair.corrupt.__dict__, "question": pair.clean.question + " Please."}))  # fmt: skip
    with pytest.raises(InputError, match="tokens"):
        shifted.prompts(tok)


@pytest.mark.integration
def test_the_embedded_model_follows_a_question_swap_with_its_retrieval_heads(smollm):
    """Measured at 300 tokens, seed 1: needle 0's question swap moves the answer to needle 3's
    and L21H8's attention from the last position onto needle 3 (its mass there grows by 0.58);
    needle 13's key swap loses the answer (the substitute no longer matches the question)."""
    from mechinterp.analysis.looking import needle_mass
    from mechinterp.heads import HeadShape
    from mechinterp.tasks.address import answered_apart

    tok = smollm.tokenizer
    (q,) = address_pairs("question_swap", tok, lengths=[300], depths=[0.25], needles=[0], seed=1)
    # the grid's haystacks are drawn needle by needle: needle 13's comes after 0's and 2's
    k = address_pairs("key_swap", tok, lengths=[300], depths=[0.25], needles=[0, 2, 13],
                      seed=1)[-1]  # fmt: skip
    rows = answered_apart(smollm, [q, k])
    assert [r["apart"] for r in rows] == [True, True]
    assert "Gizmo" in rows[0]["corrupt_answer"] and "Reginald" not in rows[1]["corrupt_answer"]
    clean, corrupt = q.prompts(tok)
    heads = HeadShape.of(smollm).all_heads()
    before, after = (needle_mass(smollm, [p], heads).pivot_table(
        index="head_name", columns="needle", values="mass") for p in (clean, corrupt))  # fmt: skip
    shift = (after[1] - before[1]).sort_values(ascending=False)
    assert shift.index[0] == "L21H8" and shift.iloc[0] == pytest.approx(0.583, abs=0.02)
    assert (after[1] + after[0] <= 1 + 1e-5).all()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from mechinterp.models.tiny import tiny_model

    return tiny_model(n_kv_heads=2, directory=tmp_path_factory.mktemp("address-tiny"))


def test_the_pair_is_read_where_the_two_answers_part(tiny_llama):
    from mechinterp.experiments.addressing import address_prompts

    tok = tiny_llama.tokenizer  # character-level: the key's letters reversed keep the alignment
    (pair,) = address_pairs("key_swap", tok, lengths=[600], depths=[0.5], needles=[2], seed=1)
    assert pair.substitute.split(", ")[-1] == "esuohthgil"
    base, _, facts = address_prompts(tiny_llama, pair, at="prompt_end")
    assert facts["lead_tokens"] == 0 and facts["first_changed"] >= base.span("needle")[0]
    clean, corrupt, facts = address_prompts(tiny_llama, pair, responses=([7, 8, 9, 10], [7, 8, 11]))
    assert facts["lead_tokens"] == 2  # the common start, then the first token that differs
    assert clean.input_ids == base.input_ids + (7, 8) and corrupt.input_ids[-2:] == (7, 8)
    assert clean.spans == base.spans  # the needles are where they were
    _, _, facts = address_prompts(tiny_llama, pair, responses=([7, 8], [7, 8, 11]))
    assert facts["lead_tokens"] == 2  # one answer stops where the other goes on
    with pytest.raises(InputError, match="answers the clean and the corrupt prompt alike"):
        address_prompts(tiny_llama, pair, responses=([7, 8], [7, 8]))
    with pytest.raises(InputError, match="at must be one of"):
        address_prompts(tiny_llama, pair, at="answer")
