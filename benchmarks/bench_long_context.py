"""Long context at the cost of plain inference: each score and intervention ÷ HF
`generate` with SDPA attention on the same NIAH instance, at 2K, 4K and 8K tokens, on the
embedded model; the explicit (eager, T × T) path beside the fused one.

    .venv/bin/python benchmarks/bench_long_context.py [--lengths 2048,4096,8000] [--jobs ...]

Every job runs in its own process (peak RSS is per process) and reports the whole process's
peak RSS, its growth (the peak minus the resident memory after loading), and the wall time of
the job alone (loading excluded). Jobs, each on one instance with 24 new tokens where it generates:
- `generate`: the HF model's own `generate` with SDPA attention (the baseline);
- `detect`: retrieval detection (Wu's score, decode rows);
- `qr`: the QR score of the instance (question rows, one prefill);
- `knockout-<mode>`: greedy generation with 10 heads knocked out at every position (`scope
  all`; edge knockout cuts the needle's keys; mean and resample references from a second
  instance of the same length);
- `patch`: per-head patching of all 270 heads (denoising) at the question positions of a planted
  clean/corrupt pair (`patch_from`: the question; 9 heads per batch).
Goals: detection ≤ 1.5× the peak memory and ≤ 1.3× the time of SDPA generation at 8K;
the growth of peak memory linear in T (fitted exponent ≤ 1.1 over 2K–8K).
Writes benchmarks/results/long_context.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# SmolLM2-135M's top-10 Wu retrieval heads, as `mechinterp detect` ranks them on a NIAH grid of
# 4 needles × {256, 512, 1024} tokens × depths {0, 0.5, 1}
TOP_HEADS = "L17H3 L18H6 L18H7 L23H2 L17H4 L20H6 L23H7 L21H8 L24H4 L23H1"
MODES = ("zero", "mean", "resample", "uniform_attention", "edge_knockout")
JOBS = ("generate", "detect", "qr", *(f"knockout-{m}" for m in MODES), "patch")
NEW_TOKENS = 24


def _rss_mib() -> float:
    """The process's peak resident memory so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_mib() -> float:
    """The process's resident memory now (MiB): the base the job's growth is measured from."""
    from mechinterp.runner import PeakMemory

    return PeakMemory.current_mib()


def _instance(tokenizer, length: int, depth: float = 0.5):
    from mechinterp.tasks.niah import niah_grid

    (example,) = niah_grid(tokenizer, lengths=[length], depths=[depth], needles=1)
    return example


def run_job(job: str, attention: str, length: int) -> dict:
    """One measurement (in this process)."""
    import torch

    torch.set_num_threads(2)
    if job == "generate":
        from mechinterp.models.load import load_hf
        from mechinterp.tasks.prompt import render

        hf, tokenizer, *_ = load_hf("smollm2-135m")
        hf.set_attn_implementation(attention)
        prompt = render(_instance(tokenizer, length), tokenizer, max_tokens=8192)
        ids = torch.tensor([prompt.input_ids])
        base = _current_mib()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)  # fmt: skip
        seconds = time.perf_counter() - t0
        text = tokenizer.decode(out[0, ids.shape[1] :])
        return _row(job, attention, length, prompt.n_tokens, base, seconds, text)

    from mechinterp.evaluate import render_all
    from mechinterp.models import load_model

    model = load_model("smollm2-135m", attention=attention)
    example = _instance(model.tokenizer, length)
    (prompt,) = render_all(model, [example])
    base = _current_mib()
    t0 = time.perf_counter()
    if job == "detect":
        from mechinterp.detect import retrieval_scores

        d = retrieval_scores(model, [prompt], [list(example.answers)], gate=None,
                             max_new_tokens=NEW_TOKENS, batch_size=1)  # fmt: skip
        text = d.instances["prediction"].iloc[0]
        extra = {"top_heads": _top(d)}
    elif job == "qr":
        from mechinterp.detect import qr_scores

        d = qr_scores(model, [prompt], target="needle", batch_size=1)
        text, extra = "", {"top_heads": _top(d)}
    elif job.startswith("knockout-"):
        text, extra = _knockout(model, job.removeprefix("knockout-"), prompt, example, length)
        t0 = extra.pop("t0")
    elif job == "patch":
        text, extra = _patch(model, length)
        t0 = extra.pop("t0")
    else:
        raise ValueError(f"unknown job {job!r}; expected one of {JOBS}")
    seconds = time.perf_counter() - t0
    return _row(job, attention, length, prompt.n_tokens, base, seconds, text, **extra)


