"""Where retrieval heads look, and which upstream heads tell them: one address pair at a time.

An address pair (`mechinterp.tasks.address`) moves the needle a retrieval head should read (a
question swap) or takes its address away (a key swap) while the needle's answer stays. For one
pair and a set of receivers (the best retrieval heads) `address_table` measures:

- `kind = mass`: each receiver's attention mass from the prompt's last position on each needle,
  clean, corrupt, and with its own query (`node = q`) or keys (`node = k`) patched back from the
  clean prompt (`analysis.looking.mass_restored`);
- `kind = sender`: exact path patching of every head below the last receiver, alone, into the
  receivers' queries and keys, with the metric the receivers' mean mass on the clean prompt's
  needle (minus the mass on the corrupt question's needle for a question swap:
  `analysis.looking.MassMetric`): how much of the move each upstream head steers;
- `kind = set`: the same for sender sets patched together: every upstream head (`upstream`),
  each hypothesis set (`previous_token`: the heads with the highest previous-token scores,
  which could build the keys at the needle, K-composition; `question_readers`: the heads that
  attend most to the question from the last position, which could build the queries,
  Q-composition) and, per hypothesis, layer-matched random sets of the same size
  (`<hypothesis>~random<i>`) to compare it with.

`recovery` = (value − corrupt) / (clean − corrupt) throughout. The claims and the report are
built from these rows over many pairs (`mechinterp.experiments.study`).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from mechinterp.errors import InputError
from mechinterp.heads import Head, HeadShape

#: The hypotheses tested against layer-matched random senders, and the input each one names.
HYPOTHESES: dict[str, str] = {"previous_token": "k", "question_readers": "q"}


def hypothesis_sets(model, clean, receivers: Sequence[Head], patterns: pd.DataFrame, *,
                    size: int) -> dict[str, list[Head]]:  # fmt: skip
    """{hypothesis: its `size` heads} among the heads below the last receiver, not receivers:
    the highest `previous_token` scores of `patterns` (`detect.patterns`, one row per head),
    and the heads paying the most attention from `clean`'s last position to its question."""
    from mechinterp.analysis.looking import needle_mass

    shape = HeadShape.of(model)
    last = max(h.layer for h in receivers)
    pool = [h for h in shape.all_heads() if h.layer < last and h not in set(receivers)]
    if len(pool) < size:
        raise InputError(f"{len(pool)} heads lie below the receivers, fewer than the hypothesis "
                         f"sets' size {size}")  # fmt: skip
    prev = {(int(r.layer), int(r.head)): float(r.previous_token) for r in patterns.itertuples()}
    by_prev = sorted(pool, key=lambda h: (-prev[(h.layer, h.head)], h))
    reads = needle_mass(model, [clean], pool, span="question").groupby("head_name")["mass"].sum()
    by_question = sorted(pool, key=lambda h: (-float(reads[str(h)]), h))
    return {"previous_token": sorted(by_prev[:size]),
            "question_readers": sorted(by_question[:size])}  # fmt: skip


def random_sets(hypotheses: dict[str, list[Head]], receivers: Sequence[Head], shape: HeadShape,
                *, draws: int, seed: int) -> dict[str, list[Head]]:  # fmt: skip
    """Per hypothesis, `draws` layer-matched sets outside it and the receivers, seeded."""
    from mechinterp.analysis.headsets import random_complement

    last = max(h.layer for h in receivers)
    above = [h for h in shape.all_heads() if h.layer >= last]  # no path from there
    out = {}
    for name, heads in hypotheses.items():
        excluded = [*heads, *receivers, *above]
        for i in range(draws):
            drawn = random_complement(excluded, len(heads), shape, seed=seed + i,
                                      match_layers=heads)  # fmt: skip
            out[f"{name}~random{i}"] = list(drawn)
    return out


#: Where the heads are read: `divergence`, the first response token where the model's clean
#: and corrupt greedy answers differ (their common start teacher-forced on both prompts), or
#: `prompt_end`, the prompt's last position (where the response's first token is predicted).
POSITIONS: tuple[str, ...] = ("divergence", "prompt_end")


