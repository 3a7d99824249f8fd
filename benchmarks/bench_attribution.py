"""Benchmark: attribution patching (AtP, AtP*) against exact per-head patching on the study's own
patching pairs, and exact path patching against the naive loop, in one run.

    .venv/bin/python benchmarks/bench_attribution.py --run RUNS/study-smollm2-135m-<hash>

`--run` is a finished `mechinterp study` run (its config, held-out baseline and retrieval heads):
the pairs are exactly the ones its patch stage patched (`stages.patch_shards`, `patch_pair`),
denoising from the knockout scope's first position on. Per pair:
- exact all-heads `patch_heads`, AtP, AtP* (of a head's output: GradDrop; the QK fix is for
  queries and keys, see `bench_atp_star.py`) and screen + verify of the top 30
  (`patch_heads(..., screen="atp*", verify_top=30)`), each timed, and one plain forward of the
  clean prompt (median of 3) as the unit. Goals: AtP ≤ 4 forwards, AtP* ≤ 10; screen + verify ÷
  exact ≤ 0.3 with the same exact top-10.
- Spearman of each estimate against exact over all 270 heads (signed effect; and the ranking
  magnitude against |exact effect|; goal ≥ 0.8), and how many of the exact top-10 (by |effect|)
  fall outside the estimate's top-30 (goal 0).
- `--full-length N`: exact patching, AtP, AtP* and both screens + verify 30 with `patch_from=0`
  (every position patched, the gradient over the whole prompt) on planted pairs of N tokens,
  for the costs when nothing is shared.
- Path patching (`path_patch`) of every upstream head into the 10 best retrieval heads' queries
  ÷ the naive loop (two full forwards per sender), on the first pair, with max |difference|;
  and queries + keys in one `path_patch_inputs` call ÷ one `path_patch` call per input.
Writes benchmarks/results/attribution.json; `--markdown` prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch

from mechinterp.interventions.attribution import attribution_patch
from mechinterp.interventions.patching import patch_heads
from mechinterp.store import provenance, write_json

OUT = Path(__file__).parent / "results" / "attribution.json"


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(
        pd.Series(a.flatten().tolist()).corr(pd.Series(b.flatten().tolist()), method="spearman")
    )


def top(values: torch.Tensor, k: int) -> set[int]:
    return set(torch.argsort(values.flatten(), descending=True)[:k].tolist())


def timed(fn, repeat: int = 1):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def study_pairs(run: Path, model, n: int | None):
    from mechinterp.config import from_dict
    from mechinterp.experiments.study import StudyConfig, stages
    from mechinterp.heads import HeadShape, parse_heads
    from mechinterp.tasks.niah import niah_grid

    config = from_dict(StudyConfig, json.loads((run / "config.json").read_text()))
    k = config.knockout
    held = niah_grid(
        model.tokenizer,
        lengths=k.niah.lengths,
        depths=k.niah.depths,
        needles=list(k.niah.needles),
        haystack=k.niah.haystack,
        seed=k.niah.seed,
    )
    baseline = pd.read_parquet(run / "baseline.parquet")
    scores = pd.read_parquet(run / "detect_scores.parquet")
    shape = HeadShape.of(model)
    retrieval = parse_heads(list(scores.loc[scores["retrieval_head"], "head_name"]), shape)
    ranked = parse_heads(list(scores["head_name"]), shape)
    shards = stages.patch_shards(
        held, baseline, retrieval, shape, config.patch, k.niah.seed, k.scope, config.template
    )
    pairs = []
    for sh in shards[:n]:
        a = sh.args
        pairs.append(
            stages.patch_pair(
                model,
                a["example"],
                a["response"],
                seed=a["seed"],
                max_tries=a["max_tries"],
                scope=a["scope"],
                template=a["template"],
            )
        )
    return pairs, ranked


def forward_time(model, ids) -> float:
    x = torch.tensor([list(ids)], device=model.cfg.device)
    with torch.no_grad():
        model(x, logits_to_keep=1)
        return timed(lambda: model(x, logits_to_keep=1), repeat=3)[1]


def bench_pair(model, p) -> dict:
    fwd = forward_time(model, p.clean)
    exact, t_exact = timed(
        lambda: patch_heads(model, p.clean, p.corrupt, p.metric, patch_from=p.start, batch_size=32)
    )
    row = {
        "n_tokens": len(p.clean),
        "patched_positions": len(p.clean) - p.start,
        "forward_s": fwd,
        "exact_s": t_exact,
        "clean": exact.clean,
        "corrupt": exact.corrupt,
        **{k: p.facts[k] for k in ("example_id", "length", "depth") if k in p.facts},
    }
    e_exact = exact.values - exact.corrupt
    exact_top10 = top(e_exact.abs(), 10)
    for name, opts in {"atp": {}, "atp*": {"grad_drop": True}}.items():
        est, t = timed(
            lambda opts=opts: attribution_patch(
                model, p.clean, p.corrupt, p.metric, patch_from=p.start, **opts
            )
        )
        row[f"{name}_s"] = t
        row[f"{name}_forwards"] = t / fwd
        row[f"{name}_spearman_signed"] = spearman(est.effect, e_exact)
        row[f"{name}_spearman_magnitude"] = spearman(est.score, e_exact.abs())
        row[f"{name}_top10_outside_top30"] = len(exact_top10 - top(est.score, 30))
    screened, t_screen = timed(
        lambda: patch_heads(
            model, p.clean, p.corrupt, p.metric, patch_from=p.start, screen="atp*", verify_top=30
        )
    )
    e_screen = (screened.values - screened.corrupt).abs().nan_to_num(-1.0)
    row["screen_s"] = t_screen
    row["screen_over_exact"] = t_screen / t_exact
    row["screen_top10_identical"] = top(e_screen, 10) == exact_top10
    plain, t_plain = timed(
        lambda: patch_heads(
            model, p.clean, p.corrupt, p.metric, patch_from=p.start, screen="atp", verify_top=30
        )
    )
    row["screen_atp_over_exact"] = t_plain / t_exact
    row["screen_atp_top10_identical"] = (
        top((plain.values - plain.corrupt).abs().nan_to_num(-1.0), 10) == exact_top10
    )
    return row


def full_length(model, n_tokens: int) -> dict:
    """Every position patched (`patch_from=0`) on a planted pair of n_tokens: nothing is shared,
    so exact patching runs every head-row over the whole prompt; AtP, AtP* and both screens +
    verify 30 against it."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_patching import pair

    from mechinterp.interventions.patching import logit_diff_metric

    clean, corrupt, good, bad = pair(model.tokenizer, n_tokens, depth=0.5)
    metric = logit_diff_metric(good, bad)
    fwd = forward_time(model, clean)
    exact, t_exact = timed(lambda: patch_heads(model, clean, corrupt, metric, batch_size=32))
    e_exact = exact.values - exact.corrupt
    exact_top10 = top(e_exact.abs(), 10)
    row = {"n_tokens": len(clean), "forward_s": fwd, "exact_s": t_exact,
           "exact_forwards": t_exact / fwd}  # fmt: skip
    for name, opts in {"atp": {}, "atp*": {"grad_drop": True}}.items():
        est, t = timed(lambda opts=opts: attribution_patch(model, clean, corrupt, metric, **opts))
        row[f"{name}_forwards"] = t / fwd
        row[f"{name}_spearman_signed"] = spearman(est.effect, e_exact)
        row[f"{name}_top10_outside_top30"] = len(exact_top10 - top(est.score, 30))
        screened, t_screen = timed(
            lambda name=name: patch_heads(
                model, clean, corrupt, metric, batch_size=32, screen=name, verify_top=30
            )
        )
        row[f"screen_{name}_over_exact"] = t_screen / t_exact
        row[f"screen_{name}_top10_identical"] = (
            top((screened.values - screened.corrupt).abs().nan_to_num(-1.0), 10) == exact_top10
        )
    return row


