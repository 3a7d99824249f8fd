"""Multi-document QA (MDQA): a question plus k passages, one of them gold.

Real data is the "lost in the middle" JSONL format (Liu et al. 2023), one record a line:
`{"question": str, "answers": [str, ...],
"ctxs": [{"title", "text", "hasanswer", "isgold"?}, ...]}`.

Synthetic variants plant one fact (see `mechinterp.tasks.needles`) in a gold passage among
distractors, along the paper's two axes:

- needle realism: `realistic` / `templated` / `symbolic`;
- haystack diversity: `high` = passages of consecutive sentences cut from the Paul Graham essays,
  titled by essay name; `low` = the repetitive filler ("The grass is green. ..."), titled
  "Document 3" and so on.

`symbolic` variants are key-value documents (each a few "The value of key X is Y." lines, one per
line), so haystack diversity does not apply to them: their variant name is plain `"symbolic"` and
`meta["diversity"]` is `"n/a"`. The other variants are named `"{realism}-{diversity}"`, e.g.
`"realistic-high"`, `"templated-low"`.
"""

from __future__ import annotations

import bisect
import json
import random
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any, Literal

from mechinterp.errors import InputError
from mechinterp.tasks import haystack
from mechinterp.tasks.example import Document, Example
from mechinterp.tasks.needles import NEEDLE_REALISMS, Fact, NeedleRealism, make_fact, make_facts

HaystackDiversity = Literal["high", "low"]
HAYSTACK_DIVERSITIES: tuple[HaystackDiversity, ...] = ("high", "low")

#: Words in one "The value of key xxxx-xxxx is xxxx-xxxx." line, to size symbolic documents.
_WORDS_PER_KV_LINE = 7


# --- reading JSONL ----------------------------------------------------------------------------


def read_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, JSON object) for each non-blank line; errors name file and line.

    Raises ValueError for a line that is not a JSON object and for a file with no records.
    """
    path = Path(path)
    seen = False
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = decode_utf8(raw, f"{path}:{lineno}")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got "
                                 f"{type(record).__name__}")  # fmt: skip
            seen = True
            yield lineno, record
    if not seen:
        raise InputError(f"{path}: no records (the file is empty)")


def decode_utf8(raw: bytes, where: str) -> str:
    """`raw` decoded as UTF-8 (a leading byte-order mark dropped), or an error naming `where`
    and the byte that is not UTF-8."""
    try:
        return raw.decode("utf-8-sig" if raw.startswith(b"\xef\xbb\xbf") else "utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1});"
                         " save the file as UTF-8") from None  # fmt: skip


def check_limit(limit: int | None) -> None:
    """Reject a negative `limit` (None means no limit)."""
    if limit is not None and limit < 0:
        raise InputError(f"limit must be >= 0 or None, got {limit}")


def as_str(value: Any, what: str, *, empty: bool = False) -> str:
    """`value` if it is a string (and, unless `empty`, not blank), else a ValueError naming the
    field `what`."""
    if not isinstance(value, str):
        raise InputError(f"{what} must be a string, got {value!r}")
    if not empty and not value.strip():
        raise InputError(f"{what} is empty")
    return value


def as_str_list(value: Any, what: str, *, empty: bool = False) -> tuple[str, ...]:
    """`value` as a tuple if it is a list of non-blank strings (an empty list only if `empty`),
    else a ValueError naming the field."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{what} must be a list of strings, got {value!r}")
    if not value and not empty:
        raise InputError(f"{what} is an empty list")
    blank = [i for i, v in enumerate(value) if not v.strip()]
    if blank:
        raise InputError(f"{what}[{blank[0]}] is empty")
    return tuple(value)


def _mdqa_example(record: Mapping[str, Any], *, source: str, line: int, variant: str) -> Example:
    question = as_str(record["question"], "question")
    answers = as_str_list(record["answers"], "answers")
    ctxs = record["ctxs"]
    if not isinstance(ctxs, list) or not ctxs:
        raise InputError("ctxs must be a non-empty list of passages")
    if not all(isinstance(c, dict) for c in ctxs):
        raise InputError("every ctx must be a JSON object")
    gold_key = "isgold" if any("isgold" in c for c in ctxs) else "hasanswer"
    documents = tuple(
        Document(
            text=as_str(c["text"], f"ctxs[{i}].text", empty=True),
            title=as_str(c.get("title") or "", f"ctxs[{i}].title", empty=True),
            gold=bool(c.get(gold_key, False)),
        )
        for i, c in enumerate(ctxs)
    )
    gold = [i for i, d in enumerate(documents) if d.gold]
    if not gold:
        raise InputError(f"no gold document (no ctx has {gold_key}=true)")
    return file_example(record, "mdqa", documents, question, answers, source=source, line=line,
                        variant=variant, gold_index=gold[0])  # fmt: skip