def address_prompts(model, pair, *, at: str = "divergence", template=None,
                    responses: tuple[Sequence[int], Sequence[int]] | None = None,
                    max_new_tokens: int = 24) -> tuple:  # fmt: skip
    """The pair's rendered prompts, read at `at` (`POSITIONS`): at `divergence` the common start
    of the clean and corrupt responses is appended to both prompts, so that the last position
    is the first one where the two answers part. `responses`: the two answers' token ids
    (`answered_apart`'s `clean_response`, `corrupt_response`); by default both are generated
    greedily. Returns (clean, corrupt, facts)."""
    from dataclasses import replace

    from mechinterp.evaluate import generate

    if at not in POSITIONS:
        raise InputError(f"at must be one of {POSITIONS}, got {at!r}")
    clean, corrupt = pair.prompts(model.tokenizer, template=template,
                                  max_tokens=int(model.cfg.n_ctx))  # fmt: skip
    first = next(i for i, (a, b) in enumerate(zip(clean.input_ids, corrupt.input_ids, strict=True))
                 if a != b)  # fmt: skip
    facts = {"example_id": pair.clean.id, "corruption": pair.kind, "at": at,
             "needle_index": pair.clean.meta["needle_index"],
             "partner_index": pair.clean.meta.get("partner_index", -1),
             "length": pair.clean.meta.get("length"), "depth": pair.clean.meta.get("depth"),
             "key": pair.key, "substitute": pair.substitute, "first_changed": first,
             "lead_tokens": 0}  # fmt: skip
    if at == "divergence":
        if responses is None:
            gens = generate(model, [clean.input_ids, corrupt.input_ids],
                            max_new_tokens=max_new_tokens, batch_size=2)  # fmt: skip
            responses = (gens[0].tokens, gens[1].tokens)
        a, b = ([int(t) for t in r] for r in responses)
        lead = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if lead is None and len(a) != len(b):  # one answer stops where the other goes on
            lead = min(len(a), len(b))
        if lead is None:
            raise InputError(f"{pair.clean.id!r}: the model answers the clean and the corrupt "
                             "prompt alike, so there is no divergence to read: leave the pair "
                             "out (`answered_apart`) or read it at='prompt_end'")  # fmt: skip
        clean = replace(clean, input_ids=clean.input_ids + tuple(a[:lead]))
        corrupt = replace(corrupt, input_ids=corrupt.input_ids + tuple(a[:lead]))
        facts["lead_tokens"] = lead
    facts["n_tokens"] = clean.n_tokens
    return clean, corrupt, facts


def address_table(model, clean, corrupt, receivers: Sequence[Head], *, patterns: pd.DataFrame,
                  facts: dict, size: int = 5, draws: int = 5, seed: int = 0,
                  via_mlps: bool = True, batch_size: int = 32) -> pd.DataFrame:  # fmt: skip
    """The rows of one aligned address pair (`clean`, `corrupt`: rendered prompts whose first
    needle span is the one the clean question asks for); see the module docstring. `facts` go
    on every row."""
    from mechinterp.analysis.looking import MassMetric, mass_restored
    from mechinterp.experiments.attribution import path_table

    receivers = list(receivers)
    if not any(h.layer > 0 for h in receivers):
        raise InputError("the receivers all sit in layer 0: no head lies upstream of them")
    shape = HeadShape.of(model)
    mass = pd.concat([mass_restored(model, clean, corrupt, receivers, node=n) for n in ("q", "k")])
    mass = mass.rename(columns={"clean": "clean_mass", "corrupt": "corrupt_mass",
                                "patched": "patched_mass"})  # fmt: skip
    mass = mass.assign(kind="mass", **facts)
    hyp = hypothesis_sets(model, clean, receivers, patterns, size=size)
    sets = {**hyp, **random_sets(hyp, receivers, shape, draws=draws, seed=seed)}
    needles = clean.spans["needle"]
    minus = needles[1] if len(needles) > 1 else None  # a question swap: A against B
    metric = MassMetric(receivers, needles[0], clean.n_tokens, minus=minus)
    paths = path_table(model, clean.input_ids, corrupt.input_ids, metric,
                       [str(h) for h in receivers], ["q", "k"], via_mlps=via_mlps,
                       batch_size=batch_size, facts=facts, name="head_name",
                       sets=sets)  # fmt: skip
    paths["flipped"] = paths["clean_metric"] > paths["corrupt_metric"]  # the mass moved
    members = {name: ",".join(map(str, heads)) for name, heads in sets.items()}
    paths["members"] = paths["head_name"].map(members)
    paths["hypothesis"] = paths["head_name"].str.split("~").str[0].where(
        paths["head_name"].str.split("~").str[0].isin(HYPOTHESES))  # fmt: skip
    return pd.concat([mass, paths], ignore_index=True)
