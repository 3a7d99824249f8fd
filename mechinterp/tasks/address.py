"""Address corruptions for NIAH: pairs of prompts that change *where* a retrieval head should
look, not *what* it copies (a content corruption, `mechinterp.tasks.corrupt`, does that).

- **question swap**: two needles in one haystack; the clean question asks for needle A, the
  corrupt question for needle B. B is a needle whose question renders to as many tokens as A's,
  so the two prompts have the same length and differ only inside the question.
- **key swap**: one needle; its key phrase (every word the needle shares with the question
  before its answer, e.g. "password", "old", "lighthouse" in "The password to the old
  lighthouse is ...") is replaced in the context, word by word, by words of the same token
  count, so the question no longer matches the needle while its answer stays. The prompts
  differ only inside the needle.

    pairs = address_pairs("question_swap", tokenizer, lengths=[512], depths=[0.25], needles=[2])
    clean, corrupt = pairs[0].prompts(tokenizer)

Every pair is checked when its prompts are rendered (`AddressPair.prompts`): same length, the
differing tokens inside the question (question swap) or the swapped needle (key swap); each
prompt records both needles' token spans (`spans["needle"]`: A first, then B). Whether the model
answers the two prompts differently is a property of the model: `answered_apart` generates both.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from mechinterp.errors import InputError
from mechinterp.tasks import haystack as hs
from mechinterp.tasks.example import Document, Example
from mechinterp.tasks.niah import NEEDLES, Haystack, Needle, niah_grid
from mechinterp.tasks.prompt import Prompt, Template, render

AddressKind = Literal["question_swap", "key_swap"]
ADDRESS_KINDS: tuple[str, ...] = ("question_swap", "key_swap")

#: Words a key word is swapped for, tried in order: the first one that keeps the prompts aligned
#: (same token count, nothing outside the word changed) is used.
KEY_SUBSTITUTES = ("garden", "window", "harbor", "castle", "river", "market", "mountain",
                   "station", "village", "library", "forest", "bridge", "island",
                   "tower")  # fmt: skip
_STOP = frozenset("a an the of to in on at is are was what where who which how for and or by "
                  "with from that this it its best".split())  # fmt: skip


@dataclass(frozen=True)
class AddressPair:
    """A clean example and its address corruption, with the same documents' layout.

    `clean` asks for needle A (`clean.needles[0]`). A question swap's `corrupt` asks for needle
    B (`corrupt.needles[1]`, also in the clean context); a key swap's `corrupt` holds needle A
    with its key phrase replaced (`key`, `substitute`: the words, comma-separated)."""

    kind: AddressKind
    clean: Example
    corrupt: Example
    key: str = ""
    substitute: str = ""

    def prompts(self, tokenizer, *, template: Template | None = None,
                max_tokens: int | None = None) -> tuple[Prompt, Prompt]:  # fmt: skip
        """The two rendered prompts, refused unless aligned (same length, differing only where
        the corruption is)."""
        clean = render(self.clean, tokenizer, template=template, max_tokens=max_tokens)
        corrupt = render(self.corrupt, tokenizer, template=template, max_tokens=max_tokens)
        where = "question" if self.kind == "question_swap" else "needle"
        problem = misalignment(clean, corrupt, where)
        if problem:
            raise InputError(f"{self.kind} pair {self.clean.id!r}: {problem}")
        return clean, corrupt


def misalignment(clean: Prompt, corrupt: Prompt, where: str) -> str:
    """Why two prompts are not an aligned pair differing only inside their `where` span (the
    question, or the first needle); "" when they are."""
    if clean.n_tokens != corrupt.n_tokens:
        return f"the prompts have {clean.n_tokens} and {corrupt.n_tokens} tokens"
    differ = [i for i, (a, b) in enumerate(zip(clean.input_ids, corrupt.input_ids, strict=True))
              if a != b]  # fmt: skip
    if not differ:
        return "the prompts are identical"
    lo, hi = clean.span(where)
    outside = [i for i in differ if not lo <= i < hi]
    if outside:
        return f"tokens {outside[:5]} differ outside the {where} span [{lo}, {hi})"
    return ""


def key_words(needle: Needle) -> list[str]:
    """The needle's key phrase: the words it shares with its question before its answer (stop
    words aside), in order, once each: "lost", "ring", "Duchess", "Amara" for the Duchess's lost
    ring."""
    words = lambda s: re.findall(r"[A-Za-z]+", s.replace("'s", ""))  # noqa: E731
    asked = {w.lower() for w in words(needle.question)}
    answer = {w.lower() for w in words(needle.answer)}
    head = words(needle.text[: needle.text.find(needle.answer)])
    shared = [w for w in head[1:] if w.lower() in asked and w.lower() not in answer
              and w.lower() not in _STOP]  # fmt: skip
    if not shared:
        raise InputError(f"needle {needle.text[:50]!r} shares no key word with its question")
    return list(dict.fromkeys(shared))


def key_word(needle: Needle) -> str:
    """The needle's main key word: of its key phrase (`key_words`), the last name (a capitalised
    word after the first), else the last word: "lighthouse" for the lighthouse password,
    "Ishida" for Captain Ishida's treasure."""
    shared = key_words(needle)
    names = [w for w in shared if w[0].isupper()]
    return (names or shared)[-1]