def _top(detection, k: int = 5) -> list[str]:
    """The k best-scoring heads (the instance's own scores), to compare the two paths."""
    values = detection.per_instance[0]
    n_heads = values.shape[1]
    order = values.flatten().argsort(descending=True, stable=True)[:k].tolist()
    return [f"L{i // n_heads}H{i % n_heads}" for i in order]


def _knockout(model, mode, prompt, example, length):
    import torch

    from mechinterp.evaluate import generate_batch, render_all, stop_token_ids
    from mechinterp.heads import parse_heads
    from mechinterp.interventions import (
        KnockoutSpec,
        knockout,
        mean_reference,
        resample_reference,
    )

    heads = parse_heads(TOP_HEADS)
    reference, kw = None, {}
    if mode in ("mean", "resample"):
        (other,) = render_all(model, [_instance(model.tokenizer, length, depth=0.25)])
        seq = list(other.input_ids) + [model.tokenizer.eos_token_id] * (NEW_TOKENS + 8)
        reference = (mean_reference(model, [seq], heads) if mode == "mean"
                     else resample_reference(model, seq, heads))  # fmt: skip
    if mode == "edge_knockout":
        start, end = prompt.spans["needle"][0]
        kw["key_positions"] = tuple(range(start, end))
    spec = KnockoutSpec(heads=heads, mode=mode, scope="all", **kw)
    t0 = time.perf_counter()
    with knockout(model, spec, reference=reference), torch.no_grad():
        (gen,) = generate_batch(model, [list(prompt.input_ids)], NEW_TOKENS, stop_token_ids(model))
    return gen.text, {"t0": t0}


def _patch(model, length):
    import torch  # noqa: F401

    from mechinterp.interventions.patching import logit_diff_metric, patch_heads

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_patching import pair

    clean, corrupt, good, bad = pair(model.tokenizer, length, depth=0.5)
    question = len(clean) - len(model.tokenizer.encode(" Now answer: the secret word is"))
    t0 = time.perf_counter()
    result = patch_heads(model, clean, corrupt, logit_diff_metric(good, bad),
                         patch_from=question, batch_size=9)  # fmt: skip
    values = result.values.flatten()
    best = int(values.nan_to_num(-1e9).argmax())
    n_heads = result.values.shape[1]
    return "", {"t0": t0, "best_head": f"L{best // n_heads}H{best % n_heads}",
                "best_recovery_logit_diff": round(float(values[best]), 4)}  # fmt: skip


def _row(job, attention, length, n_tokens, base, seconds, text, **extra) -> dict:
    return {"job": job, "attention": attention, "length": length, "n_tokens": n_tokens,
            "seconds": round(seconds, 2), "peak_rss_mib": round(_rss_mib(), 1),
            "growth_mib": round(_rss_mib() - base, 1), "text": text, **extra}  # fmt: skip


