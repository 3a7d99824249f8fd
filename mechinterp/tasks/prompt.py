"""Render an `Example` for one model: prompt text, token ids, and exact token spans.

Spans come from character offsets (the tokenizer's offset mapping), never from fuzzy matching:
the needle's characters are known where we place them, and a token belongs to a span when its
characters overlap the span's characters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mechinterp.errors import InputError
from mechinterp.tasks.example import Example

Template = Literal["chat", "plain"]
SpanName = Literal["needle", "answer", "gold_doc", "document", "question"]

INSTRUCTIONS = {
    "niah": "Read the document below and answer the question using only the document.",
    "mdqa": "Write a high-quality answer for the given question using only the provided search "
    "results (some of which might be irrelevant).",
    "multihop": "Answer the question using the documents below. The answer needs facts from more "
    "than one document. Answer with a short phrase.",
    "citation": "Below are documents, each with its number. Summarize what they say about the "
    "requested subject, citing the documents that support each point.",
}
#: Text the assistant turn starts with (teacher-forced), per task; keeps small models on task.
ANSWER_PREFIX = {"niah": "", "mdqa": "", "multihop": "", "citation": ""}


@dataclass(frozen=True)
class Prompt:
    """A rendered example. Spans are half-open token ranges [start, end) into `input_ids`."""

    example_id: str
    text: str
    input_ids: tuple[int, ...]
    spans: dict[str, tuple[tuple[int, int], ...]]

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    def span(self, name: SpanName, index: int = 0) -> tuple[int, int]:
        spans = self.spans.get(name, ())
        if index >= len(spans):
            raise InputError(f"prompt {self.example_id!r} has no {name!r} span #{index}")
        return spans[index]


def user_content(example: Example) -> tuple[str, dict[str, list[tuple[int, int]]]]:
    """The user message and character spans of its parts (documents, question, needles)."""
    parts: list[str] = [INSTRUCTIONS[example.task], "\n\n"]
    spans: dict[str, list[tuple[int, int]]] = {
        k: [] for k in ("document", "gold_doc", "needle", "answer")
    }
    cursor = sum(map(len, parts))
    doc_starts = []
    for i, doc in enumerate(example.documents):
        if example.task == "niah":
            head = ""
        else:
            head = (
                f"Document [{i + 1}](Title: {doc.title}) " if doc.title else f"Document [{i + 1}] "
            )
        sep = "\n" if i < len(example.documents) - 1 else ""
        start = cursor + len(head)
        doc_starts.append(start)
        spans["document"].append((start, start + len(doc.text)))
        if doc.gold:
            spans["gold_doc"].append((start, start + len(doc.text)))
        parts += [head, doc.text, sep]
        cursor += len(head) + len(doc.text) + len(sep)
    q_head = "\n\nQuestion: "
    parts += [q_head, example.question]
    question = (cursor + len(q_head), cursor + len(q_head) + len(example.question))
    text = "".join(parts)
    for needle in example.needles:
        spans["needle"].append(_locate_in_gold(example, needle, doc_starts))
    spans["answer"] = _answer_span(example, text, spans["needle"], doc_starts)
    return text, {**spans, "question": [question]}


def _answer_span(
    example: Example, text: str, needles: list[tuple[int, int]], doc_starts: list[int]
) -> list[tuple[int, int]]:
    """The first accepted answer's occurrence, inside a planted needle when there is one (the
    same words elsewhere in the haystack are not the retrieved copy), else in a gold document."""
    for answer in example.answers:
        for start, end in needles:
            at = text.find(answer, start, end)
            if at >= 0:
                return [(at, at + len(answer))]
    for answer in example.answers:
        found = _find_in_gold(example, answer, doc_starts)
        if found is not None:
            return [found]
    return []


def _find_in_gold(example: Example, s: str, doc_starts: list[int]) -> tuple[int, int] | None:
    for i in example.gold_indices:
        at = example.documents[i].text.find(s)
        if at >= 0:
            return doc_starts[i] + at, doc_starts[i] + at + len(s)
    return None


def _locate_in_gold(example: Example, needle: str, doc_starts: list[int]) -> tuple[int, int]:
    found = _find_in_gold(example, needle, doc_starts)
    if found is None:
        raise InputError(f"needle {needle[:60]!r} of example {example.id!r} is not in the prompt")
    return found


def render(
    example: Example,
    tokenizer,
    *,
    template: Template | None = None,
    max_tokens: int | None = None,
) -> Prompt:
    """Lay out `example` as a prompt for `tokenizer`'s model.

    `template` defaults to "chat" when the tokenizer has a chat template, else "plain"
    (`...\\nAnswer:`). `max_tokens` is the model's context window: a longer prompt is an error.
    """
    content, char_spans = user_content(example)
    if template is None:
        template = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    prefix = ANSWER_PREFIX[example.task]
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("template='chat' but the tokenizer has no chat template; use 'plain'")
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        offset = head.find(content)
        if offset < 0:
            raise InputError("the chat template altered the user message; cannot place spans")
        text = head + prefix
    elif template == "plain":
        bos = tokenizer.bos_token or ""
        offset = len(bos)
        text = f"{bos}{content}\nAnswer:" + (f" {prefix}" if prefix else "")
    else:
        raise InputError(f"unknown template {template!r}; expected 'chat' or 'plain'")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if max_tokens is not None and len(ids) > max_tokens:
        raise InputError(
            f"prompt of example {example.id!r} has {len(ids)} tokens, longer than the model's "
            f"context window of {max_tokens}; use shorter lengths or fewer documents"
        )
    spans = {
        name: tuple(_token_span(offsets, offset + s, offset + e, name) for s, e in ranges)
        for name, ranges in char_spans.items()
    }
    return Prompt(example.id, text, tuple(ids), spans)


def _token_span(offsets, start: int, end: int, name: str) -> tuple[int, int]:
    hit = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if not hit:
        raise InputError(f"no token covers the {name} characters [{start}, {end})")
    return hit[0], hit[-1] + 1


def context_end(prompt: Prompt) -> int:
    """First position after the context (where the last document ends): the question, the chat
    template and the answer come after it."""
    docs = prompt.spans.get("document", ())
    if not docs:
        raise InputError(f"prompt {prompt.example_id!r} has no document span")
    return max(end for _, end in docs)