def address_pairs(
    kind: AddressKind,
    tokenizer,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    needles: Sequence[int] | int = 3,
    haystack: Haystack = "essays",
    seed: int = 0,
    template: Template | None = None,
) -> list[AddressPair]:
    """One aligned pair per (needle, length, depth) of the NIAH grid `niah_grid` builds with
    these arguments (needle A at `depth`; a question swap's needle B at the depth half the
    context away)."""
    if kind not in ADDRESS_KINDS:
        raise InputError(f"unknown address corruption {kind!r}; expected one of {ADDRESS_KINDS}")
    grid = niah_grid(tokenizer, lengths=lengths, depths=depths, needles=needles,
                     haystack=haystack, seed=seed, template=template)  # fmt: skip
    if kind == "question_swap":
        alone = [i for i in sorted({ex.meta["needle_index"] for ex in grid})
                 if partner(i, tokenizer) is None]  # fmt: skip
        if alone:
            raise InputError(f"needles {alone} have no needle whose question has as many tokens "
                             "with this tokenizer, so no aligned question swap: leave them out")
        return [_question_swap(ex, tokenizer, template) for ex in grid]
    return [_key_swap(ex, tokenizer, template) for ex in grid]


def _question_swap(ex: Example, tokenizer, template) -> AddressPair:
    a = NEEDLES[ex.meta["needle_index"]]
    b_index = partner(ex.meta["needle_index"], tokenizer)
    b = NEEDLES[b_index]
    depth = (ex.meta["depth"] + 0.5) % 1.0
    text, _, _ = hs.insert_at_depth(ex.documents[0].text, b.text, depth)
    meta = {**ex.meta, "partner_index": b_index, "partner_depth": depth}
    clean = Example(id=f"{ex.id}-qswap", task="niah", variant=ex.variant,
                    documents=(Document(text=text, gold=True),), question=a.question,
                    answers=(a.answer,), needles=(a.text, b.text), meta=meta)  # fmt: skip
    corrupt = Example(id=f"{ex.id}-qswap-corrupt", task="niah", variant=ex.variant,
                      documents=clean.documents, question=b.question, answers=(b.answer,),
                      needles=(a.text, b.text), meta=meta)  # fmt: skip
    pair = AddressPair("question_swap", clean, corrupt)
    pair.prompts(tokenizer, template=template)
    return pair


def partner(index: int, tokenizer) -> int | None:
    """The needle after `index` (cyclically) whose question has as many tokens as its own and
    whose answer differs (None: there is none)."""
    n = len(NEEDLES)
    length = len(tokenizer.encode(NEEDLES[index].question, add_special_tokens=False))
    for step in range(1, n):
        j = (index + step) % n
        if (len(tokenizer.encode(NEEDLES[j].question, add_special_tokens=False)) == length
                and NEEDLES[j].answer != NEEDLES[index].answer):  # fmt: skip
            return j
    return None


