"""The study's units of work. Each shard function takes the model and JSON-able arguments (examples
as dicts, heads as names) and returns a tidy table, so a shard runs the same in this process or on
a Ray worker. `*_shards` functions cut a stage into shards; `combine_*` turn shard tables into the
study's tables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd

from mechinterp.errors import InputError
from mechinterp.interventions.knockout import scope_start
from mechinterp.runner import Shard
from mechinterp.tasks.example import Example
from mechinterp.tasks.prompt import context_end

# ---------------------------------------------------------------- shared helpers


def _examples(dicts: Sequence[dict]) -> list[Example]:
    return [Example.from_dict(d) for d in dicts]


def _coordinates(ex: Example) -> dict:
    from mechinterp.evaluate import _grid_coordinates

    return {
        "example_id": ex.id,
        "task": ex.task,
        **_grid_coordinates(ex),
        "needle_index": ex.meta.get("needle_index"),
    }


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# ---------------------------------------------------------------- 1. detection


def detect_shard(
    model,
    *,
    examples: list[dict],
    convention: str,
    gate: float | None,
    max_new_tokens: int,
    batch_size: int,
    template: str | None,
    span: str = "needle",
) -> pd.DataFrame:
    """Wu retrieval scores of every head on some detection instances: one row per (instance,
    head) with the instance's ROUGE-1 recall and whether it passes the gate (`counted`).
    `span` names the prompt span a copied token must come from."""
    from mechinterp.detect.retrieval import retrieval_scores
    from mechinterp.evaluate import render_all

    exs = _examples(examples)
    prompts = render_all(model, exs, template=template)
    det = retrieval_scores(
        model,
        prompts,
        [e.answers for e in exs],
        convention=convention,
        gate=None,  # gate below, over the whole grid: a shard may hold no passing instance
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        span=span,
    )
    inst = det.instances.set_index("instance_id")
    per = det.per_instance_frame().drop(columns="counted")
    coords = pd.DataFrame([_coordinates(e) for e in exs]).set_index("example_id")
    per["rouge1_recall"] = per["instance_id"].map(inst["rouge1_recall"])
    per["counted"] = per["rouge1_recall"] > gate if gate is not None else True
    for col in ("length", "depth", "needle_index"):
        per[col] = per["instance_id"].map(coords[col])
    per["prediction"] = per["instance_id"].map(inst["prediction"])
    return per


def detect_shards(examples: list[Example], stage, template) -> list[Shard]:
    by_length: dict[int, list[dict]] = {}
    for ex in examples:
        by_length.setdefault(int(ex.meta["length"]), []).append(ex.to_dict())
    return [
        Shard(
            f"detect/L{length}",
            detect_shard,
            {
                "examples": exs,
                "convention": stage.convention,
                "gate": stage.gate,
                "max_new_tokens": stage.max_new_tokens,
                "batch_size": stage.batch_size,
                "template": template,
            },
        )
        for length, exs in sorted(by_length.items())
    ]


def combine_detect(
    per_instance: pd.DataFrame, threshold: float, top_k: int | None = None
) -> pd.DataFrame:
    """One row per head: mean score over the counted instances, activation frequency, rank,
    and whether it is a retrieval head (score > threshold, or rank <= top_k when given)."""
    from mechinterp.analysis.headsets import rank_order
    from mechinterp.heads import Head

    counted = per_instance[per_instance["counted"]]
    if counted.empty:
        acc = per_instance.drop_duplicates("instance_id")["counted"].mean()
        raise InputError(
            f"no detection instance passed the gate (accuracy {acc:.0%}): use shorter contexts "
            "or easier needles in detect.niah"
        )
    g = counted.groupby(["layer", "head"])["value"]
    df = pd.DataFrame(
        {"score": g.mean(), "frequency": g.apply(lambda v: float((v > 0).mean()))}
    ).reset_index()
    df.insert(
        2, "head_name", [str(Head(a, b)) for a, b in zip(df["layer"], df["head"], strict=True)]
    )
    df = df.sort_values(["layer", "head"]).reset_index(drop=True)  # layer-major, as rank_order
    df = df.iloc[rank_order(df["score"])]  # ties in a seeded random order, not layer 0 first
    df["rank"] = range(1, len(df) + 1)
    df["retrieval_head"] = df["rank"] <= top_k if top_k is not None else df["score"] > threshold
    df["n_instances"] = counted["instance_id"].nunique()
    return df.reset_index(drop=True)


# ---------------------------------------------------------------- 2a. clean answers


def baseline_shard(
    model,
    *,
    examples: list[dict],
    max_new_tokens: int,
    batch_size: int,
    target: str,
    template: str | None,
) -> pd.DataFrame:
    """Greedy answers without any intervention: one row per example with the task metrics and
    the tokens later stages teacher-force (`target_ids`): the model's own response (`target =
    "response"`; `answer_start/end` mark the answer in it, -1 if absent; on the citation task the
    first insight it copies) or the gold answer alone (`"gold"`)."""
    from mechinterp.evaluate import (
        answer_ids,
        copied_answers,
        generate,
        is_correct,
        locate_answer,
        render_all,
        token_f1,
    )

    exs = _examples(examples)
    prompts = render_all(model, exs, template=template)
    gens = generate(
        model, [p.input_ids for p in prompts], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    rows = []
    for ex, prompt, gen in zip(exs, prompts, gens, strict=True):
        if target == "gold":
            target_ids = answer_ids(model, ex.answers[0])
            span = (0, len(target_ids))
        else:
            target_ids = list(gen.tokens)
            found = (locate_answer(model.tokenizer, gen.tokens, a) for a in copied_answers(ex))
            span = next((s for s in found if s is not None), None)
        rows.append(
            {
                **_coordinates(ex),
                "n_tokens": prompt.n_tokens,
                "context_end": context_end(prompt),
                "answer": ex.answers[0],
                "prediction": gen.text,
                "target_ids": [int(t) for t in target_ids],
                "correct": is_correct(ex.task, gen.text, ex.answers,
                                      insights=ex.meta.get("insights")),
                "f1": token_f1(gen.text, ex.answers),
                "answer_start": span[0] if span else -1,
                "answer_end": span[1] if span else -1,
                "scorable": span is not None,
            }
        )
    return pd.DataFrame(rows)


def baseline_shards(examples: list[Example], stage, template) -> list[Shard]:
    out = []
    for task in dict.fromkeys(e.task for e in examples):
        group = [e.to_dict() for e in examples if e.task == task]
        for i, chunk in enumerate(_chunks(group, stage.examples_per_shard)):
            args = {
                "examples": chunk,
                "max_new_tokens": stage.max_new_tokens,
                "batch_size": stage.batch_size,
                "target": stage.target,
                "template": template,
            }
            out.append(Shard(f"baseline/{task}-{i:03d}", baseline_shard, args))
    return out


# ---------------------------------------------------------------- 2b. knockout


#: The condition name of each random baseline draw in the knockout tables.
RANDOM_CONDITION = {"layer_matched": "random", "uniform": "random_uniform"}


def knockout_conditions(
    ranked,
    shape,
    *,
    ks: Sequence[int],
    seeds: Sequence[int],
    modes: Sequence[str],
    draws: Sequence[str] = ("layer_matched",),
) -> list[dict]:
    """The sweep's conditions: no knockout, then per mode and k the top-k and, per draw and seed,
    k random heads from the complement of the top max(ks) (so a random draw never holds a head
    the ranking calls a retrieval head at any tested k). Layer-matched draws (condition `random`)
    take the top-k's per-layer counts; uniform draws (`random_uniform`) take any layer."""
    from mechinterp.analysis.headsets import draw_baseline

    pool = ranked[: max(ks)]
    out = [{"mode": "none", "k": 0, "condition": "none", "seed": -1, "heads": []}]
    for mode in modes:
        for k in sorted(set(ks)):
            out.append({"mode": mode, "k": k, "condition": "top", "seed": -1,
                        "heads": [str(h) for h in ranked[:k]]})  # fmt: skip
            for draw in draws:
                for s in seeds:
                    drawn = draw_baseline(pool, ranked[:k], shape, seed=s, draw=draw)
                    out.append({"mode": mode, "k": k, "condition": RANDOM_CONDITION[draw],
                                "seed": s, "heads": [str(h) for h in drawn]})  # fmt: skip
    return out


def _specs(conditions: list[dict]):
    """One `KnockoutSpec` per condition (no heads: no knockout)."""
    from mechinterp.heads import parse_heads
    from mechinterp.interventions.knockout import KnockoutSpec

    return [
        KnockoutSpec(heads=parse_heads(c["heads"]), mode=c["mode"] if c["heads"] else "zero")
        for c in conditions
    ]


def knockout_shard(
    model,
    *,
    examples: list[dict],
    responses: list[dict],
    conditions: list[dict],
    scope: str,
    template: str | None,
) -> pd.DataFrame:
    """Every condition on every example (one batch row per condition): the clean response is
    teacher-forced and the answer's tokens scored. One row per (example, condition)."""
    from mechinterp.evaluate import render_all
    from mechinterp.interventions.conditions import score_conditions

    exs = _examples(examples)
    prompts = render_all(model, exs, template=template)
    specs = _specs(conditions)
    rows = []
    for ex, prompt, resp in zip(exs, prompts, responses, strict=True):
        n = prompt.n_tokens
        ids = list(prompt.input_ids) + list(resp["response_ids"])
        answer = (n + resp["answer_start"], n + resp["answer_end"])
        shared = scope_start(prompt, scope)
        res = score_conditions(model, ids, answer, specs, shared_prefix=shared)
        for r, cond in enumerate(conditions):
            rows.append(
                {
                    **_coordinates(ex),
                    "mode": cond["mode"],
                    "k": cond["k"],
                    "condition": cond["condition"],
                    "seed": cond["seed"],
                    "heads": " ".join(cond["heads"]),
                    "retrieved": bool(res.retrieved[r]),
                    "answer_logprob": float(res.mean_logprob[r]),
                    "answer_top1": float(res.top1[r].float().mean()),
                }
            )
    return pd.DataFrame(rows)


def knockout_shards(
    examples: list[Example], baseline: pd.DataFrame, ranked, shape, stage, template
) -> list[Shard]:
    """One shard per (task, chunk of answered examples): every condition of every mode runs as
    one batch per example, so each prompt's prefix cache is computed once."""
    base = baseline.set_index("example_id")
    conds = knockout_conditions(
        ranked, shape, ks=stage.ks, seeds=stage.seeds, modes=stage.modes, draws=stage.draws
    )
    return answered_shards("knockout", knockout_shard, examples, base, stage.examples_per_shard,
                           conditions=conds, scope=stage.scope, template=template)  # fmt: skip


def answered_shards(stage: str, fn, examples: list[Example], base: pd.DataFrame, size: int,
                    **args) -> list[Shard]:  # fmt: skip
    """One shard per (task, chunk) of the examples whose clean response holds the answer, with
    each example's clean response to teacher-force, and `args`."""
    out = []
    for task in dict.fromkeys(e.task for e in examples):
        group = [e for e in examples if e.task == task and bool(base.loc[e.id, "scorable"])]
        for i, chunk in enumerate(_chunks(group, size)):
            out.append(Shard(f"{stage}/{task}-{i:03d}", fn, {
                "examples": [e.to_dict() for e in chunk],
                "responses": [_response(base, e.id) for e in chunk], **args}))  # fmt: skip
    return out


# ---------------------------------------------------------------- 2c. robustness


def robustness_shard(
    model,
    *,
    examples: list[dict],
    responses: list[dict],
    conditions: list[dict],
    scopes: list[str],
    generate_scope: str | None,
    max_new_tokens: int,
    template: str | None,
) -> pd.DataFrame:
    """The claim's conditions under other scopes (teacher-forced, as `knockout_shard`) and by
    free greedy generation under `generate_scope` (None: none). One row per (example, method,
    scope, condition); `retrieved` is, for generation, whether the answer occurs in what was
    generated (normalised substring: NIAH's ROUGE-1 gate would pass "held on the 22nd of
    October" for "the first Sunday of October")."""
    from mechinterp.evaluate import render_all, substring_match
    from mechinterp.interventions.conditions import generate_conditions, score_conditions

    exs = _examples(examples)
    prompts = render_all(model, exs, template=template)
    specs = _specs(conditions)
    rows = []

    def add(ex, method, scope, cond, retrieved, extra):
        rows.append({**_coordinates(ex), "method": method, "scope": scope, "mode": cond["mode"],
                     "k": cond["k"], "condition": cond["condition"], "seed": cond["seed"],
                     "heads": " ".join(cond["heads"]), "retrieved": bool(retrieved),
                     **extra})  # fmt: skip

    for ex, prompt, resp in zip(exs, prompts, responses, strict=True):
        n = prompt.n_tokens
        ids = list(prompt.input_ids) + list(resp["response_ids"])
        answer = (n + resp["answer_start"], n + resp["answer_end"])
        for scope in scopes:
            res = score_conditions(
                model, ids, answer, specs, shared_prefix=scope_start(prompt, scope)
            )
            for r, cond in enumerate(conditions):
                add(ex, "teacher-forced", scope, cond, res.retrieved[r],
                    {"answer_logprob": float(res.mean_logprob[r]), "prediction": None})  # fmt: skip
        if generate_scope is not None:
            gens = generate_conditions(model, prompt.input_ids, specs,
                                       shared_prefix=scope_start(prompt, generate_scope),
                                       max_new_tokens=max_new_tokens)  # fmt: skip
            for gen, cond in zip(gens, conditions, strict=True):
                ok = substring_match(gen.text, ex.answers) == 1.0
                add(ex, "generation", generate_scope, cond, ok,
                    {"answer_logprob": float("nan"), "prediction": gen.text})  # fmt: skip
    return pd.DataFrame(rows)


def robustness_shards(
    examples: list[Example], baseline: pd.DataFrame, ranked, shape, config
) -> list[Shard]:
    """Shards of step 2c: the knockout stage's answered examples, its conditions at the claim's
    k in the robustness modes and seeds (no knockout, top-k, each draw), every scope but the
    knockout stage's own (its rows are step 2's) and free generation under the knockout stage's
    scope."""
    knockout, stage, k = config.knockout, config.robustness, config.claims.k
    base = baseline.set_index("example_id")
    conds = [
        c for c in knockout_conditions(ranked, shape, ks=knockout.ks,
                                       seeds=config.robustness_seeds,
                                       modes=config.robustness_modes, draws=knockout.draws)
        if c["condition"] == "none" or c["k"] == k
    ]  # fmt: skip
    scopes = [sc for sc in stage.scopes if sc != knockout.scope]
    if not scopes and not stage.generate:
        return []
    return answered_shards(
        "robustness", robustness_shard, examples, base, stage.examples_per_shard,
        conditions=conds, scopes=scopes, max_new_tokens=knockout.max_new_tokens,
        generate_scope=knockout.scope if stage.generate else None, template=config.template,
    )  # fmt: skip


def _response(base: pd.DataFrame, example_id: str) -> dict:
    """The clean response a later stage teacher-forces, and where the answer lies in it."""
    return {
        "response_ids": [int(t) for t in base.loc[example_id, "target_ids"]],
        "answer_start": int(base.loc[example_id, "answer_start"]),
        "answer_end": int(base.loc[example_id, "answer_end"]),
    }


# ---------------------------------------------------------------- 3. patching


@dataclass(frozen=True)
class PatchPair:
    """One clean / corrupt pair of the patching stages: token ids, the metric, the first
    patched position (the knockout scope's), and the facts every row of the pair carries."""

    clean: list[int]
    corrupt: list[int]
    metric: Callable
    start: int
    facts: dict


def patch_pair(model, example: dict, response: dict, *, seed: int, max_tries: int, scope: str,
               template: str | None) -> PatchPair:  # fmt: skip
    """The pair `patch_shard` patches (and the attribution and path stages reuse):
    `interventions.pairs.answer_pair` on the stored clean response, with the example's
    coordinates and the corruption's facts that every row of the pair carries."""
    from mechinterp.evaluate import render_all
    from mechinterp.interventions.pairs import answer_pair

    (ex,) = _examples([example])
    (prompt,) = render_all(model, [ex], template=template)
    resp = (response["response_ids"], response["answer_start"], response["answer_end"])
    p = answer_pair(model, prompt, response=resp, seed=seed, max_tries=max_tries, scope=scope)
    facts = {**_coordinates(ex), "corrupted_position": p.corrupted_position,
             "answer_offset": p.answer_offset, "offsets_tried": p.offsets_tried,
             "target_token": p.target_token, "corrupt_token": p.corrupt_token,
             "patch_from": p.patch_from}  # fmt: skip
    return PatchPair(list(p.clean), list(p.corrupt), p.metric, p.patch_from, facts)


def patch_shard(
    model,
    *,
    example: dict,
    response: dict,
    retrieval: list[str],
    sets: dict[str, list[str]],
    batch_size: int,
    seed: int,
    max_tries: int,
    scope: str,
    template: str | None,
) -> pd.DataFrame:
    """Denoising patching on one clean/corrupt pair. An answer token in the needle is replaced
    (`corrupt_answer`; the first of up to `max_tries` tokens whose replacement flips the answer)
    and the clean response is teacher-forced up to where it writes that token; the metric is
    logit(clean token) − logit(corrupt token) there. Rows: one per head (`kind = head`, patched
    alone) and one per head set (`kind = set`, patched jointly)."""
    from mechinterp.heads import HeadShape, parse_heads
    from mechinterp.interventions.patching import patch_heads

    pair = patch_pair(model, example, response, seed=seed, max_tries=max_tries, scope=scope,
                      template=template)  # fmt: skip
    res = patch_heads(model, pair.clean, pair.corrupt, pair.metric, patch_from=pair.start,
                      sets=sets, batch_size=batch_size)  # fmt: skip
    joint = res.sets
    shape = HeadShape.of(model)
    chosen = set(parse_heads(retrieval, shape))
    base = {**pair.facts, "clean_metric": res.clean, "corrupt_metric": res.corrupt}
    rows = []
    for h in shape.all_heads():
        rows.append({**base, "kind": "head", "name": str(h), "layer": h.layer, "head": h.head,
                     "in_set": h in chosen, "n_heads": 1,
                     "value": float(res.values[h.layer, h.head])})  # fmt: skip
    for name, heads in sets.items():
        rows.append({**base, "kind": "set", "name": name, "layer": -1, "head": -1,
                     "in_set": name == "retrieval", "n_heads": len(heads),
                     "value": joint[name]})  # fmt: skip
    df = pd.DataFrame(rows)
    gap = res.clean - res.corrupt
    df["recovery"] = (df["value"] - res.corrupt) / gap if gap != 0 else float("nan")
    df["flipped"] = res.clean > 0 > res.corrupt
    return df


def stratified_pairs(examples: list[Example], n: int) -> list[Example]:
    """n examples spread over the (length, depth) cells and the needles: cells are visited in a
    Latin-square order (round r takes, for the i-th length, the (i + r)-th depth), one example
    per cell per pass, so that a few pairs already cover every length and every depth; within a
    cell the example whose needle has been picked least so far (then the lower needle index), so
    the pairs also spread over needles (the intervals resample needles)."""
    lengths = sorted({e.meta["length"] for e in examples})
    depths = sorted({e.meta["depth"] for e in examples})
    cells: dict[tuple, list[Example]] = {}
    for e in sorted(examples, key=lambda e: e.meta["needle_index"]):
        cells.setdefault((e.meta["length"], e.meta["depth"]), []).append(e)

    def visit(cell: tuple) -> tuple[int, int]:
        i, j = lengths.index(cell[0]), depths.index(cell[1])
        return ((j - i) % len(depths), i)

    order = sorted(cells, key=visit)
    used: dict[int, int] = {}
    out: list[Example] = []
    while len(out) < n and any(cells.values()):
        for cell in order:
            if cells[cell] and len(out) < n:
                pick = min(cells[cell], key=lambda e: used.get(e.meta["needle_index"], 0))
                cells[cell].remove(pick)
                used[pick.meta["needle_index"]] = used.get(pick.meta["needle_index"], 0) + 1
                out.append(pick)
    return out


def patch_shards(
    examples: list[Example], baseline: pd.DataFrame, retrieval, shape, stage, seed, scope, template
) -> list[Shard]:
    """One shard per pair: `n_pairs` NIAH examples the model answered, stratified over the
    (length, depth) grid (`stratified_pairs`), not the shortest corner of it."""
    from mechinterp.analysis.headsets import draw_baseline

    base = baseline.set_index("example_id")
    answered = [e for e in examples if e.task == "niah" and bool(base.loc[e.id, "scorable"])]
    answered = stratified_pairs(answered, stage.n_pairs)
    names = [str(h) for h in retrieval]
    sets = {"all": [str(h) for h in shape.all_heads()]}
    if retrieval:
        sets["retrieval"] = names
        for s in stage.seeds:
            drawn = draw_baseline(retrieval, retrieval, shape, seed=s, draw="layer_matched")
            sets[f"random-s{s}"] = [str(h) for h in drawn]
    out = []
    for e in answered:
        args = {
            "example": e.to_dict(),
            "response": _response(base, e.id),
            "retrieval": names,
            "sets": sets,
            "batch_size": stage.batch_size,
            "seed": seed,
            "max_tries": stage.max_tries,
            "scope": scope,
            "template": template,
        }
        out.append(Shard(f"patch/{e.id}", patch_shard, args))
    return out


# ---------------------------------------------------------------- 4. screen and paths


def attribution_shard(model, *, example: dict, response: dict, retrieval: list[str],
                      seed: int, max_tries: int, scope: str,
                      template: str | None) -> pd.DataFrame:  # fmt: skip
    """AtP and AtP* of every head's output on one sufficiency pair (the patch stage's own pair,
    `patch_pair`): per head the estimated metric after patching it alone, its estimated
    recovery and AtP*'s ranking score. A head's output is neither a query nor a key, so AtP*
    here is GradDrop (its estimate is AtP's; its score ranks by the mean magnitude over the
    layer drops). The exact values are the patch stage's rows for the same pair; the report
    sets the two side by side."""
    from mechinterp.heads import HeadShape, parse_heads
    from mechinterp.interventions.attribution import attribution_patch

    pair = patch_pair(model, example, response, seed=seed, max_tries=max_tries, scope=scope,
                      template=template)  # fmt: skip
    star = attribution_patch(model, pair.clean, pair.corrupt, pair.metric, patch_from=pair.start,
                             grad_drop=True)  # fmt: skip
    shape = HeadShape.of(model)
    chosen = set(parse_heads(retrieval, shape))
    rank = {h: i for i, h in enumerate(star.ranking())}
    gap = star.clean - star.corrupt
    rows = []
    for h in shape.all_heads():
        rows.append({**pair.facts, "clean_metric": star.clean, "corrupt_metric": star.corrupt,
                     "name": str(h), "layer": h.layer, "head": h.head, "in_set": h in chosen,
                     "atp": float(star.atp[h]), "atp_star": float(star.values[h]),
                     "atp_star_score": float(star.score[h]), "atp_star_rank": rank[h],
                     "atp_recovery": (float(star.atp[h]) - star.corrupt) / gap if gap else
                     float("nan"),
                     "atp_star_recovery": (float(star.values[h]) - star.corrupt) / gap if gap
                     else float("nan"),
                     "flipped": star.clean > 0 > star.corrupt})  # fmt: skip
    return pd.DataFrame(rows)


def path_shard(model, *, example: dict, response: dict, receivers: list[str],
               inputs: list[str], via_mlps: bool, batch_size: int, seed: int, max_tries: int,
               scope: str, template: str | None) -> pd.DataFrame:  # fmt: skip
    """Path patching on one sufficiency pair: every head below the last receiver, alone and
    all together (`upstream`), into the receivers' `inputs` (q, k, ...). Rows: one per (input,
    sender) (`kind = sender`) and one per input for the joint set (`kind = set`); with q and k,
    also the joint set into the queries and the keys of the same query heads (`kind =
    same_heads`, per comparison of `attribution.SAME_HEADS`: under GQA the receivers' keys are
    their whole KV groups')."""
    from mechinterp.experiments.attribution import path_table

    pair = patch_pair(model, example, response, seed=seed, max_tries=max_tries, scope=scope,
                      template=template)  # fmt: skip
    return path_table(model, pair.clean, pair.corrupt, pair.metric, receivers, inputs,
                      via_mlps=via_mlps, batch_size=batch_size, facts=pair.facts,
                      patch_from=pair.start, name="name",
                      same_heads={"q", "k"} <= set(inputs))  # fmt: skip


def _pair_args(examples, baseline, retrieval, shape, config, scope: str) -> list[tuple]:
    """(shard suffix, the pair's arguments) of the patch stage's pairs, reused by later stages."""
    patch = patch_shards(examples, baseline, retrieval, shape, config.patch,
                         config.knockout.niah.seed, scope, config.template)  # fmt: skip
    keys = ("example", "response", "seed", "max_tries", "scope", "template")
    return [(sh.name.removeprefix("patch/"), {k: sh.args[k] for k in keys}) for sh in patch]


def attribution_shards(examples: list[Example], baseline: pd.DataFrame, retrieval, shape,
                       config, scope: str) -> list[Shard]:  # fmt: skip
    """One AtP / AtP* shard per patch-stage pair (none unless `attribution.enabled`)."""
    if not config.attribution.enabled:
        return []
    names = [str(h) for h in retrieval]
    pairs = _pair_args(examples, baseline, retrieval, shape, config, scope)
    return [Shard(f"attribution/{name}", attribution_shard, {**args, "retrieval": names})
            for name, args in pairs]  # fmt: skip


def path_receivers(retrieval, ranked, n: int) -> list[str]:
    """The path stage's receivers: the `n` best-scoring retrieval heads, if any lies above
    layer 0 (there must be heads below a receiver to send to it)."""
    chosen = set(retrieval)
    best = [h for h in ranked if h in chosen][:n]
    return [str(h) for h in best] if any(h.layer > 0 for h in best) else []


def path_shards(examples: list[Example], baseline: pd.DataFrame, retrieval, ranked, shape,
                config, scope: str) -> list[Shard]:  # fmt: skip
    """One path-patching shard per patch-stage pair: every upstream head into the best
    `paths.receivers` retrieval heads' `paths.inputs` (none without receivers or inputs)."""
    receivers = path_receivers(retrieval, ranked, config.paths.receivers)
    if not receivers or not config.paths.inputs:
        return []
    extra = {"receivers": receivers, "inputs": list(config.paths.inputs),
             "via_mlps": config.paths.via_mlps, "batch_size": config.patch.batch_size,
             "scope": config.paths.scope or scope}  # fmt: skip
    pairs = _pair_args(examples, baseline, retrieval, shape, config, scope)
    return [Shard(f"paths/{name}", path_shard, {**args, **extra}) for name, args in pairs]


# ---------------------------------------------------------------- 5. addressing


def address_shard(model, *, kind: str, clean: dict, corrupt: dict, key: str, substitute: str,
                  receivers: list[str], patterns: list[dict], size: int, draws: int, at: str,
                  via_mlps: bool, batch_size: int, max_new_tokens: int,
                  template: str | None) -> pd.DataFrame:  # fmt: skip
    """One address pair: its greedy answers (`kind = pair`: answered apart or not), and when the
    model answers its two prompts apart, `experiments.addressing.address_table`'s rows (where
    the receivers look, their own queries and keys patched back, and every upstream head and
    sender set path-patched into their queries and keys)."""
    from mechinterp.experiments.addressing import address_prompts, address_table
    from mechinterp.heads import HeadShape, parse_heads
    from mechinterp.tasks.address import AddressPair, answered_apart

    pair = AddressPair(kind, Example.from_dict(clean), Example.from_dict(corrupt), key=key,
                       substitute=substitute)  # fmt: skip
    (ans,) = answered_apart(model, [pair], max_new_tokens=max_new_tokens, template=template)
    answers = {k: ans[k] for k in ("clean_answer", "corrupt_answer", "clean_correct",
                                   "corrupt_correct", "apart")}  # fmt: skip
    if not ans["apart"]:
        _, _, facts = address_prompts(model, pair, at="prompt_end", template=template)
        return pd.DataFrame([{**facts, "kind": "pair", **answers}])
    c, x, facts = address_prompts(model, pair, at=at, template=template,
                                  responses=(ans["clean_response"], ans["corrupt_response"]))
    heads = parse_heads(receivers, HeadShape.of(model))
    table = address_table(model, c, x, heads, patterns=pd.DataFrame(patterns), facts=facts,
                          size=size, draws=draws, via_mlps=via_mlps,
                          batch_size=batch_size)  # fmt: skip
    return pd.concat([pd.DataFrame([{**facts, "kind": "pair", **answers}]), table],
                     ignore_index=True)


def address_shards(config, tokenizer, retrieval, ranked, patterns: pd.DataFrame) -> list[Shard]:
    """One shard per address pair of each of `addressing.kinds` (none when empty, or when no
    retrieval head lies above layer 0)."""
    from mechinterp.tasks.address import address_pairs, partner

    a = config.addressing
    receivers = path_receivers(retrieval, ranked, a.receivers)
    if not a.kinds or not receivers:
        return []
    extra = {"receivers": receivers, "patterns": patterns.to_dict("records"), "size": a.size,
             "draws": a.draws, "at": a.at, "via_mlps": a.via_mlps,
             "batch_size": config.patch.batch_size, "max_new_tokens": a.max_new_tokens,
             "template": config.template}  # fmt: skip
    shards = []
    for kind in a.kinds:
        needles = [i for i in a.niah.needles
                   if kind != "question_swap" or partner(i, tokenizer) is not None]  # fmt: skip
        pairs = address_pairs(kind, tokenizer, lengths=a.niah.lengths, depths=a.niah.depths,
                              needles=needles, haystack=a.niah.haystack, seed=a.niah.seed,
                              template=config.template) if needles else []  # fmt: skip
        shards += [Shard(f"addressing/{p.clean.id}", address_shard,
                         {"kind": kind, "clean": p.clean.to_dict(),
                          "corrupt": p.corrupt.to_dict(), "key": p.key,
                          "substitute": p.substitute, **extra}) for p in pairs]  # fmt: skip
    return shards


def pattern_shard(model, *, seq_len: int = 50, n_sequences: int = 8) -> pd.DataFrame:
    """Previous-token, duplicate-token and induction scores of every head on repeated random
    tokens (`detect.patterns`), to say what kind of head the path stage's top senders are."""
    from mechinterp.detect.patterns import PATTERN_KINDS, pattern_scores
    from mechinterp.heads import HeadShape

    shape = HeadShape.of(model)
    scores = {k: pattern_scores(model, k, seq_len=seq_len, n_sequences=n_sequences).scores
              for k in PATTERN_KINDS}  # fmt: skip
    return pd.DataFrame([{"name": str(h), "layer": h.layer, "head": h.head,
                          **{k: float(v[h.layer, h.head]) for k, v in scores.items()}}
                         for h in shape.all_heads()])  # fmt: skip