def _exponent(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of log(key) on log(n_tokens)."""
    pts = [(math.log(r["n_tokens"]), math.log(max(r[key], 1.0))) for r in rows]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return round(sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts), 3)


def summarise(runs: list[dict]) -> list[dict]:
    """Per (job, attention, length): ratios to SDPA generation at that length; per (job,
    attention): the fitted exponents of peak growth and time."""
    table = []
    base = {r["length"]: r for r in runs if r["job"] == "generate" and r["attention"] == "sdpa"}
    for r in runs:
        b = base.get(r["length"])
        table.append({
            "job": r["job"], "attention": r["attention"], "length": r["length"],
            "n_tokens": r["n_tokens"], "seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"],
            "growth_mib": r["growth_mib"],
            "time_ratio": round(r["seconds"] / b["seconds"], 2) if b else None,
            "memory_ratio": round(r["peak_rss_mib"] / b["peak_rss_mib"], 2) if b else None,
        })  # fmt: skip
    for job in dict.fromkeys(r["job"] for r in runs):
        for attention in ("sdpa", "eager"):
            rows = [r for r in runs if r["job"] == job and r["attention"] == attention]
            if len(rows) > 1:
                table.append({"job": job, "attention": attention, "length": "fit",
                              "growth_exponent": _exponent(rows, "growth_mib"),
                              "peak_exponent": _exponent(rows, "peak_rss_mib"),
                              "time_exponent": _exponent(rows, "seconds")})  # fmt: skip
    return table


def markdown(runs: list[dict]) -> str:
    """The README's table: per job and path, time and peak RSS ÷ SDPA generation at each
    length, and the fitted exponent of the peak's growth over the loaded model."""
    table = summarise(runs)
    lengths = sorted({r["length"] for r in runs})
    head = ["job", "attention"] + [f"{n // 1000}K time, memory" for n in lengths] + [
        "growth exponent"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    fits = {(r["job"], r["attention"]): r for r in table if r["length"] == "fit"}
    for key in dict.fromkeys((r["job"], r["attention"]) for r in table if r["length"] != "fit"):
        cells = []
        for n in lengths:
            row = next((r for r in table if (r["job"], r["attention"], r["length"]) == (*key, n)),
                       None)  # fmt: skip
            cells.append("—" if row is None or row["time_ratio"] is None else
                         f"{row['time_ratio']:.2f}×, {row['memory_ratio']:.2f}× "
                         f"({row['peak_rss_mib'] / 1024:.2f} GB)")  # fmt: skip
        fit = fits.get(key, {}).get("growth_exponent")
        lines.append("| " + " | ".join([*key, *cells, "—" if fit is None else f"{fit:.2f}"])
                     + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="2048,4096,8000")
    ap.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated, of {JOBS}")
    ap.add_argument("--eager", default="generate,detect,qr",
                    help="jobs also measured on the explicit (eager) path")  # fmt: skip
    ap.add_argument("--eager-lengths", default="2048,4096,8000")
    ap.add_argument("--out", default="benchmarks/results/long_context.json")
    ap.add_argument("--job", nargs=3, metavar=("JOB", "ATTENTION", "LENGTH"), help="internal")
    ap.add_argument("--markdown", action="store_true", help="print the table of --out and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())["runs"]))
        return 0
    if args.job:
        job, attention, length = args.job
        print(json.dumps(run_job(job, attention, int(length))))
        return 0
    jobs = [j for j in args.jobs.split(",") if j]
    unknown = sorted(set(jobs) - set(JOBS))
    if unknown:
        ap.error(f"unknown jobs {unknown}; expected some of {JOBS}")
    eager = set(args.eager.split(",")) & set(jobs)
    eager_lengths = {int(x) for x in args.eager_lengths.split(",") if x}
    out = Path(args.out)
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    for length in [int(x) for x in args.lengths.split(",")]:
        for job in jobs:
            for attention in ("sdpa", "eager"):
                if attention == "eager" and (job not in eager or length not in eager_lengths):
                    continue
                proc = subprocess.run([sys.executable, __file__, "--job", job, attention,
                                       str(length)], capture_output=True, text=True)  # fmt: skip
                if proc.returncode:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return proc.returncode
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                runs = [r for r in runs if (r["job"], r["attention"], r["length"])
                        != (job, attention, length)] + [row]  # fmt: skip
                print(json.dumps(row), file=sys.stderr, flush=True)
                tmp = out.with_suffix(".tmp")
                tmp.write_text(json.dumps({"runs": runs, "table": summarise(runs)}, indent=2))
                tmp.replace(out)
    for r in summarise(runs):
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
