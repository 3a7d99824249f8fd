"""Generation and answer metrics.

- `generate`: batched greedy decoding through the bridge with HF's KV cache, left padding and a
  per-model stop rule.
- `em`, `token_f1`, `rouge1_recall`, `substring_match`: answer metrics (SQuAD normalisation).
- `answer_logprobs`, `logit_diff`: teacher-forced scoring (`evaluate(score=True)` adds the
  answer's mean log-prob to every row).
- `evaluate`: a task on a model → one tidy row per example.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechinterp.errors import InputError
from mechinterp.metrics import (  # noqa: F401  (re-exported: part of this module's API)
    em,
    normalize_answer,
    rouge1_recall,
    substring_match,
    token_f1,
)
from mechinterp.models.kv_cache import cache_kwargs, new_cache
from mechinterp.tasks.example import Example
from mechinterp.tasks.prompt import Prompt, Template, render

#: Extra end-of-turn tokens that stop generation when the tokenizer knows them.
END_OF_TURN = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "</s>",
    "<end_of_turn>",
    "[/INST]",
)


@dataclass(frozen=True)
class Generation:
    tokens: tuple[int, ...]
    text: str
    stopped: bool  # True when a stop token ended it (False: hit max_new_tokens)


def stop_token_ids(model) -> frozenset[int]:
    """The model's stop rule: its EOS ids (generation config and tokenizer) and end-of-turn
    tokens its vocabulary has."""
    tok = model.tokenizer
    ids: set[int] = set()
    gen_cfg = getattr(model.original_model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    vocab = tok.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return frozenset(int(i) for i in ids)


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    stop_ids: frozenset[int] | None = None,
    progress: bool = False,
) -> list[Generation]:
    """Greedy decoding of every prompt (token ids), batched by similar length."""
    if max_new_tokens < 1:
        raise InputError("max_new_tokens must be >= 1")
    stop_ids = stop_token_ids(model) if stop_ids is None else stop_ids
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Generation | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generate", disable=not progress, leave=False)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        for i, gen in zip(
            idx,
            generate_batch(model, [prompts[i] for i in idx], max_new_tokens, stop_ids),
            strict=True,
        ):
            out[i] = gen
        bar.update(len(idx))
    bar.close()
    return out  # type: ignore[return-value]


def pad_id(model) -> int:
    tok = model.tokenizer
    if tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    return int(tok.eos_token_id) if tok.eos_token_id is not None else 0


def left_pad(
    model, prompts: Sequence[Sequence[int]]
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Token ids and attention mask of `prompts`, left-padded to the longest, on the model's
    device. Row r's prompt starts at position `width - len(prompts[r])`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("cannot run an empty prompt (or an empty batch)")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id(model), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(list(p))
        mask[r, width - len(p) :] = 1
    return ids.to(model.cfg.device), mask.to(model.cfg.device)


def generate_batch(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: frozenset[int],
    *,
    cache=None,
) -> list[Generation]:
    """Greedy decoding of one left-padded batch (see `left_pad`).

    Forward i (i = 0 is the prefill) predicts generated token i, so a hook that fires once per
    forward sees the query that produced each token; a row that has stopped keeps running on pad
    tokens until the whole batch stops. `cache`: a KV cache already holding a prefix shared by
    every row (`patching.filled_cache`); the prompts are then what follows it, unpadded.
    """
    ids, mask = left_pad(model, prompts)
    if cache is not None:
        if len({len(p) for p in prompts}) > 1:
            raise InputError("after a shared cached prefix the rows must have equal lengths")
        prefix = cache.get_seq_length()
        mask = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, prefix), mask], dim=1)
    cached = cache_kwargs(model, cache if cache is not None else new_cache(model))
    # logits_to_keep=1: only the last position's logits are needed (as HF generate does).
    logits = model(ids, attention_mask=mask, logits_to_keep=1, **cached)[:, -1]
    state = {"mask": mask}

    def step(nxt: Tensor) -> Tensor:
        state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
        return model(nxt[:, None], attention_mask=state["mask"], **cached)[:, -1]

    return greedy_decode(model.tokenizer, logits, step, max_new_tokens, stop_ids, pad_id(model))


def greedy_decode(
    tokenizer,
    logits: Float[Tensor, "batch vocab"],
    step,
    max_new_tokens: int,
    stop_ids: frozenset[int],
    pad: int,
) -> list[Generation]:
    """Greedy decoding from the prefill's last-position `logits`; `step(next_tokens [batch])`
    runs one cached forward on them and returns the next last-position logits. A row that
    has stopped is fed `pad` until every row stops."""
    device = logits.device
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
    stopped = torch.zeros_like(done)
    stop = torch.tensor(sorted(stop_ids), device=device, dtype=torch.long)
    new_tokens = []
    for i in range(max_new_tokens):
        nxt = logits.argmax(-1)
        hit = torch.isin(nxt, stop) & ~done
        stopped |= hit
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        new_tokens.append(torch.where(hit, torch.full_like(nxt, -1), nxt))
        done |= hit
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = step(nxt)
    table = torch.stack(new_tokens, dim=1).tolist()
    gens = []
    for r, row in enumerate(table):
        toks = tuple(row[: row.index(-1)] if -1 in row else row)
        text = tokenizer.decode(list(toks), skip_special_tokens=True).strip()
        gens.append(Generation(toks, text, bool(stopped[r])))
    return gens


# ---------------------------------------------------------------- answer metrics

#: The headline "correct" per task: NIAH uses Wu et al.'s ROUGE-1 recall > 0.5 gate; the QA tasks
#: use substring match; the citation task, `tasks.citation.citation_correct` against its
#: `insights` (every insight covered, citation precision and recall each ≥ 0.5).
def is_correct(
    task: str, prediction: str, answers: Sequence[str], *, insights: Sequence | None = None
) -> bool:
    if task == "niah":
        return rouge1_recall(prediction, answers) > 0.5
    if task == "citation":
        from mechinterp.tasks.citation import citation_correct, citation_scores

        return citation_correct(citation_scores(prediction, insights or ()))
    return substring_match(prediction, answers) == 1.0


# ---------------------------------------------------------------- teacher-forced scoring


@torch.no_grad()
def answer_logprobs(
    model, prompt_ids: Sequence[int], answer_ids: Sequence[int]
) -> Float[Tensor, "pos"]:  # noqa: F821
    """Log-probability of each answer token given the prompt and the answer tokens before it."""
    if not answer_ids:
        raise InputError("answer_ids is empty")
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)], device=model.cfg.device)
    logits = model(ids)[0, len(prompt_ids) - 1 : -1].float()
    logp = logits.log_softmax(-1)
    return logp.gather(-1, torch.tensor(list(answer_ids), device=logp.device)[:, None])[:, 0]


def answer_ids(model, answer: str) -> list[int]:
    """The answer's tokens as the model would write them at the start of its reply."""
    ids = model.tokenizer.encode(answer.strip(), add_special_tokens=False)
    if not ids:
        raise InputError(f"answer {answer!r} has no tokens")
    return ids


