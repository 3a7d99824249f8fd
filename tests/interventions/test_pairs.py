"""`answer_pair`: the clean / corrupt pair that patches a retrieved answer token."""

import pytest
import torch

from mechinterp.interventions.pairs import answer_pair
from mechinterp.tasks.corrupt import corrupt_answer
from mechinterp.tasks.prompt import Prompt

TEXT = "the code is figs. what is the code?"
ANSWER = (12, 16)  # "figs"


def _prompt(model) -> Prompt:
    ids = tuple(model.tokenizer.encode(TEXT, add_special_tokens=False))
    assert model.tokenizer.decode(ids[ANSWER[0] : ANSWER[1]]) == "figs"
    return Prompt("p0", TEXT, ids, {"answer": (ANSWER,), "document": ((0, 17),)})


def _diff(model, ids, good: int, bad: int) -> float:
    """Brute force: logit[good] − logit[bad] after a plain forward of `ids`."""
    with torch.no_grad():
        logits = model(torch.tensor([list(ids)]))[0, -1]
    return float(logits[good] - logits[bad])


def test_answer_pair_teacher_forces_the_response_up_to_the_corrupted_token(tiny):
    prompt = _prompt(tiny)
    answer = list(prompt.input_ids[ANSWER[0] : ANSWER[1]])
    response = [5, 6] + answer + [7]
    pair = answer_pair(tiny, prompt, response=(response, 2, 2 + len(answer)), max_tries=4)
    i = pair.answer_offset
    assert pair.clean == prompt.input_ids + tuple(response[: 2 + i])
    assert pair.target_token == response[2 + i] == answer[i]
    assert pair.corrupted_position == ANSWER[0] + i
    differ = [p for p, (a, b) in enumerate(zip(pair.clean, pair.corrupt, strict=True)) if a != b]
    assert differ == [pair.corrupted_position]
    assert pair.corrupt[pair.corrupted_position] == pair.corrupt_token
    assert pair.patch_from == prompt.n_tokens - 1  # scope "response"
    clean = _diff(tiny, pair.clean, pair.target_token, pair.corrupt_token)
    corrupt = _diff(tiny, pair.corrupt, pair.target_token, pair.corrupt_token)
    assert pair.flipped == (clean > 0 > corrupt)
    with torch.no_grad():
        logits = tiny(torch.tensor([list(pair.clean)]))[:, -1]
    assert float(pair.metric(logits)[0]) == pytest.approx(clean, abs=1e-5)
    # brute force over the first 4 answer tokens: the first whose replacement flips, else the first
    flips = []
    for j in range(4):
        c = corrupt_answer(prompt, tiny.tokenizer, offset=j)
        lead = prompt.input_ids + tuple(response[: 2 + j])
        bad = (*c.corrupt, *response[: 2 + j])
        good_tok = response[2 + j]
        flips.append(_diff(tiny, lead, good_tok, c.corrupt_token) > 0
                     > _diff(tiny, bad, good_tok, c.corrupt_token))  # fmt: skip
    expected = flips.index(True) if any(flips) else 0
    assert (i, pair.offsets_tried) == (expected, expected + 1 if any(flips) else 4)


def test_answer_pair_tries_only_the_first_token_when_the_response_answers_otherwise(tiny):
    prompt = _prompt(tiny)
    pair = answer_pair(tiny, prompt, response=([5, 6, 8, 9, 7], 2, 4), max_tries=4)
    assert (pair.answer_offset, pair.offsets_tried) == (0, 1)
    assert pair.target_token == 8


def test_answer_pair_scope_sets_the_first_patched_position(tiny):
    prompt = _prompt(tiny)
    answer = list(prompt.input_ids[ANSWER[0] : ANSWER[1]])
    resp = (answer, 0, len(answer))
    assert answer_pair(tiny, prompt, response=resp, scope="all").patch_from == 0
    assert answer_pair(tiny, prompt, response=resp, scope="query").patch_from == 17


def test_answer_pair_names_the_example_when_the_model_does_not_answer(tiny):
    with pytest.raises(ValueError, match="'p0'.*does not write the needle's answer"):
        answer_pair(tiny, _prompt(tiny), max_new_tokens=4)
