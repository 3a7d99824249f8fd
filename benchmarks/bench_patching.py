"""Benchmark: per-head activation patching and knockout on the embedded model, as ratios against
TransformerLens 4.3 measured in one run on the same inputs.

    .venv/bin/python benchmarks/bench_patching.py [--lengths 32,128] [--knockout-length 512]

- All-heads per-head patching (denoising, all positions): ours (`patch_heads`: one batched forward
  per layer, starting from the cached residual stream at that layer) vs
  `transformer_lens.patching.get_act_patch_attn_head_out_all_pos` (one full forward per head).
  Goal: ≥ 5× faster, max |difference| ≤ 1e-4.
- Knockout forward ÷ plain forward (zero mode, 10 heads; goal ≤ 1.10).

Two kinds of clean/corrupt pairs, both symmetric (one token replaced, same length):
- `planted`: plain essay text with a planted sentence ("The secret word is apple") at `depth`;
  the corrupt prompt says "lemon"; metric logit(apple) − logit(lemon) at the last position.
- `niah`: the NIAH instances `mechinterp patch` runs (chat template, the needle at `depth`),
  corrupted by `corrupt_answer` (the needle's first answer token replaced); metric
  logit(clean token) − logit(corrupt token).
Writes benchmarks/results/patching.json.
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
from transformer_lens import patching as tl_patching

from mechinterp.heads import parse_heads
from mechinterp.interventions import KnockoutSpec, knockout
from mechinterp.interventions.patching import logit_diff_metric, patch_heads
from mechinterp.models import load_model
from mechinterp.store import provenance, write_json
from mechinterp.tasks.haystack import essay_corpus

# SmolLM2-135M's top-10 Wu retrieval heads, as `mechinterp detect` ranks them on a NIAH grid of
# 4 needles × {256, 512, 1024} tokens × depths {0, 0.5, 1}
TOP_HEADS = "L17H3 L18H6 L18H7 L23H2 L17H4 L20H6 L23H7 L21H8 L24H4 L23H1"


def pair(tok, n_tokens: int, depth: float = 0.0):
    """(clean ids, corrupt ids, good token, bad token) of n_tokens, the planted sentence at
    `depth` of the essay filler."""
    good, bad = tok.encode(" apple")[-1], tok.encode(" lemon")[-1]
    needle = tok.encode(" The secret word is apple.")
    tail = tok.encode(" Now answer: the secret word is")
    n_fill = max(0, n_tokens - len(needle) - len(tail))
    fill = tok.encode(essay_corpus()[: 8 * n_fill + 64])[:n_fill]
    cut = round(depth * n_fill)
    clean = fill[:cut] + needle + fill[cut:] + tail
    if good not in needle:
        raise RuntimeError("' apple' is not one token in this tokenizer")
    corrupt = list(clean)
    corrupt[cut + needle.index(good)] = bad
    return clean, corrupt, good, bad


def niah_pair(model, n_tokens: int, depth: float):
    """A NIAH instance as `mechinterp patch` corrupts it: (clean, corrupt, good, bad)."""
    from mechinterp.evaluate import render_all
    from mechinterp.tasks.corrupt import corrupt_answer
    from mechinterp.tasks.niah import niah_grid

    (ex,) = niah_grid(model.tokenizer, lengths=[n_tokens], depths=[depth], needles=1)
    (prompt,) = render_all(model, [ex])
    c = corrupt_answer(prompt, model.tokenizer, seed=0)
    return list(c.clean), list(c.corrupt), c.clean_token, c.corrupt_token


def pairs(model, args):
    """(kind, length, depth, pair) for every benchmark input."""
    for n in _ints(args.lengths):
        for d in _floats(args.depths):
            yield "planted", n, d, pair(model.tokenizer, n, d)
    for n in _ints(args.niah_lengths):
        for d in _floats(args.niah_depths):
            yield "niah", n, d, niah_pair(model, n, d)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="32,128")
    ap.add_argument("--depths", default="0,0.5", help="where the planted word sits")
    ap.add_argument("--niah-lengths", default="256", help="NIAH instance lengths ('' for none)")
    ap.add_argument("--niah-depths", default="0,0.5,1")
    ap.add_argument("--knockout-length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "patching.json"))
    args = ap.parse_args()
    model = load_model()
    tok = model.tokenizer
    rows = []
    for kind, _n, depth, (clean, corrupt, good, bad) in pairs(model, args):
        t = time.perf_counter()
        ours = patch_heads(model, clean, corrupt, logit_diff_metric(good, bad), batch_size=9)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        _, cache = model.run_with_cache(torch.tensor([clean]))
        theirs = tl_patching.get_act_patch_attn_head_out_all_pos(
            model,
            torch.tensor([corrupt]),
            cache,
            lambda lg, g=good, b=bad: lg[0, -1, g] - lg[0, -1, b],
        )
        t_theirs = time.perf_counter() - t
        diff = float((ours.values - theirs.float()).abs().max())
        row = {
            "input": kind,
            "tokens": len(clean),
            "depth": depth,
            "first_corrupted_position": ours.settings["shared_prefix"],
            "ours_s": t_ours,
            "transformer_lens_s": t_theirs,
            "speedup": t_theirs / t_ours,
            "max_abs_diff": diff,
            "clean_logit_diff": ours.clean,
            "corrupt_logit_diff": ours.corrupt,
            "top_recovery_heads": [
                f"L{i // 9}H{i % 9}:{ours.recovery.flatten()[i]:.2f}"
                for i in ours.recovery.flatten().argsort(descending=True)[:5].tolist()
            ],
        }
        print(row)
        rows.append(row)

    clean, _, _, _ = pair(tok, args.knockout_length)
    ids = torch.tensor([clean])
    spec = KnockoutSpec(heads=parse_heads(TOP_HEADS), mode="zero")
    plain, ko = [], []
    with torch.no_grad():
        model(ids, logits_to_keep=1)  # warm-up
        for _ in range(args.repeats):
            t = time.perf_counter()
            model(ids, logits_to_keep=1)
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            with knockout(model, spec):
                model(ids, logits_to_keep=1)
            ko.append(time.perf_counter() - t)
    knock = {
        "tokens": len(clean),
        "plain_forward_s": statistics.median(plain),
        "knockout_forward_s": statistics.median(ko),
        "ratio_knockout_over_plain": statistics.median(ko) / statistics.median(plain),
    }
    print(knock)
    write_json(
        args.out,
        {
            "patching": rows,
            "knockout": knock,
            "torch_threads": torch.get_num_threads(),
            "provenance": provenance(),
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
