"""Benchmark: AtP and AtP* (Kramár et al. 2024) against exact activation patching of every node
of every head (output z, query q, key k, value v) on the study's kind of patching pair, and the
false-negative diagnostic against the truth.

    .venv/bin/python benchmarks/bench_atp_star.py --pairs 3

Pairs: the study's held-out NIAH grid (`experiments/study.yaml`'s `knockout.niah`, lengths cut
to `--lengths`), stratified over lengths, depths and needles as the patch stage does
(`stages.stratified_pairs`), each built by `answer_pair` on the model's greedy response (the
study's `patch_pair` teacher-forces the same response), denoising from the knockout scope's
first position on. Examples the model does not answer are skipped. Per pair and node:

- exact: `patch_nodes` of every unit (270 query heads for z and q, 90 KV heads for k and v on
  the embedded model);
- AtP, AtP + QK fix (q and k), AtP* (QK fix for q and k, GradDrop for all): Spearman over units
  of the signed estimate against the exact effect, and of the ranking magnitude (|estimate|, or
  GradDrop's score) against |exact effect|; how many of the exact top 10 (by |effect|) fall
  outside the ranking's top 30;
- the diagnostic (`verify_screen`: AtP* top 30 verified, 20 of the rest drawn at random,
  threshold 5 % of |clean − corrupt|): units found, the 95 % bound on unverified units above the
  threshold, and the true number from the exact sweep.

Writes benchmarks/results/atp_star.json; `--markdown` prints the tables of the last run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch

OUT = Path(__file__).parent / "results" / "atp_star.json"
ROOT = Path(__file__).resolve().parent.parent
VERIFY_TOP, SAMPLE, THRESHOLD = 30, 20, 0.05


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(pd.Series(a.flatten().tolist()).corr(pd.Series(b.flatten().tolist()),
                                                      method="spearman"))  # fmt: skip


def top(values: torch.Tensor, k: int) -> set[int]:
    return set(torch.argsort(values.flatten(), descending=True)[:k].tolist())


def study_pairs(model, n: int, lengths: list[int]):
    """The first `n` answered pairs of the study's held-out grid, in the patch stage's order."""
    from mechinterp.config import load_config
    from mechinterp.evaluate import render_all
    from mechinterp.experiments.study import StudyConfig
    from mechinterp.experiments.study.stages import stratified_pairs
    from mechinterp.interventions.pairs import answer_pair
    from mechinterp.tasks.niah import niah_grid

    config = load_config(StudyConfig, ROOT / "experiments" / "study.yaml")
    k = config.knockout
    held = niah_grid(model.tokenizer, lengths=lengths, depths=k.niah.depths,
                     needles=list(k.niah.needles), haystack=k.niah.haystack,
                     seed=k.niah.seed)  # fmt: skip
    pairs = []
    for ex in stratified_pairs(held, len(held)):
        if len(pairs) == n:
            break
        (prompt,) = render_all(model, [ex], template=config.template)
        try:
            p = answer_pair(model, prompt, seed=k.niah.seed, max_tries=config.patch.max_tries,
                            scope=k.scope)  # fmt: skip
        except ValueError:  # the model does not write the needle's answer
            continue
        pairs.append((ex.id, p))
    return pairs


def bench_node(model, p, node: str) -> dict:
    from mechinterp.interventions.attribution import attribution_patch
    from mechinterp.interventions.patching import patch_nodes, verify_screen

    args = (model, p.clean, p.corrupt, p.metric)
    t0 = time.perf_counter()
    exact = patch_nodes(*args, node=node, patch_from=p.patch_from)
    row = {"node": node, "units": exact.values.numel(), "exact_s": time.perf_counter() - t0}
    e = exact.values - exact.corrupt
    top10 = top(e.abs(), 10)
    qk = node in ("q", "k")
    variants = {"atp": {}, "atp+qk": {"qk_fix": True} if qk else None,
                "atp*": {"qk_fix": qk, "grad_drop": True}}  # fmt: skip
    star = None
    for name, opts in variants.items():
        if opts is None:
            continue
        t0 = time.perf_counter()
        est = attribution_patch(*args, node=node, patch_from=p.patch_from, **opts)
        row[f"{name}_s"] = time.perf_counter() - t0
        row[f"{name}_spearman_signed"] = spearman(est.effect, e)
        row[f"{name}_spearman_magnitude"] = spearman(est.score, e.abs())
        row[f"{name}_top10_outside_top30"] = len(top10 - top(est.score, 30))
        star = est
    screened = verify_screen(*args, star, verify_top=VERIFY_TOP, sample=SAMPLE,
                             threshold=THRESHOLD, seed=0)  # fmt: skip
    fn = screened.settings["false_negatives"]
    unverified = star.ranking()[VERIFY_TOP:]
    truth = sum(abs(float(e[h])) > fn["threshold_effect"] for h in unverified)
    row.update({"fn_sampled": fn["n_sampled"], "fn_unverified": fn["n_unverified"],
                "fn_found": len(fn["found"]), "fn_max_above_95": fn["max_above"],
                "fn_true_above": int(truth), "fn_threshold_effect": fn["threshold_effect"],
                "fn_largest_unverified_effect": max(abs(float(e[h]))
                                                    for h in unverified)})  # fmt: skip
    return row


def markdown(result: dict) -> str:
    df = pd.DataFrame(result.get("rows", []))
    if df.empty:
        return "(nothing measured yet)"
    lines = ["| node | method | Spearman signed (median, min) | Spearman magnitude (median, "
             "min) | exact top-10 outside top-30 (total) |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for node, g in df.groupby("node", sort=False):
        for m in ("atp", "atp+qk", "atp*"):
            if f"{m}_spearman_signed" not in g or g[f"{m}_spearman_signed"].isna().all():
                continue
            s, mag = g[f"{m}_spearman_signed"], g[f"{m}_spearman_magnitude"]
            lines.append(f"| {node} | {m} | {s.median():.3f}, {s.min():.3f} | "
                         f"{mag.median():.3f}, {mag.min():.3f} | "
                         f"{int(g[f'{m}_top10_outside_top30'].sum())} |")  # fmt: skip
    lines += ["", "| pair | node | unverified | sampled | found | 95 % bound | true above |",
              "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in df.itertuples():
        lines.append(f"| {r.example_id} | {r.node} | {r.fn_unverified} | {r.fn_sampled} | "
                     f"{r.fn_found} | {r.fn_max_above_95} | {r.fn_true_above} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=3, help="answered pairs to measure")
    ap.add_argument("--lengths", default="256", help="NIAH lengths, comma-separated")
    ap.add_argument("--nodes", default="z,q,k,v", help="node types, comma-separated")
    ap.add_argument("--markdown", action="store_true", help="print the tables of the last run")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(OUT.read_text())))
        return
    from mechinterp.models import load_model
    from mechinterp.store import provenance, write_json

    torch.manual_seed(0)
    model = load_model("smollm2-135m", device="cpu")
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for ex_id, p in study_pairs(model, args.pairs, lengths):
        for node in args.nodes.split(","):
            row = {"example_id": ex_id, "n_tokens": len(p.clean), "flipped": p.flipped,
                   "patched_positions": len(p.clean) - p.patch_from,
                   **bench_node(model, p, node)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"rows": rows, "provenance": provenance(torch_threads=torch.get_num_threads())}
    write_json(OUT, result)
    print(markdown(result))


if __name__ == "__main__":
    main()