def file_example(record: Mapping, task: str, documents, question: str, answers, *, source: str,
                 line: int, variant: str, **meta: Any) -> Example:  # fmt: skip
    """An example read from line `line` of a user's file `source` (its id: the record's `id`,
    else `file:line`; no needles: real answers are located in the documents later)."""
    return Example(
        id=str(record.get("id", f"{source}:{line}")), task=task, variant=variant,
        documents=documents, question=question, answers=tuple(answers), needles=(),
        meta={**meta, "n_docs": len(documents), "source": source, "line": line},
    )  # fmt: skip


def load_mdqa(
    path: str | Path, *, limit: int | None = None, variant: str = "real"
) -> list[Example]:
    """Read "lost in the middle" MDQA records as `Example`s.

    Gold documents are the ctxs with `isgold` true; in files with no `isgold` key at all, those
    with `hasanswer` true (then several may be gold; `meta["gold_index"]` is the first). `needles`
    is empty: real answers are located in the documents later. The id is the record's `id` if
    present, else `"{file name}:{line}"`.
    """
    return read_examples(path, limit, lambda record, source, line: _mdqa_example(
        record, source=source, line=line, variant=variant))  # fmt: skip


def read_examples(path: str | Path, limit: int | None, make) -> list[Example]:
    """One example per record of a JSONL file that `make(record, source, line)` turns into one
    (None skips the record), up to `limit`; a bad record is an error naming its line."""
    check_limit(limit)
    path = Path(path)
    out: list[Example] = []
    if limit == 0:
        return out
    first: dict[str, int] = {}  # id → the line that first used it
    records: dict[str, int] = {}  # the record's JSON → the line that first held it
    for lineno, record in read_records(path):
        same = records.setdefault(json.dumps(record, sort_keys=True), lineno)
        if same != lineno:
            raise InputError(f"{path}:{lineno}: repeats the record on line {same} exactly; "
                             "give each record once (it would be scored twice)")  # fmt: skip
        try:
            example = make(record, path.name, lineno)
        except KeyError as e:
            raise InputError(f"{path}:{lineno}: missing key {e}") from e
        except (ValueError, TypeError) as e:
            raise InputError(f"{path}:{lineno}: {e}") from e
        if example is None:
            continue
        if example.id in first:
            raise InputError(f"{path}:{lineno}: id {example.id!r} was already used on line "
                             f"{first[example.id]}; give each record its own id (a repeated "
                             "record would be scored twice)")  # fmt: skip
        first[example.id] = lineno
        out.append(example)
        if limit is not None and len(out) >= limit:
            break
    return out


# --- synthetic haystack documents -------------------------------------------------------------


def variant_name(realism: NeedleRealism, diversity: HaystackDiversity) -> str:
    """`"{realism}-{diversity}"`, or `"symbolic"` (key-value documents have no diversity axis)."""
    if realism not in NEEDLE_REALISMS:
        raise InputError(f"unknown needle realism {realism!r}; expected one of {NEEDLE_REALISMS}")
    if diversity not in HAYSTACK_DIVERSITIES:
        raise InputError(f"unknown diversity {diversity!r}; expected one of {HAYSTACK_DIVERSITIES}")
    return "symbolic" if realism == "symbolic" else f"{realism}-{diversity}"


@cache
def _essay_index() -> tuple[tuple[str, str, tuple[int, ...], tuple[int, ...]], ...]:
    """Per essay: (title, text, sentence-boundary offsets, cumulative word count at each)."""
    out = []
    for title, text in haystack.essays():
        bounds = haystack.sentence_boundaries(text)
        cum = [0]
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            cum.append(cum[-1] + len(text[lo:hi].split()))
        out.append((title, text, tuple(bounds), tuple(cum)))
    return tuple(out)


def essay_passage(rng: random.Random, essay: int, *, doc_words: int) -> tuple[str, str]:
    """(title, passage): consecutive whole sentences of essay `essay`, about `doc_words` words.

    The passage is a verbatim substring of the essay text: it starts at a sentence start and
    ends after the first sentence that brings it to at least `doc_words` words (or at the end).
    """
    title, text, bounds, cum = _essay_index()[essay]
    starts = [i for i in range(len(bounds) - 1) if cum[-1] - cum[i] >= doc_words] or [0]
    s = rng.choice(starts)
    e = min(bisect.bisect_left(cum, cum[s] + doc_words), len(bounds) - 1)
    return title, text[bounds[s] : bounds[e]].strip()


def filler_passage(rng: random.Random, *, doc_words: int) -> str:
    """Repetitive filler of at least `doc_words` words, starting at a random filler sentence."""
    offset, k = rng.randrange(len(haystack.FILLER_SENTENCES)), len(haystack.FILLER_SENTENCES)
    n, words = 0, 0
    while words < doc_words:
        words += len(haystack.FILLER_SENTENCES[(offset + n) % k].split())
        n += 1
    return haystack.filler_text(max(n, 1), offset=offset)