def logit_diff(
    logits: Float[Tensor, "... vocab"], correct: int, wrong: int
) -> Float[Tensor, "..."]:
    """logit[correct] − logit[wrong] (at whatever positions `logits` holds)."""
    return logits[..., correct] - logits[..., wrong]


# ---------------------------------------------------------------- a task on a model


def render_all(
    model, examples: Sequence[Example], *, template: Template | None = None
) -> list[Prompt]:
    n_ctx = int(model.cfg.n_ctx)
    return [render(ex, model.tokenizer, template=template, max_tokens=n_ctx) for ex in examples]


def evaluate(
    model,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    template: Template | None = None,
    score: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Generate an answer for every example; one row per example with its metrics. With `score`,
    also `answer_logprob`: the mean teacher-forced log-prob of the first gold answer's tokens
    after the prompt (a continuous metric for small samples)."""
    prompts = render_all(model, examples, template=template)
    t0 = time.perf_counter()
    gens = generate(
        model,
        [p.input_ids for p in prompts],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    rows = [example_row(ex, p, g) for ex, p, g in zip(examples, prompts, gens, strict=True)]
    df = pd.DataFrame(rows)
    if score:
        df["answer_logprob"] = [
            float(answer_logprobs(model, p.input_ids, answer_ids(model, ex.answers[0])).mean())
            for p, ex in zip(prompts, examples, strict=True)
        ]
    df.attrs["generate_seconds"] = seconds
    return df


def example_row(ex: Example, prompt: Prompt, gen: Generation) -> dict:
    """One tidy row of `evaluate`'s table: where the example sits, what the model wrote, and
    every answer metric."""
    needle = prompt.spans["needle"][0] if prompt.spans.get("needle") else (None, None)
    return {
        "example_id": ex.id,
        "task": ex.task,
        "variant": ex.variant,
        **_grid_coordinates(ex),
        "n_tokens": prompt.n_tokens,
        "needle_start": needle[0],
        "needle_end": needle[1],
        "answer": ex.answers[0],
        "prediction": gen.text,
        "n_generated": len(gen.tokens),
        "stopped": gen.stopped,
        "em": em(gen.text, ex.answers),
        "f1": token_f1(gen.text, ex.answers),
        "rouge1_recall": rouge1_recall(gen.text, ex.answers),
        "substring": substring_match(gen.text, ex.answers),
        "correct": is_correct(ex.task, gen.text, ex.answers, insights=ex.meta.get("insights")),
        **_citation_row(ex, gen.text),
    }


def _citation_row(ex: Example, prediction: str) -> dict:
    """The citation task's metrics (`citation_f1`, precision, recall, coverage)."""
    if ex.task != "citation":
        return {}
    from mechinterp.tasks.citation import citation_scores

    return citation_scores(prediction, ex.meta["insights"])


def _grid_coordinates(ex: Example) -> dict[str, float | int | None]:
    """(length, depth) of an example: NIAH's grid point; for document QA, the number of
    documents and the relative position of the first gold document."""
    if "length" in ex.meta and "depth" in ex.meta:
        return {"length": ex.meta["length"], "depth": ex.meta["depth"]}
    gold = ex.gold_indices
    n = len(ex.documents)
    depth = (gold[0] / (n - 1) if n > 1 else 0.0) if gold else None
    return {"length": n, "depth": None if depth is None else round(depth, 3)}


def copied_answers(ex: Example) -> list[str]:
    """What a response copies when it answers `ex`: its first answer, or on the citation task
    each insight (a summary is not copied whole; its insights are), in order."""
    if ex.task == "citation":
        return [ins["text"] for ins in ex.meta["insights"]]
    return [ex.answers[0]]


def locate_answer(tokenizer, ids: Sequence[int], answer: str) -> tuple[int, int] | None:
    """The token span [start, end) of generated `ids` that writes `answer` (first occurrence,
    case-insensitive), or None when the decoded text does not contain it."""
    ids = list(ids)
    ends = [len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True)) for i in range(len(ids))]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    at = text.lower().find(answer.strip().lower())
    if not answer.strip() or at < 0:
        return None
    stop = at + len(answer.strip())
    start = next(i for i, e in enumerate(ends) if e > at)
    end = next(i for i, e in enumerate(ends) if e >= stop) + 1
    return start, end
