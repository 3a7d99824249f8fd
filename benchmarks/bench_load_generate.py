"""Benchmark: warm load time of the embedded model, and generation time of `mechinterp eval`'s
generator vs plain HF `generate` on the same prompts (a ratio, measured in one run).

    .venv/bin/python benchmarks/bench_load_generate.py [--lengths 256,512,1024] [--needles 2]

Both sides decode greedily with the same stop tokens and max_new_tokens; HF runs on the very
model object the bridge wraps, one prompt at a time (its batched left-padded path is what ours
replaces). The token outputs are compared too: a speed number on different outputs is void.
Writes benchmarks/results/load_generate.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from mechinterp.evaluate import generate, render_all, stop_token_ids
from mechinterp.models import load_model
from mechinterp.store import provenance, write_json
from mechinterp.tasks.niah import niah_grid


def warm_load_seconds(repeats: int) -> list[float]:
    load_model()  # make sure the conversion cache exists
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        load_model()
        times.append(time.perf_counter() - t)
    return times


@torch.no_grad()
def hf_generate(model, prompts, max_new_tokens, stop):
    hf = model.original_model
    out = []
    for p in prompts:
        ids = torch.tensor([list(p)], device=model.cfg.device)
        seq = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(stop),
            pad_token_id=model.tokenizer.pad_token_id,
        )
        out.append([t for t in seq[0, len(p) :].tolist() if t not in stop])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="256,512,1024")
    ap.add_argument("--needles", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "load_generate.json"))
    args = ap.parse_args()

    loads = warm_load_seconds(3)
    print(f"warm load: median {statistics.median(loads):.2f} s over {len(loads)} loads")

    model = load_model()
    lengths = [int(x) for x in args.lengths.split(",")]
    grid = niah_grid(model.tokenizer, lengths=lengths, depths=[0.25, 0.75], needles=args.needles)
    prompts = [p.input_ids for p in render_all(model, grid)]
    stop = stop_token_ids(model)
    n = args.max_new_tokens

    ours_b1, ours_bn, theirs = [], [], []
    for _ in range(args.repeats):  # interleaved, so drift hits all sides alike
        t = time.perf_counter()
        gen1 = generate(model, prompts, max_new_tokens=n, batch_size=1)
        ours_b1.append(time.perf_counter() - t)
        t = time.perf_counter()
        genb = generate(model, prompts, max_new_tokens=n, batch_size=args.batch_size)
        ours_bn.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = hf_generate(model, prompts, n, stop)
        theirs.append(time.perf_counter() - t)
    same1 = sum(list(g.tokens) == r for g, r in zip(gen1, ref, strict=True))
    sameb = sum(list(g.tokens) == r for g, r in zip(genb, ref, strict=True))
    n_tokens = sum(len(g.tokens) for g in gen1)
    hf_s = min(theirs)
    result = {
        "warm_load_s": {"median": statistics.median(loads), "all": loads},
        "prompts": len(prompts),
        "lengths": lengths,
        "max_new_tokens": n,
        "generated_tokens": n_tokens,
        "hf_generate_s": hf_s,
        "ours_batch1_s": min(ours_b1),
        f"ours_batch{args.batch_size}_s": min(ours_bn),
        "ratio_ours_batch1_over_hf": min(ours_b1) / hf_s,
        f"ratio_ours_batch{args.batch_size}_over_hf": min(ours_bn) / hf_s,
        "identical_outputs_batch1": f"{same1}/{len(prompts)}",
        f"identical_outputs_batch{args.batch_size}": f"{sameb}/{len(prompts)}",
        "torch_threads": torch.get_num_threads(),
        "provenance": provenance(),
    }
    write_json(args.out, result)
    for k, v in result.items():
        if k != "provenance":
            print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
