"""Answer metrics on text (SQuAD normalisation): exact match, token F1, ROUGE-1 recall,
substring match. No model; `mechinterp.evaluate` re-exports them."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

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