def naive_path_patch(model, clean, corrupt, metric, senders, receivers, start: int) -> dict:
    """The naive loop: per sender, two full forwards of the corrupt prompt with hooks (pass 1
    records the receivers' queries with the sender patched and every other head frozen; pass
    2 writes them)."""
    from functools import partial

    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    z_names = [f"blocks.{la}.attn.hook_z" for la in range(n_layers)]
    store: dict = {}

    def keep(x, hook, *, key):
        store[key] = x.detach().clone()

    def run(ids, hooks):
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            return model(torch.tensor([list(ids)], device=model.cfg.device), logits_to_keep=1)

    run(clean, [(n, partial(keep, key=("c", n))) for n in z_names])
    run(corrupt, [(n, partial(keep, key=("x", n))) for n in z_names])
    layers = sorted({h.layer for h in receivers})
    points = {la: f"blocks.{la}.attn.hook_q" for la in layers}
    out = {}
    for s in senders:

        def z_hook(x, hook, *, la, s=s):
            z = store[("x", z_names[la])].clone().view(*x.shape[:2], n_heads, -1)
            if la == s.layer:
                src = store[("c", z_names[la])].view(*x.shape[:2], n_heads, -1)
                z[:, start:, s.head] = src[:, start:, s.head]
            return z.view(x.shape)

        hooks = [(z_names[la], partial(z_hook, la=la)) for la in range(s.layer, n_layers)]
        run(corrupt, hooks + [(p, partial(keep, key=("q", la))) for la, p in points.items()])

        def write(x, hook, *, la):
            x = x.clone()
            for h in receivers:
                if h.layer == la:
                    x[:, :, h.head] = store[("q", la)][:, :, h.head]
            return x

        logits = run(corrupt, [(p, partial(write, la=la)) for la, p in points.items()])
        out[s] = float(metric(logits[:, -1])[0])
    return out


