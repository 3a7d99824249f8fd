"""Benchmark: scoring a knockout sweep's conditions on one example, ours vs the TransformerLens way,
measured in one run on the same inputs.

    .venv/bin/python benchmarks/bench_knockout_sweep.py [--lengths 256,1024]

The sweep is the study's: k ∈ {1, 2, 5, 10, 20}, top-k plus 3 random draws each (20 conditions,
zero ablation) and no knockout, scored on a chat-templated NIAH instance with the model's own
response teacher-forced (the answer tokens' log-probs).
- ours: `score_conditions` — one batched forward, a row per condition (`knockout_rows`), over the
  response only (scope `response`: the prompt's KV cache is shared by every row).
- peer: TransformerLens `run_with_hooks` with a `hook_z` zero-ablation hook, one full forward
  per condition (the knockout applied at the response positions only, so both compute the same
  numbers).
Reports the speedup and the max |difference| of the answer log-probs. Writes
benchmarks/results/knockout_sweep.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from mechinterp.analysis.headsets import random_complement
from mechinterp.evaluate import generate, locate_answer, render_all
from mechinterp.heads import HeadShape, parse_heads
from mechinterp.interventions.conditions import score_conditions
from mechinterp.interventions.knockout import KnockoutSpec
from mechinterp.models import load_model
from mechinterp.store import provenance, write_json
from mechinterp.tasks.niah import niah_grid

TOP_HEADS = "L17H3 L18H6 L18H7 L23H2 L17H4 L20H6 L23H7 L21H8 L24H4 L21H5 L23H1 L29H1 L22H4 L21H1"
KS = (1, 2, 5, 10, 20)


def conditions(model) -> list[tuple]:
    shape = HeadShape.of(model)
    ranked = list(parse_heads(TOP_HEADS, shape))
    ranked += [h for h in shape.all_heads() if h not in ranked]
    out = [()]
    for k in KS:
        out.append(tuple(ranked[:k]))
        out += [tuple(random_complement(ranked[:20], k, shape, seed=s)) for s in range(3)]
    return out


@torch.no_grad()
def peer(model, ids: list[int], answer: tuple[int, int], heads: tuple, start: int) -> torch.Tensor:
    """One TransformerLens forward with a zero-ablation hook at positions >= start."""
    n_heads = model.cfg.n_heads
    by_layer: dict[int, list[int]] = {}
    for h in heads:
        by_layer.setdefault(h.layer, []).append(h.head)

    def ablate(z, hook, layer):
        shaped = z.view(*z.shape[:2], n_heads, -1).clone()
        shaped[:, start:, by_layer[layer]] = 0.0
        return shaped.view(z.shape)

    hooks = [
        (f"blocks.{la}.attn.hook_z", lambda z, hook, la=la: ablate(z, hook, la)) for la in by_layer
    ]
    logits = model.run_with_hooks(torch.tensor([ids]), fwd_hooks=hooks)[0].float()
    a0, a1 = answer
    logp = logits[a0 - 1 : a1 - 1].log_softmax(-1)
    return logp.gather(-1, torch.tensor(ids[a0:a1])[:, None])[:, 0]


def bench(model, length: int) -> dict:
    (ex,) = niah_grid(model.tokenizer, lengths=[length], depths=[0.0], needles=[4], seed=1)
    (prompt,) = render_all(model, [ex])
    (gen,) = generate(model, [prompt.input_ids], max_new_tokens=32)
    span = locate_answer(model.tokenizer, gen.tokens, ex.answers[0])
    if span is None:
        raise RuntimeError(f"the model did not answer at {length} tokens: {gen.text!r}")
    n = prompt.n_tokens
    ids = list(prompt.input_ids) + list(gen.tokens[: span[1]])
    answer = (n + span[0], n + span[1])
    conds = conditions(model)
    specs = [KnockoutSpec(heads=h, mode="zero") for h in conds]
    t0 = time.perf_counter()
    ours = score_conditions(model, ids, answer, specs, shared_prefix=n - 1)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = torch.stack([peer(model, ids, answer, h, n - 1) for h in conds])
    t_peer = time.perf_counter() - t0
    return {
        "tokens": len(ids),
        "conditions": len(conds),
        "ours_s": t_ours,
        "peer_s": t_peer,
        "speedup": t_peer / t_ours,
        "max_abs_diff": float((ours.logprobs - theirs).abs().max()),
        "retrieved_top10": bool(ours.retrieved[1 + 4 * KS.index(10)]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="256,1024")
    args = ap.parse_args(argv)
    model = load_model("smollm2-135m")
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        row = bench(model, length)
        rows.append(row)
        print(
            f"{row['tokens']:>5} tokens, {row['conditions']} conditions: "
            f"ours {row['ours_s']:.1f} s, "
            f"TransformerLens {row['peer_s']:.1f} s, {row['speedup']:.1f}x, "
            f"max |diff| {row['max_abs_diff']:.1e}"
        )
    out = Path(__file__).parent / "results" / "knockout_sweep.json"
    write_json(
        out, {"knockout_sweep": rows, "provenance": provenance(threads=torch.get_num_threads())}
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