def build_documents(
    rng: random.Random,
    planted: Mapping[int, Fact],
    *,
    n_docs: int,
    realism: NeedleRealism,
    diversity: HaystackDiversity,
    doc_words: int,
) -> tuple[Document, ...]:
    """`n_docs` documents; position `i` in `planted` is a gold document holding that fact's text.

    Prose facts go at a random sentence boundary of a passage of the same haystack kind as the
    distractors. Symbolic facts go at a random line of a key-value document; the distractor
    lines use keys and values distinct from each other and from the planted facts.
    """
    if any(not 0 <= i < n_docs for i in planted):
        raise InputError(f"planted positions {sorted(planted)} must lie in [0, {n_docs})")
    if realism == "symbolic":
        per_doc = max(1, round(doc_words / _WORDS_PER_KV_LINE))
        avoid = {s for f in planted.values() for s in (f.subject, f.answer)}
        pool = list(make_facts(rng, "symbolic", n_docs * per_doc - len(planted), avoid=avoid))
        docs = []
        for i in range(n_docs):
            lines = [pool.pop().text for _ in range(per_doc - (i in planted))]
            if i in planted:
                lines.insert(rng.randrange(len(lines) + 1), planted[i].text)
            docs.append(Document("\n".join(lines), title=f"Document {i + 1}", gold=i in planted))
        return tuple(docs)

    n_essays = len(_essay_index())
    if diversity == "high":
        picks = (
            rng.sample(range(n_essays), n_docs)
            if n_docs <= n_essays
            else [rng.randrange(n_essays) for _ in range(n_docs)]
        )
    docs = []
    for i in range(n_docs):
        if diversity == "high":
            title, text = essay_passage(rng, picks[i], doc_words=doc_words)
        else:
            title, text = f"Document {i + 1}", filler_passage(rng, doc_words=doc_words)
        if i in planted:
            text, _, _ = haystack.insert_at_depth(text, planted[i].text, rng.random())
        docs.append(Document(text, title=title, gold=i in planted))
    return tuple(docs)


def check_synthetic_args(n: int, n_docs: int, doc_words: int, *, min_docs: int = 1) -> None:
    """Shared argument validation of the synthetic generators."""
    if n < 0:
        raise InputError(f"n must be >= 0, got {n}")
    if n_docs < min_docs:
        raise InputError(f"n_docs must be >= {min_docs}, got {n_docs}")
    if doc_words < 1:
        raise InputError(f"doc_words must be >= 1, got {doc_words}")


def synthetic_mdqa(
    n: int,
    *,
    n_docs: int = 10,
    realism: NeedleRealism,
    diversity: HaystackDiversity,
    gold_position: int | Literal["random"] = "random",
    seed: int = 0,
    doc_words: int = 100,
) -> list[Example]:
    """`n` synthetic MDQA examples: one planted fact in one gold document among `n_docs`.

    Example `i` is drawn from its own `random.Random(f"mdqa:{seed}:{i}")`, so the list is
    deterministic in its arguments and a prefix does not depend on `n`. `gold_position` fixes the
    gold document's index (0-based) or draws it per example. For `realism="symbolic"`,
    `diversity` is ignored (see the module docstring).
    """
    check_synthetic_args(n, n_docs, doc_words)
    if gold_position != "random" and not (
        isinstance(gold_position, int) and 0 <= gold_position < n_docs
    ):
        raise InputError(f"gold_position must be 'random' or in [0, {n_docs}), got {gold_position}")
    out = []
    for i in range(n):
        rng = random.Random(f"mdqa:{seed}:{i}")
        gold = rng.randrange(n_docs) if gold_position == "random" else gold_position
        fact = make_fact(rng, realism)
        docs = build_documents(
            rng, {gold: fact}, n_docs=n_docs, realism=realism, diversity=diversity,
            doc_words=doc_words,
        )  # fmt: skip
        out.append(synthetic_example(
            "mdqa", i, docs, fact.question, fact.answer, (fact.text,), seed=seed,
            realism=realism, diversity=diversity, gold_index=gold))  # fmt: skip
    return out


def synthetic_example(
    task: str, i: int, documents, question: str, answer: str, needles, *, seed: int,
    realism: NeedleRealism, diversity: HaystackDiversity, **meta: Any,
) -> Example:  # fmt: skip
    """Example `i` of a synthetic variant, with its id and the meta every generator records
    (`meta` first: the task's own keys)."""
    variant = variant_name(realism, diversity)
    return Example(
        id=f"{task}-{variant}-s{seed}-{i}", task=task, variant=variant, documents=documents,
        question=question, answers=(answer,), needles=tuple(needles),
        meta={**meta, "n_docs": len(documents), "seed": seed, "realism": realism,
              "diversity": "n/a" if realism == "symbolic" else diversity},
    )  # fmt: skip
