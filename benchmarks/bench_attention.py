"""Fused attention (`load_model(attention="sdpa")`) ÷ the bridge's explicit attention, on the
embedded model: peak memory and time of one forward and of greedy generation on a NIAH instance,
each mode in its own process (peak RSS is per process). Writes benchmarks/results/attention.json.

    .venv/bin/python benchmarks/bench_attention.py [--lengths 1024,2048,4096]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ONE = """
import json, resource, sys, time, torch
from mechinterp.evaluate import evaluate
from mechinterp.models import load_model
from mechinterp.tasks.niah import niah_grid
mode, length = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(2)
model = load_model("smollm2-135m", device="cpu", attention=mode)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
(ex,) = niah_grid(model.tokenizer, lengths=[length], depths=[0.5], needles=1)
from mechinterp.evaluate import render_all
(prompt,) = render_all(model, [ex])
ids = torch.tensor([prompt.input_ids])
times = []
with torch.no_grad():
    for _ in range(2):
        t0 = time.perf_counter()
        logits = model(ids, logits_to_keep=1)
        times.append(time.perf_counter() - t0)
forward_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
row = evaluate(model, [ex], max_new_tokens=16, progress=False).iloc[0]
generate_s = time.perf_counter() - t0
print(json.dumps({"mode": mode, "length": length, "n_tokens": len(prompt.input_ids),
                  "forward_s": min(times), "generate_s": generate_s,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "forward_growth_mib": (forward_rss - base) / 1024,
                  "prediction": row["prediction"], "last_logit_0": float(logits[0, -1, 0])}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--out", default="benchmarks/results/attention.json")
    args = ap.parse_args(argv)
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        for mode in ("eager", "sdpa"):
            out = subprocess.run([sys.executable, "-c", ONE, mode, str(length)], check=True,
                                 capture_output=True, text=True).stdout  # fmt: skip
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr, flush=True)
    table = []
    for length in sorted({r["length"] for r in rows}):
        e, s = (next(r for r in rows if r["length"] == length and r["mode"] == m)
                for m in ("eager", "sdpa"))  # fmt: skip
        table.append({
            "length": length, "n_tokens": e["n_tokens"],
            "forward_time_ratio": round(s["forward_s"] / e["forward_s"], 3),
            "generate_time_ratio": round(s["generate_s"] / e["generate_s"], 3),
            "forward_memory_growth_ratio": round(
                s["forward_growth_mib"] / e["forward_growth_mib"], 3),
            "peak_rss_ratio": round(s["peak_rss_mib"] / e["peak_rss_mib"], 3),
            "same_prediction": e["prediction"] == s["prediction"],
            "last_logit_diff": abs(e["last_logit_0"] - s["last_logit_0"]),
        })  # fmt: skip
    Path(args.out).write_text(json.dumps({"runs": rows, "ratios": table}, indent=2) + "\n")
    for r in table:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
