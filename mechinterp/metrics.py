"""Answer metrics.

- On text (SQuAD normalisation): exact match, token F1, ROUGE-1 recall, substring match. No
  model; `mechinterp.evaluate` re-exports them.
- On a model's logits (`AnswerMetric`): `answer_logit_diff`, `answer_logprob`,
  `answer_prob`, the metrics patching, attribution and path patching evaluate. Each is called
  as `metric(logits, tokens)` on a teacher-forced forward (`tokens` end with the answer), or as
  `metric(last_logits)` on the logits of the position before the answer, the form the
  patching functions call (`mechinterp.interventions.resume.Metric`).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechinterp.errors import InputError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", s.lower().translate(_PUNCT)).split())


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split()


def em(prediction: str, answers: Sequence[str]) -> float:
    """Exact match after normalisation, best over the accepted answers."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token F1, best over the accepted answers."""
    return max(_f1(_tokens(prediction), _tokens(a)) for a in answers)


def _f1(pred: list[str], ref: list[str]) -> float:
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge1_recall(prediction: str, answers: Sequence[str]) -> float:
    """ROUGE-1 recall: share of the reference's unigrams (with counts) found in the prediction.
    Lower-cased, punctuation stripped, articles kept (as rouge-score does, without stemming)."""

    def toks(s: str) -> list[str]:
        return s.lower().translate(_PUNCT).split()

    best = 0.0
    for a in answers:
        ref = toks(a)
        if ref:
            best = max(best, sum((Counter(toks(prediction)) & Counter(ref)).values()) / len(ref))
    return best


def substring_match(prediction: str, answers: Sequence[str]) -> float:
    """1 when some normalised answer occurs in the normalised prediction (lost-in-the-middle's
    best-subspan accuracy)."""
    p = normalize_answer(prediction)
    return float(any(normalize_answer(a) in p for a in answers if normalize_answer(a)))


# ---------------------------------------------------------------- metrics on logits


@dataclass(frozen=True)
class AnswerMetric:
    """A metric of how strongly a model predicts `answer` (token ids), one value per batch row.

    Two calling forms:

    - `metric(logits, tokens)`: `logits` [batch, pos, vocab] of a forward on `tokens` [batch,
      pos], which end with the answer (teacher forcing: the prompt, then the answer's tokens).
      The answer's i-th token is read from the logits at the position before it.
    - `metric(last_logits)`: `last_logits` [batch, vocab], the logits at the position before a
      one-token answer (the prompt's last position). This is the form `patch_heads`,
      `attribution_patch`, `path_patch` and the other patching functions call, so an
      `AnswerMetric` can be passed to them directly.

    `kind`: `logit_diff` (logit of the answer's token minus the `distractor`'s), `logprob`
    (summed log-probability of the answer's tokens), `prob` (the answer's probability, the
    exponential of `logprob`)."""

    kind: Literal["logit_diff", "logprob", "prob"]
    answer: tuple[int, ...]
    distractor: int | None = None

    def __post_init__(self) -> None:
        if not self.answer:
            raise InputError("the answer has no tokens: give its token ids (answer_ids)")
        if self.kind == "logit_diff" and (self.distractor is None or len(self.answer) != 1):
            raise InputError("a logit difference compares one answer token with one distractor")

    def __call__(
        self,
        logits: Float[Tensor, "batch pos vocab"] | Float[Tensor, "batch vocab"],
        tokens: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch"]:  # noqa: F821
        """The metric per batch row (see the class for the two forms)."""
        if tokens is None:
            answer_logits = self._last_position(logits)
        else:
            answer_logits = self._teacher_forced(logits, tokens)
        if self.kind == "logit_diff":
            return answer_logits[:, 0, self.answer[0]] - answer_logits[:, 0, self.distractor]
        logp = answer_logits.float().log_softmax(-1)
        ids = torch.tensor(self.answer, device=logp.device)
        picked = logp.gather(-1, ids.expand(logp.shape[0], -1)[..., None])[..., 0].sum(-1)
        return picked if self.kind == "logprob" else picked.exp()

    def _last_position(self, logits: Tensor) -> Float[Tensor, "batch answer vocab"]:
        if logits.dim() != 2:
            raise InputError(
                f"logits of shape {tuple(logits.shape)} come without tokens: pass "
                "metric(logits, tokens) for [batch, pos, vocab] logits, or the last position's "
                "[batch, vocab] logits alone"
            )
        if len(self.answer) > 1:
            raise InputError(
                f"the answer has {len(self.answer)} tokens, and the last position's logits "
                "predict one: call metric(logits, tokens) on a forward over the prompt followed "
                "by the answer"
            )
        return logits[:, None]

    def _teacher_forced(
        self, logits: Tensor, tokens: Tensor
    ) -> Float[Tensor, "batch answer vocab"]:
        n = len(self.answer)
        if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(tokens.shape):
            raise InputError(
                f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} must be "
                "[batch, pos, vocab] and [batch, pos] of the same forward"
            )
        if tokens.shape[1] <= n:
            raise InputError(f"tokens hold {tokens.shape[1]} positions: a prompt must come "
                             f"before the {n} answer tokens")  # fmt: skip
        want = torch.tensor(self.answer, device=tokens.device)
        if not bool((tokens[:, -n:] == want).all()):
            raise InputError(
                f"tokens must end with the answer {list(self.answer)} (teacher forcing), got "
                f"{tokens[0, -n:].tolist()} in the first row: append the answer's ids to the "
                "prompt and run the model on both"
            )
        return logits[:, -n - 1 : -1]


def _ids(answer: int | Sequence[int]) -> tuple[int, ...]:
    ids = (answer,) if isinstance(answer, Integral) else tuple(answer)
    if any(not isinstance(i, Integral) or isinstance(i, bool) or i < 0 for i in ids):
        raise InputError(f"answer token ids must be non-negative ints, got {list(ids)[:5]}")
    return tuple(int(i) for i in ids)


def answer_logit_diff(answer: int, distractor: int) -> AnswerMetric:
    """logit(answer) − logit(distractor) at the position before the answer (the patching
    metric: does the model prefer the clean token over the corrupt one?)."""
    return AnswerMetric("logit_diff", _ids(answer), _ids(distractor)[0])


def answer_logprob(answer: int | Sequence[int]) -> AnswerMetric:
    """log p(answer): the sum over the answer's tokens of each one's log-probability given
    the prompt and the answer tokens before it."""
    return AnswerMetric("logprob", _ids(answer))


def answer_prob(answer: int | Sequence[int]) -> AnswerMetric:
    """p(answer): the product over the answer's tokens of each one's probability given the
    prompt and the answer tokens before it."""
    return AnswerMetric("prob", _ids(answer))
