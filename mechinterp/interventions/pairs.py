"""Clean / corrupt pairs for patching a retrieved answer.

`answer_pair(model, prompt)` replaces one answer token inside the needle by another word's single
token (a *content* corruption: it changes what a retrieval head copies, not where it looks) and
teacher-forces the model's clean response up to where it writes that token, so the metric,
logit(clean token) − logit(corrupt token), is read exactly where the answer is retrieved. Of the
first `max_tries` answer tokens it takes the first whose replacement flips the model's preference
(clean metric > 0 > corrupt metric). The study's patching, attribution and path-patching stages
build their pairs with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mechinterp.errors import InputError
from mechinterp.interventions.knockout import Scope, scope_start
from mechinterp.interventions.resume import Metric, logit_diff_metric
from mechinterp.tasks.corrupt import Corruption, corrupt_answer
from mechinterp.tasks.prompt import Prompt


@dataclass(frozen=True)
class AnswerPair:
    """A pair `patch_heads`, `patch_sets`, `attribution_patch` and `path_patch` take:
    `clean` / `corrupt` token ids (prompt + teacher-forced response), the patched positions'
    start (`patch_from`, the scope's first position) and the metric's two tokens."""

    clean: tuple[int, ...]
    corrupt: tuple[int, ...]
    patch_from: int
    target_token: int
    corrupt_token: int
    corrupted_position: int
    answer_offset: int
    offsets_tried: int
    flipped: bool

    @property
    def metric(self) -> Metric:
        """logit(clean token) − logit(corrupt token) at the last position."""
        return logit_diff_metric(self.target_token, self.corrupt_token)


def response_answer(model, prompt: Prompt, max_new_tokens: int) -> tuple[list[int], int, int]:
    """The model's greedy response to `prompt` and where it writes the needle's answer tokens:
    (response ids, answer start, answer end); an error names the example when it does not."""
    from mechinterp.evaluate import generate

    (gen,) = generate(model, [prompt.input_ids], max_new_tokens=max_new_tokens)
    resp = [int(t) for t in gen.tokens]
    return (resp, *answer_in_response(prompt, resp, gen.text))


def answer_in_response(prompt: Prompt, response: Sequence[int], text: str = "") -> tuple[int, int]:
    """Where `response` (token ids) first writes the needle's answer tokens of `prompt`."""
    p0, p1 = prompt.span("answer")
    answer = list(prompt.input_ids[p0:p1])
    resp = list(response)
    for a0 in range(len(resp) - len(answer) + 1):
        if resp[a0 : a0 + len(answer)] == answer:
            return a0, a0 + len(answer)
    raise InputError(
        f"the model's greedy response to {prompt.example_id!r} ({text!r}) does not write the "
        "needle's answer tokens: pick an example it answers, or pass `response=`"
    )


def answer_pair(
    model,
    prompt: Prompt,
    *,
    response: tuple[Sequence[int], int, int] | None = None,
    seed: int = 0,
    max_tries: int = 4,
    scope: Scope = "response",
    max_new_tokens: int = 32,
) -> AnswerPair:
    """The clean / corrupt pair for `prompt` (a rendered example with an `answer` span: NIAH and
    the synthetic needle tasks).

    `response` is `(response_ids, answer_start, answer_end)`: the clean response to teacher-force
    and where in it the answer is written. By default it is the model's greedy response, and an
    error names the example when that response does not write the needle's answer. When the
    given response's answer differs from the needle's, only the first answer token is tried.
    When no tried token flips the preference, the first is returned (`flipped` is False).
    """
    if response is None:
        response = response_answer(model, prompt, max_new_tokens)
    resp, a0, a1 = [int(t) for t in response[0]], int(response[1]), int(response[2])
    p0, p1 = prompt.span("answer")
    aligned = list(prompt.input_ids[p0:p1]) == resp[a0:a1]
    tries = min(max_tries, p1 - p0) if aligned else 1
    start = scope_start(prompt, scope)
    first: AnswerPair | None = None
    for i in range(tries):
        c: Corruption = corrupt_answer(prompt, model.tokenizer, seed=seed, offset=i)
        lead, target = resp[: a0 + i], resp[a0 + i]
        clean, corrupt = tuple(c.clean) + tuple(lead), tuple(c.corrupt) + tuple(lead)
        with torch.no_grad():
            logits = model(
                torch.tensor([clean, corrupt], device=model.cfg.device), logits_to_keep=1
            )
        diff = (logits[:, -1, target] - logits[:, -1, c.corrupt_token]).tolist()
        flipped = diff[0] > 0 > diff[1]
        pair = AnswerPair(clean, corrupt, start, target, c.corrupt_token, c.position, i, i + 1,
                          flipped)  # fmt: skip
        if flipped:
            return pair
        first = first or pair
    assert first is not None
    return AnswerPair(**{**first.__dict__, "offsets_tried": tries})