def _key_swap(ex: Example, tokenizer, template) -> AddressPair:
    a = NEEDLES[ex.meta["needle_index"]]
    keys = key_words(a)
    clean = Example(id=f"{ex.id}-kswap", task="niah", variant=ex.variant,
                    documents=ex.documents, question=a.question, answers=(a.answer,),
                    needles=(a.text,), meta=ex.meta)  # fmt: skip
    clean_prompt = render(clean, tokenizer, template=template)
    head, tail = a.text[: a.text.find(a.answer)], a.text[a.text.find(a.answer) :]

    def corrupt_with(swapped_head: str) -> Example:
        swapped = swapped_head + tail
        doc = ex.documents[0].text.replace(a.text, swapped, 1)
        return Example(id=f"{ex.id}-kswap-corrupt", task="niah", variant=ex.variant,
                       documents=(Document(text=doc, gold=True),), question=a.question,
                       answers=(a.answer,), needles=(swapped,), meta=ex.meta)  # fmt: skip

    used: list[str] = []
    for key in keys:  # each key word in turn, by the first substitute that keeps the alignment
        for word in substitutes(key, tokenizer):
            if word.lower() in {u.lower() for u in used}:
                continue
            trial = re.sub(rf"\b{key}\b", word, head)
            corrupt = corrupt_with(trial)
            if not misalignment(clean_prompt, render(corrupt, tokenizer, template=template),
                                "needle"):  # fmt: skip
                head = trial
                used.append(word)
                break
        else:
            raise InputError(f"no substitute for the key word {key!r} of needle "
                             f"{ex.meta['needle_index']} keeps the prompts aligned with this "
                             "tokenizer")  # fmt: skip
    corrupt = corrupt_with(head)
    key, substitute = ", ".join(keys), ", ".join(used)
    corrupt = replace(corrupt, meta={**ex.meta, "key": key, "substitute": substitute})
    return AddressPair("key_swap", clean, corrupt, key=key, substitute=substitute)


def substitutes(key: str, tokenizer, *, max_words: int = 4):
    """Candidate replacements for `key`, in order: `KEY_SUBSTITUTES` words, then two, three or
    four of them (at most `max_words`, and as many words as the key has tokens), capitalised
    where the key is, then the key's letters reversed; only those with as many tokens as the
    key (after a space) are given."""
    from itertools import permutations

    count = lambda w: len(tokenizer.encode(" " + w, add_special_tokens=False))  # noqa: E731
    n = count(key)
    words = [w.capitalize() if key[0].isupper() else w for w in KEY_SUBSTITUTES
             if w != key.lower()]  # fmt: skip
    for size in range(1, min(n, max_words) + 1):
        for combo in permutations(words, size):
            candidate = " ".join(combo)
            if count(candidate) == n:
                yield candidate
    backwards = key[::-1].lower()
    backwards = backwards.capitalize() if key[0].isupper() else backwards
    if backwards.lower() != key.lower() and count(backwards) == n:
        yield backwards


def answered_apart(model, pairs: Sequence[AddressPair], *, max_new_tokens: int = 24,
                   template: Template | None = None) -> list[dict]:  # fmt: skip
    """Each pair's greedy answers: `clean_correct` (the clean answer holds A's answer),
    `corrupt_correct` (the corrupt answer holds the corrupt example's answer: B's for a question
    swap; for a key swap A's, i.e. the model still retrieved the needle whose key no longer
    matches), `apart`, the pairs an address analysis can use: the clean answer is right and
    the corruption moved the answer (a question swap answered with B's answer; a key swap no
    longer answered with A's: a paraphrase that copies the substitute still counts as
    retrieved), and `clean_response` / `corrupt_response`, the two answers' token ids."""
    from mechinterp.evaluate import generate, is_correct

    rows = []
    for pair in pairs:  # a pair's prompts are equally long: one batch, no padding, so each
        # pair's answers do not depend on which other pairs are asked
        prompts = pair.prompts(model.tokenizer, template=template, max_tokens=int(model.cfg.n_ctx))
        gens = generate(model, [p.input_ids for p in prompts], max_new_tokens=max_new_tokens,
                        batch_size=2)  # fmt: skip
        clean, corrupt = gens[0].text, gens[1].text
        ok = is_correct("niah", clean, pair.clean.answers)
        moved = is_correct("niah", corrupt, pair.corrupt.answers)
        apart = ok and (moved if pair.kind == "question_swap" else not moved)
        rows.append({"example_id": pair.clean.id, "kind": pair.kind, "clean_answer": clean,
                     "corrupt_answer": corrupt, "clean_correct": ok, "corrupt_correct": moved,
                     "apart": apart,
                     "clean_response": [int(t) for t in gens[0].tokens],
                     "corrupt_response": [int(t) for t in gens[1].tokens]})  # fmt: skip
    return rows