def bench_paths(model, p, ranked) -> dict:
    from mechinterp.interventions.paths import path_patch, path_patch_inputs

    receivers = list(ranked[:10])
    first = min(h.layer for h in receivers)
    senders = [h for h in ranked if h.layer < max(r.layer for r in receivers)]
    fast, t_fast = timed(
        lambda: path_patch(
            model,
            p.clean,
            p.corrupt,
            p.metric,
            senders=senders,
            receivers=receivers,
            receiver_input="q",
            patch_from=p.start,
        )
    )
    naive_senders = senders[:: max(1, len(senders) // 20)]  # the loop is slow: time a sample
    slow, t_slow = timed(
        lambda: naive_path_patch(
            model, p.clean, p.corrupt, p.metric, naive_senders, receivers, p.start
        )
    )
    diff = max(abs(float(fast.values[h]) - float(slow[h])) for h in naive_senders)
    per_sender_naive = t_slow / len(naive_senders)
    # queries and keys (the study's two inputs): one pass 1 for both vs one call per input
    common = {"senders": senders, "receivers": receivers, "patch_from": p.start}
    both, t_both = timed(lambda: path_patch_inputs(
        model, p.clean, p.corrupt, p.metric, receiver_inputs=("q", "k"), **common))  # fmt: skip
    t_each = t_fast + timed(lambda: path_patch(model, p.clean, p.corrupt, p.metric,
                                               receiver_input="k", **common))[1]  # fmt: skip
    assert (both["q"].values - fast.values).nan_to_num().abs().max() < 1e-5
    return {
        "n_senders": len(senders),
        "n_receivers": len(receivers),
        "first_receiver": first,
        "path_patch_s": t_fast,
        "naive_s_estimated": per_sender_naive * len(senders),
        "ratio": t_fast / (per_sender_naive * len(senders)),
        "max_abs_diff": diff,
        "naive_senders_timed": len(naive_senders),
        "q_and_k_one_call_s": t_both,
        "q_and_k_one_call_each_s": t_each,
        "q_and_k_ratio": t_both / t_each,
    }


def markdown(result: dict) -> str:
    df = pd.DataFrame(result.get("pairs", []))
    if df.empty:
        return "(no pairs measured yet)"
    lines = [
        "| method | forwards (median) | Spearman signed | Spearman magnitude | exact top-10 "
        "outside top-30 (total) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m in ("atp", "atp*", "atp+qk", "atp+gd"):  # (the last two: results of earlier versions)
        if f"{m}_forwards" not in df:
            continue
        lines.append(
            f"| {m} | {df[f'{m}_forwards'].median():.2f} | "
            f"{df[f'{m}_spearman_signed'].median():.3f} | "
            f"{df[f'{m}_spearman_magnitude'].median():.3f} | "
            f"{int(df[f'{m}_top10_outside_top30'].sum())} |"
        )
    lines.append("")
    lines.append(
        f"screen + verify top 30 ÷ exact: median {df['screen_over_exact'].median():.2f}; "
        f"identical top-10 in {int(df['screen_top10_identical'].sum())}/{len(df)} pairs; "
        f"with plain AtP as the screen: {df['screen_atp_over_exact'].median():.2f}, identical "
        f"top-10 in {int(df['screen_atp_top10_identical'].sum())}/{len(df)}"
    )
    for r in result.get("full_length", []):
        line = (
            f"patch_from=0 at {r['n_tokens']} tokens: AtP {r['atp_forwards']:.1f} "
            f"forwards, AtP* {r['atp*_forwards']:.1f}"
        )
        if "exact_forwards" in r:  # older results timed only the estimates
            line += (
                f", exact {r['exact_forwards']:.1f}; screen + verify 30 ÷ exact: AtP "
                f"{r['screen_atp_over_exact']:.2f} (same top-10: "
                f"{r['screen_atp_top10_identical']}), AtP* {r['screen_atp*_over_exact']:.2f} "
                f"(same top-10: {r['screen_atp*_top10_identical']})"
            )
        lines.append(line)
    if result.get("paths"):
        r = result["paths"]
        lines.append(
            f"path patching of {r['n_senders']} senders into {r['n_receivers']} "
            f"receivers: {r['path_patch_s']:.1f} s vs naive {r['naive_s_estimated']:.1f} s "
            f"(ratio {r['ratio']:.3f}; max |diff| {r['max_abs_diff']:.1e})"
        )
        if "q_and_k_ratio" in r:
            lines.append(
                f"queries and keys: {r['q_and_k_one_call_s']:.1f} s in one call (one pass 1) "
                f"vs {r['q_and_k_one_call_each_s']:.1f} s in one call each "
                f"(ratio {r['q_and_k_ratio']:.2f})"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="a finished study run directory")
    ap.add_argument("--pairs", type=int, default=None, help="first N pairs only")
    ap.add_argument(
        "--full-length",
        type=int,
        action="append",
        default=[],
        help="also time AtP / AtP* with patch_from=0 at N tokens (repeatable)",
    )
    ap.add_argument(
        "--parts",
        default="pairs,full,paths",
        help="which parts to (re)measure; the others are kept from the last run",
    )
    ap.add_argument("--markdown", action="store_true", help="print the tables of the last run")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(OUT.read_text())))
        return
    from mechinterp.models import load_model
    from mechinterp.models.load import tune_allocator

    tune_allocator()
    torch.manual_seed(0)
    model = load_model("smollm2-135m", device="cpu")
    parts = set(args.parts.split(","))
    if parts & {"pairs", "paths"} and args.run is None:
        ap.error("--run RUN_DIR is needed for the pairs and paths parts (or --parts full)")
    pairs, ranked = [], []
    if parts & {"pairs", "paths"}:
        pairs, ranked = study_pairs(args.run, model, args.pairs)
    result = json.loads(OUT.read_text()) if OUT.is_file() else {}  # parts not rerun are kept
    if "pairs" in parts:
        rows = []
        for i, p in enumerate(pairs):
            rows.append(bench_pair(model, p))
            print(f"pair {i + 1}/{len(pairs)}: {rows[-1]}", flush=True)
        result["pairs"] = rows
    if "full" in parts:
        result["full_length"] = [full_length(model, n) for n in args.full_length]
        print(json.dumps(result["full_length"]), flush=True)
    if "paths" in parts:
        result["paths"] = bench_paths(model, pairs[0], ranked)
        print(json.dumps(result["paths"]), flush=True)
    # one provenance per part: parts not rerun keep theirs (older files held one for all)
    # the run directory's name (study-<model>-<config hash>), not this machine's path to it
    run_name = None if args.run is None else args.run.resolve().name
    prov = provenance(run=run_name, torch_threads=torch.get_num_threads())
    kept = result.get("provenance", {})
    if "created" in kept:
        kept = {part: kept for part in kept.get("parts", [])}
    result["provenance"] = {**kept, **{part: prov for part in sorted(parts)}}
    write_json(OUT, result)
    print(markdown(result))


if __name__ == "__main__":
    main()
